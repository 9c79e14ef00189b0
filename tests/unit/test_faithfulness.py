"""The faithfulness and localisation metrics: hand-built cases with hand-computed answers, and agreement with
the maintained Quantus package (0.6) where it has the same metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.method.faithfulness import (
    FaithfulnessAccumulator,
    curve_auc,
    drop_and_increase,
    gaussian_blur,
    linear_impute,
    perturbation_curves,
    pointing_game,
    relevance_mass,
    road_curves,
    road_removed,
    scaled,
)

H = W = 16


class RegionProbe(nn.Module):
    """Class 0's logit is ``a`` × the mean of channel 0 over a fixed region; class 1's is constant 0."""

    def __init__(self, region: torch.Tensor, a: float = 8.0):
        super().__init__()
        self.region, self.a = region.float(), a

    def forward(self, x):
        inside = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([self.a * inside, torch.zeros_like(inside)], dim=1)


def _sigmoid_probs(model):
    return lambda images: torch.sigmoid(model(images))


def _square(top: int, left: int, size: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[top : top + size, left : left + size] = True
    return m


def test_pointing_game_hits_on_the_object_misses_off_it_and_counts_the_tolerance():
    truth = _square(4, 4, 4).unsqueeze(0)  # rows/cols 4..7
    on, off, near = torch.zeros(3, H, W)
    on[5, 6] = 1.0
    off[14, 14] = 1.0
    near[7, 11] = 1.0  # 4 px right of the object's last column (7)
    maps = torch.stack([on, off, near])
    assert pointing_game(maps, truth.expand(3, H, W)).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, truth.expand(3, H, W), tolerance=4.0).tolist() == [1.0, 0.0, 1.0]
    assert pointing_game(maps, truth.expand(3, H, W), tolerance=3.9).tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(pointing_game(on[None], torch.zeros(1, H, W, dtype=torch.bool))[0])  # no ground truth
    # a plateau: its first pixel in raster order is the point (row 0 here, far from the object)
    plateau = torch.zeros(1, H, W)
    plateau[0, 0:2, 10:12] = 1.0
    plateau[0, 5, 5] = 1.0
    assert pointing_game(plateau, truth).tolist() == [0.0]


def test_relevance_mass_is_the_share_of_the_map_inside_the_object():
    truth = _square(0, 0, 8)  # 64 pixels
    m = torch.zeros(H, W)
    m[0:4, 0:8] = 1.0  # 32 inside
    m[12:16, 0:8] = 0.5  # 32 outside at half weight: mass 16
    assert relevance_mass(m[None], truth[None]).item() == pytest.approx(32 / 48)
    assert math.isnan(relevance_mass(torch.zeros(1, H, W), truth[None]).item())  # no mass


def test_deletion_of_a_perfect_mask_drops_at_the_first_step_and_matches_the_hand_computed_area():
    region = _square(0, 0, 8)  # a quarter of the image: 64 of 256 pixels
    model = RegionProbe(region)
    x = torch.zeros(1, 3, H, W)
    x[0, 0][region] = 1.0
    perfect = region.float()[None] + 0.001 * torch.linspace(1, 0, H * W).view(1, H, W)  # object first
    steps = 16  # 16 pixels per step
    curve = perturbation_curves(_sigmoid_probs(model), x, perfect, torch.tensor([0]), steps)[0]
    # by hand: after k steps, 16k of the region's 64 pixels are gone: p = σ(8 (1 − 16k/64)) until k = 4
    hand = [1 / (1 + math.exp(-8 * max(0.0, 1 - 16 * k / 64))) for k in range(steps + 1)]
    assert curve.tolist() == pytest.approx(hand, abs=1e-6)
    assert curve[1] < curve[0]
    trapezoids = sum((hand[k] + hand[k + 1]) / 2 for k in range(steps)) / steps
    assert curve_auc(curve[None]).item() == pytest.approx(trapezoids, abs=1e-6)
    assert curve_auc(curve[None]).item() == pytest.approx(np.trapezoid(curve.numpy(), dx=1 / steps), abs=1e-12)
    # the reverse ranking (background first) keeps the probability until the last quarter
    reverse = 1 - perfect
    late = perturbation_curves(_sigmoid_probs(model), x, reverse, torch.tensor([0]), steps)[0]
    assert curve_auc(late[None]).item() > curve_auc(curve[None]).item() + 0.3


def test_insertion_reveals_onto_the_blurred_image_in_the_maps_order():
    region = _square(0, 0, 8)
    model = RegionProbe(region)
    x = torch.zeros(1, 3, H, W)
    x[0, 0][region] = 1.0
    start = gaussian_blur(x, 2.0)
    curve = perturbation_curves(_sigmoid_probs(model), x, region.float()[None], torch.tensor([0]), 4, start=start)[0]
    assert curve[0].item() == pytest.approx(torch.sigmoid(model(start))[0, 0].item())  # nothing revealed
    assert curve[1].item() == pytest.approx(torch.sigmoid(torch.tensor(8.0)).item(), abs=1e-6)  # the region first
    assert curve[-1].item() == pytest.approx(torch.sigmoid(model(x))[0, 0].item())


def test_gaussian_blur_keeps_a_constant_image_and_the_mean():
    flat = torch.full((1, 3, 12, 12), 0.7)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat)
    img = torch.rand(2, 3, 12, 12)
    assert gaussian_blur(img, 1.0).mean().item() == pytest.approx(img.mean().item(), abs=0.02)


def test_average_drop_and_increase_by_hand():
    full = torch.tensor([0.8, 0.5, 0.0])
    masked = torch.tensor([0.2, 0.6, 0.1])
    drop, increase = drop_and_increase(full, masked)
    assert drop[:2].tolist() == pytest.approx([75.0, 0.0]) and math.isnan(drop[2])
    assert increase.tolist() == [0.0, 1.0, 1.0]


def test_the_accumulator_averages_pairs_per_image_then_images():
    region = _square(0, 0, 8)
    model = RegionProbe(region)
    x = torch.zeros(2, 3, H, W)
    x[:, 0][:, region] = 1.0
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # image 0: two classes, image 1: one
    seg = torch.zeros(2, H, W, dtype=torch.long)
    seg[:, region] = 1  # class 0's pixels
    seg[0, 12:, 12:] = 2  # class 1's
    maps = torch.zeros(2, 2, H, W)
    maps[:, 0][:, region] = 1.0  # class 0: on its object (a hit, mass 1)
    maps[0, 1, 0, 15] = 1.0  # class 1: off its object (a miss, mass 0)
    acc = FaithfulnessAccumulator(steps=4, tolerance=0.0, blur_sigma=1.0)
    acc.update(_sigmoid_probs(model), x, labels, seg, maps)
    assert acc.per_image("pointing_game").tolist() == [0.5, 1.0]
    assert acc.per_image("relevance_mass").tolist() == pytest.approx([0.5, 1.0])
    assert acc.means()["pointing_game"] == pytest.approx(0.75)
    lo, hi = acc.intervals()["pointing_game"]
    assert 0.5 <= lo <= 0.75 <= hi <= 1.0
    curves = acc.mean_curves()
    assert len(curves["deletion"]) == len(curves["insertion"]) == 5
    assert len(curves["road_morf"]) == len(curves["road_lerf"]) == 9
    # ROAD: removing class 0's most relevant pixels (its whole region) lowers p_0 below removing its least relevant
    assert acc.per_image("road_morf")[1] < acc.per_image("road_lerf")[1]
    assert scaled(15, 48) == pytest.approx(15 * 48 / 224)


# ------------------------------------------------------------------------------- Quantus, a peer


S = 12  # Quantus wants its step (3 channels × pixels) to divide H·W: 144 pixels in 9 steps of 16


def _random_case(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 5)
    ).eval()
    x = torch.randn(6, 3, S, S)
    maps = torch.rand(6, S, S)  # continuous: no ties between pixels
    classes = torch.randint(0, 5, (6,))
    truth = torch.rand(6, S, S) > 0.7
    return model, x, maps, classes, truth


def test_deletion_curves_equal_quantus_pixel_flipping_with_the_same_baseline_and_steps():
    quantus = pytest.importorskip("quantus")
    model, x, maps, classes, _ = _random_case()
    steps = 9  # 16 pixels per step, i.e. 48 features (3 channels) per Quantus step
    ours = perturbation_curves(_sigmoid_probs(model), x, maps, classes, steps)
    metric = quantus.PixelFlipping(
        features_in_step=3 * S * S // steps, perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True
    )
    a = np.repeat(maps.numpy()[:, None], 3, axis=1)
    logits = np.asarray(
        metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=classes.numpy(),
            a_batch=a,
            channel_first=True,
            softmax=False,
            device="cpu",
        )
    )
    theirs = 1 / (1 + np.exp(-logits))  # Quantus' curve starts after the first step
    assert theirs.shape == (6, steps)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, atol=1e-5)
    # its AUC is trapezoids with dx = 1 over its curve (from the first step; return_auc_per_sample calls
    # np.trapz, gone in NumPy 2.4, so it is computed here); ours is on [0, 1] from step 0, i.e.
    # K · ours = theirs + (p_0 + p_1) / 2
    theirs_auc = np.trapezoid(theirs, dx=1, axis=1)
    c = ours.numpy()
    np.testing.assert_allclose(steps * curve_auc(ours).numpy(), theirs_auc + (c[:, 0] + c[:, 1]) / 2, atol=1e-4)


def test_pointing_game_and_relevance_mass_equal_quantus_on_random_maps():
    quantus = pytest.importorskip("quantus")
    model, x, maps, classes, truth = _random_case(1)
    kwargs = dict(
        model=model,
        x_batch=x.numpy(),
        y_batch=classes.numpy(),
        a_batch=maps.numpy()[:, None],
        s_batch=truth.numpy()[:, None].astype(np.float32),
        channel_first=True,
        device="cpu",
    )
    theirs_pg = np.asarray(quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)(**kwargs), float)
    theirs_rm = np.asarray(
        quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)(**kwargs), float
    )
    np.testing.assert_array_equal(pointing_game(maps, truth).numpy(), theirs_pg)
    np.testing.assert_allclose(relevance_mass(maps, truth).numpy(), theirs_rm, atol=1e-6)


def test_a_constant_map_ranks_no_pixel_so_its_ranking_metrics_are_undefined():
    region = _square(0, 0, 8)
    model = RegionProbe(region)
    x = torch.zeros(1, 3, H, W)
    x[0, 0][region] = 1.0
    seg = torch.zeros(1, H, W, dtype=torch.long)
    seg[0, region] = 1
    acc = FaithfulnessAccumulator(steps=4, tolerance=0.0, blur_sigma=1.0, ranking=False)
    acc.update(_sigmoid_probs(model), x, torch.tensor([[1.0, 0.0]]), seg, torch.full((1, 2, H, W), 0.5))
    means = acc.means()
    assert math.isnan(means["deletion_auc"]) and math.isnan(means["pointing_game"]) and acc.mean_curves() == {}
    assert means["relevance_mass"] == pytest.approx(64 / 256)  # the object's share of a flat map
    full, half = torch.sigmoid(model(x))[0, 0].item(), torch.sigmoid(model(0.5 * x))[0, 0].item()
    assert means["average_drop"] == pytest.approx((full - half) / full * 100)


# ------------------------------------------------------------------------------- ROAD, grad-cam a peer


def test_linear_imputation_fills_a_hole_with_the_mean_of_its_neighbours_and_keeps_the_rest():
    image = torch.arange(3 * 5 * 5, dtype=torch.float64).view(3, 5, 5)  # each channel a linear ramp
    hole = torch.zeros(5, 5, dtype=torch.bool)
    hole[1:4, 1:4] = True
    filled = linear_impute(image, hole, noise=0.0)
    assert torch.equal(filled[:, ~hole], image[:, ~hole])
    assert torch.allclose(filled, image)  # a linear ramp is its neighbours' weighted mean everywhere
    one = torch.zeros(5, 5, dtype=torch.bool)
    one[0, 0] = True  # a corner: 3 neighbours, weights 1/6, 1/6, 1/12 renormalised
    corner = linear_impute(image, one, noise=0.0)[0, 0, 0]
    assert corner == pytest.approx((image[0, 0, 1] * 2 + image[0, 1, 0] * 2 + image[0, 1, 1]) / 5)
    noisy = linear_impute(image, hole, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert 0 < (noisy - image).abs().max() < 0.06


@pytest.mark.parametrize("most_relevant_first", [True, False])
def test_road_equals_grad_cams_road_at_the_same_percentiles_without_noise(most_relevant_first):
    """grad-cam's ROAD (pytorch_grad_cam.metrics.road) at kept-pixel percentile p removes what ours removes at the
    fraction 1 − p/100 (MoRF) or p/100 (LeRF) and returns the mean change of the score: ours, mapped the same
    way, with noise 0 in both (its imputer adds 0.01·randn by default, unseeded)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        AveragerAcrossThresholds,
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    torch.manual_seed(0)
    size = 11  # 121 pixels: every percentile 10…90 falls on a pixel's value
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 5)
    ).eval()
    x = torch.randn(4, 3, size, size)
    maps = torch.rand(4, size, size)
    classes = torch.tensor([0, 3, 1, 4])
    remove = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    percentiles = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    averager = AveragerAcrossThresholds(
        lambda p: PerturbationConfidenceMetric(remove(p, NoisyLinearImputer(noise=0.0))), percentiles
    )
    targets = [lambda out, c=int(c): torch.sigmoid(out[c]) for c in classes]
    theirs = averager(x, maps.numpy(), targets, model)  # at percentile p, 100 − p % of the pixels removed
    fractions = tuple(1 - p / 100 for p in percentiles)
    probs = _sigmoid_probs(model)
    with torch.no_grad():
        curves = road_curves(probs, x, maps, classes, most_relevant_first, fractions=fractions, noise=0.0)
        full = probs(x)[torch.arange(4), classes].double()
    ours = (curves - full[:, None]).mean(1)
    assert ours.numpy() == pytest.approx(theirs, abs=1e-5)
    # the pixels removed at 30%: 121 − round(0.7 · 120) = 37, the most (least) relevant ones
    removed = road_removed(maps, 0.3, most_relevant_first)
    assert removed.flatten(1).sum(1).tolist() == [37] * 4
    ranked = maps.flatten(1).argsort(1, descending=most_relevant_first)[:, :37]
    assert all(removed[i].flatten()[ranked[i]].all() for i in range(4))
