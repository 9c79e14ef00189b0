"""Faithfulness to the classifier and localisation of a map, per (image, present class) pair (pure torch).

Each metric takes the map of one class of one image, (P, H, W) for P pairs, and, where it needs the
classifier, ``prob_fn``: images (N, 3, H, W) → the Explanandum's **sigmoid** probabilities (N, C) (the
classifier is multi-label; its probability of a class is the sigmoid of that class's logit).

- **Deletion** (Petsiuk et al. 2018, RISE): pixels ranked by the map, highest first, are removed in
  ``steps`` equal steps (k/steps of the pixels at step k, k = 0 … steps); a removed pixel takes the
  value 0 in normalised space, i.e. the data set's mean colour. The score is the area under the curve
  of p_c over the removed fraction (trapezoids on [0, 1]): lower is better.
- **Insertion** (same paper): the pixels are revealed in the same order onto a blurred copy of the image
  (Gaussian, σ = ``blur_sigma``; 5 px at 224 px in the paper, scaled with the image): area under p_c
  over the revealed fraction, higher is better.
- **Pointing game** (Zhang et al. 2018): a hit when the map's maximum lies within ``tolerance`` pixels
  (Euclidean) of the class's ground-truth pixels (15 px at 224 px in the paper, scaled with the image);
  on ties the first maximum in raster order (``argmax``, as TorchRay's benchmark; Quantus'
  ``PointingGame`` counts any tied maximum: the two agree when the maximum is unique).
- **Relevance mass accuracy** (Arras et al. 2022): the share of the map's mass inside the class's
  ground truth, Σ m·g / Σ m.
- **Average drop / increase in confidence** (Chattopadhay et al. 2018, Grad-CAM++): with Y = p_c(x)
  and O = p_c(m ⊙ x), drop = max(0, Y − O) / Y · 100 (percent, lower is better) and increase = 1 when
  O > Y (the share of pairs, higher is better).
- **ROAD** (Rong et al. 2022, "Remove and Debias"): at each fraction f of :data:`ROAD_FRACTIONS` that share of
  the pixels, ranked by the map, is removed, most relevant first (MoRF) or least relevant first (LeRF)
  (:func:`road_removed`), and filled by **noisy linear imputation** (each removed pixel the mean of its 8 neighbours,
  direct ones weighted 1/6, diagonal 1/12, those outside the image left out: one sparse linear system per
  image; then Gaussian noise of σ = :data:`ROAD_NOISE` in normalised space, seeded). Unlike deletion's mean
  colour, the fill carries no trace of the removed pixels' shape, so it favours no method trained with a
  fill. ``road_morf`` / ``road_lerf``: the mean of p_c over the fractions (lower / higher is better).

Undefined values are NaN and left out of means: pointing game and relevance mass without ground-truth
pixels of the class, relevance mass of an all-zero map, average drop where Y = 0, and deletion,
insertion and pointing game of a method whose maps rank no pixel above another (the constant masks:
``ranking=False`` in :class:`FaithfulnessAccumulator`, which then skips their perturbation curves).

Ground truth of class ``c`` is ``seg == c + 1`` (void and background are not the class). The perturbation
curves of all pairs and steps of a batch go through ``prob_fn`` in chunks (no per-pixel Python loop).
:class:`FaithfulnessAccumulator` keeps each image's mean over its pairs, for the means, the percentile
bootstrap intervals over images and the mean curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.method.metrics import bootstrap_interval

METRICS = (
    "deletion_auc",
    "insertion_auc",
    "pointing_game",
    "relevance_mass",
    "average_drop",
    "average_increase",
    "road_morf",
    "road_lerf",
)
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the ROAD paper's and grad-cam's
ROAD_NOISE = 0.01  # σ of the imputation noise (grad-cam's NoisyLinearImputer default), in normalised space
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
               (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))  # fmt: skip
PAPER_SIZE = 224  # the size the papers' pixel settings refer to
POINTING_TOLERANCE_AT_224 = 15.0
BLUR_SIGMA_AT_224 = 5.0


def scaled(pixels_at_224: float, size: int) -> float:
    """A pixel setting of the papers (stated at 224 px) at an image size of ``size``."""
    return pixels_at_224 * size / PAPER_SIZE


def descending_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(P, H, W) → (P, H·W) int64: each pixel's position when the map is sorted highest first (ties in
    raster order)."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def gaussian_blur(images: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Each channel blurred with a Gaussian of ``sigma`` pixels, kernel ±``radius`` (default ±⌈3σ⌉), reflected
    borders (OpenCV's default, ``BORDER_REFLECT_101``)."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma)) if radius is None else max(1, int(radius))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def perturbation_curves(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int,
    start: torch.Tensor | None = None,
    chunk_images: int = 256,
) -> torch.Tensor:
    """p_c along the deletion (``start`` None) or insertion (``start``: the blurred images) of each pair.

    Args:
        images: (P, 3, H, W) one image per pair (normalised).
        maps: (P, H, W) the pair's map.
        classes: (P,) the pair's class.
        steps: the curve has ``steps + 1`` points, at k/steps of the pixels removed (revealed).
        start: insertion only: (P, 3, H, W) what the unrevealed pixels show.

    Returns:
        (P, steps + 1) float64 probabilities.
    """
    P, _, H, W = images.shape
    ranks = descending_ranks(maps)  # (P, HW)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) / steps * H * W).long().to(ranks.device)
    per_chunk = max(1, chunk_images // (steps + 1))
    curves = torch.empty(P, steps + 1, dtype=torch.float64)
    for a in range(0, P, per_chunk):
        b = min(P, a + per_chunk)
        chosen = (ranks[a:b, None, :] < counts[None, :, None]).view(b - a, steps + 1, 1, H, W)  # removed/revealed
        x = images[a:b, None]
        if start is None:
            batch = torch.where(chosen, torch.zeros_like(x), x)
        else:
            batch = torch.where(chosen, x, start[a:b, None])
        with torch.no_grad():
            p = prob_fn(batch.flatten(0, 1)).view(b - a, steps + 1, -1)
        cls = classes[a:b].to(p.device)
        curves[a:b] = p.gather(2, cls.view(-1, 1, 1).expand(-1, steps + 1, 1)).squeeze(2).double().cpu()
    return curves


def linear_impute(
    image: torch.Tensor, removed: torch.Tensor, noise: float = ROAD_NOISE, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ROAD's noisy linear imputation of ``image`` (C, H, W) where ``removed`` (H, W) is True: every removed pixel
    is the weighted mean of its in-image 8-neighbours (known or themselves imputed: one sparse system for all of
    them), plus Gaussian noise of σ ``noise``. Every channel alike; known pixels unchanged."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    C, H, W = image.shape
    gone = removed.reshape(-1).cpu().numpy().astype(bool)
    where = np.flatnonzero(gone)
    n = where.size
    out = image.detach().reshape(C, -1).cpu().double().clone()
    if n == 0:
        return out.reshape(C, H, W).to(image)
    if n == H * W:
        raise ValueError("linear_impute: every pixel is removed, there is nothing to impute from")
    variable = np.full(H * W, -1)
    variable[where] = np.arange(n)
    r, c = np.divmod(where, W)
    known = out.numpy().T  # (H·W, C)
    weight_sum, rhs = np.zeros(n), np.zeros((n, C))
    rows, cols, values = [], [], []
    for dr, dc, w in _NEIGHBOURS:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        equation, neighbour = np.flatnonzero(inside), rr[inside] * W + cc[inside]
        weight_sum[equation] += w
        unknown = gone[neighbour]
        rows.append(equation[unknown])
        cols.append(variable[neighbour[unknown]])
        values.append(np.full(int(unknown.sum()), w))
        np.subtract.at(rhs, equation[~unknown], w * known[neighbour[~unknown]])
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    values.append(-weight_sum)
    system = coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solved = torch.from_numpy(np.asarray(spsolve(system.tocsc(), rhs)).reshape(n, C)).T  # (C, n)
    if noise:
        solved = solved + noise * torch.randn(solved.shape, generator=generator, dtype=torch.float64)
    out[:, torch.from_numpy(where)] = solved
    return out.reshape(C, H, W).to(image)


def road_removed(maps: torch.Tensor, fraction: float, most_relevant_first: bool) -> torch.Tensor:
    """(P, H, W) bool: the pixels ROAD removes at ``fraction``. Of the N pixels, k = round((1 − fraction)(N − 1))
    are kept, the least relevant (MoRF) or the most relevant (LeRF), and the other N − k removed: grad-cam's count
    at percentile 100(1 − fraction) (``np.percentile``'s k-th value, the pixels below it kept). Ranked, ties in
    raster order (as deletion), so a map with many equal values (Grad-CAM's zeros) still loses that share."""
    n = maps.shape[-2] * maps.shape[-1]
    keep = round((1.0 - fraction) * (n - 1))
    ranks = descending_ranks(maps.detach().cpu())  # 0: the most relevant pixel
    gone = ranks < n - keep if most_relevant_first else ranks >= keep
    return gone.view(maps.shape)


def road_curves(
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    most_relevant_first: bool,
    fractions: tuple[float, ...] = ROAD_FRACTIONS,
    noise: float = ROAD_NOISE,
    seed: int = 0,
) -> torch.Tensor:
    """p_c of each pair at each ROAD fraction: (P, len(fractions)) float64 (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    P = images.shape[0]
    curves = torch.empty(P, len(fractions), dtype=torch.float64)
    for j, fraction in enumerate(fractions):
        gone = road_removed(maps, fraction, most_relevant_first)
        filled = torch.stack([linear_impute(images[i], gone[i], noise, generator) for i in range(P)])
        with torch.no_grad():
            p = prob_fn(filled.to(images.device))
        curves[:, j] = p[torch.arange(P, device=p.device), classes.to(p.device)].double().cpu()
    return curves


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves sampled at k/K, k = 0 … K (trapezoids on [0, 1]): (P, K + 1) → (P,)."""
    K = curves.shape[1] - 1
    return (curves.sum(1) - (curves[:, 0] + curves[:, -1]) / 2) / K


def pointing_game(maps: torch.Tensor, truth: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """(P,) 1.0 for a hit, 0.0 for a miss, NaN without ground truth: a hit when the map's maximum (the
    first in raster order on ties) is within ``tolerance`` pixels (Euclidean) of a ground-truth pixel."""
    flat = maps.flatten(1)
    at_max = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.argmax(dim=1, keepdim=True), True)
    region = truth.float().unsqueeze(1)
    r = int(math.floor(tolerance))
    if r > 0:
        t = torch.arange(-r, r + 1, dtype=torch.float32, device=maps.device)
        disc = ((t[:, None] ** 2 + t[None, :] ** 2) <= tolerance**2).float()
        region = F.conv2d(region, disc.view(1, 1, 2 * r + 1, 2 * r + 1), padding=r)
    near = (region.squeeze(1) > 0.5).flatten(1)
    hit = (at_max & near).any(dim=1).double()
    return torch.where(truth.flatten(1).any(dim=1), hit, torch.full_like(hit, math.nan)).cpu()


def relevance_mass(maps: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(P,) Σ m·g / Σ m; NaN without ground truth or for an all-zero map."""
    m = maps.flatten(1).double()
    inside = (m * truth.flatten(1)).sum(1)
    total = m.sum(1)
    ok = truth.flatten(1).any(dim=1) & (total > 0)
    return torch.where(ok, inside / torch.where(total > 0, total, torch.ones_like(total)), math.nan).cpu()


def drop_and_increase(full: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average drop (percent) and increase (0/1) per pair from Y = p_c(x) and O = p_c(m ⊙ x), both (P,)."""
    full, masked = full.double(), masked.double()
    drop = torch.where(full > 0, (full - masked).clamp(min=0) / torch.where(full > 0, full, 1.0) * 100, math.nan)
    return drop, (masked > full).double()


class FaithfulnessAccumulator:
    """Every metric of every (image, present class) pair, kept per image (its mean over its pairs), with
    the curves' sums for the mean deletion and insertion curves.

    Args:
        steps: points of the perturbation curves − 1.
        tolerance: the pointing game's, in pixels.
        blur_sigma: the insertion start's Gaussian, in pixels.
        ranking: False for a method whose maps rank no pixel above another (a constant): deletion,
            insertion and pointing game are NaN for it, and no curve is computed.
    """

    def __init__(self, steps: int, tolerance: float, blur_sigma: float, ranking: bool = True) -> None:
        self.steps, self.tolerance, self.blur_sigma, self.ranking = steps, tolerance, blur_sigma, ranking
        self._per_image: dict[str, list[torch.Tensor]] = {k: [] for k in METRICS}
        self._curve_sums = {
            "deletion": torch.zeros(steps + 1, dtype=torch.float64),
            "insertion": torch.zeros(steps + 1, dtype=torch.float64),
            "road_morf": torch.zeros(len(ROAD_FRACTIONS), dtype=torch.float64),
            "road_lerf": torch.zeros(len(ROAD_FRACTIONS), dtype=torch.float64),
        }
        self._pairs = 0

    def update(
        self,
        prob_fn: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        labels: torch.Tensor,
        seg: torch.Tensor,
        maps: torch.Tensor,
        chunk_images: int = 256,
    ) -> None:
        """Add a batch: ``images`` (B, 3, H, W), ``labels`` (B, C) multi-hot, ``seg`` (B, H, W) class
        index + 1 per pixel, ``maps`` (B, C, H, W) in [0, 1] (NaN already zeroed)."""
        present = labels > 0.5 if labels.dtype != torch.bool else labels
        i, c = present.nonzero(as_tuple=True)
        if i.numel() == 0:
            return
        x, m = images[i], maps[i, c]
        truth = seg[i] == (c + 1).view(-1, 1, 1)
        with torch.no_grad():
            full = prob_fn(x)[torch.arange(i.numel(), device=x.device), c].double().cpu()
            masked = prob_fn(m.unsqueeze(1) * x)[torch.arange(i.numel(), device=x.device), c].double().cpu()
        drop, increase = drop_and_increase(full, masked)
        undefined = torch.full((i.numel(),), math.nan, dtype=torch.float64)
        if self.ranking:
            deletion = perturbation_curves(prob_fn, x, m, c, self.steps, chunk_images=chunk_images)
            insertion = perturbation_curves(
                prob_fn, x, m, c, self.steps, start=gaussian_blur(x, self.blur_sigma), chunk_images=chunk_images
            )
            road = {
                name: road_curves(prob_fn, x, m, c, most_relevant_first=first)
                for name, first in (("road_morf", True), ("road_lerf", False))
            }
            self._curve_sums["deletion"] += deletion.sum(0)
            self._curve_sums["insertion"] += insertion.sum(0)
            for name, curves in road.items():
                self._curve_sums[name] += curves.sum(0)
            self._pairs += i.numel()
        values = {
            "deletion_auc": curve_auc(deletion) if self.ranking else undefined,
            "insertion_auc": curve_auc(insertion) if self.ranking else undefined,
            "pointing_game": pointing_game(m, truth, self.tolerance) if self.ranking else undefined,
            "relevance_mass": relevance_mass(m, truth),
            "average_drop": drop,
            "average_increase": increase,
            "road_morf": road["road_morf"].mean(1) if self.ranking else undefined,
            "road_lerf": road["road_lerf"].mean(1) if self.ranking else undefined,
        }
        image_of_pair = i.cpu()
        images_in_batch = labels.shape[0]
        for key, v in values.items():  # per image: the mean over its pairs (NaN pairs left out)
            ok = torch.isfinite(v)
            sums = torch.zeros(images_in_batch, dtype=torch.float64).index_add_(
                0, image_of_pair, torch.where(ok, v, 0.0)
            )
            n = torch.zeros(images_in_batch, dtype=torch.float64).index_add_(0, image_of_pair, ok.double())
            has_pairs = torch.zeros(images_in_batch, dtype=torch.bool).index_fill_(0, image_of_pair, True)
            self._per_image[key].append(torch.where(n > 0, sums / n.clamp(min=1), math.nan)[has_pairs])

    def per_image(self, key: str) -> np.ndarray:
        """Each image's value of metric ``key`` (NaN where undefined), in the order seen."""
        parts = self._per_image[key]
        return torch.cat(parts).numpy() if parts else np.zeros(0)

    def means(self) -> dict[str, float]:
        """The mean of each metric over the images where it is defined (each image: mean of its pairs)."""
        out = {}
        for key in METRICS:
            v = self.per_image(key)
            v = v[np.isfinite(v)]
            out[key] = float(v.mean()) if v.size else math.nan
        return out

    def intervals(self, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
        """Percentile bootstrap interval of each mean over the images (seeded, so reruns agree)."""
        return {key: bootstrap_interval(self.per_image(key), resamples, level, seed) for key in METRICS}

    def mean_curves(self) -> dict[str, list[float]]:
        """The deletion and insertion curves averaged over every pair, at k/steps, and the ROAD curves at
        :data:`ROAD_FRACTIONS` (empty without ranking)."""
        if not self.ranking:
            return {}
        n = max(self._pairs, 1)
        return {name: (s / n).tolist() if self._pairs else [math.nan] * len(s) for name, s in self._curve_sums.items()}
