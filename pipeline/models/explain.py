"""The per-image records that consumers of a registered Explainer get: its MLflow pyfunc and ``wysiwyc serve``
both answer with :func:`explain`, the classes chosen by the rule of ``wysiwyc attribute``
(:class:`ClassRule`, from :mod:`pipeline.method.class_rule`), so the two agree with each other and with
batch attribution.

A record: ``classes`` (the explained classes, most probable first; under the default ``threshold`` rule the
predicted ones, at least the top-1), ``probabilities`` (the classifier's sigmoid probability of each) and
``masks`` (each class's mask as a base64 PNG, 8-bit grey, at the model's input size S×S: 255·mask rounded).

Light on purpose (numpy, torch, PIL): it runs inside a registered model where this package is not
installed (the model carries the code).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.method.class_rule import ClassRule
from pipeline.method.class_rule import explained_classes as explained_classes  # re-exported beside ClassRule


def mask_png(mask8: np.ndarray) -> str:
    """A (H, W) uint8 mask as base64 PNG text."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(mask8).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_from_png(text: str) -> np.ndarray:
    """The (H, W) mask in [0, 1] (float32) of a record's base64 PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im, dtype=np.float32) / 255.0


def explain(predictor, images: torch.Tensor, rule: ClassRule | Sequence[ClassRule], batch_size: int = 64) -> list[dict]:
    """One record per image (module docstring) for a (B, 3, S, S) batch: uint8 pixels (normalised here, on
    the predictor's device, its classifier's way) or float images normalised so; ``rule`` for every image, or
    one rule per image; ``batch_size`` images per model call."""

    rules = [rule] * images.shape[0] if isinstance(rule, ClassRule) else list(rule)
    records = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(predictor.device)
        prediction = predictor(predictor.normalize(x))
        masks8 = (prediction.masks * 255).round().to(torch.uint8).cpu().numpy()
        probs = prediction.probs.cpu()
        for j in range(len(probs)):
            chosen = rules[start + j].indices(probs[j : j + 1], predictor.classes)[0]
            records.append(
                {
                    "classes": [predictor.classes[c] for c in chosen],
                    "probabilities": [float(probs[j, c]) for c in chosen],
                    "masks": [mask_png(masks8[j, c]) for c in chosen],
                }
            )
    return records
