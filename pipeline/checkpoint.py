"""Checkpoints: plain dicts of tensors and primitives, saved through :mod:`pipeline.storage`.

A checkpoint is ``{"format", "kind" ("classifier" | "explainer"), "arch", "classes", "image_size",
"model", "optimizer", "scaler", "epoch", "step", "config", "metrics", "explanandum"?}``. It is read
with ``torch.load(weights_only=True)``, so a checkpoint from untrusted storage cannot run code.

Each checkpoint written here has a record beside it, ``FILE.sha256`` (``sha256sum``'s format), written after
the file: a checkpoint whose bytes no longer match its record (altered, damaged, half-replaced) is refused when
read, naming both. A checkpoint without a record (written before records existed, or by hand) loads as it is.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re

import torch

from pipeline import storage
from pipeline.errors import WysiwycError

FORMAT = "wysiwyc-checkpoint/1"
RECORD_SUFFIX = ".sha256"  # FILE.sha256 beside FILE: "<hex>  <name>\n", as sha256sum writes it
# the end of every "not a checkpoint" message: what the file should have been
_WHAT_A_CHECKPOINT_IS = (
    "a checkpoint is the .pt file that `wysiwyc train classifier` or `wysiwyc train explainer` writes "
    "(RUN/best.pt, the `checkpoint` of its summary): a torch.save dict with format "
    f"{FORMAT!r}, kind (classifier or explainer), arch, classes, image_size and the weights under model"
)


def save_checkpoint(state: dict, url: str, opts=None) -> str:
    """Write ``state`` atomically to ``url`` (local path or s3://), then its record ``url.sha256``; returns the
    sha256."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes(url, data, opts)
    storage.write_bytes(url + RECORD_SUFFIX, f"{digest}  {posixpath.basename(url)}\n".encode(), opts)
    return digest


def checked_digest(data: bytes, url: str, opts=None) -> str:
    """The sha256 of ``data`` read from ``url``, checked against the record beside it when there is one.

    Raises:
        WysiwycError: the bytes are not the ones recorded (naming the file, both digests and what to do).
    """
    digest = hashlib.sha256(data).hexdigest()
    try:
        record = storage.read_bytes(url + RECORD_SUFFIX, opts).decode("ascii", "replace").split()
    except storage.NotFound:
        return digest
    if not record or record[0] != digest:
        recorded = record[0] if record else "(an empty record)"
        raise WysiwycError(
            f"checkpoint {storage.redact(url)}: its sha256 is {digest} but {posixpath.basename(url)}{RECORD_SUFFIX} "
            f"beside it records {recorded}: the file changed after it was written (damaged or altered); restore it "
            "or train it again"
        )
    return digest


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
    digest = checked_digest(data, url, opts)
    return parse_checkpoint(data, url), digest
