"""The paper's evaluation metrics, vectorised over a batch of images (pure torch, no I/O).

Inputs, per image: a mask (B, H, W) in [0, 1] (per image, the masks of its ground-truth classes merged
by pixel-wise max), the ground-truth foreground (B, H, W) bool and ``valid`` (B, H, W) bool = not void.
Void pixels (VOC's 255) are left out of every sum: they are neither object nor background.

Definitions follow the paper's code (stevenstalder/NN-Explainer,
``src/evaluation/eval_utils/assessment_metrics.py``), restricted to valid pixels:

- ``d_f1_25``/``d_f1_50``/``d_f1_75``: F1 of the foreground with the mask binarised at mask > t,
  P = tp/(tp+fp+1e-10), R = tp/(tp+fn+1e-10), F1 = 2PR/(P+R+1e-10); ``d_f1`` their mean.
- ``c_f1``: the same with soft counts tp = Σ m·g, fp = Σ m·(1−g), fn = Σ (1−m)·g.
- ``acc``: soft accuracy (Σ m·g + Σ (1−m)(1−g)) / #valid.
- ``d_iou``: mean over t = 0.1…0.9 of |(m > t) ∧ g| / (|(m > t) ∨ g| + 1e-15).
- ``c_iou``: Σ min(m, g) / (Σ max(m, g) + 1e-15).
- ``auc``: ROC-AUC of the mask as a score for foreground (rank formula, ties counted ½, as sklearn).
- ``object_coverage``: mean mask over object pixels (the paper's ``mask_coverage``, = 1 − Σ relu(g−m)/Σ g).
- ``background_coverage``: mean mask over background pixels (the paper's ``background_coverage``,
  = Σ relu(m−g)/Σ(1−g): the share of the background the mask wrongly keeps — lower is better).
- ``saliency``: log(max(area, 0.05)) − log(p), see :func:`saliency`.

Undefined values are NaN (and :class:`MetricAccumulator` skips NaN): every metric of an image with no
valid pixel; ``auc`` without foreground or without background; ``object_coverage`` without
foreground; ``background_coverage`` without background (the paper's code returned 0 for the two
coverages there, which biases the means; ours leaves such images out of that mean).

A mask holding a NaN is set to 0 as a whole before any metric sees it (:func:`zero_nan_masks`), as the
paper's ``compute_scores.gen_evaluation`` does, so an image never drops out of some means only.

The paper's own protocol (``evaluate.protocol: paper``), to read numbers beside the paper's tables:
:func:`paper_foreground` (its ground truth), :func:`paper_segmentation_scores`, :func:`paper_saliency`
and :func:`paper_class_specificity_sums` (its notebook's class-specificity matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

F1_THRESHOLDS = (0.25, 0.5, 0.75)
IOU_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
PAPER_SPECIFICITY_THRESHOLDS = IOU_THRESHOLDS  # the notebook's np.arange(0.1, 1.0, 0.1)
VOID = 255


def zero_nan_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask that holds a NaN set to 0 as a whole, and which ones did.

    The paper's ``src/evaluation/eval_utils/compute_scores.py`` (``gen_evaluation``) does the same
    (``if np.sum(np.isnan(mask)): mask = np.zeros(...)``), so such an image scores as the all-zero mask
    in every metric instead of dropping out of the means that NaN would poison.

    Args:
        masks: (..., H, W); one mask is one (H, W) slice, e.g. (B, H, W) merged or (B, C, H, W) per class.

    Returns:
        (masks with the NaN-holding ones zeroed, has_nan (...) bool: which masks held a NaN).
    """
    has_nan = masks.isnan().flatten(-2).any(-1)
    return torch.where(has_nan[..., None, None], torch.zeros_like(masks), masks), has_nan


def foreground_and_valid(seg: torch.Tensor, void_value: int = VOID) -> tuple[torch.Tensor, torch.Tensor]:
    """From a class-index map (0 background, k+1 class k, 255 void): foreground and valid, (B, H, W) bool."""
    valid = seg != void_value
    return (seg > 0) & valid, valid


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    precision = tp / (tp + fp + 1e-10)
    recall = tp / (tp + fn + 1e-10)
    return 2 * precision * recall / (precision + recall + 1e-10)


def roc_auc(scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-image ROC-AUC (B,) of ``scores`` (B, H, W) for ``positive`` pixels, over valid pixels only.

    AUC = (R⁺ − P(P+1)/2) / (P·N), R⁺ the sum of the (tie-averaged, 1-based) ranks of the positive
    pixels among the valid ones; NaN when an image has no positive or no negative valid pixel.
    """
    B = scores.shape[0]
    s = scores.reshape(B, -1).double()
    pos = (positive & valid).reshape(B, -1)
    val = valid.reshape(B, -1)
    s = torch.where(val, s, torch.full_like(s, math.inf))  # void sorts above every valid score
    ordered = s.sort(dim=1).values
    below = torch.searchsorted(ordered, s, side="left")  # valid values strictly smaller
    upto = torch.searchsorted(ordered, s, side="right")  # valid values smaller or equal
    ranks = (below + upto + 1).double() / 2.0
    n_pos = pos.sum(dim=1).double()
    n_neg = (val & ~pos).sum(dim=1).double()
    r_pos = (ranks * pos).sum(dim=1)
    auc = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, math.nan))
    return auc.to(scores.dtype if scores.is_floating_point() else torch.float32)


def segmentation_scores(
    mask: torch.Tensor, foreground: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every mask-vs-ground-truth metric of the paper, one value per image.

    Args:
        mask: (B, H, W) in [0, 1].
        foreground: (B, H, W) bool, ground-truth object pixels.
        valid: (B, H, W) bool, pixels that count (not void); all pixels when None.

    Returns:
        ``d_f1_25``, ``d_f1_50``, ``d_f1_75``, ``d_f1``, ``c_f1``, ``acc``, ``d_iou``, ``c_iou``,
        ``auc``, ``object_coverage``, ``background_coverage``: tensors (B,) (NaN where undefined).
    """
    m = mask.float()
    if valid is None:
        valid = torch.ones_like(foreground, dtype=torch.bool)
    v = valid.float()
    g = (foreground & valid).float()
    dims = (1, 2)
    n_valid = v.sum(dims)
    n_fg = g.sum(dims)
    n_bg = n_valid - n_fg

    scores: dict[str, torch.Tensor] = {}
    # discrete F1 at 0.25 / 0.5 / 0.75
    f1s = []
    for t in F1_THRESHOLDS:
        b = (m > t).float() * v
        tp = (b * g).sum(dims)
        f1s.append(_f1(tp, b.sum(dims) - tp, n_fg - tp))
        scores[f"d_f1_{int(round(t * 100))}"] = f1s[-1]
    scores["d_f1"] = torch.stack(f1s).mean(0)
    # continuous F1 and soft accuracy
    mv = m * v
    tp = (mv * g).sum(dims)
    fp = mv.sum(dims) - tp
    fn = n_fg - tp
    tn = n_bg - fp
    scores["c_f1"] = _f1(tp, fp, fn)
    scores["acc"] = (tp + tn) / n_valid
    # discrete IoU (mean over 0.1…0.9) and continuous IoU
    ious = []
    for t in IOU_THRESHOLDS:
        b = (m > t) & valid
        inter = (b & foreground).float().sum(dims)
        union = (b | (foreground & valid)).float().sum(dims)
        ious.append(inter / (union + 1e-15))
    scores["d_iou"] = torch.stack(ious).mean(0)
    scores["c_iou"] = (torch.minimum(m, g) * v).sum(dims) / ((torch.maximum(m, g) * v).sum(dims) + 1e-15)
    scores["auc"] = roc_auc(m, foreground, valid)
    # coverages: mean mask over object pixels / over background pixels
    nan = torch.full_like(n_fg, math.nan)
    scores["object_coverage"] = torch.where(n_fg > 0, tp / n_fg.clamp(min=1), nan)
    scores["background_coverage"] = torch.where(n_bg > 0, fp / n_bg.clamp(min=1), nan)

    no_valid = n_valid == 0
    return {k: torch.where(no_valid, nan, val) for k, val in scores.items()}


def saliency(
    mask: torch.Tensor, probs_masked: torch.Tensor, labels: torch.Tensor, class_prob: str = "mean"
) -> torch.Tensor:
    """Saliency metric (Dabkowski & Gal): log(max(area, 0.05)) − log p(classes | m ⊙ x), per image.

    ``area`` is the mean of the mask over *all* pixels (the share of the image shown to the
    classifier, void included). ``p`` is the Explanandum's **sigmoid** probability of the image's
    ground-truth classes on the masked image: by default their mean (in [0, 1] like the single class
    probability of the original metric); ``"sum"`` is the paper's code (a sum of softmax
    probabilities there), ``"product"`` the joint probability under independent sigmoids. ``p`` is
    clamped at 1e-12. Lower is better. NaN for images without a label.

    Args:
        mask: (B, H, W) in [0, 1].
        probs_masked: (B, C) sigmoid probabilities of the Explanandum on m ⊙ x.
        labels: (B, C) multi-hot ground truth.
        class_prob: ``mean`` | ``sum`` | ``product``.
    """
    present = (labels > 0.5 if labels.dtype != torch.bool else labels).float()
    area = mask.float().flatten(1).mean(1).clamp(min=0.05)
    p = probs_masked.float()
    n = present.sum(1)
    if class_prob == "mean":
        pc = (p * present).sum(1) / n.clamp(min=1)
    elif class_prob == "sum":
        pc = (p * present).sum(1)
    elif class_prob == "product":
        pc = torch.where(present.bool(), p, torch.ones_like(p)).prod(1)
    else:
        raise ValueError(f"class_prob must be mean, sum or product, got {class_prob!r}")
    out = area.log() - pc.clamp(min=1e-12).log()
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


# ---------------------------------------------------------------------------------------------------
# Intervals over images (percentile bootstrap, seeded: reruns agree, and methods compared draw alike)


def bootstrap_draws(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) image indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` interval of bootstrap replicates ([NaN, NaN] without a finite one)."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return [math.nan, math.nan]
    tail = (1.0 - level) / 2 * 100
    return [float(x) for x in np.percentile(draws, [tail, 100 - tail])]


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` over the images where it is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return [math.nan, math.nan]
    return percentile_interval(v[bootstrap_draws(v.size, resamples, seed)].mean(axis=1), level)


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, float | list[float] | int]:
    """Mean of the per-image difference ``a − b`` (two methods on the same images, in the same order) over the
    images where both are defined, and its percentile bootstrap interval (the images resampled, each keeping its
    pair): ``{"delta", "ci95", "images"}``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape[0]} against {b.shape[0]} images; pair them first")
    d = a - b
    d = d[np.isfinite(d)]
    delta = float(d.mean()) if d.size else math.nan
    return {"delta": delta, "ci95": bootstrap_interval(d, resamples, level, seed), "images": int(d.size)}


class MetricAccumulator:
    """Per-image metric values over batches: ``compute`` gives the mean of each (NaN skipped), ``per_image``
    the values in the order seen, ``intervals`` their bootstrap intervals."""

    def __init__(self) -> None:
        self.values: dict[str, list[np.ndarray]] = {}

    def update(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Add per-image values (tensors of shape (B,) or scalars); NaN/inf values are kept as undefined."""
        for key, value in scores.items():
            t = torch.as_tensor(value).detach().double().flatten().cpu().numpy()
            self.values.setdefault(key, []).append(np.where(np.isfinite(t), t, math.nan))

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's images after this one's (e.g. from another worker)."""
        for key, parts in other.values.items():
            self.values.setdefault(key, []).extend(parts)

    def per_image(self, key: str) -> np.ndarray:
        """Each image's value of ``key`` (NaN where undefined), in the order seen."""
        parts = self.values.get(key, [])
        return np.concatenate(parts) if parts else np.zeros(0)

    def compute(self) -> dict[str, float]:
        """The mean of every metric over the images where it was defined (NaN if none)."""
        out = {}
        for key in self.values:
            v = self.per_image(key)
            v = v[np.isfinite(v)]
            out[key] = float(v.mean()) if v.size else math.nan
        return out

    def intervals(self, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
        """The percentile bootstrap interval of each mean over the images."""
        return {key: bootstrap_interval(self.per_image(key), resamples, level, seed) for key in self.values}


# ---------------------------------------------------------------------------------------------------
# Class specificity


def class_specificity_sums(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    per_class_masks: torch.Tensor,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts behind the class-specificity matrix, per image of one batch.

    For every (image i, present class c) the image is masked with class c's mask (x_i ⊙ M_{i,c}) and
    classified; ``sums[i, r, c]`` is p_r for every class r present in image i, ``counts[i, r, c]`` is 1
    there. All pairs go through ``prob_fn`` in chunks of ``chunk_size`` images. Summed over images they
    give the matrix; kept per image they give its bootstrap interval.

    Args:
        prob_fn: images (N, 3, H, W) → the Explanandum's **sigmoid** probabilities (N, C).
        images: (B, 3, H, W), normalised as the Explanandum expects.
        labels: (B, C) multi-hot.
        per_class_masks: (B, C, H, W) in [0, 1] (only the present classes' masks are used).

    Returns:
        (sums, counts), both (B, C, C) float64, indexed [i, r, c].
    """
    present = labels > 0.5 if labels.dtype != torch.bool else labels
    B, C = present.shape
    sums = torch.zeros(B * C, C, dtype=torch.float64)  # row i·C + c holds the vector over r
    counts = torch.zeros(B * C, C, dtype=torch.float64)
    i_idx, c_idx = present.nonzero(as_tuple=True)
    for start in range(0, i_idx.numel(), chunk_size):
        i = i_idx[start : start + chunk_size]
        c = c_idx[start : start + chunk_size]
        masked = images[i] * per_class_masks[i, c].unsqueeze(1)  # x_i ⊙ M_{i,c}
        with torch.no_grad():
            p = prob_fn(masked).detach().double().cpu()  # (P, C)
        rows = present[i].double().cpu()  # which r are in image i
        key = (i * C + c).cpu()
        sums.index_add_(0, key, p * rows)
        counts.index_add_(0, key, rows)
    return sums.view(B, C, C).transpose(1, 2), counts.view(B, C, C).transpose(1, 2)


def specificity_means(matrices: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean diagonal, mean off-diagonal) of class-specificity matrices (..., C, C), vectorised over the
    leading dimensions; NaN cells (no image held both classes) are left out, and a part with no finite
    cell is NaN."""
    m = np.asarray(matrices, dtype=np.float64)
    finite = np.isfinite(m)
    eye = np.eye(m.shape[-1], dtype=bool)

    def mean_of(cells: np.ndarray) -> np.ndarray:
        keep = finite & cells
        n = keep.sum(axis=(-2, -1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, np.where(keep, m, 0.0).sum(axis=(-2, -1)) / np.maximum(n, 1), np.nan)

    return mean_of(eye), mean_of(~eye)


def specificity_gaps(matrices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean diagonal − mean off-diagonal of class-specificity matrices (..., C, C)
    (:func:`specificity_means`); NaN where either part has no finite cell."""
    diag, off = specificity_means(matrices)
    return diag - off


class ClassSpecificityAccumulator:
    """Accumulates M[r][c] = mean over images containing r and c of p_r(x ⊙ M_c) over batches, and
    each image's share of it for the bootstrap interval of the gap.

    ``rule="paper"`` accumulates the paper notebook's matrix instead (:func:`paper_class_specificity_sums`:
    masks of every class, binarised at 0.1…0.9; a mean over the images containing r)."""

    def __init__(self, num_classes: int, rule: str = "project") -> None:
        if rule not in ("project", "paper"):
            raise ValueError(f"rule must be project or paper, got {rule!r}")
        self.num_classes = num_classes
        self.rule = rule
        self._sums: list[torch.Tensor] = []  # (B, C, C) per batch
        self._counts: list[torch.Tensor] = []

    def update(self, prob_fn, images, labels, per_class_masks, chunk_size: int = 32) -> None:
        sums_fn = paper_class_specificity_sums if self.rule == "paper" else class_specificity_sums
        s, n = sums_fn(prob_fn, images, labels, per_class_masks, chunk_size=chunk_size)
        self._sums.append(s)
        self._counts.append(n)

    def _per_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        C = self.num_classes
        empty = torch.zeros(0, C, C, dtype=torch.float64)
        return torch.cat(self._sums or [empty]), torch.cat(self._counts or [empty])

    def matrix(self) -> torch.Tensor:
        """M (C, C) indexed [r, c]; NaN where no image held both r and c."""
        sums, counts = (t.sum(dim=0) for t in self._per_image())
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))

    def num_images(self) -> int:
        return self._per_image()[0].shape[0]

    def gaps_of(self, draws: np.ndarray) -> np.ndarray:
        """The specificity gap recomputed from each row of image indices ``draws`` (R, n): NaN where undefined."""
        sums, counts = self._per_image()
        weights = torch.zeros(draws.shape[0], sums.shape[0], dtype=torch.float64).scatter_add_(
            1, torch.as_tensor(draws), torch.ones(draws.shape, dtype=torch.float64)
        )  # how often each image was drawn
        s = torch.einsum("kn,nrc->krc", weights, sums)
        c = torch.einsum("kn,nrc->krc", weights, counts)
        return specificity_gaps(torch.where(c > 0, s / c.clamp(min=1), torch.full_like(s, math.nan)))

    def gap(self) -> float:
        return float(specificity_gaps(self.matrix()[None])[0])

    def gap_interval(self, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of the specificity gap over the test images: the images are
        drawn with replacement ``resamples`` times (seeded, so reruns agree) and the gap recomputed from
        the drawn images' sums. (NaN, NaN) with fewer than two images."""
        n = self.num_images()
        if n < 2:
            return math.nan, math.nan
        lo, hi = percentile_interval(self.gaps_of(bootstrap_draws(n, resamples, seed)), level)
        return lo, hi

    def paired_gap(self, other: ClassSpecificityAccumulator, resamples: int = 1000, level: float = 0.95, seed: int = 0):
        """The gap of this method minus ``other``'s (the same images, in the same order), with the percentile
        interval of that difference when the images are resampled together: ``{"delta", "ci95", "images"}``."""
        n = self.num_images()
        if other.num_images() != n:
            raise ValueError(f"paired_gap: {n} against {other.num_images()} images; pair them first")
        draws = bootstrap_draws(n, resamples, seed)
        ci = percentile_interval(self.gaps_of(draws) - other.gaps_of(draws), level) if n >= 2 else [math.nan] * 2
        return {"delta": self.gap() - other.gap(), "ci95": ci, "images": n}


def class_specificity_matrix(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    per_class_masks: torch.Tensor,
    chunk_size: int = 32,
) -> torch.Tensor:
    """M[r][c] (C, C) over the given images: the mean, over images containing both r and c, of the
    Explanandum's sigmoid probability of r on the image masked with class c's mask (NaN where no such
    image). High on the diagonal, low off it, for class-specific masks. Use
    :class:`ClassSpecificityAccumulator` to accumulate over batches."""
    acc = ClassSpecificityAccumulator(labels.shape[1])
    acc.update(prob_fn, images, labels, per_class_masks, chunk_size=chunk_size)
    return acc.matrix()


# ---------------------------------------------------------------------------------------------------
# The paper's protocol (evaluate.protocol: paper)


def paper_foreground(seg: np.ndarray, size: int, luminance: np.ndarray) -> np.ndarray:
    """The paper's ground-truth foreground of one image: (size, size) bool.

    ``src/evaluation/eval_utils/compute_scores.py``, ``open_segmentation_mask``: the segmentation PNG
    opened with ``convert("L")``, resized by ``transforms.Resize((224, 224))`` (PIL bilinear, which
    widens its filter when shrinking), divided by 255 and, for VOC, ``mask[mask > 0] = 1``. So void
    pixels count as object, and so does every resized pixel whose filter reaches an object pixel with
    weight enough to round to a grey level ≥ 1: object edges grow by about one resized pixel. The paper
    binarised VOC only; its COCO ground truth stayed soft at the edges, which
    :func:`segmentation_scores` (a boolean foreground) cannot take, so COCO is binarised here too.

    Args:
        seg: (H, W) class-index map at the source resolution (0 background, k+1 class k, 255 void).
        size: the side of the evaluated masks (the paper: 224).
        luminance: the grey level of each class index (:func:`pipeline.data.voc.paper_seg_luminance`).
    """
    from PIL import Image

    lut = np.asarray(luminance, dtype=np.uint8)
    grey = Image.fromarray(lut[np.asarray(seg, dtype=np.uint8)])  # the PNG as convert("L") sees it
    resized = np.asarray(grey.resize((size, size), Image.BILINEAR))  # T.Resize((224, 224)) on a PIL image
    return resized > 0  # mask[mask > 0] = 1


def paper_segmentation_scores(mask: torch.Tensor, foreground: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`segmentation_scores` as the paper's ``src/evaluation/eval_utils/assessment_metrics.py``
    computes them: every pixel counts (void is already object in :func:`paper_foreground`), and
    ``object_coverage`` / ``background_coverage`` are 0, not NaN, for an image without object /
    background pixels (``mask_coverage`` / ``background_coverage`` return 0 there). ``auc`` stays NaN
    where undefined (``auc`` returns None there and the paper's tables leave None out)."""
    scores = segmentation_scores(mask, foreground)
    for key in ("object_coverage", "background_coverage"):
        scores[key] = torch.nan_to_num(scores[key], nan=0.0)
    return scores


def paper_saliency(mask: torch.Tensor, logits_masked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's saliency: log(max(area, 0.05)) − log Σ_{c ∈ classes} softmax(f(m ⊙ x))_c, per image.

    ``src/evaluation/eval_utils/assessment_metrics.py`` (``saliency``), fed by
    ``src/evaluation/eval_utils/compute_scores.py`` (``gen_evaluation``: ``p_mask`` = softmax of the
    logits on m ⊙ x). The paper sums over the image's per-object class list (VOC: one entry per
    annotated object, a class with three objects counted three times; COCO: each present class once).
    Our shards keep only which classes are present, so each present class counts once here: for VOC
    images with several objects of one class p is smaller and the saliency higher than the paper's.

    Args:
        mask: (B, H, W) in [0, 1].
        logits_masked: (B, C) the Explanandum's logits on m ⊙ x.
        labels: (B, C) multi-hot ground truth.
    """
    return saliency(mask, logits_masked.float().softmax(dim=1), labels, class_prob="sum")


def paper_class_specificity_sums(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    per_class_masks: torch.Tensor,
    thresholds: tuple[float, ...] = PAPER_SPECIFICITY_THRESHOLDS,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts behind the paper's class-specificity matrix, per image of one batch.

    ``notebooks/evaluate_class_scores.ipynb`` (``compute_results`` and the loops over target and mask
    classes, masks saved by ``src/evaluation/explainer.py`` in ``mode = 'classes'``): for an image i
    holding class r, the mask of class c (every c, present in the image or not) binarised at each
    threshold t, the image masked with it and classified; the score is p_r averaged over the
    thresholds, and M[r][c] the mean score over the images holding r:
    M[r][c] = mean_{i ∋ r} mean_t p_r(x_i ⊙ [M_{i,c} > t]). The notebook's p is a softmax, which
    ``prob_fn`` gives. All B·C·T masked images go through ``prob_fn`` in chunks of ``chunk_size``.

    Args:
        prob_fn: images (N, 3, H, W) → the Explanandum's probabilities (N, C) (the paper: softmax).
        images: (B, 3, H, W), normalised as the Explanandum expects.
        labels: (B, C) multi-hot.
        per_class_masks: (B, C, H, W) in [0, 1], every class's mask.
        thresholds: the binarisation thresholds (the notebook's ``np.arange(0.1, 1.0, 0.1)``).

    Returns:
        (sums, counts), both (B, C, C) float64, indexed [i, r, c]: sums = present_{i,r} · mean_t p_r,
        counts = present_{i,r} (for every c), the format of :func:`class_specificity_sums`.
    """
    present = labels > 0.5 if labels.dtype != torch.bool else labels
    B, C = present.shape
    T = len(thresholds)
    t = torch.as_tensor(thresholds, dtype=per_class_masks.dtype, device=per_class_masks.device)
    rows_all = present.double().cpu()
    sums = torch.zeros(B * C, C, dtype=torch.float64)  # row i·C + c holds the vector over r
    total = B * C * T
    for start in range(0, total, chunk_size):
        j = torch.arange(start, min(start + chunk_size, total), device=images.device)
        i, c, k = j // (C * T), (j // T) % C, j % T  # image, mask class, threshold of each masked image
        binary = (per_class_masks[i, c] > t[k, None, None]).to(images.dtype)  # [M_{i,c} > t]
        with torch.no_grad():
            p = prob_fn(images[i] * binary.unsqueeze(1)).detach().double().cpu()  # (P, C)
        i, c = i.cpu(), c.cpu()
        sums.index_add_(0, i * C + c, p * rows_all[i] / T)  # mean over the T thresholds
    counts = rows_all[:, :, None].expand(B, C, C).clone()  # [i, r, c] = present_{i,r}
    return sums.view(B, C, C).transpose(1, 2), counts
