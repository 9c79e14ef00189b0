"""Consumers of the registry (issue 16), against a real MLflow registry (sqlite file) and real servers on
127.0.0.1: the registered pyfunc loaded where this package is not importable, ``mlflow models serve``
answering ``POST /invocations``, ``wysiwyc serve`` on Ray Serve (concurrent requests, 4xx for bad input,
the version switch after ``wysiwyc promote``, SIGTERM), classifiers in the registry, the stale-classifier
gate and ``wysiwyc lineage``.

Tiny untrained nets at 32 px on a 24-image synthetic split: what is checked is that every way in gives
what a direct :class:`~pipeline.models.predictor.Predictor` call gives, not mask quality.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _free_ports, classifier_state, cli, environ, explainer_state
from PIL import Image

from pipeline.checkpoint import save_checkpoint
from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.shards import read_manifest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.models.explain import ClassRule, mask_from_png
from pipeline.models.predictor import load_predictor

SIZE = 32
BIN = Path(sys.executable).parent
CLI = [str(BIN / "wysiwyc")]
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())

# a consumer's environment: torch, torchvision, mlflow, numpy (and what they bring); none of what only
# this package needs (absent from the site folder the script sees: `_consumer_site`), and not the package
# itself (python -S: the editable install's hook never runs)
ONLY_OURS = ("ray", "boto3", "botocore", "webdataset", "pycocotools", "typer", "matplotlib", "psutil", "tqdm")
CLEAN_LOAD = """
import sys
sys.path.append(sys.argv[1])
import importlib.util
assert importlib.util.find_spec("pipeline") is None, "the package is importable before the model is loaded"
assert importlib.util.find_spec("tqdm") is None, "a package only wysiwyc needs is installed"
import json, mlflow.pyfunc, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
images = [open(p, "rb").read() for p in sys.argv[4:]]
out = model.predict(pd.DataFrame({"image": images}), params={"classes": "topk", "top_k": 2})
listed = model.predict({"image": images[:2]})
pixels = np.load(sys.argv[3] + ".npy")
fixed = {"classes": "fixed", "fixed_classes": ["star"]}
normalised = model.predict(pd.DataFrame({"pixels": list(pixels)}), params=fixed)
import pipeline
json.dump({"records": out.to_dict(orient="records"), "listed": listed.to_dict(orient="records"),
           "pixels": normalised.to_dict(orient="records"), "code": pipeline.__file__,
           "outputs": str(model.metadata.get_output_schema())}, open(sys.argv[3], "w"))
"""


def _consumer_site(root: Path) -> str:
    """A site-packages folder without what only this package needs (links to everything else): there such a
    package is absent as it is in a consumer's environment (``importlib.util.find_spec`` gives None)."""
    site = root / "consumer-site"
    if not site.is_dir():
        site.mkdir()
        for entry in Path(SITE_PACKAGES).iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top not in ONLY_OURS and not entry.name.startswith(("__editable__", "wysiwyc")):
                (site / entry.name).symlink_to(entry)
    return str(site)


def _png(seed: int, size=(50, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A split, two classifiers (A, B) and Explainer checkpoints for each, a sqlite registry, gate files."""
    root = tmp_path_factory.mktemp("consumers")
    reader = SyntheticReader(24, seed=3, split="test", image_size=SIZE)
    ingest(reader, str(root / "data"), "test", IngestConfig(workers=1, shard_size=12), progress=False)
    data = str(root / "data" / "test")
    classes = list(reader.classes)
    checkpoints, shas = {}, {}
    for key, seed in {"clf_a": 0, "clf_b": 5}.items():
        checkpoints[key] = str(root / f"{key}.pt")
        state = classifier_state(classes, SIZE, seed, config={"data": {"train": data}}, metrics={"val_map": 0.5})
        shas[key] = save_checkpoint(state, checkpoints[key])
    for key, (clf, seed) in {"a1": ("clf_a", 1), "a2": ("clf_a", 2), "a3": ("clf_a", 3), "b1": ("clf_b", 4)}.items():
        checkpoints[key] = str(root / f"{key}.pt")
        state = explainer_state(
            classes,
            SIZE,
            checkpoints[clf],
            shas[clf],
            seed,
            metrics={"val_loss": 1.0},
            config={"data": {"train": data, "image_size": SIZE}, "loss": {}},
            explainer_init="scratch",
            black_box=True,
        )
        save_checkpoint(state, checkpoints[key])
    gate = root / "gate.yaml"
    gate.write_text(f"split: {data}\nevaluate:\n  methods: [explainer]\n  batch_size: 8\nminimum:\n  cont_iou: 0.0\n")
    lenient = root / "stale-ok.yaml"
    lenient.write_text(gate.read_text() + "allow_stale_classifier: true\n")
    images = {f"{i}.png": _png(i) for i in range(4)} | {"4.jpg": _jpeg(4)}
    for name, body in images.items():
        (root / name).write_bytes(body)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `mlflow models serve` runs uvicorn
        "WYSIWYC_RAY_TMP": str(root / "r"),
    }
    with environ({"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}):
        from mlflow.tracking import MlflowClient

        yield {
            "root": root,
            "data": data,
            "classes": classes,
            "checkpoints": checkpoints,
            "shas": shas,
            "gate": str(gate),
            "lenient": str(lenient),
            "images": images,
            "uri": uri,
            "env": env,
            "cli": cli,  # `wysiwyc ARGS` in this process, with this registry (the environment set here)
            "config": load_config(None, [f"tracking.uri={uri}", "data.loader_workers=0"]),
            "client": MlflowClient(uri, uri),
        }


@pytest.fixture(scope="module")
def registered(reg):
    """Classifier A as models:/clf/1 (the CLI) and @champion; Explainer a1 (for A) as models:/expl/1 @champion."""
    from pipeline.registry import register_checkpoint
    from pipeline.workflows.promotion import promote

    clf = json.loads(
        reg["cli"](
            "register", "--classifier", "--checkpoint", reg["checkpoints"]["clf_a"], "--name", "clf", "--json"
        ).stdout
    )
    promoted_clf = json.loads(reg["cli"]("promote", "--name", "clf", "--version", "1", "--json").stdout)
    expl = register_checkpoint(reg["checkpoints"]["a1"], "expl", reg["config"])
    promoted = promote("expl", "1", reg["config"], reg["gate"], progress=False)
    return {"clf": clf, "promoted_clf": promoted_clf, "expl": expl, "promoted": promoted}


def _reference(reg, key: str, image: bytes):
    """The direct Predictor call on one image (its own preprocessing: PIL → tensor)."""
    predictor = load_predictor(reg["checkpoints"][key])
    with Image.open(io.BytesIO(image)) as im:
        return predictor(predictor.preprocess(im).unsqueeze(0)), predictor.classes


def _assert_record_matches(record: dict, reference, classes: list[str], rule: ClassRule) -> None:
    chosen = rule.indices(reference.probs, classes)[0]
    assert record["classes"] == [classes[c] for c in chosen]
    assert np.allclose(record["probabilities"], [float(reference.probs[0, c]) for c in chosen], atol=1e-5)
    for c, text in zip(chosen, record["masks"]):
        mask = mask_from_png(text)
        assert mask.shape == (SIZE, SIZE)
        assert np.abs(mask - reference.masks[0, c].numpy()).max() <= 1 / 255 + 1e-6


def test_classifiers_register_and_an_explainer_records_the_classifier_version_it_explains(reg, registered):
    clf, expl = registered["clf"], registered["expl"]
    assert (clf["model_uri"], clf["kind"], clf["aliases"]) == ("models:/clf/1", "classifier", ["candidate"])
    assert registered["promoted_clf"]["aliases"]["champion"] == "1" and registered["promoted_clf"]["gate"] is None
    tags = reg["client"].get_model_version("clf", "1").tags
    assert tags["wysiwyc.classifier_sha256"] == reg["shas"]["clf_a"] and tags["wysiwyc.kind"] == "classifier"
    assert expl["classifier_version"] == "models:/clf/1"
    v1 = reg["client"].get_model_version("expl", "1").tags
    assert (v1["wysiwyc.classifier_model"], v1["wysiwyc.classifier_version"]) == ("clf", "1")
    assert any("the classifier's @champion" in c for c in registered["promoted"]["checks"])
    # the classifier's pyfunc: images → probabilities, equal to the classifier's own forward pass
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/clf@champion")
    out = model.predict({"image": [reg["images"]["0.png"]]}, params={"classes": "topk", "top_k": 6})
    reference, classes = _reference(reg, "a1", reg["images"]["0.png"])
    assert np.allclose(out.iloc[0]["all_probabilities"], reference.probs[0].numpy(), atol=1e-5)
    assert out.iloc[0]["classes"] == [classes[c] for c in torch.argsort(reference.probs[0], descending=True)]
    # an Explainer checkpoint given as a classifier (and the reverse) is refused, naming the fix
    wrong = reg["cli"]("register", "--classifier", "--checkpoint", reg["checkpoints"]["a1"], "--name", "c", check=False)
    assert wrong.returncode == 2 and "is a explainer checkpoint" in wrong.stderr and "--classifier" in wrong.stderr


def test_the_registered_pyfunc_loads_and_predicts_where_the_package_is_not_importable(reg, registered):
    folder = reg["client"].get_model_version_download_uri("expl", "1").removeprefix("file://")
    requirements = (Path(folder) / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.startswith(("wysiwyc", "-e", "file:", "."))], requirements
    assert {r.split("==")[0] for r in requirements} >= {"torch", "torchvision", "mlflow", "numpy"}
    assert (Path(folder) / "input_example.json").is_file()
    got = _clean_load(reg, "models:/expl/1", load_predictor(reg["checkpoints"]["a1"]), "out.json")
    assert "/code/pipeline/" in got["code"]  # the code that travelled with the model
    assert all(f"'{c}'" in got["outputs"] for c in ("classes", "probabilities", "masks"))
    topk = ClassRule(mode="topk", top_k=2)
    assert len(got["records"]) == len(reg["images"])
    for name, record in zip(reg["images"], got["records"]):
        reference, classes = _reference(reg, "a1", reg["images"][name])
        _assert_record_matches(record, reference, classes, topk)
    for name, record in zip(("0.png", "1.png"), got["listed"]):  # a plain dict of bytes, the default rule
        _assert_record_matches(record, *_reference(reg, "a1", reg["images"][name]), ClassRule())
    reference, classes = _reference(reg, "a1", reg["images"]["1.png"])
    _assert_record_matches(got["pixels"][0], reference, classes, ClassRule(mode="fixed", fixed=("star",)))


def _clean_load(reg, model_uri: str, predictor, out: str) -> dict:
    """Run :data:`CLEAN_LOAD` on ``model_uri`` in a consumer's environment (outside the repository): what the
    registered pyfunc answered. Its ``pixels`` input is image 1.png as ``predictor`` normalises it."""
    root = reg["root"]
    np.save(root / f"{out}.npy", torch.stack([predictor.preprocess(Image.open(root / "1.png"))]).numpy())
    script = root / "clean_load.py"
    script.write_text(CLEAN_LOAD)
    files = [str(root / n) for n in reg["images"]]
    env = {k: v for k, v in reg["env"].items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-S", str(script), _consumer_site(root), model_uri, str(root / out), *files],
        cwd=root,  # outside the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / out).read_text())


def _http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else proc.returncode
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def test_mlflow_models_serve_answers_invocations_with_the_predictors_masks(reg, registered):
    (port,) = _free_ports(1)
    log = open(reg["root"] / "mlflow-serve.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/expl@champion", "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        env=reg["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", proc, 120)
        images = [reg["images"]["2.png"], reg["images"]["4.jpg"]]
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]},
            "params": {"classes": "topk", "top_k": 3},
        }
        status, answer = _http(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, answer
        for image, record in zip(images, answer["predictions"]):
            reference, classes = _reference(reg, "a1", image)
            _assert_record_matches(record, reference, classes, ClassRule(mode="topk", top_k=3))
        # the example stored with the model is a valid request
        folder = reg["client"].get_model_version_download_uri("expl", "1").removeprefix("file://")
        example = (Path(folder) / "serving_input_example.json").read_bytes()
        status, answer = _http(f"http://127.0.0.1:{port}/invocations", example, {"Content-Type": "application/json"})
        assert status == 200 and len(answer["predictions"]) == 1 and answer["predictions"][0]["masks"]
        bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        status, answer = _http(
            f"http://127.0.0.1:{port}/invocations", json.dumps(bad).encode(), {"Content-Type": "application/json"}
        )
        assert status == 400 and "not an image" in json.dumps(answer)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_wysiwyc_serve_batches_concurrent_requests_refuses_bad_input_and_follows_a_promotion(reg, registered):
    from pipeline.registry import register_checkpoint

    (port,) = _free_ports(1)
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", "models:/expl@champion", "--port", str(port), "--refresh", "1"]
        + ["--replicas", "1", "serve.batch_wait_s=0.05", "serve.max_image_bytes=200000"]
        + ["serve.max_image_pixels=5000", "--json"],
        env=reg["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())  # the line a script waits for
        assert ready == {"url": url, "model_version": "1"}
        status, health = _http(f"{url}/health")
        assert status == 200 and health["model_version"] == "1" and health["model_name"] == "expl"
        names = [f"{i % 5}.png" if i % 5 < 4 else "4.jpg" for i in range(24)]

        def explain(name: str):
            ctype = "image/jpeg" if name.endswith(".jpg") else "image/png"
            return _http(f"{url}/explain", reg["images"][name], {"Content-Type": ctype})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(explain, names))
        references = {n: _reference(reg, "a1", reg["images"][n]) for n in set(names)}
        for name, (status, answer) in zip(names, answers):
            assert status == 200, answer
            assert 1 <= answer["batch"] <= 16
            assert answer["model_version"] == "1" and answer["mask_size"] == [SIZE, SIZE]
            _assert_record_matches(answer, *references[name], ClassRule())
        status, answer = _http(
            f"{url}/explain?classes=topk&top_k=2", reg["images"]["0.png"], {"Content-Type": "image/png"}
        )
        assert status == 200 and len(answer["classes"]) == 2

        # bad input: a clear 4xx, and the replica still answers
        refusals = {
            415: _http(f"{url}/explain", reg["images"]["0.png"], {"Content-Type": "text/plain"}),
            400: _http(f"{url}/explain", b"not an image", {"Content-Type": "image/png"}),
            413: _http(f"{url}/explain", b"\x89PNG" + bytes(300_000), {"Content-Type": "image/png"}),
            404: _http(f"{url}/nowhere"),
            405: _http(f"{url}/explain"),
        }
        for code, (status, answer) in refusals.items():
            assert status == code and answer["error"], (code, status, answer)
        assert "image/png" in refusals[415][1]["error"] and "not an image" in refusals[400][1]["error"]
        assert "serve.max_image_bytes" in refusals[413][1]["error"]
        status, answer = _http(f"{url}/explain", _png(9, size=(100, 60)), {"Content-Type": "image/png"})
        assert status == 413 and "serve.max_image_pixels=5000" in answer["error"]  # from the header
        status, answer = _http(
            f"{url}/explain?classes=fixed&fixed_classes=nope", reg["images"]["0.png"], {"Content-Type": "image/png"}
        )
        assert status == 400 and "nope" in answer["error"]
        assert explain("1.png")[0] == 200
        # one class named 1,000 times is one mask, not 1,000 (the query stays under the HTTP server's 16 kB line)
        first = health["classes"][0]
        many = ",".join([first] * 1000)
        status, answer = _http(
            f"{url}/explain?classes=fixed&fixed_classes={many}", reg["images"]["0.png"], {"Content-Type": "image/png"}
        )
        assert status == 200 and answer["classes"] == [first] and len(answer["masks"]) == 1

        # a promotion reaches the endpoint without a restart, and the answers say which version answered
        second = register_checkpoint(reg["checkpoints"]["a2"], "expl", reg["config"])
        reg["cli"]("promote", "--name", "expl", "--version", second["version"], "--gate", reg["gate"])
        deadline = time.time() + 60
        while _http(f"{url}/health")[1]["model_version"] != second["version"]:
            assert time.time() < deadline, "the endpoint did not switch to the promoted version"
            time.sleep(0.5)
        status, answer = explain("3.png")
        assert status == 200 and answer["model_version"] == second["version"]
        _assert_record_matches(answer, *_reference(reg, "a2", reg["images"]["3.png"]), ClassRule())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]  # SIGTERM ends it cleanly, with its summary
    assert json.loads(out.strip().splitlines()[-1])["url"] == url


def test_the_gate_refuses_an_explainer_of_a_classifier_that_is_not_the_champion_unless_overridden(reg, registered):
    from pipeline.registry import register_checkpoint, register_classifier
    from pipeline.workflows.promotion import promote

    clf_b = register_classifier(reg["checkpoints"]["clf_b"], "clf", reg["config"])
    assert clf_b["version"] == "2"
    # an Explainer for classifier A registered now, while A is still the champion
    stale = register_checkpoint(reg["checkpoints"]["a3"], "expl", reg["config"])
    assert stale["classifier_version"] == "models:/clf/1"
    promote("clf", "2", reg["config"])
    refused = reg["cli"]("promote", "--name", "expl", "--version", stale["version"], "--gate", reg["gate"], check=False)
    assert refused.returncode == 2
    assert "models:/clf/1" in refused.stderr and "@champion is v2" in refused.stderr
    assert "allow_stale_classifier" in refused.stderr
    assert reg["client"].get_model_version_by_alias("expl", "champion").version != stale["version"]
    overridden = promote("expl", stale["version"], reg["config"], reg["lenient"], progress=False)
    assert overridden["aliases"]["champion"] == stale["version"]
    assert any("allowed by allow_stale_classifier" in c for c in overridden["checks"])
    # an Explainer trained for the champion classifier passes the plain gate
    fresh = register_checkpoint(reg["checkpoints"]["b1"], "expl", reg["config"])
    assert fresh["classifier_version"] == "models:/clf/2"
    assert promote("expl", fresh["version"], reg["config"], reg["gate"], progress=False)["version"] == fresh["version"]
    promote("clf", "1", reg["config"])  # the classifier goes back: that Explainer is stale now
    with pytest.raises(WysiwycError, match="@champion is v1"):
        promote("expl", fresh["version"], reg["config"], reg["gate"], progress=False)
    promote("clf", "2", reg["config"])


def test_lineage_chains_data_classifier_explainer(reg, registered):
    """Whatever the tests before left @champion (alone, the fixture's pair; after the gate test, B's)."""
    from pipeline.registry import lineage

    client = reg["client"]
    chain = json.loads(reg["cli"]("lineage", "models:/expl@champion", "--json").stdout)
    champion = str(client.get_model_version_by_alias("expl", "champion").version)
    explains = client.get_model_version("expl", champion).tags["wysiwyc.classifier_version"]
    classifier_champion = str(client.get_model_version_by_alias("clf", "champion").version)
    assert chain["explainer_version"] == f"models:/expl/{champion}"
    assert chain["classifier_version"] == f"models:/clf/{explains}"
    assert chain["classifier_champion"] == f"models:/clf/{classifier_champion}"
    assert chain["classifier_is_champion"] is (explains == classifier_champion)
    digest = read_manifest(reg["data"])["digest"]
    assert chain["dataset_digests"] == {"classifier": digest, "explainer": digest}
    assert chain["attribution_runs"] == []  # none here; the quickstart's e2e test checks a real one
    text = reg["cli"]("lineage", "models:/expl/1").stdout
    state = "(the @champion)" if classifier_champion == "1" else f"(@champion is models:/clf/{classifier_champion})"
    assert f"classifier  models:/clf/1 {state}" in text and "explainer   models:/expl/1" in text
    assert f"manifest digest {digest[:16]}" in text
    assert lineage(f"models:/clf/{classifier_champion}", reg["config"])["explainer_version"] is None


def test_an_explainer_of_an_mlflow_pytorch_classifier_registers_promotes_goes_stale_and_loads_portably(reg, registered):
    """F trained "outside" and logged as an MLflow pytorch model (pt2, its interface in the metadata) in the same
    registry: the Explainer version records that version (the stale-classifier gate follows its @champion),
    carries F's exported program, and its pyfunc gives the direct predictor's answers where the package is not
    importable."""
    import mlflow.pytorch
    from outside import MEAN, STD, tiny

    from pipeline.config import ExplanandumConfig
    from pipeline.models.classifier import load_classifier
    from pipeline.registry import register_checkpoint
    from pipeline.workflows.promotion import promote

    root, classes, client = reg["root"], reg["classes"], reg["client"]
    interface = {"classes": classes, "output": "sigmoid", "mean": list(MEAN), "std": list(STD)}
    x = torch.zeros(2, 3, SIZE, SIZE).numpy()
    mlflow.set_experiment(experiment_id=client.create_experiment("outside", (root / "outside").as_uri()))
    for seed in (0, 1):  # versions 1 and 2 of the team's classifier
        with mlflow.start_run():
            mlflow.pytorch.log_model(
                tiny(len(classes), seed), name="f", input_example=x, registered_model_name="outside", metadata=interface
            )
    client.set_registered_model_alias("outside", "champion", "1")
    f = load_classifier(ExplanandumConfig(model="models:/outside@champion"), registry=reg["uri"])
    assert (f.form, f.uri) == ("export", "models:/outside/1")
    checkpoints = {}
    for key, seed in (("byo1", 7), ("byo2", 8)):
        checkpoints[key] = str(root / f"{key}.pt")
        state = explainer_state(
            classes,
            SIZE,
            f.uri,
            f.sha256,
            seed,
            explanandum=f.record(),
            metrics={"val_loss": 1.0},
            config={"data": {"train": reg["data"], "image_size": SIZE}, "loss": {}},
            explainer_init="scratch",
            black_box=True,
        )
        save_checkpoint(state, checkpoints[key])
    first = register_checkpoint(checkpoints["byo1"], "byo-expl", reg["config"])
    assert first["classifier_version"] == "models:/outside/1"
    tags = client.get_model_version("byo-expl", first["version"]).tags
    assert (tags["wysiwyc.classifier_model"], tags["wysiwyc.classifier_version"]) == ("outside", "1")
    assert tags["wysiwyc.explanandum_form"] == "export" and tags["wysiwyc.labels"] == "dataset"
    promoted = promote("byo-expl", first["version"], reg["config"], reg["gate"], progress=False)
    assert promoted["aliases"]["champion"] == first["version"]
    # the team moves its champion to version 2: an Explainer of version 1 is stale now
    client.set_registered_model_alias("outside", "champion", "2")
    second = register_checkpoint(checkpoints["byo2"], "byo-expl", reg["config"])
    refused = reg["cli"](
        "promote", "--name", "byo-expl", "--version", second["version"], "--gate", reg["gate"], check=False
    )
    assert refused.returncode == 2 and "allow_stale_classifier" in refused.stderr

    # the portable pyfunc of version 1: F travels as its exported program, normalised its own way
    byo = load_predictor(checkpoints["byo1"], registry=reg["uri"])
    got = _clean_load(reg, f"models:/byo-expl/{first['version']}", byo, "byo.json")
    assert byo.norm.mean == MEAN and len(got["records"]) == len(reg["images"])
    for name, record in zip(reg["images"], got["records"]):
        with Image.open(io.BytesIO(reg["images"][name])) as im:
            reference = byo(byo.preprocess(im).unsqueeze(0))
        _assert_record_matches(record, reference, byo.classes, ClassRule(mode="topk", top_k=2))
    one = byo(byo.preprocess(Image.open(reg["root"] / "1.png")).unsqueeze(0))  # the pixels input: F's normalisation
    _assert_record_matches(got["pixels"][0], one, byo.classes, ClassRule(mode="fixed", fixed=("star",)))

    # served: the endpoint loads the champion with its exported F and answers as the direct predictor
    (port,) = _free_ports(1)
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", "models:/byo-expl@champion", "--port", str(port), "--replicas", "1", "--json"],
        env=reg["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(proc.stdout.readline())["model_version"] == first["version"]
        status, answer = _http(
            f"http://127.0.0.1:{port}/explain", reg["images"]["1.png"], {"Content-Type": "image/png"}
        )
        assert status == 200, answer
        with Image.open(io.BytesIO(reg["images"]["1.png"])) as im:
            _assert_record_matches(answer, byo(byo.preprocess(im).unsqueeze(0)), byo.classes, ClassRule())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
