"""The conv building blocks that the ``small_cnn`` classifier and the ``compact`` Explainer both stack (each
net its own instance and weights; the Explainer takes nothing of a classifier by using them)."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3×3-BN-ReLU ×2: one block of ``SmallCNN``, of the ``compact`` Explainer's encoder and decoder."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def encode_blocks(blocks: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every :func:`conv_block` of a stack with ``pool`` between them, highest resolution
    first (the skips of a U-Net decoder)."""
    feats = []
    for i, block in enumerate(blocks):
        if i > 0:
            x = pool(x)
        x = block(x)
        feats.append(x)
    return feats
