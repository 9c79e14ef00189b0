"""iGOS++ (Khorram et al., "iGOS++: Integrated Gradient Optimized Saliency by Bilateral Perturbations", CHIL 2021),
our own implementation, run as NN-Explainer ran it for the paper's comparison.

For an image x, a class c and a baseline x̃ (x blurred), two low-resolution masks M_d (deletion) and M_i
(insertion), both starting at 1, are optimised together; the explanation is where their product M = M_d·M_i
is low. With φ(a, b, m) = a·m + b·(1 − m), s_c the classifier's softmax probability of c, m↑ a mask
upsampled bilinearly (corners aligned) to the image and noise n ~ 𝒩(0, 0.2²) per pixel:

- the **deletion score** of a mask m: D(m) = (1/K)·Σ_k s_c(φ(x, x̃, (k/K)·m↑) + n), k = 1…K (the path from
  the baseline to the image deleted where m = 0), to be made small;
- the **insertion score**: I(m) = (1/K)·Σ_k s_c(φ(x̃, x, (k/K)·m↑) + n) (the image inserted into the baseline
  where m = 0), to be made large;
- the regulariser R(m) = λ₁·mean|1 − m| + λ₂·BTV(x, m): the mask's squared total variation and the
  upsampled mask's, each difference weighted by exp(−Δx²/σ) of the image there (bilateral: edges of the
  mask are cheap where the image has edges), σ = 0.01, halved sum of the four terms.

Each of ``iterations`` steps takes the *integrated gradient* (the gradient of the K-point path sums above):
g_d = ½·∇_{M_d}[D(M) − I(M) + D(M_d)] + ∇_{M_d}R(M), g_i = ½·∇_{M_i}[D(M) − I(M) − I(M_i)] + ∇_{M_i}R(M), a
backtracking line search on L = D(M_d) − I(M_i) + D(M) − I(M) + R(M) from a step of 1000 (×0.2 until the
Armijo condition L(new) ≤ L + step·(−10⁻⁴·‖g‖²) holds, or the step falls under 10⁻⁵), then
M ← clamp(M − step·g, 0, 1). The saliency map is 1 − M↑, min-max normalised per (image, class)
(a mask that never moved has no range: NaN, which evaluate sets to 0 and counts, as NN-Explainer's
normalisation did).

NN-Explainer's settings (its ``IGOS_pp`` folder): masks of 28 × 28 at 224 px (scaled to the image),
λ₁ = 1, λ₂ = 20, 20 iterations of K = 15 integration steps (its script passes its ``--ig_iter`` 20 as the
iterations and ``--iterations`` 15 as the steps), softmax scores (also for its multi-label VGG-16 and
ResNet-50), the baseline OpenCV's Gaussian blur with a 51-px kernel and σ = 50 px at 224 px, one optimisation
per present class. Every (image, class) pair of a batch is optimised at once here; the pairs do not
interact (the classifier is frozen and in eval mode), so each gets what a run of its own would.

The reference code is GPL-3 (read, not copied); ``tests/unit/test_igos.py`` runs it beside ours where its
source is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluate.baselines import class_index_tensor
from pipeline.method.faithfulness import gaussian_blur, scaled

SIZE_AT_224 = 28  # the masks' side at 224 px
ITERATIONS = 20
IG_STEPS = 15
L1 = 1.0
L2 = 20.0
NOISE = 0.2  # σ of the Gaussian noise added to every path image
BILATERAL_SIGMA = 0.01
TV_POWER = 2
STEP = 1000.0  # the line search's first step
ARMIJO = 1e-4
DECAY = 0.2
MIN_STEP = 1e-5
BLUR_SIGMA_AT_224 = 50.0  # the baseline: cv2.GaussianBlur(x, (51, 51), 50) at 224 px
BLUR_RADIUS_AT_224 = 25


def blurred_baseline(x: torch.Tensor) -> torch.Tensor:
    """x̃: the images blurred as NN-Explainer's baseline (σ 50 px, kernel ±25 px at 224, scaled; reflected borders)."""
    size = x.shape[-1]
    return gaussian_blur(x, scaled(BLUR_SIGMA_AT_224, size), radius=round(scaled(BLUR_RADIUS_AT_224, size)))


def upscale(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(P, 1, h, w) → (P, 1, H, W), bilinear with the corners aligned (``nn.UpsamplingBilinear2d``)."""
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=True)


def path_score(
    model: nn.Module,
    start: torch.Tensor,
    end: torch.Tensor,
    up_masks: torch.Tensor,
    classes: torch.Tensor,
    steps: int,
    noise: float = NOISE,
) -> torch.Tensor:
    """(P,) the mean over k = 1…K of s_c(φ(start, end, (k/K)·m) + n): D(m) with (x, x̃), I(m) with (x̃, x).

    start, end: (P, 3, H, W); up_masks: (P, 1, H, W); classes: (P,)."""
    P, K = start.shape[0], steps
    scales = torch.linspace(1 / K, 1, K, device=start.device, dtype=start.dtype).view(1, K, 1, 1, 1)
    m = up_masks.unsqueeze(1) * scales  # (P, K, 1, H, W)
    images = start.unsqueeze(1) * m + end.unsqueeze(1) * (1 - m)
    if noise:
        images = images + torch.randn_like(images) * noise
    probs = torch.softmax(model(images.flatten(0, 1)).to(start.dtype), dim=1).view(P, K, -1)
    return probs.gather(2, classes.view(P, 1, 1).expand(P, K, 1)).squeeze(2).sum(dim=1) / K


def bilateral_tv(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(P,) BTV(x, m) for masks (P, 1, h, w): ½·(TV(m) + TV(m↑) weighted by exp(−Δx²/σ)), squared differences, each
    term a mean over its pixel pairs. As the reference, the vertical weight squares the channels' mean difference
    and the horizontal one averages the channels' weights."""
    P = masks.shape[0]
    m = masks[:, 0]
    a = (m[:, :-1, :] - m[:, 1:, :]).abs().pow(TV_POWER).reshape(P, -1).mean(dim=1)
    b = (m[:, :, :-1] - m[:, :, 1:]).abs().pow(TV_POWER).reshape(P, -1).mean(dim=1)
    up = upscale(masks, tuple(images.shape[-2:]))
    vertical = torch.exp(-((images[:, :, :-1, :] - images[:, :, 1:, :]).mean(dim=1) ** 2) / BILATERAL_SIGMA)
    horizontal = torch.exp(-((images[:, :, :, :-1] - images[:, :, :, 1:]) ** 2) / BILATERAL_SIGMA).mean(dim=1)
    bil_a = (vertical.reshape(P, -1) * (up[:, :, :-1, :] - up[:, :, 1:, :]).abs().pow(TV_POWER).reshape(P, -1)).mean(1)
    bil_b = (horizontal.reshape(P, -1) * (up[:, :, :, :-1] - up[:, :, :, 1:]).abs().pow(TV_POWER).reshape(P, -1)).mean(
        1
    )
    return 0.5 * (a + b + bil_a + bil_b)


def regulariser(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(P,) R(m) = λ₁·mean|1 − m| + λ₂·BTV(x, m)."""
    return L1 * (1 - masks).abs().reshape(masks.shape[0], -1).mean(dim=1) + L2 * bilateral_tv(images, masks)


def igos_pp_pairs(
    model: nn.Module,
    x: torch.Tensor,
    image_of: torch.Tensor,
    class_of: torch.Tensor,
    iterations: int = ITERATIONS,
    ig_steps: int = IG_STEPS,
    size: int | None = None,
) -> torch.Tensor:
    """The iGOS++ saliency map (P, H, W) of each (image, class) pair.

    Args:
        model: images (N, 3, H, W) → logits (N, C), frozen and in eval mode.
        x: normalised images (B, 3, H, W).
        image_of, class_of: (P,) the image and the class of each pair.
        iterations: optimisation steps (NN-Explainer: 20).
        ig_steps: K, points of each integrated-gradient path (NN-Explainer: 15).
        size: the masks' side (default: 28 at 224 px, scaled to the image, at least 2).
    """
    H, W = x.shape[-2:]
    side = size or max(2, round(scaled(SIZE_AT_224, H)))
    x = x if x.dtype == torch.float64 else x.float()
    with torch.no_grad():
        images = x[image_of]
        base = blurred_baseline(x)[image_of]
    P, shape = images.shape[0], (H, W)
    classes = class_of.to(x.device)

    every = slice(None)

    def deletion(rows, up):
        return path_score(model, images[rows], base[rows], up, classes[rows], ig_steps)

    def insertion(rows, up):
        return path_score(model, base[rows], images[rows], up, classes[rows], ig_steps)

    def objective(rows, md, mi):  # the line search's L of the pairs ``rows``
        ud, ui = upscale(md, shape), upscale(mi, shape)
        both = ud * ui
        deleted = deletion(rows, ud) + deletion(rows, both)
        return deleted - insertion(rows, ui) - insertion(rows, both) + regulariser(images[rows], md * mi)

    md = torch.ones(P, 1, side, side, device=x.device, dtype=x.dtype)
    mi = torch.ones_like(md)
    with torch.enable_grad():
        for _ in range(iterations):
            md.requires_grad_(True)
            mi.requires_grad_(True)
            ud, ui = upscale(md, shape), upscale(mi, shape)
            del_md, del_mi = torch.autograd.grad(deletion(every, ud * ui).sum(), (md, mi))
            ins_md, ins_mi = torch.autograd.grad(insertion(every, ud * ui).sum(), (md, mi))
            (own_md,) = torch.autograd.grad(deletion(every, ud).sum(), md)
            (own_mi,) = torch.autograd.grad(insertion(every, ui).sum(), mi)
            reg_md, reg_mi = torch.autograd.grad(regulariser(images, md * mi).sum(), (md, mi))
            g_d = (del_md - ins_md + own_md) / 2 + reg_md
            g_i = (del_mi - ins_mi - own_mi) / 2 + reg_mi
            md, mi = md.detach(), mi.detach()
            step = line_search(objective, md, mi, g_d, g_i)
            md = (md - step * g_d).clamp(0, 1)
            mi = (mi - step * g_i).clamp(0, 1)
    with torch.no_grad():
        up = upscale(md * mi, shape)[:, 0]  # (P, H, W)
        lo = up.flatten(1).amin(dim=1).view(P, 1, 1)
        hi = up.flatten(1).amax(dim=1).view(P, 1, 1)
        return 1 - (up - lo) / (hi - lo)  # NaN for a mask without range, as the reference's normalisation


@torch.no_grad()
def line_search(objective, md: torch.Tensor, mi: torch.Tensor, g_d: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
    """(P, 1, 1, 1) steps, ``objective(rows, md, mi)`` being L of the pairs ``rows``: from :data:`STEP`,
    ×:data:`DECAY` per pair while L(M − step·g) > L(M) − step·10⁻⁴·‖g‖² (both masks' gradients), a pair leaving
    the search once its step is under :data:`MIN_STEP`."""
    P = md.shape[0]
    steps = torch.full((P,), STEP, device=md.device, dtype=md.dtype)
    base = objective(slice(None), md, mi)
    slope = -ARMIJO * (g_d.pow(2).reshape(P, -1).sum(1) + g_i.pow(2).reshape(P, -1).sum(1))
    open_ = torch.ones(P, dtype=torch.bool, device=md.device)
    while True:
        s = steps[open_].view(-1, 1, 1, 1)
        new_d = (md[open_] - s * g_d[open_]).clamp(0, 1)
        new_i = (mi[open_] - s * g_i[open_]).clamp(0, 1)
        losses = objective(open_.clone(), new_d, new_i)
        still = (losses > base[open_] + steps[open_] * slope[open_]) & (steps[open_] >= MIN_STEP)
        open_[open_.clone()] = still
        if not open_.any():
            return steps.view(P, 1, 1, 1)
        steps[open_] *= DECAY


def igos_pp(model: nn.Module, x: torch.Tensor, classes, **settings) -> torch.Tensor:
    """iGOS++ maps (B, K, H, W) of the requested classes (the common baseline signature of
    :mod:`pipeline.evaluate.baselines`); ``settings``: ``iterations``, ``ig_steps``, ``size``."""
    cls = class_index_tensor(classes, x.shape[0], device=x.device)
    B, K = cls.shape
    image_of = torch.arange(B, device=x.device).repeat_interleave(K)
    return igos_pp_pairs(model, x, image_of, cls.reshape(-1), **settings).reshape(B, K, *x.shape[-2:])
