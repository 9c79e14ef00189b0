"""The main job end to end, shrunk: `wysiwyc quickstart` at 24 px with one epoch per training stage, run
as users install it: from a wheel of the package, installed into a throw-away venv, in a folder outside
the checkout (the presets travel in the wheel).

Real components throughout: a local Ray (2 Ray Train workers per training stage, Ray Data actors for
attribution), MLflow in an sqlite file of the work dir (tracking and registry). What it checks is the
plumbing the full-size `make quickstart` relies on: every stage runs and hands its output to the next,
the Explainer is registered and promoted to @champion through a gate, the held-apart corpus is
attributed with `models:/quickstart-explainer@champion`, and report.html is self-contained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
# 64 training images: fewer than the 100 a shard holds, so the quickstart must cut them for its 2 ranks
NUM_IMAGES, NUM_CORPUS = 64, 40


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a throw-away venv holding a wheel of the package (built from what the Dockerfile
    copies) and seeing this environment's dependencies through a .pth file (not its editable install)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(root / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((root / "dist").glob("wysiwyc-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv / "bin"


def test_the_wheel_runs_outside_the_checkout_with_its_presets(installed, tmp_path):
    run = dict(cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    where = subprocess.run([installed / "python", "-c", "import pipeline; print(pipeline.__file__)"], **run)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout  # the wheel, not the checkout
    version = subprocess.run([installed / "python", "-c", "import pipeline; print(pipeline.__version__)"], **run)
    assert subprocess.run([installed / "wysiwyc", "--version"], **run).stdout.split() == [
        "wysiwyc",
        version.stdout.strip(),
    ]
    assert "train" in subprocess.run([installed / "wysiwyc", "--help"], **run).stdout
    listing = subprocess.run([installed / "wysiwyc", "presets"], **run)
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert {"cpu/explainer", "gates/default", "paper/voc_vgg16", "sweeps/voc_vgg16_lambdas"} <= set(names)
    assert (
        subprocess.run([installed / "wysiwyc", "presets", "cpu/explainer"], **run).stdout
        == (REPO / "configs" / "cpu" / "explainer.yaml").read_text()
    )
    # every preset by its short name, validated (the paper presets with the backbone file they require)
    load_all = (
        "import sys\n"
        "from pipeline.config import Config, GateConfig, load_config\n"
        "for name in sys.argv[1:]:\n"
        "    folder, stem = name.split('/')\n"
        "    extra = [] if folder != 'paper' else ['explanandum.pretrained_backbone=/w.pth'] if "
        "stem.startswith('classifier_') else ['explainer.backbone_weights=/w.pth']\n"
        "    load_config(name, extra, model=GateConfig if folder == 'gates' else Config)\n"
        "    print(name)\n"
    )
    loaded = subprocess.run([installed / "python", "-c", load_all, *names], **run)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == names and len(names) == len(list((REPO / "configs").rglob("*.yaml")))


@pytest.fixture(scope="module")
def quickstart(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("quickstart")  # outside the checkout: presets and gate come from the wheel
    gate = work / "gate.yaml"  # a real gate: the Explainer only, thresholds an untrained net can reach
    gate.write_text("evaluate: {methods: [explainer]}\nminimum: {cont_iou: 0.0, mean_f1: 0.0}\n")
    proc = subprocess.run(
        [
            installed / "wysiwyc",
            "quickstart",
            "--workdir",
            str(work / "qs"),
            "--num-images",
            str(NUM_IMAGES),
            "--num-corpus",
            str(NUM_CORPUS),
            "data.image_size=24",
            "trainer.epochs=1",
            "explainer.distill_epochs=1",
            "evaluate.rise_masks=20",
            "evaluate.overlay_images=4",
            f"registry.gate={gate}",
            "--json",
        ],
        cwd=work,
        env=_env(TMPDIR=str(work)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), work / "qs"


def test_every_stage_runs_and_is_timed(quickstart):
    summary, work = quickstart
    stages = ("data", "classifier", "explainer", "evaluate", "register", "promote", "attribute", "report")
    assert list(summary["timings"]) == [*stages, "total"]
    assert all(summary["timings"][s] >= 0 for s in stages)
    assert all(summary["timings"][s] > 1 for s in ("classifier", "explainer", "evaluate", "attribute"))
    assert summary["timings"]["total"] == pytest.approx(sum(summary["timings"][s] for s in stages), abs=0.5)
    assert Path(summary["checkpoint"]).is_file()
    assert summary["mlflow_ui"].startswith(f"mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}")


def test_a_small_training_set_is_cut_into_a_shard_per_reader(quickstart):
    from pipeline.data.shards import read_manifest

    summary, work = quickstart
    train = read_manifest(str(work / "data" / "synthetic" / "train"))
    # the CPU presets read with 2 ranks × 1 loader worker: 64 images in 2 shards of 32
    assert train["num_samples"] == NUM_IMAGES and [s["num_samples"] for s in train["shards"]] == [32, 32]


def test_the_explainer_is_promoted_and_attributes_the_corpus(quickstart):
    from mlflow import MlflowClient

    from pipeline.attribute import read_index
    from pipeline.data.shards import read_manifest

    summary, work = quickstart
    assert summary["model_uri"] == "models:/quickstart-explainer@champion"
    assert summary["version"] == "1" and summary["promotion"] == "v1 is @champion"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("quickstart-explainer", "champion").version) == "1"
    # the gate chose on the validation split; the test split only reported (evaluate)
    gate_split = client.get_model_version("quickstart-explainer", "1").tags["wysiwyc.gate.split"]
    assert gate_split == read_manifest(str(work / "data" / "synthetic" / "val"))["url"]
    assert summary["num_samples"] == NUM_CORPUS
    index = read_index(summary["attribution"]).to_pylist()
    assert len(index) == NUM_CORPUS == len({row["source"] for row in index})
    assert {row["status"] for row in index} == {"ok"}
    assert {row["model_version"] for row in index} == {"1"}
    # the attribution run is in the same MLflow, with the version it used and its statistics
    (attribution,) = client.search_runs([client.get_experiment_by_name("attribution").experiment_id])
    assert attribution.data.params["model_version"] == "1" and attribution.data.metrics["images"] == NUM_CORPUS
    # both trainings were tracked in the same MLflow as the registry
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert {"cpu-classifier", "cpu-explainer"} <= {r.info.run_name for r in runs}


def test_report_is_self_contained_with_table_pictures_and_lambdas(quickstart):
    summary, work = quickstart
    html = Path(summary["report"]).read_text()
    assert Path(summary["report"]) == work / "report.html"
    for method in ("Explainer", "Grad-CAM", "RISE", "const. 0", "const. 0.5", "const. 1", "ideal"):
        assert f"<td>{method}</td>" in html
    # overlay grid, F1 curve, faithfulness curves and four specificity matrices (Explainer, Grad-CAM, RISE,
    # ideal) embedded,
    # nothing fetched from elsewhere
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 7
    scored = load_config("cpu/evaluate").evaluate.faithfulness_images  # the preset's first N test images
    assert f"Faithfulness to the classifier ({scored} images)" in html and "deletion AUC ↓" in html
    assert "src='http" not in html and "src='/" not in html
    assert "entropy_regularizer" in html and "class_mask_max_area" in html
    # the Explainer's net and schedule as configs/cpu/explainer.yaml sets them
    assert "The Explainer is black-box, as the paper" in html  # the report leads with what it shows
    assert "<tr><td>explainer.init</td><td>distilled</td></tr>" in html
    assert "<tr><td>explainer.cam</td><td>True</td></tr>" in html
    assert "<tr><td>explainer.arch</td><td>resunet</td></tr>" in html and "explainer.levels" not in html
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert f"{metrics['methods']['explainer']['cont_iou']:.3f}" in html


def _readme_examples() -> list[tuple[str, str]]:
    """``(language, code)`` of the fenced blocks of the README's consumer section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Consume a registered Explainer: three ways in", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def test_lineage_and_the_readme_consumer_examples_on_the_quickstart_registry(installed, quickstart, tmp_path):
    import signal

    from pipeline.data.shards import read_manifest

    summary, work = quickstart
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", TMPDIR=str(tmp_path))
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    chain = json.loads(subprocess.run([installed / "wysiwyc", "lineage", summary["model_uri"], "--json"], **run).stdout)
    assert chain["explainer_version"] == "models:/quickstart-explainer/1"
    assert chain["classifier_version"] == "models:/quickstart-classifier/1" and chain["classifier_is_champion"]
    train = read_manifest(str(work / "data" / "synthetic" / "train"))["digest"]
    assert chain["dataset_digests"] == {"classifier": train, "explainer": train}
    (attribution,) = chain["attribution_runs"]
    assert attribution["images"] == NUM_CORPUS and attribution["status"] == "FINISHED"
    assert summary["attribution"].rstrip("/").endswith(attribution["run_id"])

    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "image.png")
    (with_package, _), (without_package, _), (http, _) = [(c, lang) for lang, c in _readme_examples()]
    first = subprocess.run([installed / "python", "-c", with_package], **run)
    assert first.returncode == 0 and first.stdout.startswith("quickstart-explainer 1\n"), first.stderr[-2000:]
    # without the package: python -S (no .pth hook), only the site-packages holding torch, mlflow, …
    clean = (
        f"import sys, importlib.util; sys.path.append({site.getsitepackages()[0]!r}); "
        "assert importlib.util.find_spec('pipeline') is None; exec(sys.stdin.read())"
    )
    second = subprocess.run([sys.executable, "-S", "-c", clean], input=without_package, **run)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and second.stdout.count("[") >= 2

    serve_line, *curls = [line for line in http.strip().splitlines() if line.strip()]
    server = subprocess.Popen(
        [str(installed / a) if a == "wysiwyc" else a for a in serve_line.rstrip("&").split()],
        cwd=tmp_path,
        env={**env, "WYSIWYC_RAY_TMP": str(tmp_path / "r"), "PATH": f"{installed}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "http://127.0.0.1:8000" in server.stdout.readline()
        health, explained = (json.loads(subprocess.run(["bash", "-c", c], **run).stdout) for c in curls)
        assert health["model_version"] == "1" and explained["model_version"] == "1"
        assert len(explained["classes"]) == len(explained["masks"]) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    assert server.returncode == 0
