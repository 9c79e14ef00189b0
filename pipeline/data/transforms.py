"""Decoding a shard sample into training tensors: resize, flip (image and segmentation together), normalise."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import decode_image, resized_rgb
from pipeline.data.sample import decode_png

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID = 255


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (…, 3, H, W) images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] (for pictures)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# image_to_tensor's normalisation folded into one multiply-add on 0..255 values: (x/255 - mean)/std
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float32))).view(3, 1, 1)
_SHIFT = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float32) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def image_to_tensor(image: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """RGB ``size``×``size`` float tensor (3, size, size), contiguous, ImageNet-normalised.

    Resized (bilinear) at full source resolution (:func:`pipeline.data.images.resized_rgb`), flipped
    left-right after the resize when ``flip``, then normalised as :func:`normalize` does (the same values
    up to float rounding, ~5e-7), with one float tensor allocated per image.
    """

    pixels = resized_rgb(image, size)
    if flip:
        pixels = pixels[:, ::-1]
    return normalize_uint8(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) uint8 pixels → the float32 ImageNet-normalised images of :func:`image_to_tensor`
    (bit for bit): a batch decoded elsewhere is normalised on the model's device."""
    scale, shift = _SCALE.to(pixels.device), _SHIFT.to(pixels.device)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).add_(shift)


def seg_to_tensor(seg: np.ndarray, size: int, flip: bool = False) -> torch.Tensor:
    """Class-index map resized by nearest neighbour (labels never blend), as a (size, size) long tensor."""
    resized = np.array(Image.fromarray(seg.astype(np.uint8, copy=False)).resize((size, size), Image.NEAREST))
    if flip:
        resized = resized[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(resized)).long()


def decode_sample(raw: dict, *, image_size: int, num_classes: int, flip: bool = False) -> dict:
    """A shard sample (``{"__key__", "jpg"|"png", "json", "seg.png"?}``) → training tensors.

    Returns:
        ``{"key", "image" (3,S,S) float, "labels" (C,) float multi-hot, "seg" (S,S) long}``; ``seg``
        is all void (255) when the sample has no segmentation.
    """
    meta = json.loads(raw["json"])
    key = raw["__key__"]
    source = f"{raw['__url__']}#{key}" if raw.get("__url__") else key
    # no pixel limit: ingest wrote only images that passed its checks (PIL's decompression-bomb guard applies)
    pixels = decode_image(raw.get("jpg") or raw.get("png"), source, image_size, None)[0]
    if flip:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    image = normalize_uint8(torch.from_numpy(pixels))
    labels = torch.zeros(num_classes)
    if meta["labels"]:
        labels[torch.tensor(meta["labels"])] = 1.0
    if "seg.png" in raw:
        seg = seg_to_tensor(decode_png(raw["seg.png"]), image_size, flip)
    else:
        seg = torch.full((image_size, image_size), VOID, dtype=torch.long)
    return {"key": key, "image": image, "labels": labels, "seg": seg}
