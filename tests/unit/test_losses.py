"""The Explainer's loss terms (pipeline.method.losses), on tensors small enough to check by hand."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.method.losses import (
    class_mask_area_loss,
    classifier_loss,
    entropy_loss,
    explainer_loss,
    rt_alternative,
    rt_saliency_loss,
    supervised_mask_loss,
    total_variation,
)
from pipeline.models.explainer import CompactExplainer
from pipeline.models.explanandum import SmallCNN, freeze_explanandum

torch.set_num_threads(1)

PAPER_WEIGHTS = types.SimpleNamespace(
    entropy_regularizer=1.0,
    mask_variation_regularizer=1.0,
    mask_area_constraint_regularizer=1.0,
    mask_total_area_regularizer=0.1,
    ncmask_total_area_regularizer=0.3,
    class_mask_min_area=0.05,
    class_mask_max_area=0.3,
)


class SumClassifier(nn.Module):
    """F(x)_c = w_c · Σ x: a classifier whose logits are easy to compute by hand."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", torch.tensor(w))

    def forward(self, x):
        return x.sum(dim=(1, 2, 3))[:, None] * self.w


def test_total_variation_counts_the_reflected_border_difference_twice():
    z = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]]])
    # right: row0 |0-1|+|1-3| + reflected |3-1| = 5, row1 0+2+2 = 4 ; down: (2+1+3) twice = 12
    assert total_variation(z).item() == pytest.approx((5 + 4 + 12) / 6)


def test_total_variation_equals_the_papers_reflect_padded_difference_convolution():
    z = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
    down = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]).view(1, 1, 3, 3)
    padded = F.pad(z.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    paper = (F.conv2d(padded, right).abs() + F.conv2d(padded, down).abs()).mean()
    torch.testing.assert_close(total_variation(z), paper)
    # NN-Explainer's RTSalTotalVariationConv: the same convolution, the differences squared
    rt_sal = (F.conv2d(padded, right).square() + F.conv2d(padded, down).square()).mean()
    torch.testing.assert_close(total_variation(z, squared=True), rt_sal)


def test_total_variation_of_a_constant_mask_is_zero():
    assert total_variation(torch.full((2, 4, 4), 0.3)).item() == 0.0


def test_entropy_loss_of_uniform_logits_is_minus_log_c_over_c():
    assert entropy_loss(torch.zeros(2, 4)).item() == pytest.approx(-math.log(4) / 4)


def test_entropy_loss_of_a_confident_prediction_is_near_zero():
    assert entropy_loss(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_area_constraint_sums_present_classes_and_averages_over_the_batch():
    # 1×10 masks; a_min 0.2 → the 2 largest values should be 1, a_max 0.5 → all but the 5 largest 0
    S = torch.randn(3, 3, 1, 10)  # classes that are not present must not matter
    S[0, 0] = 0.0  # s = 0.5 everywhere: min 2·0.5, max 5·0.5 → 3.5/10
    S[0, 1] = torch.tensor([30.0] * 6 + [-30.0] * 4)  # six ones: one too many for a_max → 1/10
    S[1, 2] = -30.0  # all zero: the two required ones are missing → 2/10
    y = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])  # image 2 has no label: contributes 0
    expected = ((0.35 + 0.1) + 0.2 + 0.0) / 3
    assert class_mask_area_loss(S, y, 0.2, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_area_constraint_is_zero_for_masks_within_the_bounds():
    S = torch.full((1, 1, 2, 5), -30.0)
    S[0, 0, 0, :3] = 30.0  # 3 of 10 pixels: between a_min 0.2 and a_max 0.5
    assert class_mask_area_loss(S, torch.tensor([[1]]), 0.2, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_explainer_loss_terms_by_hand():
    x = torch.tensor([[[[2.0, 4.0], [0.0, 2.0]]]])  # (1,1,2,2)
    y = torch.tensor([[1.0, 0.0]])
    ln3 = math.log(3.0)
    S = torch.tensor([[[[0.0, ln3], [0.0, 0.0]], [[-ln3, 0.0], [-ln3, -ln3]]]])
    w = types.SimpleNamespace(**{**vars(PAPER_WEIGHTS), "class_mask_min_area": 0.25, "class_mask_max_area": 0.5})
    out = explainer_loss(SumClassifier([1.0, -0.5]), x, y, S, w)

    # m = [[.5,.75],[.5,.5]], n = [[.25,.5],[.25,.25]]
    torch.testing.assert_close(out["m"], torch.tensor([[[0.5, 0.75], [0.5, 0.5]]]))
    torch.testing.assert_close(out["n"], torch.tensor([[[0.25, 0.5], [0.25, 0.25]]]))
    # m⊙x sums to 5 → logits (5, −2.5); (1−m)⊙x sums to 3 → logits (3, −1.5)
    torch.testing.assert_close(out["logits_masked"], torch.tensor([[5.0, -2.5]]))
    torch.testing.assert_close(out["logits_inverted"], torch.tensor([[3.0, -1.5]]))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    classification = (softplus(-5.0) + softplus(-2.5)) / 2
    p = torch.softmax(torch.tensor([3.0, -1.5]), 0)
    entropy = float((p * p.log()).mean())
    tv = 0.25 + 0.25
    area = (0.25 + 2 * 0.5) / 4  # sorted m = (.75,.5,.5,.5): 1 − .75 below a_min, .5 + .5 beyond a_max
    expected = {
        "classification": classification,
        "entropy": entropy,
        "tv": tv,
        "area_constraint": area,
        "mask_area": 0.5625,
        "ncmask_area": 0.3125,
    }
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key
    total = classification + entropy + tv + area + 0.1 * 0.5625 + 0.3 * 0.3125
    assert out["total"].item() == pytest.approx(total, rel=1e-5)


RT_WEIGHTS = types.SimpleNamespace(
    rt_variation_regularizer=10.0,
    rt_area_regularizer=1.0,
    rt_destroyer_regularizer=5.0,
    rt_destroyer_power=0.3,
    rt_alternative="both",
)


def test_rt_saliency_loss_terms_by_hand():
    x = torch.tensor([[[[2.0, 4.0], [0.0, 2.0]]]])
    y = torch.tensor([[1.0, 0.0]])
    ln3 = math.log(3.0)
    S = torch.tensor([[[[0.0, ln3], [0.0, 0.0]], [[-ln3, 0.0], [-ln3, -ln3]]]], requires_grad=True)
    F_ = SumClassifier([1.0, -0.5])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # m_0 = [[.5,.75],[.5,.5]]; alternative 0: Φ(x, m) = m⊙x sums to 5, Φ(x, 1 − m) to 3
    # TV squared (NN-Explainer's RTSalTotalVariationConv): the one step of .25 in each direction, its reflection
    # counted again: (2 · .25² + 2 · .25²) / 4 pixels = .0625 (the L1 TV of the paper's loss would be .25)
    out = rt_saliency_loss(F_, x, y, S, RT_WEIGHTS, alternative=torch.zeros_like(x))
    expected = {"preserver": softplus(-5.0), "destroyer": sigmoid(3.0), "tv": 0.0625, "area": 0.5625}
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key
    total = 10 * 0.0625 + 0.5625 + softplus(-5.0) + 5 * sigmoid(3.0) ** 0.3
    assert out["total"].item() == pytest.approx(total, rel=1e-5)
    # logged like the paper's loss: F(m ⊙ x), F((1 − m) ⊙ x) and the merged target mask's area
    torch.testing.assert_close(out["logits_masked"], torch.tensor([[5.0, -2.5]]))
    torch.testing.assert_close(out["logits_inverted"], torch.tensor([[3.0, -1.5]]))
    assert out["mask_area"].item() == pytest.approx(0.5625)
    # the alternative fills what the mask removes: with ones, Φ(x, m) sums to 5 + Σ(1 − m) = 6.75
    ones = rt_saliency_loss(F_, x, y, S, RT_WEIGHTS, alternative=torch.ones_like(x))
    assert ones["preserver"].item() == pytest.approx(softplus(-6.75), rel=1e-5)
    assert ones["destroyer"].item() == pytest.approx(sigmoid(3.0 + 2.25), rel=1e-5)
    # only the present class's logits carry gradient; the absent class's mask is untouched
    out["total"].backward()
    assert S.grad[0, 0].abs().sum() > 0 and S.grad[0, 1].abs().sum() == 0
    # two present classes: ONE merged mask (pixel-wise max) for both, the preserver and destroyer averaged over
    # the (image, class) pairs, and the power applied to the destroyer's mean
    both = torch.tensor([[1.0, 1.0]])
    merged = torch.maximum(torch.sigmoid(S[0, 0]), torch.sigmoid(S[0, 1])).detach()  # = m_0 here
    two = rt_saliency_loss(F_, x, both, S.detach(), RT_WEIGHTS, alternative=torch.zeros_like(x))
    kept, removed = (merged * x[0, 0]).sum().item(), ((1 - merged) * x[0, 0]).sum().item()  # 5 and 3
    logits_kept, logits_removed = (kept, -0.5 * kept), (removed, -0.5 * removed)
    preserver = sum(softplus(-v) for v in logits_kept) / 2
    destroyer = sum(sigmoid(v) for v in logits_removed) / 2
    assert two["preserver"].item() == pytest.approx(preserver, rel=1e-5)
    assert two["destroyer"].item() == pytest.approx(destroyer, rel=1e-5)
    power_of_mean = 10 * 0.0625 + 0.5625 + preserver + 5 * destroyer**0.3
    mean_of_powers = 10 * 0.0625 + 0.5625 + preserver + 5 * sum(sigmoid(v) ** 0.3 for v in logits_removed) / 2
    assert two["total"].item() == pytest.approx(power_of_mean, rel=1e-5)
    assert abs(power_of_mean - mean_of_powers) > 1e-3  # the two readings differ: the test tells them apart


def test_rt_saliency_alternative_is_a_blur_or_noise():
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    blur = rt_alternative(x, "blur")
    assert blur.shape == x.shape and blur.var() < 0.3 * x.var()  # σ 10 px at 224: ~1.1 px here
    noise = rt_alternative(x, "noise", torch.Generator().manual_seed(1))
    assert abs(float(noise.std()) - 1.0) < 0.15 and abs(float((noise * x).mean())) < 0.15
    # coloured: mean 0.11 plus one offset per image and channel within ±0.33
    offsets = noise.mean((2, 3)) - 0.11
    assert offsets.abs().max() < 0.33 + 0.1 and offsets.std() > 0.05
    # the trainer's batches under cpu_amp: channels_last, bf16 autocast; the blur stays float32 (and fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = rt_alternative(x.contiguous(memory_format=torch.channels_last), "blur")
    assert amp.dtype == torch.float32 and torch.allclose(amp, blur)
    drawn = {bool(rt_alternative(x, "both", torch.Generator().manual_seed(s)).var() < 0.3) for s in range(12)}
    assert drawn == {True, False}  # either, drawn per batch


def test_explainer_loss_weights_scale_their_terms():
    x = torch.randn(2, 3, 6, 6)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    S = torch.randn(2, 3, 6, 6)
    F_ = SumClassifier([0.1, -0.2, 0.05])
    base = explainer_loss(F_, x, y, S, PAPER_WEIGHTS)
    heavy = types.SimpleNamespace(
        **{**vars(PAPER_WEIGHTS), "mask_variation_regularizer": 3.0, "entropy_regularizer": 0.0}
    )
    other = explainer_loss(F_, x, y, S, heavy)
    delta = 2.0 * base["tv"] - 1.0 * base["entropy"]
    torch.testing.assert_close(other["total"], base["total"] + delta)


def test_single_label_option_uses_cross_entropy():
    x = torch.ones(1, 1, 2, 2)
    S = torch.full((1, 2, 2, 2), 30.0)  # m ≈ 1: the masked image is the image
    out = explainer_loss(SumClassifier([0.5, 0.0]), x, torch.tensor([[1.0, 0.0]]), S, PAPER_WEIGHTS, single_label=True)
    assert out["classification"].item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)


def test_classifier_loss_is_binary_cross_entropy_with_logits():
    assert classifier_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))


def test_gradients_reach_the_explainer_and_never_change_the_frozen_explanandum():
    torch.manual_seed(0)
    explanandum = SmallCNN(3, channels=(4, 4, 4, 4))
    explanandum.train()
    explanandum(torch.randn(4, 3, 16, 16))  # non-trivial BatchNorm running stats
    freeze_explanandum(explanandum)
    explainer = CompactExplainer(3, channels=(4, 4, 4, 4))
    parent = nn.ModuleDict({"explainer": explainer, "explanandum": explanandum})
    before = copy.deepcopy(explanandum.state_dict())
    explainer_before = copy.deepcopy(explainer.state_dict())

    parent.train()  # what a training loop does every epoch; must not unfreeze the Explanandum
    optimizer = torch.optim.Adam(parent.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for _ in range(2):
        optimizer.zero_grad()
        out = explainer_loss(explanandum, x, y, explainer(x), PAPER_WEIGHTS)
        out["total"].backward()
        optimizer.step()
        parent.train()

    grads = [p.grad for p in explainer.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in explanandum.parameters())
    after = explanandum.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # weights and BatchNorm running stats alike
    assert not any(m.training for m in explanandum.modules())
    assert explainer.training
    assert any(not torch.equal(explainer.state_dict()[k], v) for k, v in explainer_before.items())


def test_the_supervised_positive_control_learns_the_ground_truth_masks_by_hand():
    """loss.kind=supervised: binary cross-entropy of each class's mask against seg == c + 1, void pixels left out."""
    S = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]]]])  # (1, 2 classes, 1, 2 pixels)
    seg = torch.tensor([[[1, 255]]])  # pixel 0: class 0; pixel 1: void
    p0, p1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(0.5))
    expected = (-torch.log(p0) - torch.log(1 - p1)) / 2  # pixel 0 only: class 0 is 1 there, class 1 is 0
    assert supervised_mask_loss(S, seg) == pytest.approx(float(expected))
    perfect = torch.tensor([[[[20.0, 0.0]], [[-20.0, 0.0]]]])
    assert supervised_mask_loss(perfect, seg) < 1e-8
