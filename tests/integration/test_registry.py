"""The model registry against a real ``mlflow server`` (sqlite backend, artifacts in SeaweedFS).

Tiny untrained nets at 32 px on a 24-image synthetic test split (checkpoints and shards in the same
SeaweedFS): untrained masks say nothing about quality, but the gate only needs metrics that differ
between versions, and a "blank" Explainer (every mask ≈ 0, continuous IoU 0) is reliably worse than
a random one (masks ≈ 0.5, continuous IoU > 0). Versions of the model ``expl``:

- v1: a random ``compact`` Explainer (A);
- v2: the blank Explainer;
- v3: A's weights again in another checkpoint (other bytes, the same metrics as v1).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import classifier_state, cli, environ, explainer_state

from pipeline import storage
from pipeline.checkpoint import save_checkpoint
from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.shards import ShardDataset, read_manifest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.models.explain import mask_from_png
from pipeline.models.predictor import load_predictor

pytestmark = pytest.mark.s3

SIZE = 32
LAMBDAS = {
    "entropy_regularizer": 0.5,
    "mask_variation_regularizer": 1.0,
    "mask_area_constraint_regularizer": 0.8,
    "mask_total_area_regularizer": 0.1,
    "ncmask_total_area_regularizer": 0.3,
    "class_mask_min_area": 0.05,
    "class_mask_max_area": 0.3,
}


def _explainer_state(classes, classifier_uri, classifier_sha, data, seed, blank=False, epoch=0, init="scratch"):
    return explainer_state(
        classes,
        SIZE,
        classifier_uri,
        classifier_sha,
        seed,
        blank,
        epoch=epoch,
        metrics={"val_loss": 1.25},
        config={"data": {"train": data, "image_size": SIZE}, "loss": LAMBDAS},
        explainer_init=init,
        black_box=init != "explanandum_copy",
    )


@pytest.fixture(scope="module")
def reg(s3_server, mlflow_server, session_stack, tmp_path_factory):
    """Shards, a classifier and three Explainer checkpoints in SeaweedFS; config and env for the registry."""
    root = tmp_path_factory.mktemp("registry")
    bucket = s3_server.make_bucket("registry")
    base = f"s3://{bucket}"
    reader = SyntheticReader(24, seed=3, split="test", image_size=SIZE)
    ingest(reader, f"{base}/data", "test", IngestConfig(workers=1, shard_size=12), opts=s3_server.opts, progress=False)
    classes = list(reader.classes)
    clf_sha = save_checkpoint(
        classifier_state(classes, SIZE),
        f"{base}/clf.pt",
        s3_server.opts,
    )
    data = f"{base}/data/test"
    checkpoints, shas = {}, {}
    for key, kwargs in {
        "a": {"seed": 1},
        "blank": {"seed": 1, "blank": True},
        "a2": {"seed": 1, "epoch": 1},
        "a3": {"seed": 1, "epoch": 2},
        "b": {"seed": 2},
        "b2": {"seed": 2, "epoch": 1},
        "white": {"seed": 1, "epoch": 3, "init": "explanandum_copy"},
    }.items():
        checkpoints[key] = f"{base}/ckpt/{key}.pt"
        shas[key] = save_checkpoint(
            _explainer_state(classes, f"{base}/clf.pt", clf_sha, data, **kwargs), checkpoints[key], s3_server.opts
        )
    gate = root / "gate.yaml"
    gate.write_text(
        f"split: {data}\nevaluate:\n  methods: [explainer]\n  batch_size: 8\n"
        "minimum:\n  cont_iou: 0.0\nchampion_margin:\n  cont_iou: 0.05\n  mean_f1: 0.05\n"
    )
    overrides = [
        f"tracking.uri={mlflow_server.uri}",
        "tracking.experiment=registry-tests",
        "data.loader_workers=0",
        "registry.readers=[reader]",  # the stack's read-only identity (serve, attribute)
    ]
    env = {
        **os.environ,
        **s3_server.env,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TMPDIR": str(root),
    }
    with environ({k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}):
        yield {
            "root": root,
            "bucket": bucket,
            "data": data,
            "classes": classes,
            "checkpoints": checkpoints,
            "shas": shas,
            "clf_sha": clf_sha,
            "gate": str(gate),
            "overrides": overrides,
            "env": env,
            "config": load_config(None, overrides),
            "uri": mlflow_server.uri,
            "client": mlflow_server.client(),
            "s3": s3_server,
            "reader_env": {k: v for k, v in session_stack.reader_env.items() if k.startswith("MLFLOW_TRACKING_")},
        }


def wysiwyc(reg, *args, check=True):
    return cli(*args, env=reg["env"], check=check)


@pytest.fixture(scope="module")
def registered(reg):
    """v1 (A) through the CLI; v2 (blank) and v3 (A again) through the Python API."""
    from pipeline.registry import register_checkpoint

    first = json.loads(
        wysiwyc(
            reg, "register", "--checkpoint", reg["checkpoints"]["a"], "--name", "expl", *reg["overrides"], "--json"
        ).stdout
    )
    blank = register_checkpoint(reg["checkpoints"]["blank"], "expl", reg["config"])
    third = register_checkpoint(reg["checkpoints"]["a2"], "expl", reg["config"])
    return {"v1": first, "v2": blank, "v3": third}


def test_register_makes_a_candidate_version_with_lineage_tags(reg, registered):
    from pipeline.registry import register_checkpoint

    v1 = registered["v1"]
    assert (v1["name"], v1["version"], v1["model_uri"]) == ("expl", "1", "models:/expl/1")
    assert [registered["v2"]["version"], registered["v3"]["version"]] == ["2", "3"]
    client = reg["client"]
    assert client.get_model_version_by_alias("expl", "candidate").version == "3"  # the newest registration
    tags = client.get_model_version("expl", "1").tags
    data = storage.read_bytes(reg["checkpoints"]["a"], reg["s3"].opts)
    assert tags["wysiwyc.explainer_sha256"] == hashlib.sha256(data).hexdigest() == reg["shas"]["a"]
    assert tags["wysiwyc.explainer"] == reg["checkpoints"]["a"]
    assert tags["wysiwyc.explanandum_sha256"] == reg["clf_sha"]
    assert tags["wysiwyc.dataset_digest"] == read_manifest(reg["data"], reg["s3"].opts)["digest"]
    assert json.loads(tags["wysiwyc.classes"]) == reg["classes"] and tags["wysiwyc.image_size"] == str(SIZE)
    assert {k: float(tags[f"wysiwyc.lambda.{k}"]) for k in LAMBDAS} == LAMBDAS
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert tags["wysiwyc.git_commit"].removesuffix("-dirty") == expected
    # the register run holds the λ values as params and the packaged model as artifacts
    run = client.get_run(v1["mlflow_run_id"])
    assert run.data.params["loss.entropy_regularizer"] == "0.5" and run.data.metrics["val_loss"] == 1.25
    files = {a.path for a in client.list_artifacts(v1["mlflow_run_id"], "model/artifacts")}
    assert {
        "model/artifacts/explainer.pt",
        "model/artifacts/explanandum.pt",
        "model/artifacts/config.yaml",
        "model/artifacts/wysiwyc.json",
    } <= files
    # the same checkpoint again: the same version, no copy
    again = register_checkpoint(reg["checkpoints"]["a"], "expl", reg["config"])
    assert again["version"] == "1" and again["existing"] is True
    assert len(client.search_model_versions("name='expl'")) == 3


def test_registered_version_loads_in_a_fresh_process_from_its_uri_alone(reg, registered):
    root = reg["root"]
    torch.manual_seed(5)
    images = torch.randn(5, 3, SIZE, SIZE)
    torch.save(images, root / "images.pt")
    code = (
        "import sys, torch, mlflow.pyfunc, pandas as pd\n"
        "from pipeline.registry import load_explainer\n"
        "torch.set_num_threads(1)\n"
        "x = torch.load(sys.argv[1])\n"
        "p = load_explainer('models:/expl@candidate')\n"
        "out = p(x)\n"
        "model = mlflow.pyfunc.load_model('models:/expl/3')\n"
        "every = {'classes': 'fixed', 'fixed_classes': p.classes}\n"
        "five = model.predict(pd.DataFrame({'pixels': list(x.numpy())}), params=every)\n"
        "arrays = model.unwrap_python_model().predict(None, x.numpy())  # the 4-d form of earlier versions\n"
        "one = model.unwrap_python_model().predict(None, x[:1].numpy())\n"
        "try:\n"
        "    mlflow.MlflowClient().set_registered_model_alias('expl', 'champion', '3')\n"
        "    refused = ''\n"
        "except mlflow.exceptions.MlflowException as exc:\n"
        "    refused = str(exc)\n"
        "torch.save({'masks': out.masks, 'probs': out.probs, 'name': p.model_name, 'version': p.model_version,\n"
        "            'uri': p.explainer_uri, 'classes': p.classes, 'size': p.image_size,\n"
        "            'records': five.to_dict(orient='records'),\n"
        "            'pyfunc_masks': torch.from_numpy(arrays['masks']),\n"
        "            'pyfunc_probs': torch.from_numpy(arrays['probs']),\n"
        "            'pyfunc_one': torch.from_numpy(one['masks']), 'refused': refused}, sys.argv[2])\n"
    )
    # nothing but the tracking URI and the read-only identity (registry.readers): no storage credentials (the server
    # serves the artifacts), no right to move an alias
    env = {k: v for k, v in reg["env"].items() if not k.startswith(("AWS_", "MLFLOW_S3"))} | reg["reader_env"]
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root / "images.pt"), str(root / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(root / "out.pt")
    assert (got["name"], got["version"], got["uri"]) == ("expl", "3", "models:/expl/3")
    assert got["classes"] == reg["classes"] and got["size"] == SIZE
    assert "PERMISSION_DENIED" in got["refused"] or "403" in got["refused"], got["refused"]  # READ only

    torch.set_num_threads(1)
    reference = load_predictor(reg["checkpoints"]["a2"], opts=reg["s3"].opts)(images)
    assert got["masks"].shape == (5, len(reg["classes"]), SIZE, SIZE)
    assert torch.equal(got["masks"], reference.masks) and torch.equal(got["probs"], reference.probs)
    assert torch.equal(got["pyfunc_masks"], reference.masks) and torch.equal(got["pyfunc_probs"], reference.probs)
    # the pyfunc's records ('pixels' input, every class): 8-bit PNG masks within 1/255 of the Predictor's
    assert [r["classes"] for r in got["records"]] == [reg["classes"]] * 5
    for i, record in enumerate(got["records"]):
        assert np.allclose(record["probabilities"], reference.probs[i].numpy(), atol=1e-6)
        masks = np.stack([mask_from_png(m) for m in record["masks"]])
        assert np.abs(masks - reference.masks[i].numpy()).max() <= 1 / 255 + 1e-6
    # any batch size (another batch size may take other CPU kernels: equal up to float rounding)
    assert torch.allclose(got["pyfunc_one"], reference.masks[:1], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def promoted(reg, registered):
    """v1 promoted (no champion yet), then v3 (not worse than v1)."""
    from pipeline.workflows.promotion import promote

    first = promote("expl", "1", reg["config"], reg["gate"], progress=False)
    second = promote("expl", "3", reg["config"], reg["gate"], progress=False)
    return first, second


def test_a_passing_gate_moves_champion_and_previous_champion_and_records_the_gate(reg, promoted):
    first, second = promoted
    client = reg["client"]
    assert first["previous_champion"] is None and second["previous_champion"] == "1"
    aliases = client.get_registered_model("expl").aliases
    assert (aliases["champion"], aliases["previous-champion"]) == ("3", "1")
    tags = client.get_model_version("expl", "3").tags
    assert tags["wysiwyc.gate.result"] == "passed" and tags["wysiwyc.gate"] == reg["gate"]
    assert tags["wysiwyc.gate.champion_before"] == "1" and tags["wysiwyc.promoted_by"]
    assert tags["wysiwyc.promoted_at"].startswith(("20", "19"))
    assert json.loads(tags["wysiwyc.gate.config"])["champion_margin"] == {"cont_iou": 0.05, "mean_f1": 0.05}
    checks = json.loads(tags["wysiwyc.gate.checks"])
    assert [(c["kind"], c["metric"]) for c in checks] == [
        ("minimum", "cont_iou"),
        ("champion_margin", "cont_iou"),
        ("champion_margin", "mean_f1"),
        ("classifier_champion", "classifier"),
    ]
    assert all(c["passed"] for c in checks)
    assert "its classifier is not registered" in checks[-1]["reason"]  # checked only when it is
    # the evaluation is stored on the version (keyed by the split digest) and as an MLflow run
    digest = read_manifest(reg["data"], reg["s3"].opts)["digest"]
    record = json.loads(tags[f"wysiwyc.eval.{digest[:16]}"])
    labelled = sum(
        1 for s in ShardDataset(reg["data"], image_size=SIZE, train=False, opts=reg["s3"].opts) if s["labels"].sum() > 0
    )
    assert record["digest"] == digest and record["num_images"] == labelled
    assert second["evaluation"] == record["metrics"]
    run = client.get_run(record["run_id"])
    assert run.data.metrics["cont_iou"] == pytest.approx(record["metrics"]["cont_iou"])
    assert record["metrics"]["cont_iou"] > 0
    # v3 has v1's weights: the same metrics on the same split
    v1 = json.loads(client.get_model_version("expl", "1").tags[f"wysiwyc.eval.{digest[:16]}"])
    assert v1["metrics"]["cont_iou"] == pytest.approx(record["metrics"]["cont_iou"])
    events = [
        json.loads(v)
        for k, v in sorted(client.get_registered_model("expl").tags.items())
        if k.startswith("wysiwyc.event.")
    ]
    assert [(e["action"], e["version"]) for e in events] == [("promote", "1"), ("promote", "3")]


def test_a_failing_gate_moves_nothing_and_exits_non_zero(reg, promoted):
    client = reg["client"]
    before = dict(client.get_registered_model("expl").aliases)
    proc = wysiwyc(
        reg,
        "promote",
        "--name",
        "expl",
        "--version",
        "2",
        "--gate",
        reg["gate"],
        *reg["overrides"],
        "--json",
        check=False,
    )
    assert proc.returncode == 2
    message = json.loads(proc.stdout)["error"]
    assert "models:/expl/2 did not pass the gate" in message and "champion stays v3" in message
    assert "cont_iou 0.0000 is worse than the champion's" in message
    assert dict(client.get_registered_model("expl").aliases) == before
    tags = client.get_model_version("expl", "2").tags
    assert "wysiwyc.promoted_at" not in tags and "wysiwyc.gate.result" not in tags
    # its evaluation was stored (blank masks: continuous IoU 0)
    digest = read_manifest(reg["data"], reg["s3"].opts)["digest"]
    assert json.loads(tags[f"wysiwyc.eval.{digest[:16]}"])["metrics"]["cont_iou"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_accepts_a_registry_uri(reg, promoted):
    out = reg["root"] / "eval"
    proc = wysiwyc(
        reg,
        "evaluate",
        "explainer.checkpoint=models:/expl@champion",
        f"data.test={reg['data']}",
        "evaluate.methods=[explainer]",
        "evaluate.batch_size=8",
        f"output={out}",
        *reg["overrides"],
        "--json",
    )
    summary = json.loads(proc.stdout)
    assert summary["explainer"] == "models:/expl/3"
    digest = read_manifest(reg["data"], reg["s3"].opts)["digest"]
    stored = json.loads(reg["client"].get_model_version("expl", "3").tags[f"wysiwyc.eval.{digest[:16]}"])
    metrics = json.loads((out / "metrics.json").read_text())["methods"]["explainer"]
    assert metrics["cont_iou"] == pytest.approx(stored["metrics"]["cont_iou"])
    # the version keeps the digest of the split its numbers came from (a gate on it will be refused)
    assert summary["test_digest"] == digest
    assert json.loads(reg["client"].get_model_version("expl", "3").tags["wysiwyc.published_split_digests"]) == [digest]


def test_a_gate_never_chooses_on_a_split_the_numbers_come_from(reg, promoted):
    """The test split is touched once: a gate is refused on the split a version's published numbers came from
    (recorded by `wysiwyc evaluate`), and on data.test (named, or the same data under another URL); a gate file
    that sets allow_test_split does it on purpose."""
    from pipeline.workflows.promotion import PUBLISHED_TAG, gate_split, load_gate, promote

    wysiwyc(
        reg,
        "evaluate",
        "explainer.checkpoint=models:/expl/1",
        f"data.test={reg['data']}",
        "evaluate.methods=[explainer]",
        "evaluate.batch_size=8",
        f"output={reg['root'] / 'eval-v1'}",
        *reg["overrides"],
    )
    digest = read_manifest(reg["data"], reg["s3"].opts)["digest"]
    assert json.loads(reg["client"].get_model_version("expl", "1").tags[PUBLISHED_TAG]) == [digest]
    before = dict(reg["client"].get_registered_model("expl").aliases)
    with pytest.raises(WysiwycError, match=r"published numbers came from \(wysiwyc evaluate\).*allow_test_split: true"):
        promote("expl", "1", reg["config"], reg["gate"], progress=False)
    named = reg["root"] / "gate-on-test.yaml"
    named.write_text("split: test\nevaluate:\n  methods: [explainer]\n  batch_size: 8\n")
    with_test = load_config(None, [*reg["overrides"], f"data.test={reg['data']}"])
    with pytest.raises(WysiwycError, match="data.test, the split of the final numbers"):
        promote("expl", "2", with_test, str(named), progress=False)  # v2 was never evaluated: data.test itself
    with pytest.raises(WysiwycError, match="data.test, the split of the final numbers"):
        promote("expl", "2", with_test, reg["gate"], progress=False)  # the same data under its URL
    assert dict(reg["client"].get_registered_model("expl").aliases) == before  # nothing moved
    on_purpose = reg["root"] / "gate-on-purpose.yaml"
    on_purpose.write_text(Path(reg["gate"]).read_text() + "allow_test_split: true\n")
    tags = reg["client"].get_model_version("expl", "1").tags
    assert gate_split(load_gate(str(on_purpose)), str(on_purpose), reg["config"], tags) == reg["data"]
    val = load_config(None, [*reg["overrides"], f"data.val={reg['data']}"])
    on_val = load_gate(str(named)).model_copy(update={"split": "val", "allow_test_split": True})
    assert gate_split(on_val, "g", val, {}) == reg["data"]  # `val` names data.val


def test_rollback_restores_the_previous_champion(reg):
    from pipeline.registry import register_checkpoint
    from pipeline.workflows.promotion import promote, rollback

    config = reg["config"]
    for key in ("b", "b2"):
        register_checkpoint(reg["checkpoints"][key], "roll", config)
    promote("roll", "1", config, reg["gate"], progress=False)
    promote("roll", "2", config, reg["gate"], progress=False)
    summary = json.loads(wysiwyc(reg, "promote", "--rollback", "--name", "roll", *reg["overrides"], "--json").stdout)
    assert (summary["version"], summary["rolled_back_from"]) == ("1", "2")
    client = reg["client"]
    assert dict(client.get_registered_model("roll").aliases) == {"champion": "1", "candidate": "2"}
    assert client.get_model_version("roll", "1").tags["wysiwyc.restored_from"] == "2"
    assert "wysiwyc.rolled_back_at" in client.get_model_version("roll", "2").tags
    with pytest.raises(WysiwycError, match="has no alias 'previous-champion'"):
        rollback("roll", config)


def test_registry_uris_that_do_not_resolve_are_refused_naming_what_is_missing(reg, registered):
    from pipeline.registry import load_explainer

    with pytest.raises(WysiwycError, match=r"registered model 'expl' has no alias 'nope' \(versions \[1, 2, 3\]"):
        load_explainer("models:/expl@nope", reg["uri"])
    with pytest.raises(WysiwycError, match=r"registered model 'expl' has no version 9"):
        load_explainer("models:/expl/9", reg["uri"])
    # MLflow's basic-auth answers 403 alike for a model that does not exist and one the identity may not read
    with pytest.raises(WysiwycError, match=r"refused 'promoter' .*no registered model 'missing'.*wysiwyc register"):
        load_explainer("models:/missing@champion", reg["uri"])
    proc = wysiwyc(reg, "promote", "--name", "missing", "--version", "1", *reg["overrides"], check=False)
    assert proc.returncode == 2 and "no registered model 'missing'" in proc.stderr


def test_register_from_sweep_takes_the_best_trial(reg):
    pytest.importorskip("pipeline.tune")
    sweeps = f"s3://{reg['bucket']}/sweeps"
    record = {
        "name": "lam",
        "metric": "val_selection",
        "mode": "max",
        "parent_run_id": "p123",
        "best": {
            "trial": "t2",
            "params": {"loss.entropy_regularizer": 0.5},
            "metrics": {"val_selection": 0.7},
            "checkpoint": reg["checkpoints"]["a3"],
            "mlflow_run_id": "r456",
        },
        "trials": [],
    }
    storage.write_text(f"{sweeps}/lam/sweep.json", json.dumps(record), reg["s3"].opts)
    summary = json.loads(
        wysiwyc(
            reg,
            "register",
            "--from-sweep",
            "lam",
            "--name",
            "swept",
            f"sweep.storage={sweeps}",
            *reg["overrides"],
            "--json",
        ).stdout
    )
    assert summary["model_uri"] == "models:/swept/1" and summary["trial"] == "t2"
    tags = reg["client"].get_model_version("swept", "1").tags
    assert tags["wysiwyc.explainer_sha256"] == reg["shas"]["a3"]
    assert (tags["wysiwyc.sweep"], tags["wysiwyc.sweep_trial"], tags["wysiwyc.training_run_id"]) == (
        "lam",
        "t2",
        "r456",
    )
    run = reg["client"].get_run(summary["mlflow_run_id"])
    assert run.data.metrics["sweep.val_selection"] == pytest.approx(0.7)


def test_the_default_gate_refuses_a_white_box_explainer_unless_the_gate_file_allows_it(reg):
    from pipeline.registry import register_checkpoint
    from pipeline.workflows.promotion import promote

    version = register_checkpoint(reg["checkpoints"]["white"], "expl-white", reg["config"])["version"]
    tags = reg["client"].get_model_version("expl-white", version).tags
    assert (tags["wysiwyc.explainer_init"], tags["wysiwyc.black_box"]) == ("explanandum_copy", "false")
    proc = wysiwyc(
        reg,
        "promote",
        "--name",
        "expl-white",
        "--version",
        version,
        "--gate",
        reg["gate"],
        *reg["overrides"],
        "--json",
        check=False,
    )
    assert proc.returncode == 2
    message = json.loads(proc.stdout)["error"]
    assert "is not a black-box Explainer (explainer.init=explanandum_copy" in message
    assert "allow_white_box: true" in message
    assert "champion" not in reg["client"].get_registered_model("expl-white").aliases
    allowing = reg["root"] / "gate-white.yaml"
    allowing.write_text(open(reg["gate"]).read() + "allow_white_box: true\n")
    assert promote("expl-white", version, reg["config"], str(allowing), progress=False)["version"] == version
    assert reg["client"].get_registered_model("expl-white").aliases["champion"] == version


def test_a_gate_without_a_split_chooses_on_data_val_and_never_reads_data_test(reg):
    """A gate's ``split: null`` means the validation split (the default gate names it: ``split: val``): a gate
    chooses the champion, and the test split reports the final numbers only. With only data.test set, promote
    refuses before any evaluation."""
    from pipeline.registry import register_checkpoint
    from pipeline.workflows.promotion import load_gate, promote

    default = load_gate("gates/default")
    assert default.split == "val" and default.allow_test_split is False  # the default gate: data.val
    version = register_checkpoint(reg["checkpoints"]["b"], "expl-val", reg["config"])["version"]
    text = open(reg["gate"]).read()
    gate = reg["root"] / "gate-no-split.yaml"
    gate.write_text(text.replace(f"split: {reg['data']}\n", ""))
    assert load_gate(str(gate)).split is None
    only_test = load_config(None, [*reg["overrides"], f"data.test={reg['data']}"])
    with pytest.raises(WysiwycError, match=r"has no split and data\.val is not set.*never evaluates on data\.test"):
        promote("expl-val", version, only_test, str(gate), progress=False)
    client = reg["client"]
    assert "champion" not in client.get_registered_model("expl-val").aliases
    assert not any(k.startswith("wysiwyc.eval.") for k in client.get_model_version("expl-val", version).tags)
    with_val = load_config(None, [*reg["overrides"], f"data.val={reg['data']}"])
    summary = promote("expl-val", version, with_val, str(gate), progress=False)
    manifest = read_manifest(reg["data"], reg["s3"].opts)
    assert summary["split"] == storage.redact(manifest["url"])
    tags = client.get_model_version("expl-val", version).tags
    assert (tags["wysiwyc.gate.split"], tags["wysiwyc.gate.split_digest"]) == (summary["split"], manifest["digest"])
    assert client.get_registered_model("expl-val").aliases["champion"] == version


def test_a_version_whose_file_is_not_the_registered_one_does_not_load(reg):
    """The downloaded explainer.pt is compared with the version's recorded sha256 (tag) before any use."""
    from pipeline.registry import load_explainer, register_checkpoint

    version = register_checkpoint(reg["checkpoints"]["b2"], "expl-sha", reg["config"])["version"]
    uri = f"models:/expl-sha/{version}"
    assert load_explainer(uri, reg["uri"]).explainer_sha256 == reg["shas"]["b2"]
    reg["client"].set_model_version_tag("expl-sha", version, "wysiwyc.explainer_sha256", reg["shas"]["a"])
    with pytest.raises(WysiwycError, match=r"the downloaded explainer\.pt .* is not the registered one"):
        load_explainer(uri, reg["uri"])


def test_promotions_of_one_model_take_turns_and_a_champion_moved_meanwhile_stops_the_move(reg, monkeypatch):
    """MLflow's aliases have no compare-and-set: the lease makes promote and rollback take turns (forced here: a
    promotion is held inside the champion's evaluation, after it read the champion), and the champion is read
    again before it moves."""
    import threading

    from pipeline.registry import register_checkpoint
    from pipeline.workflows import promotion

    config = load_config(None, [*reg["overrides"], f"registry.lease=s3://{reg['bucket']}/leases"])
    for key in ("b", "b2"):
        register_checkpoint(reg["checkpoints"][key], "race", config)
    promotion.promote("race", "1", config, reg["gate"], progress=False)
    inside, go_on, outcome = threading.Event(), threading.Event(), {}
    real = promotion.ensure_evaluation

    def held_evaluation(name, version, *args, **kwargs):
        if version == "1":  # the champion's evaluation, while v2 is being promoted
            inside.set()
            assert go_on.wait(120)
        return real(name, version, *args, **kwargs)

    def promoting():
        try:
            outcome["v2"] = promotion.promote("race", "2", config, reg["gate"], progress=False)
        except WysiwycError as exc:
            outcome["v2"] = exc

    leases = lambda: reg["s3"].client().list_objects_v2(Bucket=reg["bucket"], Prefix="leases/")["KeyCount"]  # noqa: E731
    monkeypatch.setattr(promotion, "ensure_evaluation", held_evaluation)
    thread = threading.Thread(target=promoting)
    thread.start()
    try:
        assert inside.wait(120)
        assert leases() == 1
        for other in (
            lambda: promotion.promote("race", "1", config, reg["gate"]),
            lambda: promotion.rollback("race", config),
        ):
            with pytest.raises(
                WysiwycError, match=r"the aliases of the registered model race .* is held by \w+ \(pid \d+"
            ):
                other()
        # meanwhile the champion is moved outside wysiwyc (the MLflow UI, say): the promotion moves nothing
        reg["client"].set_registered_model_alias("race", "champion", "2")
    finally:
        go_on.set()
        thread.join(300)
    assert isinstance(outcome["v2"], WysiwycError), outcome
    assert "models:/race@champion moved from v1 to v2 while the gate ran" in str(outcome["v2"])
    assert dict(reg["client"].get_registered_model("race").aliases) == {"champion": "2", "candidate": "2"}
    assert "wysiwyc.promoted_at" not in reg["client"].get_model_version("race", "2").tags
    # the lease was released: the next promotion goes through
    monkeypatch.setattr(promotion, "ensure_evaluation", real)
    assert promotion.promote("race", "1", config, reg["gate"], progress=False)["previous_champion"] == "2"
    assert leases() == 0
