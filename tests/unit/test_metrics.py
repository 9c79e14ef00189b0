"""Evaluation metrics (pipeline.evaluate.metrics) on masks small enough to score by hand."""

import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.metrics import (
    ClassSpecificityAccumulator,
    MetricAccumulator,
    class_specificity_matrix,
    class_specificity_sums,
    foreground_and_valid,
    roc_auc,
    saliency,
    segmentation_scores,
    specificity_gaps,
)


def _seg():
    # 2×4 class-index map: 0 background, 1 = class 0, 255 void
    return torch.tensor([[[0, 1, 1, 0], [0, 1, 255, 255]]])


def test_foreground_and_valid_from_a_class_index_map():
    fg, valid = foreground_and_valid(_seg())
    assert fg.tolist() == [[[False, True, True, False], [False, True, False, False]]]
    assert valid.tolist() == [[[True, True, True, True], [True, True, False, False]]]


def test_all_ones_mask_iou_equals_the_foreground_fraction_of_valid_pixels():
    fg, valid = foreground_and_valid(_seg())
    s = segmentation_scores(torch.ones(1, 2, 4), fg, valid)
    assert s["c_iou"].item() == pytest.approx(3 / 6)  # 3 object pixels of 6 valid ones
    assert s["d_iou"].item() == pytest.approx(3 / 6)
    assert s["object_coverage"].item() == pytest.approx(1.0)
    assert s["background_coverage"].item() == pytest.approx(1.0)
    assert s["acc"].item() == pytest.approx(0.5)
    assert s["auc"].item() == pytest.approx(0.5)  # all scores tied


def test_ideal_mask_scores_one_on_f1_iou_and_auc():
    fg, valid = foreground_and_valid(_seg())
    s = segmentation_scores(fg.float(), fg, valid)
    for key in ("d_f1_25", "d_f1_50", "d_f1_75", "d_f1", "c_f1", "acc", "d_iou", "c_iou", "auc", "object_coverage"):
        assert s[key].item() == pytest.approx(1.0, abs=1e-6), key
    assert s["background_coverage"].item() == 0.0


def test_void_pixels_are_ignored_whatever_the_mask_says_there():
    fg, valid = foreground_and_valid(_seg())
    ideal = fg.float()
    noisy = ideal.clone()
    noisy[0, 1, 2:] = torch.tensor([1.0, 0.3])  # values on the two void pixels
    a, b = segmentation_scores(ideal, fg, valid), segmentation_scores(noisy, fg, valid)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_discrete_and_continuous_scores_by_hand():
    # 1×4 image: object at pixels 0,1; mask (0.9, 0.4, 0.6, 0.0)
    fg = torch.tensor([[[True, True, False, False]]])
    valid = torch.ones_like(fg)
    m = torch.tensor([[[0.9, 0.4, 0.6, 0.0]]])
    s = segmentation_scores(m, fg, valid)
    # t=0.25: predicted {0,1,2}: P=2/3, R=1 → 0.8 ; t=0.5: {0,2}: P=R=1/2 → 0.5 ; t=0.75: {0}: P=1, R=1/2 → 2/3
    assert s["d_f1_25"].item() == pytest.approx(0.8, abs=1e-6)
    assert s["d_f1_50"].item() == pytest.approx(0.5, abs=1e-6)
    assert s["d_f1_75"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert s["d_f1"].item() == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-6)
    # soft: tp = 1.3, fp = 0.6, fn = 0.7 → P = 1.3/1.9, R = 1.3/2.0
    P, R = 1.3 / 1.9, 1.3 / 2.0
    assert s["c_f1"].item() == pytest.approx(2 * P * R / (P + R), abs=1e-6)
    assert s["acc"].item() == pytest.approx((1.3 + 1.4) / 4, abs=1e-6)
    # continuous IoU: Σmin = 0.9+0.4 = 1.3, Σmax = 1+1+0.6+0 = 2.6
    assert s["c_iou"].item() == pytest.approx(0.5, abs=1e-6)
    # discrete IoU per threshold 0.1…0.9: predicted sets give 2/3 (t<.4), 1/3 (.4≤t<.6), 1/2 (.6≤t<.9), 0 (t≥.9)
    per_t = [2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 1 / 2, 0.0]
    assert s["d_iou"].item() == pytest.approx(sum(per_t) / 9, abs=1e-6)
    # AUC: positives (0.9, 0.4) vs negatives (0.6, 0.0): pairs won 1+1+0+1 = 3 of 4
    assert s["auc"].item() == pytest.approx(0.75)
    assert s["object_coverage"].item() == pytest.approx(0.65)
    assert s["background_coverage"].item() == pytest.approx(0.3)


def test_auc_counts_ties_as_half_and_matches_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(3, 5, 6, generator=g) * 4).round() / 4  # many ties
    pos = torch.rand(3, 5, 6, generator=g) > 0.6
    valid = torch.rand(3, 5, 6, generator=g) > 0.2
    got = roc_auc(scores, pos, valid)
    for b in range(3):
        p = scores[b][pos[b] & valid[b]]
        n = scores[b][~pos[b] & valid[b]]
        wins = (p[:, None] > n[None, :]).float() + 0.5 * (p[:, None] == n[None, :]).float()
        assert got[b].item() == pytest.approx(wins.mean().item(), abs=1e-6)


def test_empty_foreground_leaves_auc_and_object_coverage_undefined():
    fg = torch.zeros(1, 2, 2, dtype=torch.bool)
    s = segmentation_scores(torch.full((1, 2, 2), 0.25), fg, torch.ones_like(fg))
    assert math.isnan(s["auc"].item()) and math.isnan(s["object_coverage"].item())
    assert s["background_coverage"].item() == pytest.approx(0.25)
    assert s["c_iou"].item() == 0.0 and s["d_f1"].item() == 0.0
    assert s["acc"].item() == pytest.approx(0.75)


def test_all_void_image_gives_nan_for_every_metric_and_the_accumulator_skips_it():
    fg = torch.zeros(2, 2, 2, dtype=torch.bool)
    fg[1, 0, 0] = True
    valid = torch.ones_like(fg)
    valid[0] = False
    s = segmentation_scores(fg.float(), fg, valid)
    assert all(math.isnan(v[0].item()) for v in s.values())
    acc = MetricAccumulator()
    acc.update(s)
    means = acc.compute()
    assert means["c_iou"] == pytest.approx(1.0) and acc.counts["c_iou"] == 1


def test_metric_accumulator_averages_over_batches():
    acc = MetricAccumulator()
    acc.update({"c_iou": torch.tensor([0.2, 0.4])})
    acc.update({"c_iou": torch.tensor([0.9]), "auc": torch.tensor([float("nan")])})
    other = MetricAccumulator()
    other.update({"c_iou": torch.tensor([0.5])})
    acc.merge(other)
    out = acc.compute()
    assert out["c_iou"] == pytest.approx(2.0 / 4)
    assert math.isnan(out["auc"])


def test_saliency_is_log_area_minus_log_mean_true_class_probability():
    mask = torch.zeros(2, 2, 5)
    mask[0, :, :2] = 1.0  # area 0.4
    probs = torch.tensor([[0.8, 0.1, 0.4], [0.5, 0.5, 0.5]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    s = saliency(mask, probs, labels)
    assert s[0].item() == pytest.approx(math.log(0.4) - math.log(0.6), rel=1e-5)
    assert s[1].item() == pytest.approx(math.log(0.05) - math.log(0.5), rel=1e-5)  # area floor 0.05
    s_sum = saliency(mask, probs, labels, class_prob="sum")
    assert s_sum[0].item() == pytest.approx(math.log(0.4) - math.log(1.2), rel=1e-5)
    s_prod = saliency(mask, probs, labels, class_prob="product")
    assert s_prod[0].item() == pytest.approx(math.log(0.4) - math.log(0.32), rel=1e-5)
    assert math.isnan(saliency(mask[:1], probs[:1], torch.zeros(1, 3))[0].item())


def _toy_prob_fn(x):
    """Class c is 'seen' with probability equal to the mean brightness of column c (sigmoid-free toy)."""
    return x[:, 0].mean(dim=1).clamp(0, 1)  # (N, W) with W = C


def test_class_specificity_matrix_on_a_toy_classifier():
    # 3 classes, 1×3 images of ones; class c's mask keeps column c only
    images = torch.ones(2, 3, 1, 3)
    labels = torch.tensor([[1, 1, 0], [1, 1, 1]])
    masks = torch.eye(3).view(1, 3, 1, 3).expand(2, 3, 1, 3).clone()
    masks[1, 0] = torch.tensor([[1.0, 0.5, 0.0]])  # image 1's class-0 mask leaks half onto class 1
    M = class_specificity_matrix(_toy_prob_fn, images, labels, masks)
    # column 0 (mask of class 0): p_0 = 1 in both images; p_1 = 0 (image 0) and 0.5 (image 1); p_2 only image 1: 0
    assert M[0, 0].item() == pytest.approx(1.0)
    assert M[1, 0].item() == pytest.approx(0.25)
    assert M[2, 0].item() == pytest.approx(0.0)
    assert M[1, 1].item() == pytest.approx(1.0) and M[2, 2].item() == pytest.approx(1.0)
    assert M[0, 2].item() == pytest.approx(0.0)  # only image 1 has class 2


def test_class_specificity_accumulates_over_batches_and_leaves_unseen_pairs_nan():
    images = torch.ones(2, 3, 1, 3)
    labels = torch.tensor([[1, 1, 0], [1, 1, 0]])
    masks = torch.eye(3).view(1, 3, 1, 3).expand(2, 3, 1, 3).clone()
    masks[1, 0] = torch.tensor([[1.0, 1.0, 0.0]])
    acc = ClassSpecificityAccumulator(3)
    acc.update(_toy_prob_fn, images[:1], labels[:1], masks[:1])
    acc.update(_toy_prob_fn, images[1:], labels[1:], masks[1:], chunk_size=1)
    M = acc.matrix()
    assert M[1, 0].item() == pytest.approx(0.5)
    assert math.isnan(M[2, 2].item()) and math.isnan(M[0, 2].item())


def test_class_specificity_sums_are_kept_per_image_and_add_up_to_the_matrix():
    images = torch.ones(2, 3, 1, 3)
    labels = torch.tensor([[1, 1, 0], [1, 1, 1]])
    masks = torch.eye(3).view(1, 3, 1, 3).expand(2, 3, 1, 3).clone()
    masks[1, 0] = torch.tensor([[1.0, 0.5, 0.0]])
    sums, counts = class_specificity_sums(_toy_prob_fn, images, labels, masks, chunk_size=2)
    assert sums.shape == counts.shape == (2, 3, 3)
    # image 1, mask of class 0 (column 0): p_0 = 1, p_1 = 0.5, p_2 = 0, all three classes present
    assert sums[1, :, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert counts[0, :, 2].tolist() == [0, 0, 0]  # class 2 is not in image 0: no mask of it is used
    assert counts[0, 2, :].tolist() == [0, 0, 0]  # nor is its probability counted
    M = class_specificity_matrix(_toy_prob_fn, images, labels, masks)
    torch.testing.assert_close(sums.sum(0) / counts.sum(0).clamp(min=1), torch.nan_to_num(M))


def test_specificity_gaps_vectorised_over_matrices_leaves_out_empty_cells():
    a = [[0.9, 0.1], [0.3, 0.7]]
    b = [[1.0, math.nan], [0.0, math.nan]]  # diagonal: 1.0 only; off-diagonal: 0.0 only
    gaps = specificity_gaps(np.array([a, b]))
    assert gaps.tolist() == pytest.approx([0.8 - 0.2, 1.0])
    assert math.isnan(specificity_gaps(np.array([[math.nan, 0.2], [0.1, math.nan]])))


def test_gap_interval_is_a_seeded_bootstrap_over_images():
    # identical images: every resample gives the same matrix, so the interval is the gap itself
    images = torch.ones(6, 3, 1, 3)
    labels = torch.tensor([[1, 1, 0]] * 6)
    masks = torch.eye(3).view(1, 3, 1, 3).expand(6, 3, 1, 3).clone()
    acc = ClassSpecificityAccumulator(3)
    acc.update(_toy_prob_fn, images, labels, masks)
    gap = float(specificity_gaps(acc.matrix().numpy()))
    assert gap == pytest.approx(1.0)
    assert acc.gap_interval() == pytest.approx((gap, gap))
    # images that disagree: a real spread around the gap, the same on every call with the same seed
    masks[::2, 0] = torch.tensor([[1.0, 1.0, 0.0]])  # every other image's class-0 mask also keeps class 1
    acc = ClassSpecificityAccumulator(3)
    acc.update(_toy_prob_fn, images[:3], labels[:3], masks[:3])
    acc.update(_toy_prob_fn, images[3:], labels[3:], masks[3:])
    gap = float(specificity_gaps(acc.matrix().numpy()))  # off-diagonal (0.5 + 0) / 2: gap 0.75
    assert gap == pytest.approx(0.75)
    lo, hi = acc.gap_interval(resamples=500)
    assert lo < gap < hi and 0.5 <= lo and hi <= 1.0
    assert acc.gap_interval(resamples=500) == (lo, hi)
    assert math.isnan(ClassSpecificityAccumulator(3).gap_interval()[0])
