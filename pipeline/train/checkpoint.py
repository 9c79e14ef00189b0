"""Checkpoints: plain dicts of tensors and primitives, saved through :mod:`pipeline.storage`.

A checkpoint is ``{"format", "kind" ("classifier" | "explainer"), "arch", "classes", "image_size",
"model", "optimizer", "scaler", "epoch", "step", "config", "metrics", "explanandum"?}``. It is read
with ``torch.load(weights_only=True)``, so a checkpoint from untrusted storage cannot run code.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import WysiwycError

FORMAT = "wysiwyc-checkpoint/1"


def save_checkpoint(state: dict, url: str, opts=None) -> str:
    """Write ``state`` atomically to ``url`` (local path or s3://); returns its sha256."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    storage.write_bytes(url, data, opts)
    return hashlib.sha256(data).hexdigest()


def parse_checkpoint(data: bytes, source: str) -> dict:
    """A checkpoint from its bytes (``weights_only``: tensors and primitives only)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, forbidden globals
        raise WysiwycError(f"{storage.redact(source)} is not a loadable wysiwyc checkpoint "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WysiwycError(f"{storage.redact(source)} is not a wysiwyc checkpoint (format {FORMAT})")
    return state


def load_checkpoint(url: str, opts=None) -> tuple[dict, str]:
    """``(checkpoint, sha256)`` of the checkpoint at ``url``."""
    try:
        data = storage.read_bytes(url, opts)
    except storage.NotFound:
        raise WysiwycError(f"checkpoint {storage.redact(url)} does not exist: train one first or fix the "
                           f"URI (explanandum.checkpoint / explainer.checkpoint)") from None
    return parse_checkpoint(data, url), hashlib.sha256(data).hexdigest()


def _expect(state: dict, kind: str, url: str) -> None:
    if state.get("kind") != kind:
        raise WysiwycError(f"{storage.redact(url)} is a {state.get('kind')} checkpoint, expected a {kind} one")


def load_classifier(url: str, opts=None, frozen: bool = True) -> tuple[nn.Module, dict, str]:
    """The classifier of a checkpoint, frozen and locked in eval mode as an Explanandum.

    Returns:
        ``(model, checkpoint, sha256)``.
    """
    from pipeline.models.explanandum import build_explanandum, freeze_explanandum

    state, digest = load_checkpoint(url, opts)
    _expect(state, "classifier", url)
    model = build_explanandum(state["arch"], len(state["classes"]), weights=state["model"])
    return (freeze_explanandum(model) if frozen else model), state, digest


def load_explainer(url: str, opts=None) -> tuple[nn.Module, dict, str]:
    """The Explainer of a checkpoint (eval mode). Returns ``(model, checkpoint, sha256)``."""
    from pipeline.models.explainer import build_explainer

    state, digest = load_checkpoint(url, opts)
    _expect(state, "explainer", url)
    model = build_explainer(state["arch"], len(state["classes"]), weights=state["model"])
    return model.eval(), state, digest


def public_config(config: Any) -> dict:
    """The resolved config as plain data for a checkpoint or MLflow (secrets masked)."""
    return config.model_dump(mode="json")
