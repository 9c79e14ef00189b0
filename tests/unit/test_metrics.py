"""Evaluation metrics (pipeline.method.metrics) on masks small enough to score by hand."""

import math

import numpy as np
import pytest
import torch

from pipeline.data.voc import paper_seg_luminance, voc_colormap
from pipeline.method.metrics import (
    ClassSpecificityAccumulator,
    MetricAccumulator,
    class_specificity_matrix,
    class_specificity_sums,
    foreground_and_valid,
    paper_class_specificity_sums,
    paper_foreground,
    paper_saliency,
    paper_segmentation_scores,
    roc_auc,
    saliency,
    segmentation_scores,
    specificity_gaps,
    zero_nan_masks,
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
    assert means["c_iou"] == pytest.approx(1.0) and np.isfinite(acc.per_image("c_iou")).sum() == 1


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


def test_the_paired_difference_agrees_with_scipys_paired_bootstrap():
    """Our paired percentile bootstrap against scipy.stats.bootstrap (paired, percentile) on the same data: the
    same mean difference, and intervals that agree to Monte-Carlo error; NaN pairs are left out."""
    from scipy.stats import bootstrap

    from pipeline.method.metrics import bootstrap_interval, paired_difference

    rng = np.random.default_rng(7)
    a = rng.normal(0.6, 0.2, 400)
    b = a - rng.normal(0.05, 0.1, 400)  # correlated, as two methods on the same images are
    ours = paired_difference(a, b, resamples=4000)
    peer = bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True, method="percentile", n_resamples=20000,
                     random_state=1).confidence_interval  # fmt: skip
    assert ours["delta"] == pytest.approx(np.mean(a - b)) and ours["images"] == 400
    assert ours["ci95"] == pytest.approx([peer.low, peer.high], abs=0.002)  # the interval's width is ~0.02
    # pairing matters: the unpaired intervals of the two means overlap, the paired one excludes 0
    lo_a, hi_a = bootstrap_interval(a)
    lo_b, hi_b = bootstrap_interval(b)
    assert lo_a < hi_b and ours["ci95"][0] > 0
    # an image where either value is undefined is left out of both
    a[:10], b[10:20] = np.nan, np.nan
    partial = paired_difference(a, b)
    assert partial["images"] == 380 and partial["delta"] == pytest.approx(np.mean((a - b)[20:]))
    with pytest.raises(ValueError, match="pair them first"):
        paired_difference(a, b[:5])


def test_the_paired_gap_resamples_both_methods_on_the_same_images():
    images = torch.ones(8, 3, 1, 3)
    labels = torch.tensor([[1, 1, 0]] * 8)
    sharp = torch.eye(3).view(1, 3, 1, 3).expand(8, 3, 1, 3).clone()
    blurred = sharp.clone()
    blurred[::2, 0] = torch.tensor([[1.0, 1.0, 0.0]])
    one, other = ClassSpecificityAccumulator(3), ClassSpecificityAccumulator(3)
    one.update(_toy_prob_fn, images, labels, sharp)
    other.update(_toy_prob_fn, images, labels, blurred)
    same = one.paired_gap(one)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
    paired = one.paired_gap(other, resamples=500)
    assert paired["delta"] == pytest.approx(one.gap() - other.gap()) == pytest.approx(1.0 - 0.75)
    lo, hi = paired["ci95"]
    assert 0 < lo <= paired["delta"] <= hi <= 0.5


# ------------------------------------------------------------------------------- NaN masks


def test_a_mask_holding_a_nan_is_zeroed_as_a_whole_and_flagged():
    masks = torch.rand(2, 3, 4, 4)
    masks[0, 1, 2, 3] = math.nan  # one NaN pixel: the whole mask goes
    masks[1, 2] = math.nan
    zeroed, has_nan = zero_nan_masks(masks)
    assert has_nan.tolist() == [[False, True, False], [False, False, True]]
    assert zeroed[0, 1].abs().sum().item() == 0.0 and zeroed[1, 2].abs().sum().item() == 0.0
    keep = ~has_nan
    torch.testing.assert_close(zeroed[keep], masks[keep])
    merged, flags = zero_nan_masks(masks[:, 1])  # (B, H, W): one flag per image
    assert flags.tolist() == [True, False] and not merged.isnan().any()


# ------------------------------------------------------------------- the paper's protocol


def _paper_open_segmentation_mask(seg: np.ndarray, size: int) -> np.ndarray:
    """The paper's compute_scores.open_segmentation_mask, literally, on ``seg`` saved as a VOC PNG."""
    import io

    import torchvision.transforms as T
    from PIL import Image

    im = Image.frombytes("P", (seg.shape[1], seg.shape[0]), seg.astype(np.uint8).tobytes())
    im.putpalette(voc_colormap().flatten().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    mask = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    mask = T.Compose([T.Resize((size, size))])(mask)
    mask = np.array(mask) / 255.0
    mask[mask > 0] = 1
    return mask


def test_paper_luminance_is_pil_grey_of_the_voc_colormap():
    from PIL import Image

    im = Image.frombytes("P", (16, 16), np.arange(256, dtype=np.uint8).tobytes())
    im.putpalette(voc_colormap().flatten().tolist())
    grey = np.array(im.convert("L")).flatten()
    used = [*range(21), 255]  # background, the 20 classes, void
    assert paper_seg_luminance()[used].tolist() == grey[used].tolist()
    assert paper_seg_luminance()[255] == 220  # void (224, 224, 192): grey, i.e. object
    assert voc_colormap()[1].tolist() == [128, 0, 0] and voc_colormap()[15].tolist() == [192, 128, 128]
    # a subset in another order keeps each class's VOC colour; non-VOC data: every object white
    sub = paper_seg_luminance(["person", "aeroplane"])
    assert sub[1] == paper_seg_luminance()[15] and sub[2] == paper_seg_luminance()[1]
    assert paper_seg_luminance(voc=False)[[0, 1, 7, 255]].tolist() == [0, 255, 255, 255]


def test_paper_ground_truth_counts_void_and_bilinear_edges_as_object():
    # 8×8 background with a one-pixel void line in column 4 and a class-1 (aeroplane) pixel at (0, 0)
    seg = np.zeros((8, 8), dtype=np.uint8)
    seg[:, 4] = 255
    seg[0, 0] = 1
    # at the source size: exactly the non-background pixels, void included
    assert (paper_foreground(seg, 8, paper_seg_luminance()) == (seg != 0)).all()
    # shrunk to 4×4 (PIL bilinear, filter 2 source pixels wide): output column j is centred on source
    # 2j + 1; the void line (centre 4.5) reaches column 1 (distance 1.5 < 2, weight 1/8 → grey 220/8)
    # and column 2 (distance 0.5), not columns 0 and 3; nearest neighbour would sample columns 1, 3, 5, 7
    # and lose the line entirely
    fg = paper_foreground(seg, 4, paper_seg_luminance())
    assert fg[:, 1].all() and fg[:, 2].all() and not fg[1:, 0].any() and not fg[:, 3].any()
    assert fg[0, 0]  # the aeroplane pixel (grey 38) still rounds to a grey level ≥ 1 after the filter
    # the same as the paper's own code on the same segmentation saved as a VOC PNG
    for size in (4, 3, 5, 8):
        assert (
            paper_foreground(seg, size, paper_seg_luminance()) == (_paper_open_segmentation_mask(seg, size) == 1)
        ).all(), size
    rng = np.random.default_rng(0)
    big = rng.choice([0, 0, 0, 4, 15, 255], size=(37, 53)).astype(np.uint8)  # boat (darkest grey 15), person, void
    assert (paper_foreground(big, 16, paper_seg_luminance()) == (_paper_open_segmentation_mask(big, 16) == 1)).all()


def test_paper_segmentation_scores_count_every_pixel_and_give_zero_coverage_where_undefined():
    fg = torch.tensor([[[False, True], [True, True]], [[False, False], [False, False]]])
    mask = torch.tensor([[[1.0, 0.5], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    ours = segmentation_scores(mask, fg)
    paper = paper_segmentation_scores(mask, fg)
    assert paper["object_coverage"].tolist() == pytest.approx([0.5, 0.0])  # image 1 has no object: 0, not NaN
    assert math.isnan(ours["object_coverage"][1].item())
    assert paper["background_coverage"][0].item() == pytest.approx(1.0)
    assert math.isnan(paper["auc"][1].item())  # still undefined: the paper's tables leave it out
    for key in ("c_iou", "d_f1", "acc"):
        torch.testing.assert_close(paper[key], ours[key])


def test_paper_saliency_sums_softmax_probabilities_over_present_classes():
    mask = torch.zeros(1, 2, 5)
    mask[0, :, :2] = 1.0  # area 0.4
    logits = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])  # softmax: 0.6, 0.3, 0.1
    labels = torch.tensor([[1, 1, 0]])
    s = paper_saliency(mask, logits, labels)
    assert s.item() == pytest.approx(math.log(0.4) - math.log(0.9), rel=1e-5)


# probability vectors of a toy 3-class classifier on 1×2 images, by which pixels are visible:
# none, left only, right only, both (softmax outputs given directly)
_P_NONE, _P_LEFT, _P_RIGHT, _P_BOTH = ([0.2, 0.2, 0.6], [0.7, 0.1, 0.2], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1])


def _toy_softmax_fn(x):
    table = torch.tensor([_P_NONE, _P_LEFT, _P_RIGHT, _P_BOTH], dtype=x.dtype)
    visible = (x[:, 0, 0] != 0).long()  # (N, 2): left, right
    return table[visible[:, 0] + 2 * visible[:, 1]]


def test_paper_class_specificity_binarises_every_class_mask_at_the_nine_thresholds_by_hand():
    images = torch.ones(2, 3, 1, 2)
    labels = torch.tensor([[1, 1, 0], [0, 1, 0]])  # class 2 is in no image: its row stays empty
    masks = torch.tensor(
        [
            [
                [[0.95, 0.05]],  # image 0, class 0: left kept at every t, right at none → left only ×9
                [[0.0, 0.55]],  # class 1: right kept for t = 0.1…0.5 (5), nothing for 0.6…0.9 (4)
                [[0.35, 0.35]],
            ],  # class 2 (absent, still used): both for t = 0.1…0.3 (3), nothing for 6
            [
                [[1.0, 1.0]],  # image 1, class 0 (absent): both ×9
                [[0.0, 1.0]],  # class 1: right only ×9
                [[0.0, 0.0]],
            ],  # class 2: nothing ×9
        ]
    )
    p = {k: np.array(v) for k, v in zip(("none", "left", "right", "both"), (_P_NONE, _P_LEFT, _P_RIGHT, _P_BOTH))}
    score0 = {0: p["left"], 1: (5 * p["right"] + 4 * p["none"]) / 9, 2: (3 * p["both"] + 6 * p["none"]) / 9}
    score1 = {0: p["both"], 1: p["right"], 2: p["none"]}
    expected = np.full((3, 3), np.nan)
    for c in range(3):
        expected[0, c] = score0[c][0]  # images holding class 0: image 0
        expected[1, c] = (score0[c][1] + score1[c][1]) / 2  # images holding class 1: both
    acc = ClassSpecificityAccumulator(3, rule="paper")
    acc.update(_toy_softmax_fn, images, labels, masks, chunk_size=5)  # 2·3·9 = 54 masked images, odd chunks
    np.testing.assert_allclose(acc.matrix().numpy(), expected, rtol=1e-6)
    assert expected[0, 0] == pytest.approx(0.7) and expected[1, 0] == pytest.approx(0.25)
    sums, counts = paper_class_specificity_sums(_toy_softmax_fn, images, labels, masks)
    assert counts[1].tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]  # image 1 holds class 1, any mask class
    with pytest.raises(ValueError, match="rule"):
        ClassSpecificityAccumulator(3, rule="notebook")
