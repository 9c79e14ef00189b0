"""The Explainer's training objective (Stalder et al. 2022) and the classifier's.

L_E = L_c + λ_e·L_e + λ_tv·L_tv + λ_a·L_a + λ_m·mean(m) + λ_n·mean(n), with

- L_c  = BCEWithLogits(F(m ⊙ x), y)                     (cross-entropy for single-label data)
- L_e  = −mean entropy of softmax(F((1 − m) ⊙ x))
- L_tv = TV(m) + TV(n)
- L_a  = Σ over present classes c of the sorted-area penalty of sigmoid(S_c), averaged over the batch.

Normalisations follow the paper's code (stevenstalder/NN-Explainer, ``src/utils/loss.py``) so that
its λ values carry over:

- Entropy: the mean is over batch *and* classes of −p log p, i.e. L_e = −(1/C)·mean_b H(p_b), p
  clamped at 1e-16 before the log. With 20 classes L_e lies in [−log(20)/20, 0] ≈ [−0.15, 0].
- TV: TV(z) = (1/(B·H·W))·Σ_{b,i,j} (|z[i,j] − z[i,j+1]| + |z[i,j] − z[i+1,j]|), the sum over
  *every* pixel, where the neighbour past the last column/row is the reflected one (z[i,W] = z[i,W−2],
  z[H,j] = z[H−2,j]) — the paper's 3×3 difference convolution with reflect padding. The last
  column's and row's differences therefore count twice.
- Area: for one present class, the sigmoid mask is flattened and sorted descending (s_0 ≥ s_1 ≥ …);
  penalty = mean over k of relu(1[k < ⌊a_min·HW⌋] − s_k) + relu(s_k − 1[k < ⌊a_max·HW⌋]); summed over
  the image's present classes, then averaged over the batch (images with no label contribute 0).

``loss.kind: rt_saliency`` trains the same Explainer net with Dabkowski & Gal's (NeurIPS 2017) real-time
saliency objective instead (:func:`rt_saliency_loss`), a named variant for the comparison.

``weights`` is any object with the paper's attribute names (``entropy_regularizer`` λ_e,
``mask_variation_regularizer`` λ_tv, ``mask_area_constraint_regularizer`` λ_a,
``mask_total_area_regularizer`` λ_m, ``ncmask_total_area_regularizer`` λ_n, ``class_mask_min_area``,
``class_mask_max_area``), e.g. ``pipeline.config.LossConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.method.faithfulness import gaussian_blur, scaled
from pipeline.method.masks import target_and_nontarget_masks


def classification_loss(logits: torch.Tensor, y: torch.Tensor, single_label: bool = False) -> torch.Tensor:
    """BCEWithLogits(logits, y) for multi-hot y; cross-entropy with argmax(y) when ``single_label``."""
    if single_label:
        return F.cross_entropy(logits, y.float().argmax(dim=1))
    return F.binary_cross_entropy_with_logits(logits, y.float())


def classifier_loss(logits: torch.Tensor, y: torch.Tensor, single_label: bool = False) -> torch.Tensor:
    """The Explanandum's fine-tuning loss: BCE with logits against multi-hot labels (paper)."""
    return classification_loss(logits, y, single_label=single_label)


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, single_label: bool = False
) -> torch.Tensor:
    """L_d = BCEWithLogits(student logits, p_F): the student reproduces the Explanandum's sigmoid
    probabilities (soft targets), class by class (``explainer.init=distilled``); for a single-label
    (softmax) F the cross-entropy of the student's softmax against F's softmax (soft targets)."""
    if single_label:
        return F.cross_entropy(student_logits, teacher_probs)
    return F.binary_cross_entropy_with_logits(student_logits, teacher_probs)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_e = −mean over (b, c) of −p log p, p = softmax(logits) (minimising it maximises entropy)."""
    p = F.softmax(logits, dim=-1).clamp(min=1e-16)
    return (p * p.log()).mean()  # = −mean(−p log p)


def total_variation(z: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """TV(z) for masks (B, H, W) (H, W ≥ 2): mean over all pixels of |Δ_right| + |Δ_down| (``squared``: Δ², as
    NN-Explainer's ``RTSalTotalVariationConv`` for RT-Saliency), the neighbour past the border reflected (the
    paper's reflect-padded difference convolution)."""
    dx = z[..., :, :-1] - z[..., :, 1:]  # (B, H, W-1)
    dy = z[..., :-1, :] - z[..., 1:, :]  # (B, H-1, W)
    dx, dy = (dx.square(), dy.square()) if squared else (dx.abs(), dy.abs())
    # last column: |z[i,W-1] − z[i,W-2]| = dx[..., -1]; last row likewise dy[..., -1, :]
    total = dx.sum() + dx[..., -1].sum() + dy.sum() + dy[..., -1, :].sum()
    return total / z.numel()


def area_template(num_pixels: int, area: float, device=None, dtype=None) -> torch.Tensor:
    """1[k < ⌊area·HW⌋] for k = 0…HW−1: the ideal sorted mask of a given area fraction."""
    ones = int(num_pixels * area)
    return (torch.arange(num_pixels, device=device) < ones).to(dtype or torch.float32)


def class_mask_area_loss(S: torch.Tensor, y: torch.Tensor, min_area: float, max_area: float) -> torch.Tensor:
    """L_a: sorted-area penalty of every present class's mask, summed per image, mean over the batch.

    Vectorised: the present (b, c) pairs are gathered into one (P, HW) tensor and sorted together.
    """
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise ValueError(f"need 0 <= class_mask_min_area <= class_mask_max_area <= 1, got {min_area}, {max_area}")
    B, C, H, W = S.shape
    present = y > 0.5 if y.dtype != torch.bool else y
    b_idx, c_idx = present.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return S.sum() * 0.0  # keep the graph (and the device/dtype)
    s = torch.sigmoid(S[b_idx, c_idx].flatten(1)).sort(dim=1, descending=True).values  # (P, HW)
    t_min = area_template(H * W, min_area, S.device, s.dtype)
    t_max = area_template(H * W, max_area, S.device, s.dtype)
    # relu(1[k < a_min·HW] − s_k) + relu(s_k − 1[k < a_max·HW]), averaged over pixels
    per_mask = (F.relu(t_min - s) + F.relu(s - t_max)).mean(dim=1)  # (P,)
    per_image = torch.zeros(B, device=S.device, dtype=s.dtype).index_add(0, b_idx, per_mask)
    return per_image.mean()


def explainer_loss(
    explanandum: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    S: torch.Tensor,
    weights: Any,
    single_label: bool = False,
) -> dict[str, torch.Tensor]:
    """The Explainer's loss L_E, every term separately.

    The Explanandum F must already be frozen and in eval mode (``freeze_explanandum``); gradients flow
    through it to the mask only.

    Args:
        explanandum: F, mapping an image batch to logits (B, C).
        x: ImageNet-normalised images (B, 3, H, W) (so m ⊙ x shows the mean colour where m = 0).
        y: multi-hot labels (B, C).
        S: Explainer logits (B, C, H, W).
        weights: object with the paper's λ names (see the module docstring).
        single_label: use cross-entropy for L_c (single-label data sets).

    Returns:
        ``classification`` (L_c), ``entropy`` (L_e), ``tv`` (L_tv), ``area_constraint`` (L_a),
        ``mask_area`` (mean m), ``ncmask_area`` (mean n) — all unweighted scalars — and ``total``
        (L_E, weighted, the one to backpropagate); plus ``m``, ``n`` (B, H, W), ``logits_masked`` =
        F(m ⊙ x) and ``logits_inverted`` = F((1 − m) ⊙ x) (B, C), for accuracy/F1 logging.
    """
    m, n = target_and_nontarget_masks(S, y)
    logits_masked = explanandum(m.unsqueeze(1) * x)
    logits_inverted = explanandum((1.0 - m).unsqueeze(1) * x)

    terms = {
        "classification": classification_loss(logits_masked, y, single_label=single_label),
        "entropy": entropy_loss(logits_inverted),
        "tv": total_variation(m) + total_variation(n),
        "area_constraint": class_mask_area_loss(
            S, y, float(weights.class_mask_min_area), float(weights.class_mask_max_area)
        ),
        "mask_area": m.mean(),
        "ncmask_area": n.mean(),
    }
    total = (
        terms["classification"]
        + weights.entropy_regularizer * terms["entropy"]
        + weights.mask_variation_regularizer * terms["tv"]
        + weights.mask_area_constraint_regularizer * terms["area_constraint"]
        + weights.mask_total_area_regularizer * terms["mask_area"]
        + weights.ncmask_total_area_regularizer * terms["ncmask_area"]
    )
    return {
        **terms,
        "total": total,
        "m": m,
        "n": n,
        "logits_masked": logits_masked,
        "logits_inverted": logits_inverted,
    }


def supervised_mask_loss(S: torch.Tensor, seg: torch.Tensor, void: int = 255) -> torch.Tensor:
    """``loss.kind: supervised``, the sanity check's positive control: the per-class masks sigmoid(S) (B, C, H, W)
    learn the ground truth (class c's mask 1 on ``seg == c + 1``, 0 elsewhere), binary cross-entropy over the
    pixels that are not ``void``. It never reads the classifier: an Explainer trained so encodes the labels,
    which a sanity check must catch."""
    classes = torch.arange(S.shape[1], device=S.device).view(1, -1, 1, 1)
    target = (seg.unsqueeze(1).long() == classes + 1).to(S.dtype)
    valid = (seg != void).unsqueeze(1).expand_as(S).to(S.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(S, target, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1.0)


RT_BLUR_SIGMA_AT_224 = 10.0  # Dabkowski & Gal's blurred alternative
RT_NOISE_MEAN, RT_COLOUR_RANGE = 0.11, 0.66  # their coloured-noise alternative (pytorch-saliency, NN-Explainer)


def rt_alternative(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The image that replaces what a mask removes in Φ(x, m) = m·x + (1 − m)·A: ``blur`` (a Gaussian blur
    of σ 10 px at 224 px, scaled), ``noise`` (coloured noise, as Dabkowski & Gal's code and NN-Explainer's
    ``generate_alternative_image``: N(0.11, 1) per pixel plus one U(−0.33, 0.33) per image and channel, in the
    normalised space), or ``both`` (either, drawn per batch, as they alternate them)."""
    if kind == "both":
        kind = "blur" if torch.rand((), generator=generator).item() < 0.5 else "noise"
    if kind == "blur":
        # float32, contiguous, outside autocast: a depthwise bf16 convolution of a channels_last batch takes
        # the CPU minutes (the trainer's batches are channels_last under cpu_amp)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return gaussian_blur(x.float().contiguous(), scaled(RT_BLUR_SIGMA_AT_224, x.shape[-1]))
    colour = (torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator) - 0.5) * RT_COLOUR_RANGE
    return (torch.randn(x.shape, generator=generator) + RT_NOISE_MEAN + colour).to(x.device)


def rt_saliency_loss(
    explanandum: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    S: torch.Tensor,
    weights: Any,
    alternative: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dabkowski & Gal's real-time saliency objective as NN-Explainer trained its RT-Saliency baseline
    (``RTSalExplainerClassifierModel``, the paper's comparison), on the merged target mask m (the pixel-wise max
    of the present classes' masks sigmoid(S_c); multi-label: p = sigmoid of F's logit):

        L = λ_tv·TV²(m) + λ_a·mean(m) + P + λ_d·D^power,
        P = mean over present (i, c) of −log p_c(Φ(x_i, m_i)),  D = mean over present (i, c) of p_c(Φ(x_i, 1 − m_i))

    TV² squares the neighbour differences (:func:`total_variation` with ``squared``); the power applies to the
    mean D (their ``torch.pow(destr_loss, 0.3)``); Φ(x, m) = m·x + (1 − m)·A with A from :func:`rt_alternative`.
    Weights ``rt_variation_regularizer``, ``rt_area_regularizer``, ``rt_destroyer_regularizer``,
    ``rt_destroyer_power``.

    Returns the unweighted ``preserver`` (P), ``destroyer`` (D, before the power), ``tv``, ``area`` (mean of m)
    and the weighted ``total``, and, as :func:`explainer_loss`, ``m``, ``mask_area`` = mean(m),
    ``logits_masked`` = F(m ⊙ x) and ``logits_inverted`` = F((1 − m) ⊙ x) for logging (no gradient).
    """
    if alternative is None:
        alternative = rt_alternative(x, weights.rt_alternative)
    present = y > 0.5 if y.dtype != torch.bool else y
    m, _ = target_and_nontarget_masks(S, y)
    with torch.no_grad():  # the same logged quantities as the paper's loss (F1 of F(m ⊙ x), …)
        logits_masked = explanandum(m.unsqueeze(1) * x)
        logits_inverted = explanandum((1.0 - m).unsqueeze(1) * x)
    if not present.any():
        zero = S.sum() * 0.0
        terms = {"preserver": zero, "destroyer": zero, "tv": zero, "area": zero}
        destroyer = zero
    else:
        keep = m.unsqueeze(1)
        kept = explanandum(keep * x + (1 - keep) * alternative)
        removed = explanandum((1 - keep) * x + keep * alternative)
        terms = {
            "preserver": -F.logsigmoid(kept.float())[present].mean(),
            "destroyer": torch.sigmoid(removed.float())[present].mean(),
            "tv": total_variation(m, squared=True),
            "area": m.mean(),
        }
        destroyer = terms["destroyer"].pow(weights.rt_destroyer_power)
    total = (
        weights.rt_variation_regularizer * terms["tv"]
        + weights.rt_area_regularizer * terms["area"]
        + terms["preserver"]
        + weights.rt_destroyer_regularizer * destroyer
    )
    return {
        **terms,
        "total": total,
        "mask_area": m.mean().detach(),
        "m": m,
        "logits_masked": logits_masked,
        "logits_inverted": logits_inverted,
    }
