"""``wysiwyc sanity`` on a tiny run: both retrained Explainers, the numbers, a verdict, MLflow nesting, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.train.trainer import fit

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier and an Explainer trained (locally, tracked in sqlite) on tiny synthetic shards."""
    root = tmp_path_factory.mktemp("sanity")
    for split, n, seed in (("train", 64, 0), ("val", 16, 1), ("test", 16, 2)):
        reader = SyntheticReader(n, seed, split, image_size=SIZE)
        ingest(reader, str(root / "data"), split, IngestConfig(workers=1, shard_size=16), progress=False)
    common = [
        f"data.train={root}/data/train",
        f"data.val={root}/data/val",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "trainer.batch_size=16",
        f"trainer.storage={root}/ckpt",
        "optim.lr=0.003",
        "trainer.backend=local",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
    ]
    torch.manual_seed(0)
    clf = fit("classifier", load_config(None, [*common, "trainer.epochs=2", "trainer.run_name=clf"]), progress=False)
    explainer_keys = [*common, "trainer.epochs=1", "trainer.run_name=exp"]
    explainer_keys.append(f"explanandum.checkpoint={clf['checkpoint']}")
    exp = fit("explainer", load_config(None, explainer_keys), progress=False)
    return root, explainer_keys, exp


def _sanity(root, keys, checkpoint):
    cmd = [sys.executable, "-m", "pipeline.cli", "sanity", *keys, f"explainer.checkpoint={checkpoint}"]
    cmd += [f"data.test={root}/data/test", "sanity.levels=[1,2]", "--json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_sanity_retrains_against_both_classifiers_and_gives_the_numbers_and_a_verdict(trained):
    from mlflow.tracking import MlflowClient

    root, keys, exp = trained
    proc = _sanity(root, keys, exp["checkpoint"])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert isinstance(out["passed"], bool) and proc.returncode == (0 if out["passed"] else 1)
    assert out["verdict"] in ("passed", "failed", "inconclusive") and out["passed"] == (out["verdict"] == "passed")
    assert out["verdict_line"].startswith(out["verdict"].upper())
    # the positive control: the same net trained on the ground-truth masks ignores its classifier, so retrained
    # against the randomized classifier it keeps its masks, and the check reports it failed
    control = out["positive_control"]
    assert control["verdict"] == control["expected"] == "failed", control
    assert control["randomized"]["spearman"] > 0.5 and not control["randomized"]["spearman_ok"]
    assert "supervised_real" in control["real"]["checkpoint"] and "supervised_randomized" in control["checkpoint"]
    assert torch.load(control["checkpoint"], weights_only=True)["black_box"] is False  # learns from the labels
    # the cascade: one retrained Explainer per level, the top 1 and 2 conv/linear layers re-initialised
    levels = out["levels"]
    assert [lv["layers"] for lv in levels] == [1, 2] and levels[0]["randomized"][-1] == "fc"
    assert set(levels[0]["randomized"]) < set(levels[1]["randomized"])  # a cascade: each level adds layers
    assert all(-1 <= lv["spearman"] <= 1 and 0 <= lv["cont_iou"] <= 1 for lv in levels)
    # the permuted-labels classifier's fit decides whether that arm tested anything
    fit = out["permuted_fit"]
    assert fit["required"] == pytest.approx(0.8 * fit["real_train_f1"]) and 0 <= fit["train_f1"] <= 1
    assert fit["fitted"] == (fit["train_f1"] >= fit["required"])
    if not fit["fitted"]:
        assert out["verdict"] == "inconclusive" and "learned nothing" in out["verdict_line"]
    for row in ("real", "randomized", "permuted_labels"):
        assert 0.0 <= out[row]["cont_iou"] <= 1.0 and -1.0 <= out[row]["spec_gap"] <= 1.0, row
    for row in ("randomized", "permuted_labels"):
        assert -1.0 <= out[row]["spearman"] <= 1.0 and -1.0 <= out[row]["ssim"] <= 1.0, row
        assert out[row]["checkpoint"].endswith("best.pt") and f"exp-sanity-{row}" in out[row]["checkpoint"]
        expected = out[row]["spearman"] < 0.5 and out[row]["cont_iou"] <= out["criteria"]["iou_bound"]
        assert (out[row]["spearman_ok"] and out[row]["iou_ok"]) == expected
    checks_pass = all(out[r]["spearman_ok"] and out[r]["iou_ok"] for r in ("randomized", "permuted_labels"))
    assert out["passed"] == (checks_pass and fit["fitted"])
    bound = out["real"]["cont_iou"] - 0.5 * (out["real"]["cont_iou"] - out["ones"]["cont_iou"])
    assert out["criteria"]["iou_bound"] == pytest.approx(bound)
    assert 0 < out["num_images"] <= 16 and out["split"] == "test"
    assert out["randomized_layers"][-1] == "fc"
    # the randomised classifier: its top layers differ from the real one's, the lowest block does not
    real_state = torch.load(exp["checkpoint"], weights_only=True)["explanandum"]
    randomized = torch.load(out["classifiers"]["randomized"], weights_only=True)
    assert randomized["sanity"]["randomized"] == out["randomized_layers"]
    assert real_state["arch"] == randomized["arch"] == "small_cnn"

    # MLflow: the sanity run under the evaluated Explainer's run; the three trainings under the sanity run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    sanity_run = client.get_run(out["mlflow_run_id"])
    assert sanity_run.data.tags["mlflow.parentRunId"] == exp["mlflow_run_id"]
    assert sanity_run.data.tags["wysiwyc.sanity"] == out["verdict"]
    assert sanity_run.data.metrics["randomized.spearman"] == pytest.approx(out["randomized"]["spearman"])
    children = client.search_runs(
        [sanity_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'"
    )
    names = sorted(r.data.tags.get("wysiwyc.run_name", r.info.run_name) for r in children)
    assert names == [
        "exp-sanity-level_1",
        "exp-sanity-level_2",
        "exp-sanity-permuted-classifier",
        "exp-sanity-permuted_labels",
        "exp-sanity-randomized",
        "exp-sanity-supervised_randomized",
        "exp-sanity-supervised_real",
    ]

    # relaunched: nothing is trained again, the same numbers come back
    state = (root / "ckpt" / "exp-sanity" / "sanity.json").read_text()
    again = json.loads(_sanity(root, keys, exp["checkpoint"]).stdout)
    assert (root / "ckpt" / "exp-sanity" / "sanity.json").read_text() == state
    for row in ("real", "randomized", "permuted_labels"):
        assert again[row]["cont_iou"] == pytest.approx(out[row]["cont_iou"]), row
    assert again["mlflow_run_id"] == out["mlflow_run_id"]


def test_sanity_without_an_explainer_checkpoint_says_what_to_set(trained):
    root, keys, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sanity", *keys, "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"].startswith("sanity: set explainer.checkpoint to the Explainer under test")
