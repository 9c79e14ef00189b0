"""Every YAML under configs/ loads and validates; the four paper presets match DESIGN.md's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, GateConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODELS = {"gates": GateConfig}  # folders of configs/ whose files are not a Config

# DESIGN.md, "paper presets": (lr, λ_e, λ_tv, λ_a, λ_m, λ_n) — the spec, hard-coded on purpose
PAPER = {
    "voc_vgg16": (1e-5, 1.0, 1.0, 1.0, 0.1, 0.3),
    "coco_vgg16": (1e-5, 1.0, 0.3, 0.3, 0.03, 0.1),
    "voc_resnet50": (1e-4, 3.0, 1.0, 0.8, 0.01, 0.3),
    "coco_resnet50": (1e-5, 3.0, 0.05, 0.1, 0.01, 0.03),
}


def _yaml_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_with_the_values_it_states(path):
    import yaml

    config = load_config(path, model=MODELS.get(path.parent.name, Config))
    stated = yaml.safe_load(path.read_text())
    for section, values in stated.items():
        if not isinstance(values, dict) or isinstance(getattr(config, section), dict):
            assert getattr(config, section) == values
            continue
        for key, value in values.items():
            loaded = getattr(getattr(config, section), key)
            assert loaded == value, f"{path}: {section}.{key} loads as {loaded!r}, the file says {value!r}"


def test_all_paper_presets_exist():
    names = {p.stem for p in (CONFIGS / "paper").glob("*.yaml")}
    for preset in PAPER:
        assert preset in names
        assert f"classifier_{preset}" in names


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_explainer_preset(preset):
    c = load_config(CONFIGS / "paper" / f"{preset}.yaml")
    lr, l_e, l_tv, l_a, l_m, l_n = PAPER[preset]
    assert isinstance(c.optim.lr, float) and c.optim.lr == pytest.approx(lr, rel=1e-12)
    assert c.loss.entropy_regularizer == pytest.approx(l_e)
    assert c.loss.mask_variation_regularizer == pytest.approx(l_tv)
    assert c.loss.mask_area_constraint_regularizer == pytest.approx(l_a)
    assert c.loss.mask_total_area_regularizer == pytest.approx(l_m)
    assert c.loss.ncmask_total_area_regularizer == pytest.approx(l_n)
    assert c.explainer.arch == "deeplabv3_resnet50"
    assert c.explanandum.arch == preset.split("_")[1]
    assert c.data.image_size == 224 and c.trainer.batch_size == 16
    assert c.trainer.use_gpu and c.trainer.amp == "bf16"
    if preset.startswith("voc"):
        assert (c.trainer.patience, c.trainer.min_delta) == (5, pytest.approx(0.001))
    else:
        assert c.trainer.patience == 2


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_classifier_preset(preset):
    c = load_config(CONFIGS / "paper" / f"classifier_{preset}.yaml")
    assert c.explanandum.arch == preset.split("_")[1]
    assert c.explanandum.pretrained_backbone
    assert c.data.image_size == 224 and c.trainer.use_gpu and c.trainer.amp == "bf16"
