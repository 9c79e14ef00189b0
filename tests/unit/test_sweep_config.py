"""Sweep files: base + sweep file + overrides layering, space validation, the selection score."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import PRESETS
from pipeline.errors import WysiwycError
from pipeline.tune import apply_values, load_sweep

CONFIGS = PRESETS  # the checkout's configs/ links here
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml")) + [CONFIGS / "cpu" / "sweep.yaml"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_sweep_preset_resolves_its_base_and_space(path):
    # a sweep over a paper preset needs its ImageNet backbone file, like the preset itself
    paper = "paper" in yaml.safe_load(path.read_text())["sweep"]["base"]
    if paper:
        with pytest.raises(WysiwycError, match="needs explainer.backbone_weights"):
            load_sweep(path)
    config = load_sweep(path, ["explainer.backbone_weights=/weights/resnet50-imagenet.pth"] if paper else [])
    assert Path(config.sweep.base).is_file() and config.sweep.name and config.sweep.space
    for key in config.sweep.space:  # every swept key exists in the trial config
        node = config
        for part in key.split("."):
            node = getattr(node, part)


def _write(
    tmp_path, text: str, base: str = "trainer:\n  epochs: 5\n  batch_size: 4\nloss:\n  entropy_regularizer: 3.0\n"
):
    (tmp_path / "base.yaml").write_text(base)
    sweep = tmp_path / "sweeps" / "s.yaml"
    sweep.parent.mkdir(exist_ok=True)
    sweep.write_text(text)
    return sweep


SWEEP = """sweep:
  name: s
  base: ../base.yaml
  space:
    loss.mask_variation_regularizer: {grid: [0.5, 2.0]}
  metric: train_loss
  mode: min
trainer:
  epochs: 2
"""


def test_trial_config_is_base_then_sweep_file_then_overrides(tmp_path):
    config = load_sweep(_write(tmp_path, SWEEP), ["trainer.batch_size=8", "sweep.num_samples=3"])
    assert config.sweep.base == str((tmp_path / "base.yaml").resolve())  # relative to the sweep file's folder
    assert config.loss.entropy_regularizer == 3.0  # from the base
    assert config.trainer.epochs == 2  # the sweep file over the base
    assert config.trainer.batch_size == 8  # the command line over both
    assert config.sweep.num_samples == 3
    trial = apply_values(config, {"loss.mask_variation_regularizer": 0.5})
    assert trial.loss.mask_variation_regularizer == 0.5 and config.loss.mask_variation_regularizer == 1.0


@pytest.mark.parametrize(
    "space, message",
    [
        ("loss.no_such_lambda: {grid: [1.0]}", "unknown key 'no_such_lambda'"),
        ("loss: {grid: [1.0]}", "is a section"),
        ("trainer.storage: {grid: [a, b]}", "the sweep sets it itself"),
        ("loss.entropy_regularizer: {grid: [1.0, -1.0]}", "loss.entropy_regularizer=-1.0"),
        ("loss.entropy_regularizer: {loguniform: [0.0, 1.0]}", "low > 0"),
        ("loss.entropy_regularizer: {uniform: [2.0, 1.0]}", "low < high"),
        ("loss.entropy_regularizer: {grid: [1.0], choice: [2.0]}", "exactly one of"),
    ],
)
def test_bad_space_is_refused_before_anything_runs(tmp_path, space, message):
    text = SWEEP.replace("loss.mask_variation_regularizer: {grid: [0.5, 2.0]}", space)
    with pytest.raises(WysiwycError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_sweep(_write(tmp_path, text))


def test_missing_base_names_where_it_was_looked_for(tmp_path):
    with pytest.raises(WysiwycError, match="relative to the sweep file's folder"):
        load_sweep(_write(tmp_path, SWEEP.replace("../base.yaml", "base.yaml")))


def test_selection_score_is_masked_image_f1_minus_mask_area():
    from pipeline.config import LossConfig
    from pipeline.train.steps import Stats, StepContext, explainer_loss_fn

    torch.manual_seed(0)
    explanandum = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    explainer = torch.nn.Conv2d(3, 3, 1)
    seg = torch.zeros(4, 8, 8, dtype=torch.long)
    seg[:, 2:6, 2:6] = 1
    batch = {
        "image": torch.randn(4, 3, 8, 8),
        "labels": torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]),
        "seg": seg,
    }
    stats = Stats()
    _, logged = explainer_loss_fn(explainer, explanandum, LossConfig(), StepContext(), ground_truth=True)(batch)
    stats.add(logged)
    out = stats.compute()
    assert out["selection"] == pytest.approx(out["f1"] - out["mask_area"])
    assert 0.0 <= out["c_iou"] <= 1.0 and 0.0 <= out["d_f1"] <= 1.0
    # without ground truth (all void) the segmentation scores are absent, not zero
    stats = Stats()
    stats.add(
        explainer_loss_fn(explainer, explanandum, LossConfig(), StepContext(), ground_truth=True)(
            {**batch, "seg": torch.full_like(seg, 255)}
        )[1]
    )
    assert "c_iou" not in stats.compute() and "selection" in stats.compute()


def test_a_sweep_of_distilled_explainers_is_refused_naming_the_way_out(tmp_path):
    base = "explainer:\n  init: distilled\n  cam: true\ntrainer:\n  epochs: 2\n"
    sweep = _write(
        tmp_path,
        "sweep:\n  name: s\n  base: ../base.yaml\n  space:\n    loss.entropy_regularizer: {grid: [0.5, 1.0]}\n",
        base=base,
    )
    with pytest.raises(WysiwycError, match="init=distilled would distil the classifier again in every trial"):
        load_sweep(sweep, ["data.val=/d/val"])
    assert load_sweep(sweep, ["data.val=/d/val", "explainer.init=scratch"]).explainer.init == "scratch"
