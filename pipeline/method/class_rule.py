"""Which classes an image explains: :class:`ClassRule`, the one rule (and its defaults) of ``wysiwyc
attribute`` (the ``attribute.classes`` / ``threshold`` / ``top_k`` / ``fixed_classes`` keys), of a registered
Explainer's pyfunc and of ``wysiwyc serve`` (their ``params``).

Here, below the config and the models, so that both take it from one place: the config's defaults, the
registered model's parameter schema and every caller of the rule. Light on purpose (torch and
:mod:`pipeline.errors`): it runs inside a registered model too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from pipeline.errors import WysiwycError

Mode = Literal["threshold", "topk", "fixed"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class ClassRule:
    """The class-choice rule: ``mode`` ``threshold`` (p ≥ ``threshold``, at least the top-1) | ``topk``
    (the ``top_k`` most probable) | ``fixed`` (the ``fixed`` class names, in their order). The field
    defaults are the defaults of the config keys and of the pyfunc / HTTP params."""

    mode: Mode = "threshold"
    threshold: float = 0.5
    top_k: int = 3
    fixed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # each name once, in its first place: never more masks than the model has classes (a request naming
        # one class 4,000 times asked for 4,000 masks)
        object.__setattr__(self, "fixed", tuple(dict.fromkeys(self.fixed)))

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
                mode=str(params.get("classes") or cls.mode),
                threshold=float(params.get("threshold", cls.threshold)),
                top_k=int(params.get("top_k", cls.top_k)),
                fixed=tuple(str(n) for n in fixed),
            )
        except (TypeError, ValueError) as exc:
            raise WysiwycError(f"params: threshold must be a number and top_k an integer ({exc})") from None
        if rule.mode not in MODES:
            raise WysiwycError(f"params: classes={rule.mode!r}: use one of {', '.join(MODES)}")
        if not 0 <= rule.threshold <= 1 or rule.top_k < 1:
            raise WysiwycError(f"params: threshold {rule.threshold} must lie in [0, 1] and top_k {rule.top_k} be ≥ 1")
        return rule

    def fixed_indices(self, classes: Sequence[str], setting: str = "fixed_classes") -> tuple[int, ...]:
        """The indices of the ``fixed`` classes among ``classes`` under ``mode=fixed`` (else ()).

        Raises:
            WysiwycError: an unknown name or an empty list (``setting`` names the key in the message).
        """
        if self.mode != "fixed":
            return ()
        unknown = [n for n in self.fixed if n not in classes]
        if unknown or not self.fixed:
            raise WysiwycError(
                f"classes=fixed needs {setting} from the model's classes {list(classes)}"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        return tuple(list(classes).index(n) for n in self.fixed)

    def indices(self, probs, classes: Sequence[str]) -> list[list[int]]:
        """Per image of ``probs`` (B, C), the class indices to explain (:func:`explained_classes`)."""
        return explained_classes(probs, self.mode, self.threshold, self.top_k, self.fixed_indices(classes))


def explained_classes(
    probs, mode: str, threshold: float = ClassRule.threshold, top_k: int = ClassRule.top_k, fixed: tuple[int, ...] = ()
) -> list[list[int]]:
    """Per image, the class indices to explain, most probable first (fixed: in the given order).

    Args:
        probs: (B, C) the Explanandum's probabilities.
        mode: ``threshold`` (p ≥ threshold, at least the top-1), ``topk`` (the top_k) or ``fixed``
            (the class indices ``fixed``).
    """
    if mode == "fixed":
        return [list(fixed) for _ in range(probs.shape[0])]
    order = torch.argsort(torch.as_tensor(probs), dim=1, descending=True)
    if mode == "topk":
        return order[:, : min(top_k, probs.shape[1])].tolist()
    above = (torch.as_tensor(probs) >= threshold).sum(dim=1).clamp(min=1)  # the top-1 is the floor
    return [row[:n] for row, n in zip(order.tolist(), above.tolist())]
