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
NUM_IMAGES, NUM_CORPUS = 200, 40


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


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


def test_the_explainer_is_promoted_and_attributes_the_corpus(quickstart):
    from mlflow import MlflowClient

    from pipeline.attribute import read_index

    summary, work = quickstart
    assert summary["model_uri"] == "models:/quickstart-explainer@champion"
    assert summary["version"] == "1" and summary["promotion"] == "v1 is @champion"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("quickstart-explainer", "champion").version) == "1"
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
    assert "<tr><td>explainer.levels</td><td>3</td></tr>" in html
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert f"{metrics['methods']['explainer']['cont_iou']:.3f}" in html
