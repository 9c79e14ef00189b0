"""Checkpoints: plain dicts of tensors and primitives, saved through :mod:`pipeline.storage`.

A checkpoint is ``{"format", "kind" ("classifier" | "explainer"), "arch", "classes", "image_size",
"model", "optimizer", "scaler", "epoch", "step", "config", "metrics", "explanandum"?}``. It is read
with ``torch.load(weights_only=True)``, so a checkpoint from untrusted storage cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import re

import torch

from pipeline import storage
from pipeline.errors import WysiwycError

FORMAT = "wysiwyc-checkpoint/1"
# the end of every "not a checkpoint" message: what the file should have been
_WHAT_A_CHECKPOINT_IS = (
    "a checkpoint is the .pt file that `wysiwyc train classifier` or `wysiwyc train explainer` writes "
    "(RUN/best.pt, the `checkpoint` of its summary): a torch.save dict with format "
    f"{FORMAT!r}, kind (classifier or explainer), arch, classes, image_size and the weights under model"
)


def save_checkpoint(state: dict, url: str, opts=None) -> str:
    """Write ``state`` atomically to ``url`` (local path or s3://); returns its sha256."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    storage.write_bytes(url, data, opts)
    return hashlib.sha256(data).hexdigest()


def parse_checkpoint(data: bytes, source: str) -> dict:
    """A checkpoint from its bytes (``weights_only``: tensors and primitives only).

    Raises:
        WysiwycError: the bytes are not a checkpoint; the message names ``source``, says what it holds
            instead (nothing, text, objects that could run code, an unreadable archive, another
            program's torch file) and what a checkpoint is.
    """
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, forbidden globals
        raise WysiwycError(
            f"{storage.redact(source)} is not a wysiwyc checkpoint: {_unloadable(data, exc)}; {_WHAT_A_CHECKPOINT_IS}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        held = f"a dict without format {FORMAT!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise WysiwycError(
            f"{storage.redact(source)} is not a wysiwyc checkpoint: it is a torch file holding "
            f"{held} (bare weights, or another program's checkpoint?); {_WHAT_A_CHECKPOINT_IS}"
        )
    return state


def _unloadable(data: bytes, exc: Exception) -> str:
    """Why ``torch.load`` refused ``data``, in words (its own message for a text file is "pop from empty list")."""
    if not data:
        return "it is empty (0 bytes)"
    head = data[:4096]
    try:
        head.decode("utf-8")
        is_text = b"\0" not in head
    except UnicodeDecodeError as bad:  # text whose last character was cut by the 4096-byte head
        is_text = bad.start >= len(head) - 3 and b"\0" not in head
    if is_text:
        return "it is a text file"
    forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if forbidden:
        return (
            f"it holds a Python object ({forbidden.group(1)}) besides tensors and plain values, and "
            "loading it could run code"
        )
    first = (str(exc).splitlines() or [""])[0].split(". ")[0][:200]  # torch's advice that follows is not ours
    return f"torch.load cannot read it ({type(exc).__name__}: {first})"


def load_checkpoint(url: str, opts=None) -> tuple[dict, str]:
    """``(checkpoint, sha256)`` of the checkpoint at ``url``."""
    try:
        data = storage.read_bytes(url, opts)
    except storage.NotFound:
        raise WysiwycError(
            f"checkpoint {storage.redact(url)} does not exist: train one first or fix the "
            f"URI (explanandum.model / explainer.checkpoint)"
        ) from None
    return parse_checkpoint(data, url), hashlib.sha256(data).hexdigest()
