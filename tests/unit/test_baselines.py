"""Baseline attributions (pipeline.evaluate.baselines) on a classifier built by hand to look at one region."""

import pytest
import torch
from torch import nn

from pipeline.evaluate.baselines import (
    constant,
    get_baseline,
    gradcam,
    ideal,
    rise,
    rise_masks,
)
from pipeline.models.explanandum import build_explanandum, freeze_explanandum

torch.set_num_threads(1)

H = W = 16
OBJ0 = (slice(2, 5), slice(2, 5))  # inside the left half: what class 0 looks at
OBJ1 = (slice(10, 13), slice(11, 14))  # inside the right half: what class 1 looks at


class RegionGate(nn.Module):
    """feature_c = brightness · region_c: channel c sees only its own half of the image."""

    def __init__(self):
        super().__init__()
        regions = torch.zeros(2, H, W)
        regions[0, :, : W // 2] = 1.0
        regions[1, :, W // 2 :] = 1.0
        self.register_buffer("regions", regions)

    def forward(self, x):
        return x.mean(dim=1, keepdim=True) * self.regions


class RegionClassifier(nn.Module):
    """logit_c = Σ (brightness over region c) − 4.5: class c's evidence is the brightness of its half."""

    def __init__(self):
        super().__init__()
        self.gate = RegionGate()

    def forward(self, x):
        return self.gate(x).sum(dim=(2, 3)) - 4.5


def _image():
    x = torch.zeros(1, 3, H, W)
    x[(0, slice(None)) + OBJ0] = 1.0
    x[(0, slice(None)) + OBJ1] = 1.0
    return x


def test_gradcam_maps_peak_on_the_object_each_class_looks_at():
    model = RegionClassifier().eval()
    maps = gradcam(model, _image().repeat(2, 1, 1, 1), [0, 1], target_layer=model.gate)
    assert maps.shape == (2, 2, H, W)
    expected0 = torch.zeros(H, W)
    expected0[OBJ0] = 1.0
    expected1 = torch.zeros(H, W)
    expected1[OBJ1] = 1.0
    torch.testing.assert_close(maps[0, 0], expected0, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[1, 1], expected1, atol=1e-5, rtol=0)


def test_rise_maps_peak_on_the_object_each_class_looks_at():
    model = RegionClassifier().eval()
    maps = rise(model, _image(), [0, 1], num_masks=400, grid_size=4, p=0.5, seed=0, batch_size=100)
    assert maps.shape == (1, 2, H, W)
    assert maps.min() >= 0 and maps.max() <= 1
    for k, (own, other) in enumerate([(OBJ0, OBJ1), (OBJ1, OBJ0)]):
        m = maps[0, k]
        assert m[own].mean() > m[other].mean() + 0.3, k
        row, col = divmod(int(m.argmax()), W)
        assert own[0].start - 1 <= row <= own[0].stop and own[1].start - 1 <= col <= own[1].stop, (k, row, col)


def test_rise_masks_are_reproducible_from_the_seed_and_keep_about_p():
    make_a = rise_masks(50, H, W, grid_size=4, p=0.5, seed=3)
    make_b = rise_masks(50, H, W, grid_size=4, p=0.5, seed=3)
    a = make_a(0, 50)
    assert a.shape == (50, H, W)
    assert torch.equal(a, make_b(0, 50)) and torch.equal(a[10:20], make_a(10, 20))
    assert 0.35 < a.mean().item() < 0.65
    assert not torch.equal(a, rise_masks(50, H, W, grid_size=4, seed=4)(0, 50))


def test_gradcam_on_a_frozen_small_cnn_keeps_it_frozen_and_gives_per_image_classes():
    torch.manual_seed(0)
    model = freeze_explanandum(build_explanandum("small_cnn", 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 24, 24)
    maps = gradcam(model, x, torch.tensor([[0, 3, 1], [2, 2, 0]]))
    assert maps.shape == (2, 3, 24, 24)
    assert maps.min() >= 0 and maps.max() <= 1
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_constant_and_ideal_masks():
    x = torch.zeros(2, 3, 2, 3)
    assert torch.equal(constant(0.5)(None, x, [1, 4]), torch.full((2, 2, 2, 3), 0.5))
    assert torch.equal(get_baseline("zeros")(None, x, [0]), torch.zeros(2, 1, 2, 3))
    seg = torch.tensor([[[0, 1, 2], [255, 2, 0]], [[1, 1, 0], [0, 0, 0]]])
    maps = ideal(None, x, [1, 0], seg=seg)
    assert maps.shape == (2, 2, 2, 3)
    assert maps[0, 0].tolist() == [[0, 0, 1], [0, 1, 0]]  # class 1 = value 2; void is not object
    assert maps[1, 1].tolist() == [[1, 1, 0], [0, 0, 0]]


def test_get_baseline_binds_options_and_rejects_unknown_names():
    model = RegionClassifier().eval()
    maps = get_baseline("rise", num_masks=20, grid_size=4, batch_size=20)(model, _image(), [0])
    assert maps.shape == (1, 1, H, W)
    with pytest.raises(Exception, match="unknown baseline"):
        get_baseline("lime")
