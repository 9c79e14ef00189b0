"""Which classes an image explains (:class:`ClassRule`, the rule of ``wysiwyc attribute``) and the per-image
records that consumers of a registered Explainer get: its MLflow pyfunc and ``wysiwyc serve`` both answer
with :func:`explain`, so the two agree with each other and with batch attribution.

A record: ``classes`` (the explained classes, most probable first; under the default ``threshold`` rule the
predicted ones, at least the top-1), ``probabilities`` (the classifier's sigmoid probability of each) and
``masks`` (each class's mask as a base64 PNG, 8-bit grey, at the model's input size S×S: 255·mask rounded).

Light on purpose (numpy, torch, PIL): it runs inside a registered model where this package is not
installed (the model carries the code).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.transforms import normalize_uint8
from pipeline.errors import WysiwycError

MODES = ("threshold", "topk", "fixed")


def explained_classes(
    probs, mode: str, threshold: float = 0.5, top_k: int = 3, fixed: tuple[int, ...] = ()
) -> list[list[int]]:
    """Per image, the class indices to explain, most probable first (fixed: in the given order).

    Args:
        probs: (B, C) the Explanandum's probabilities.
        mode: ``threshold`` (p ≥ threshold, at least the top-1), ``topk`` (the top_k) or ``fixed``.
    """
    if mode == "fixed":
        return [list(fixed) for _ in range(probs.shape[0])]
    order = torch.argsort(torch.as_tensor(probs), dim=1, descending=True)
    if mode == "topk":
        return order[:, : min(top_k, probs.shape[1])].tolist()
    above = (torch.as_tensor(probs) >= threshold).sum(dim=1).clamp(min=1)  # the top-1 is the floor
    return [row[:n] for row, n in zip(order.tolist(), above.tolist())]


def fixed_indices(names: Sequence[str], classes: Sequence[str], setting: str = "attribute.fixed_classes") -> tuple:
    """The indices of the class ``names`` among ``classes``; a clear error for an unknown or empty list."""
    unknown = [n for n in names if n not in classes]
    if unknown or not names:
        raise WysiwycError(
            f"classes=fixed needs {setting} from the model's classes {list(classes)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    return tuple(list(classes).index(n) for n in names)


@dataclass(frozen=True)
class ClassRule:
    """The class-choice rule: ``mode`` ``threshold`` | ``topk`` | ``fixed`` with its ``threshold``, ``top_k``
    and ``fixed`` class names (the ``attribute.classes`` / ``threshold`` / ``top_k`` / ``fixed_classes`` keys)."""

    mode: str = "threshold"
    threshold: float = 0.5
    top_k: int = 3
    fixed: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: Mapping | None) -> ClassRule:
        """The rule of pyfunc / HTTP ``params`` (``classes``, ``threshold``, ``top_k``, ``fixed_classes``:
        a list or a comma-separated string); the defaults for what is absent. Raises WysiwycError."""
        params = dict(params or {})
        fixed = params.get("fixed_classes") or ()
        if isinstance(fixed, str):
            fixed = [n.strip() for n in fixed.split(",") if n.strip()]
        try:
            rule = cls(
                mode=str(params.get("classes") or "threshold"),
                threshold=float(params.get("threshold", 0.5)),
                top_k=int(params.get("top_k", 3)),
                fixed=tuple(str(n) for n in fixed),
            )
        except (TypeError, ValueError) as exc:
            raise WysiwycError(f"params: threshold must be a number and top_k an integer ({exc})") from None
        if rule.mode not in MODES:
            raise WysiwycError(f"params: classes={rule.mode!r}: use one of {', '.join(MODES)}")
        if not 0 <= rule.threshold <= 1 or rule.top_k < 1:
            raise WysiwycError(f"params: threshold {rule.threshold} must lie in [0, 1] and top_k {rule.top_k} be ≥ 1")
        return rule

    def fixed_indices(self, classes: Sequence[str]) -> tuple[int, ...]:
        """The indices of the ``fixed`` classes under ``mode=fixed`` (else ()); WysiwycError for unknown names."""
        return fixed_indices(self.fixed, classes, "fixed_classes") if self.mode == "fixed" else ()

    def indices(self, probs, classes: Sequence[str]) -> list[list[int]]:
        """Per image, the class indices to explain (:func:`explained_classes`)."""
        return explained_classes(probs, self.mode, self.threshold, self.top_k, self.fixed_indices(classes))


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
    the predictor's device) or float ImageNet-normalised images; ``rule`` for every image, or one rule per
    image; ``batch_size`` images per model call."""

    rules = [rule] * images.shape[0] if isinstance(rule, ClassRule) else list(rule)
    records = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(predictor.device)
        prediction = predictor(normalize_uint8(x) if x.dtype == torch.uint8 else x.float())
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
