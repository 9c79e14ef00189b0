"""Decoding a shard sample into training tensors: resize, flip (image and segmentation together), normalise."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.config import MAX_IMAGE_PIXELS
from pipeline.data.images import decode_image, resized_rgb
from pipeline.data.sample import decode_png

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID = 255


@dataclass(frozen=True)
class Normalization:
    """A classifier's input normalisation of pixels in [0, 1]: ``(x - mean) / std`` per RGB channel. The
    Explainer and F see images normalised F's way, so a masked pixel (0) is F's mean colour."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _view(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) images in [0, 1] → normalised."""
        return (images - self._view(self.mean, images)) / self._view(self.std, images)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images → [0, 1], clamped (for pictures)."""
        return (images * self._view(self.std, images) + self._view(self.mean, images)).clamp(0, 1)

    def uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) uint8 pixels → float32 normalised images, one multiply-add on 0..255 values (a batch
        decoded elsewhere is normalised on the model's device)."""
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device)
        scale = (1.0 / (255.0 * std)).view(3, 1, 1)
        shift = (-torch.tensor(self.mean, dtype=torch.float32, device=pixels.device) / std).view(3, 1, 1)
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).add_(shift)

    def mean_colour(self) -> np.ndarray:
        """The colour of a normalised 0 (a masked pixel), RGB in [0, 1]."""
        return np.asarray(self.mean, dtype=np.float32)


IMAGENET = Normalization()


def normalize(images: torch.Tensor, norm: Normalization = IMAGENET) -> torch.Tensor:
    """``norm`` (ImageNet's by default) of (…, 3, H, W) images in [0, 1]."""
    return norm(images)


def denormalize(images: torch.Tensor, norm: Normalization = IMAGENET) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] (for pictures)."""
    return norm.inverse(images)


def image_to_tensor(image: Image.Image, size: int, flip: bool = False, norm: Normalization = IMAGENET) -> torch.Tensor:
    """RGB ``size``×``size`` float tensor (3, size, size), contiguous, normalised (``norm``, ImageNet's by default).

    Resized (bilinear) at full source resolution (:func:`pipeline.data.images.resized_rgb`), flipped
    left-right after the resize when ``flip``, then normalised as :func:`normalize` does (the same values
    up to float rounding, ~5e-7), with one float tensor allocated per image.
    """

    pixels = resized_rgb(image, size)
    if flip:
        pixels = pixels[:, ::-1]
    return norm.uint8(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))


def normalize_uint8(pixels: torch.Tensor, norm: Normalization = IMAGENET) -> torch.Tensor:
    """(…, 3, H, W) uint8 pixels → the float32 normalised images of :func:`image_to_tensor` (bit for bit)."""
    return norm.uint8(pixels)


def seg_to_tensor(seg: np.ndarray, size: int, flip: bool = False) -> torch.Tensor:
    """Class-index map resized by nearest neighbour (labels never blend), as a (size, size) long tensor."""
    resized = np.array(Image.fromarray(seg.astype(np.uint8, copy=False)).resize((size, size), Image.NEAREST))
    if flip:
        resized = resized[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(resized)).long()


def decode_sample(
    raw: dict,
    *,
    image_size: int,
    num_classes: int,
    flip: bool = False,
    norm: Normalization = IMAGENET,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """A shard sample (``{"__key__", "jpg"|"png", "json", "seg.png"?}``) → training tensors.

    Returns:
        ``{"key", "image" (3,S,S) float, "labels" (C,) float multi-hot, "seg" (S,S) long}``; ``seg``
        is all void (255) when the sample has no segmentation.
    """
    meta = json.loads(raw["json"])
    key = raw["__key__"]
    source = f"{raw['__url__']}#{key}" if raw.get("__url__") else key
    # data.max_image_pixels from the header: shards written elsewhere, or with a higher limit, cannot make
    # every loader worker decode a huge image
    pixels = decode_image(raw.get("jpg") or raw.get("png"), source, image_size, max_pixels, "data.max_image_pixels")[0]
    if flip:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    image = norm.uint8(torch.from_numpy(pixels))
    labels = torch.zeros(num_classes)
    if meta["labels"]:
        labels[torch.tensor(meta["labels"])] = 1.0
    if "seg.png" in raw:
        seg = seg_to_tensor(decode_png(raw["seg.png"]), image_size, flip)
    else:
        seg = torch.full((image_size, image_size), VOID, dtype=torch.long)
    return {"key": key, "image": image, "labels": labels, "seg": seg}
