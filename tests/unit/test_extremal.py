"""Extremal Perturbations (pipeline.evaluate.extremal): the pieces by hand, and the paper's area rule on
a classifier built to look at one region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.extremal import (
    SmoothMask,
    blur_pyramid,
    class_reward,
    extremal_perturbation,
    optimise_masks,
    perturb,
    pick_area,
    smooth_masks,
)

torch.set_num_threads(1)

SIZE = 32
REGIONS = ((slice(3, 13), slice(3, 13)), (slice(19, 29), slice(19, 29)))  # 100 px each: ~0.098 of the image


class LooksAtOneRegion(torch.nn.Module):
    """Logit c = 100·(mean energy of channel 0 inside region c − 0.3·mean energy outside it)."""

    def forward(self, x):
        energy = x[:, 0] ** 2
        logits = []
        for rows, cols in REGIONS:
            inside = torch.zeros(energy.shape[-2:], dtype=torch.bool)
            inside[rows, cols] = True
            logits.append(100 * (energy[:, inside].mean(1) - 0.3 * energy[:, ~inside].mean(1)))
        return torch.stack(logits, dim=1)


def _checkerboard(batch: int = 1) -> torch.Tensor:
    """±1 at every pixel: a blur of any size takes most of its energy away."""
    i = torch.arange(SIZE)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float()
    return board.expand(batch, 3, SIZE, SIZE).clone()


def test_pick_area_is_the_smallest_area_that_keeps_the_original_score_else_the_largest():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 6.0, 7.0], [0.0, 0.5, 1.0, 1.5]])
    original = torch.tensor([2.5, 4.0, 2.0])
    assert pick_area(scores, original).tolist() == [2, 0, 3]
    # equal counts as kept
    assert pick_area(torch.tensor([[1.0, 2.0]]), torch.tensor([2.0])).tolist() == [1]


def test_the_pyramid_runs_from_the_most_blurred_image_to_the_image_itself():
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    pyramid = blur_pyramid(x, max_blur=3.0, levels=4)
    assert pyramid.shape == (1, 4, 3, SIZE, SIZE)
    assert torch.equal(pyramid[:, -1], x)
    energy = [float((pyramid[0, level] ** 2).mean()) for level in range(4)]
    assert energy == sorted(energy) and energy[0] < 0.05 * energy[-1]  # σ 3, 2, 1, 0: less noise left
    # m = 1 is the image, m = 0 the most blurred level, m = 0.5 halfway between the two middle levels
    ones, zeros, half = (torch.full((1, SIZE, SIZE), v) for v in (1.0, 0.0, 0.5))
    assert torch.allclose(perturb(pyramid, ones), x)
    assert torch.allclose(perturb(pyramid, zeros), pyramid[:, 0])
    assert torch.allclose(perturb(pyramid, half), 0.5 * pyramid[:, 1] + 0.5 * pyramid[:, 2])


def test_smooth_masks_of_constant_parameters_are_those_constants_and_a_bump_is_local():
    generator = SmoothMask((SIZE, SIZE), step=2, sigma=3.0)
    h, w = generator.params_shape
    assert (h, w) == (16, 16)
    mask, full = generator.generate(torch.zeros(1, 1, h, w))
    assert mask.shape == (1, SIZE, SIZE) and full.shape[-1] > SIZE  # the margin of σ px per side
    assert float(mask.abs().max()) == 0.0
    mask, _ = generator.generate(torch.ones(1, 1, h, w))
    # the smooth maximum (softmax pooling) of distance-weighted ones stays just below 1
    assert 0.95 < float(mask.min()) and float(mask.max()) <= 1.0
    bump = torch.zeros(1, 1, h, w)
    bump[0, 0, 4, 4] = 1.0  # the parameter at pixel (8, 8)
    mask, _ = generator.generate(bump)
    assert float(mask[0, 8, 8]) == pytest.approx(1.0)
    assert float(mask[0, 8, 30]) == 0.0 and float(mask[0, 30, 8]) == 0.0
    assert 0.0 < float(mask[0, 8, 12]) < 1.0  # smooth: between the bump and the far field


def _per_pixel_smooth_mask(params, size, step, sigma):
    """The smooth mask written pixel by pixel, as the paper's reference code states it: every output pixel
    (v, u) the softmax-pooled (coldness 20) parameters of its (2r+1)² window, each weighted by
    k(δ/σ) = exp(−2·max(0, δ/σ − 0.5)²) of its distance δ to the pixel."""
    import math

    import torch.nn.functional as F

    margin, padding, radius = round(sigma), 1 + math.ceil(2 * sigma / step), 1 + math.ceil(sigma / step)
    kernel = 2 * radius + 1
    mid = [math.ceil(z / step) + 2 * padding - kernel + 1 for z in size]
    out = [step * z - step + 1 for z in mid]
    v, u = torch.meshgrid(torch.arange(out[0]).float(), torch.arange(out[1]).float(), indexing="ij")
    weight = torch.zeros(kernel * kernel, *out)
    for ky in range(kernel):
        for kx in range(kernel):
            iv = torch.floor(v / step) + ky - padding
            iu = torch.floor(u / step) + kx - padding
            delta = torch.sqrt((v - (margin + step * iv)) ** 2 + (u - (margin + step * iu)) ** 2)
            weight[ky * kernel + kx] = torch.exp(-2 * ((delta / sigma - 0.5).clamp(min=0) ** 2))
    windows = F.unfold(params, (kernel, kernel), padding=padding).reshape(len(params), -1, *mid)
    windows = F.interpolate(windows, scale_factor=step, mode="nearest")[..., : out[0], : out[1]]
    weighted = weight * windows
    full = (weighted * F.softmax(20 * weighted, dim=1)).sum(1).clamp(0, 1)
    return full[:, margin : margin + size[0], margin : margin + size[1]], full


@pytest.mark.parametrize(("size", "step", "sigma"), [((48, 48), 2, 4.5), ((32, 32), 1, 3.0), ((40, 56), 3, 5.0)])
def test_the_smooth_mask_equals_its_pixel_by_pixel_definition(size, step, sigma):
    generator = SmoothMask(size, step, sigma)
    params = torch.rand(3, 1, *generator.params_shape, generator=torch.Generator().manual_seed(0))
    mask, full = generator.generate(params)
    expected_mask, expected_full = _per_pixel_smooth_mask(params, size, step, sigma)
    assert full.shape == expected_full.shape
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(full, expected_full, rtol=0, atol=1e-6)


def test_the_area_rule_on_a_classifier_that_looks_at_one_region():
    model = LooksAtOneRegion().eval()
    x = _checkerboard()
    image_of, class_of = torch.tensor([0, 0]), torch.tensor([0, 1])
    # the rule itself, on unsmoothed masks (a checkerboard loses its energy under any blur) and the class's logit
    # areas are shares of the whole generated mask, its margin included (TorchRay's rule): 0.03 of 38 × 38 px
    settings = {"areas": (0.03, 0.1, 0.2, 0.3), "steps": 150, "jitter": False, "smooth": 0.0, "reward": "simple"}
    masks, scores, original = optimise_masks(model, x, image_of, class_of, **settings)
    assert original.tolist() == pytest.approx([70.0, 70.0], abs=1e-3)
    # 0.03 (43 px) cannot keep the region (100 px): the score falls; from 0.1 on it is kept
    assert (scores[:, 0] < original).all() and (scores[:, 1:] >= original[:, None]).all()
    assert pick_area(scores, original).tolist() == [1, 1]
    # the common baseline signature, classes (B, K): each class's mask at the picked area
    maps = extremal_perturbation(model, x, torch.tensor([[0, 1]]), **settings)
    assert maps.shape == (1, 2, SIZE, SIZE) and torch.allclose(maps[0], masks[:, 1])
    for k, (rows, cols) in enumerate(REGIONS):
        inside = float(maps[0, k][rows, cols].sum() / maps[0, k].sum())
        # most of the mask on the region the class's logit reads (0.1 of the 38 × 38 mask is 144 px: ≤ 0.69 of it)
        assert inside > 0.5, (k, inside)
        assert float(maps[0, k][rows, cols].mean()) > 0.9


def test_the_contrastive_reward_is_the_class_logit_minus_the_largest_other():
    """TorchRay's contrastive_reward, as NN-Explainer ran Extremal Perturbations: y_c − max_{c' ≠ c} y_c'."""
    logits = torch.tensor([[1.0, 5.0, 3.0], [2.0, -1.0, 0.5]])
    target = torch.tensor([0, 0])
    assert class_reward(logits, target).tolist() == [1.0 - 5.0, 2.0 - 0.5]
    assert class_reward(logits, torch.tensor([1, 2])).tolist() == [5.0 - 3.0, 0.5 - 2.0]
    assert class_reward(logits, target, "simple").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="neither contrastive nor simple"):
        optimise_masks(LooksAtOneRegion(), _checkerboard(), torch.tensor([0]), torch.tensor([0]), steps=1, reward="x")


def test_the_contrastive_reward_keeps_the_other_class_out_of_the_mask():
    """Class 0's mask under the contrastive reward gains by hiding region 1 (whose logit is the one subtracted):
    less of its mass on region 1 than under the plain logit."""
    model, x = LooksAtOneRegion().eval(), _checkerboard()
    pair = (torch.tensor([0]), torch.tensor([0]))
    plain = optimise_masks(model, x, *pair, areas=(0.3,), steps=120, jitter=False, smooth=0.0, reward="simple")[0]
    contrast = optimise_masks(model, x, *pair, areas=(0.3,), steps=120, jitter=False, smooth=0.0)[0]
    rows, cols = REGIONS[1]
    assert float(contrast[0, 0][rows, cols].mean()) < float(plain[0, 0][rows, cols].mean()) - 0.1


def test_the_final_smoothing_equals_scipys_gaussian_filter_with_zeros_beyond_the_border():
    from scipy.ndimage import gaussian_filter

    masks = torch.rand(2, 20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = smooth_masks(masks, 2.0)  # ±8 px, as scipy's truncate=4
    peer = [gaussian_filter(m.numpy(), sigma=2.0, mode="constant", cval=0.0, truncate=4.0) for m in masks]
    np.testing.assert_allclose(ours.numpy(), np.stack(peer), rtol=0, atol=1e-12)
