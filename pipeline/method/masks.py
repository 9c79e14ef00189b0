"""Mask aggregation of the method: per-class masks, target mask m and non-target mask n.

Shapes: the Explainer's logits S are (B, C, H, W); labels y are multi-hot (B, C) (bool, or float with
1 = present). Per-class masks keep S's shape; m and n are (B, H, W) (as in the paper's code); apply
them to an image batch with ``m.unsqueeze(1) * x``.
"""

from __future__ import annotations

import torch


def class_masks(S: torch.Tensor) -> torch.Tensor:
    """Per-class masks sigmoid(S_c), shape (B, C, H, W)."""
    return torch.sigmoid(S)


def _masked_max_sigmoid(S: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """sigmoid(max over selected c of S_c) per pixel; exactly 0 where no class is selected."""
    any_selected = select.any(dim=1)  # (B,)
    filled = S.masked_fill(~select[:, :, None, None], float("-inf"))
    top = filled.amax(dim=1)  # (B, H, W); -inf on rows with nothing selected
    # replace those rows before the sigmoid so no inf/NaN reaches values or gradients
    top = torch.where(any_selected[:, None, None], top, torch.zeros_like(top))
    return torch.where(any_selected[:, None, None], torch.sigmoid(top), torch.zeros_like(top))


def target_and_nontarget_masks(S: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target mask m and non-target mask n of the method, both (B, H, W).

    m = sigmoid(max over c with y_c = 1 of S_c); n = sigmoid(max over c with y_c = 0 of S_c).
    An image with no label has m = 0 exactly; an image with every label has n = 0 exactly (no NaN
    in values or gradients). Vectorised over the batch (masked fill + amax).

    Args:
        S: Explainer logits (B, C, H, W).
        y: multi-hot labels (B, C), bool or float (> 0.5 means present).
    """
    present = y > 0.5 if y.dtype != torch.bool else y
    return _masked_max_sigmoid(S, present), _masked_max_sigmoid(S, ~present)
