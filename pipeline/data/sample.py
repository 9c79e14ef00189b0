"""The record every reader yields and every shard holds (the data contract: README, "Shards")."""

from __future__ import annotations

import abc
import hashlib
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from pipeline.config import MAX_IMAGE_PIXELS
from pipeline.errors import InputError, WysiwycError

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_key(text: str) -> str:
    """A WebDataset ``__key__`` for ``text``: no dots, no slashes (``a/b.c.jpg`` → ``a_b_c_jpg``)."""
    key = _KEY_BAD.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return key


def unique_keys(keys: Sequence[str], ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Sample keys made unique within a split, and the ones that had to be changed.

    A key that several inputs share (``img.1`` and ``img_1`` both sanitise to ``img_1``) gets ``_``
    and the first 8 hex digits of the sha1 of each input's id appended (``img_1_04b9aa6a``,
    ``img_1_ef298af0``); the other keys stay as they are. A key depends only on the ids that share
    it, so the same inputs get the same keys on every run.

    Args:
        keys: the key of each input (``safe_key`` of its name).
        ids: each input's own unique id (VOC image id, path below the prefix, COCO image id).

    Returns:
        ``(keys, renamed)``: the unique keys in input order, and ``{id: key}`` of the inputs whose key
        was changed (the manifest records it as ``renamed``).

    Raises:
        WysiwycError: two inputs still share a key (an id given twice, or an id whose key spells
            another's disambiguated key); the message names both.
    """
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    unique, renamed, owner = [], {}, {}
    for key, id_ in zip(keys, ids):
        if counts[key] > 1:
            key = f"{key}_{hashlib.sha1(id_.encode()).hexdigest()[:8]}"
            renamed[id_] = key
        if key in owner:
            raise WysiwycError(f"inputs {owner[key]!r} and {id_!r} get the same sample key {key!r}; rename one of them")
        owner[key] = id_
        unique.append(key)
    return unique, renamed


def inside(folder: str | os.PathLike, name: str) -> bool:
    """Whether ``folder/name`` lies inside ``folder``: ``name`` is not absolute and no ``..`` climbs out.

    The check is on the path as written: a symbolic link inside ``folder`` still counts as inside, so a
    data set whose image folder is linked in from another disk works.
    """
    base = os.path.normpath(os.path.abspath(folder))
    target = os.path.normpath(os.path.join(base, name))
    return target.startswith(base.rstrip(os.sep) + os.sep)


@dataclass
class Sample:
    """One image with its labels.

    Attributes:
        key: unique sample key without dots (``__key__`` in the shard).
        image: encoded image bytes, kept as the source bytes when already JPEG/PNG.
        ext: ``"jpg"`` or ``"png"``: the encoding of ``image``.
        labels: sorted class indices present in the image (may be empty).
        width, height: image size in pixels.
        source: where the image came from (path or URI, credentials redacted).
        seg: optional ``uint8`` (H, W) class-index map: 0 background, k+1 class k, 255 void.
    """

    key: str
    image: bytes
    ext: str
    labels: list[int]
    width: int
    height: int
    source: str
    seg: np.ndarray | None = field(default=None, repr=False)

    def meta(self) -> dict:
        """The ``json`` member of the sample in a shard."""
        return {
            "id": self.key,
            "labels": [int(c) for c in self.labels],
            "width": int(self.width),
            "height": int(self.height),
            "source": self.source,
        }


@dataclass
class Skipped:
    """An input that could not be used, and why (recorded in the manifest's ``skipped`` list)."""

    key: str
    source: str
    reason: str

    def as_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "reason": self.reason}


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The uint8 array stored in PNG bytes (palette PNGs give their indices, not colours)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


class Reader(abc.ABC):
    """A source of samples, split so ingest can load items in parallel worker processes.

    ``items()`` is cheap (ids, in a deterministic order); ``load(item)`` does the heavy work (read,
    verify, rasterise) and raises :class:`~pipeline.errors.InputError` for an unusable input. Readers
    are pickled to worker processes, so they hold only plain data.
    """

    name: str = ""
    classes: list[str]
    source: str
    # {input id: key} of the inputs whose key was disambiguated (see unique_keys), known once items()
    # has run; ingest records it in the manifest. Readers assign their own mapping, never mutate this one.
    renamed: Mapping[str, str] = MappingProxyType({})
    # the pixel limit of the images it decodes (ingest sets data.max_image_pixels)
    max_pixels: int = MAX_IMAGE_PIXELS

    @abc.abstractmethod
    def items(self) -> list:
        """Item ids in a deterministic order; raises WysiwycError for an empty or missing split."""

    @abc.abstractmethod
    def load(self, item) -> Sample:
        """The sample for ``item``; raises InputError naming the file when it is unusable."""

    @abc.abstractmethod
    def describe(self, item) -> tuple[str, str]:
        """``(key, source)`` of ``item``, without loading it (for the skipped list)."""

    def load_or_skip(self, item) -> Sample | Skipped:
        """``load(item)``, or a :class:`Skipped` record when the input is unusable."""
        try:
            return self.load(item)
        except InputError as exc:
            key, source = self.describe(item)
            return Skipped(key, source, str(exc))

    def __iter__(self) -> Iterator[Sample | Skipped]:
        for item in self.items():
            yield self.load_or_skip(item)
