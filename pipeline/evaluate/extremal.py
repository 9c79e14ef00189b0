"""Extremal Perturbations (Fong, Patrick & Vedaldi, ICCV 2019), our own implementation of the paper.

For an image x and a class c, the *preservation game* looks, for each area a, for the smooth mask m_a
of about a·HW pixels whose preserved image keeps the class's score highest:

    m_a = argmax_m  Φ_c(m ⊗ x) − λ_t · mean((sort(m) − r_a)²)

- m ⊗ x is the blur perturbation: each pixel interpolated linearly between the levels of a pyramid of
  Gaussian blurs σ_l = σ_max·(1 − l/(L−1)), l = 0…L−1 (m = 0: blurred with σ_max, m = 1: the pixel
  itself); L = 8, σ_max = 20 px at 224 px.
- m is a *smooth mask*: parameters on a grid every ``step`` pixels (7 at 224), each output pixel the
  smooth maximum (softmax pooling, coldness 20) of the parameters within ``radius`` cells, weighted by
  k(δ/σ) = exp(−2·max(0, δ/σ − 0.5)²) of their distance δ (σ = 21 px at 224), clamped to [0, 1].
- Φ_c is the **contrastive reward** TorchRay's ``contrastive_reward`` computes and NN-Explainer's comparison
  used: the class's logit minus the largest other class's logit (what makes the mask class-specific; the
  plain logit is ``reward="simple"``). r_a is the sorted reference mask over the whole generated mask, its
  margin included, with a share a of ones (TorchRay's area rule: ``int(N·(1 − a))`` zeros of N). The area
  weight λ_t starts at 300 and grows ×1.0035 per step (800 steps in the paper).
- SGD, learning rate 0.01, momentum 0.9 (dampening 0.9), parameters start at 1 and are clamped to [0, 1]
  after each step; the perturbed batch is flipped horizontally every other step (jitter).
- The final masks are smoothed as NN-Explainer ran TorchRay (``smooth=0.09``): a Gaussian of σ = 0.09 ·
  min(H, W), zero beyond the border, kernel ±4σ.
- The paper's area rule picks the mask, as NN-Explainer applied it: the smallest area a* whose smoothed
  mask's preserved image keeps the class's logit at least the original's, y_c(m_a* ⊗ x) ≥ y_c(x); when no
  area reaches it, the largest area's mask.

Pixel settings are given at 224 px and scaled to the image size (the grid step rounded to a whole
pixel, at least 1). With fewer steps than the paper's 800 the schedule is compressed, not cut: the
learning rate is scaled by 800/steps and λ grows by 1.0035^(800/steps) per step, so λ ends where the
paper's does and the parameters can travel as far. Every (image, class) pair and every area is
optimised in one batch: each step is one forward and one backward pass of P·A images.

TorchRay (the authors' reference code) is unmaintained and licensed for non-commercial use: this
follows the paper, its published settings and the settings NN-Explainer passed to TorchRay (read, not
copied).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluate.baselines import class_index_tensor
from pipeline.method.faithfulness import gaussian_blur, scaled

AREAS = (0.05, 0.1, 0.2, 0.3)
PAPER_STEPS = 800
LEVELS = 8
COLDNESS = 20.0
STEP_AT_224 = 7
SIGMA_AT_224 = 21.0
MAX_BLUR_AT_224 = 20.0
LEARNING_RATE = 0.01
MOMENTUM = 0.9
AREA_WEIGHT = 300.0
AREA_GROWTH = 1.0035
SMOOTH = 0.09  # the final masks' Gaussian, σ as a share of the image's shorter side (NN-Explainer's setting)


def blur_pyramid(images: torch.Tensor, max_blur: float, levels: int = LEVELS) -> torch.Tensor:
    """(B, L, 3, H, W): level l blurred with σ_max·(1 − l/(L−1)); the last level is the image itself."""
    sigmas = [max_blur * (1 - level / (levels - 1)) for level in range(levels)]
    return torch.stack([gaussian_blur(images, s) for s in sigmas], dim=1)


def perturb(pyramid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """m ⊗ x: pyramid (N, L, 3, H, W), masks (N, H, W) in [0, 1] → (N, 3, H, W), linear between levels."""
    levels = pyramid.shape[1]
    w = masks.clamp(0, 1).unsqueeze(1) * (levels - 1)  # (N, 1, H, W)
    k = w.detach().floor().clamp(max=levels - 2)
    frac = w - k  # the gradient flows through the interpolation weight
    k = k.long().unsqueeze(1).expand(-1, 1, pyramid.shape[2], -1, -1)  # (N, 1, 3, H, W)
    lower = pyramid.gather(1, k).squeeze(1)
    upper = pyramid.gather(1, k + 1).squeeze(1)
    return (1 - frac) * lower + frac * upper


class SmoothMask:
    """The smooth-mask generator for masks of ``size`` = (H, W): parameters (N, 1, h, w) → masks.

    ``generate`` returns the mask cropped to the image (N, H, W) and the whole mask with its margin of σ
    pixels on every side (N, H', W'); the area constraint is taken over the whole one. An output pixel's
    weights depend only on its position within its ``step``-pixel cell, so the pooling runs once per
    position in the cell (step² times) over the parameter windows, at the parameters' resolution.
    """

    def __init__(self, size: tuple[int, int], step: int, sigma: float, device=None):
        self.size, self.step, self.sigma = tuple(size), int(step), float(sigma)
        self.margin = round(self.sigma)
        self.padding = 1 + math.ceil((self.sigma + self.sigma) / step)
        self.radius = 1 + math.ceil(self.sigma / step)
        self.params_shape = tuple(math.ceil(z / step) for z in self.size)
        self.kernel = 2 * self.radius + 1
        self.mid = tuple(z + 2 * self.padding - self.kernel + 1 for z in self.params_shape)
        self.out = tuple(step * z - step + 1 for z in self.mid)
        # weight[a, b, k]: k(δ/σ) of an output pixel at offset (a, b) in its cell to the k-th parameter of
        # its window, δ the distance from the pixel to that parameter's position
        phase = torch.arange(step, dtype=torch.float32)
        offsets = (torch.arange(self.kernel, dtype=torch.float32) - self.padding) * step + self.margin
        dv = phase[:, None, None, None] - offsets[None, None, :, None]  # (step, 1, k, 1)
        du = phase[None, :, None, None] - offsets[None, None, None, :]  # (1, step, 1, k)
        delta = torch.sqrt(dv**2 + du**2)
        weight = torch.exp(-2 * ((delta / self.sigma - 0.5).clamp(min=0) ** 2))  # (step, step, k, k)
        self.weight = weight.reshape(step, step, self.kernel**2, 1, 1).to(device)

    def generate(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k2 = params.shape[0], self.kernel**2
        windows = F.unfold(params, (self.kernel, self.kernel), padding=self.padding).reshape(n, k2, *self.mid)
        rows = []
        for a in range(self.step):
            cols = []
            for b in range(self.step):
                weighted = self.weight[a, b] * windows  # (N, K, mid_h, mid_w)
                cols.append((weighted * F.softmax(COLDNESS * weighted, dim=1)).sum(dim=1))
            rows.append(torch.stack(cols, dim=-1))  # (N, mid_h, mid_w, step)
        full = torch.stack(rows, dim=2)  # (N, mid_h, step, mid_w, step): pixel (i·step + a, j·step + b)
        full = full.reshape(n, self.mid[0] * self.step, self.mid[1] * self.step)[:, : self.out[0], : self.out[1]]
        full = full.clamp(0, 1)
        m = self.margin
        return full[:, m : m + self.size[0], m : m + self.size[1]], full


@functools.lru_cache(maxsize=8)
def _generator(size: tuple[int, int], step: int, sigma: float, device: str) -> SmoothMask:
    return SmoothMask(size, step, sigma, device=device)


def optimise_masks(
    model: nn.Module,
    x: torch.Tensor,
    image_of: torch.Tensor,
    class_of: torch.Tensor,
    areas=AREAS,
    steps: int = PAPER_STEPS,
    jitter: bool = True,
    reward: str = "contrastive",
    smooth: float = SMOOTH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preservation game for P (image, class) pairs and every area, in one batch.

    Args:
        model: images (N, 3, H, W) → logits (N, C), frozen and in eval mode.
        x: normalised images (B, 3, H, W).
        image_of, class_of: (P,) the image and the class of each pair.
        areas: the target areas a, as shares of the image.
        steps: optimisation steps (the paper: 800).
        jitter: flip the perturbed batch horizontally every other step (the paper's).
        reward: ``contrastive`` (TorchRay's, NN-Explainer's) or ``simple`` (the class's logit).
        smooth: the final masks' Gaussian σ as a share of min(H, W) (0: none).

    Returns:
        ``masks`` (P, A, H, W) in [0, 1] (smoothed), ``scores`` (P, A) = y_c(m_a ⊗ x), the class's logit on the
        smoothed masks' preserved images (not jittered), and ``original`` (P,) = y_c(x).
    """
    if reward not in ("contrastive", "simple"):
        raise ValueError(f"extremal perturbation: reward {reward!r} is neither contrastive nor simple")
    _, _, H, W = x.shape
    P, A = image_of.shape[0], len(areas)
    device = x.device
    step = max(1, round(scaled(STEP_AT_224, H)))
    generator = _generator((H, W), step, scaled(SIGMA_AT_224, H), str(device))
    with torch.no_grad():
        pyramid = blur_pyramid(x.float().contiguous(), scaled(MAX_BLUR_AT_224, H))  # (B, L, 3, H, W)
        original = model(x).float()[image_of, class_of]  # (P,)
    n = P * A
    pyramid = pyramid[image_of.repeat_interleave(A)]  # (N, L, 3, H, W), pair-major
    target = class_of.repeat_interleave(A)  # (N,)

    full_pixels = generator.out[0] * generator.out[1]
    reference = torch.ones(A, full_pixels, device=device)
    for i, a in enumerate(areas):  # ascending: TorchRay's int(N·(1 − a)) zeros over the mask with its margin
        reference[i, : int(full_pixels * (1 - a))] = 0.0
    reference = reference.repeat(P, 1)  # (N, pixels)

    params = torch.ones(n, 1, *generator.params_shape, device=device, requires_grad=True)
    compress = PAPER_STEPS / steps
    optimizer = torch.optim.SGD([params], lr=LEARNING_RATE * compress, momentum=MOMENTUM, dampening=MOMENTUM)
    growth = AREA_GROWTH**compress
    weight = AREA_WEIGHT
    rows = torch.arange(n, device=device)
    with torch.enable_grad():
        for t in range(steps):
            masks, full = generator.generate(params)
            images = perturb(pyramid, masks)
            if jitter and t % 2 == 0:
                images = images.flip(dims=(3,))
            gain = class_reward(model(images).float(), target, reward)  # (N,)
            regular = ((full.reshape(n, -1).sort(dim=1).values - reference) ** 2).mean(dim=1)
            energy = gain - weight * regular
            # the gradient of the parameters only (a model whose weights require grad keeps none)
            (params.grad,) = torch.autograd.grad(-energy.sum(), params)
            optimizer.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            weight *= growth
    with torch.no_grad():
        masks, _ = generator.generate(params)
        if smooth > 0:
            masks = smooth_masks(masks, smooth * min(H, W))
        scores = model(perturb(pyramid, masks)).float()[rows, target]
    return masks.reshape(P, A, H, W), scores.reshape(P, A), original


def class_reward(logits: torch.Tensor, target: torch.Tensor, reward: str = "contrastive") -> torch.Tensor:
    """(N, C) logits → (N,) reward of class ``target`` per row: its logit (``simple``), minus the largest other
    class's logit (``contrastive``, TorchRay's ``contrastive_reward``)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    own = logits[rows, target]
    if reward == "simple":
        return own
    others = logits.clone()
    others[rows, target] = -torch.inf
    return own - others.max(dim=1).values


def smooth_masks(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) masks blurred with a Gaussian of ``sigma`` pixels, kernel ±⌈4σ⌉, zero beyond the border
    (TorchRay's ``imsmooth`` with constant padding, as NN-Explainer's ``smooth``)."""
    radius = math.ceil(4 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=masks.dtype, device=masks.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(masks.unsqueeze(1), kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, radius)).squeeze(1)


def pick_area(scores: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The paper's rule: per pair (…, A) the index of the smallest area whose preserved score is at least
    the original's (areas in increasing order); the largest area where none is."""
    reaches = scores >= original.unsqueeze(-1)
    first = reaches.float().argmax(dim=-1)  # the first True (0 when none)
    return torch.where(reaches.any(dim=-1), first, torch.full_like(first, scores.shape[-1] - 1))


def extremal_pairs(model: nn.Module, x: torch.Tensor, image_of: torch.Tensor, class_of: torch.Tensor, **settings):
    """The mask (P, H, W) of each (image, class) pair at the area the paper's rule picks; ``settings``:
    ``areas``, ``steps``, ``jitter``, ``reward``, ``smooth`` of :func:`optimise_masks`."""
    settings["areas"] = sorted(float(a) for a in settings.get("areas", AREAS))
    masks, scores, original = optimise_masks(model, x, image_of, class_of, **settings)
    pick = pick_area(scores, original)  # (P,)
    return masks[torch.arange(masks.shape[0], device=masks.device), pick].detach()


def extremal_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    classes,
    areas=AREAS,
    steps: int = PAPER_STEPS,
    jitter: bool = True,
    reward: str = "contrastive",
    smooth: float = SMOOTH,
) -> torch.Tensor:
    """Extremal-perturbation masks (B, K, H, W) in [0, 1] of the requested classes (the common baseline
    signature of :mod:`pipeline.evaluate.baselines`), each at the area the paper's rule picks."""
    cls = class_index_tensor(classes, x.shape[0], device=x.device)
    B, K = cls.shape
    image_of = torch.arange(B, device=x.device).repeat_interleave(K)
    settings = {"areas": areas, "steps": steps, "jitter": jitter, "reward": reward, "smooth": smooth}
    masks = extremal_pairs(model, x, image_of, cls.reshape(-1), **settings)
    return masks.reshape(B, K, *x.shape[-2:])
