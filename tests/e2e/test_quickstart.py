"""The main job end to end, shrunk: `wysiwyc quickstart` at 24 px with one epoch per training stage.

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
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES, NUM_CORPUS = 200, 40


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("quickstart")
    gate = work / "gate.yaml"  # a real gate: the Explainer only, thresholds an untrained net can reach
    gate.write_text("evaluate: {methods: [explainer]}\nminimum: {cont_iou: 0.0, mean_f1: 0.0}\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TMPDIR": str(work)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "quickstart", "--workdir", str(work / "qs"),
         "--num-images", str(NUM_IMAGES), "--num-corpus", str(NUM_CORPUS), "data.image_size=24",
         "trainer.epochs=1", "explainer.distill_epochs=1", "evaluate.rise_masks=20", "evaluate.overlay_images=4", f"registry.gate={gate}",
         "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
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
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    summary, work = quickstart
    assert summary["model_uri"] == "models:/quickstart-explainer@champion"
    assert summary["version"] == "1" and summary["promotion"] == "v1 is @champion"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("quickstart-explainer", "champion").version) == "1"
    assert summary["num_samples"] == NUM_CORPUS
    index = pq.read_table(Path(summary["attribution"]) / "index.parquet").to_pylist()
    assert len(index) == NUM_CORPUS == len({row["source"] for row in index})
    assert {row["status"] for row in index} == {"ok"}
    assert {row["model_version"] for row in index} == {"1"}
    # both trainings were tracked in the same MLflow as the registry
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert {"cpu-classifier", "cpu-explainer"} <= {r.info.run_name for r in runs}


def test_report_is_self_contained_with_table_pictures_and_lambdas(quickstart):
    summary, work = quickstart
    html = Path(summary["report"]).read_text()
    assert Path(summary["report"]) == work / "report.html"
    for method in ("Explainer", "Grad-CAM", "RISE", "const. 0", "const. 0.5", "const. 1", "ideal"):
        assert f"<td>{method}</td>" in html
    # overlay grid, F1 curve and four specificity matrices (Explainer, Grad-CAM, RISE, ideal) embedded,
    # nothing fetched from elsewhere
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 6
    assert "src='http" not in html and "src='/" not in html
    assert "entropy_regularizer" in html and "class_mask_max_area" in html
    # the Explainer's net and schedule as configs/cpu/explainer.yaml sets them
    assert "The Explainer is black-box, as the paper" in html  # the report leads with what it shows
    assert "<tr><td>explainer.init</td><td>distilled</td></tr>" in html
    assert "<tr><td>explainer.cam</td><td>True</td></tr>" in html
    assert "<tr><td>explainer.levels</td><td>3</td></tr>" in html
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert f"{metrics['methods']['explainer']['cont_iou']:.3f}" in html
