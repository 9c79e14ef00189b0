"""Unlabelled images under a prefix (local folder, ``file://`` or ``s3://``), and image verification.

:class:`ImageFolderReader` turns every image under a prefix into a :class:`Sample` with no labels, for
batch attribution of a corpus. The listing goes through :mod:`pipeline.storage`, so a local folder and
an object-store prefix behave the same.

:func:`decoded_image` is the one place that decides whether bytes are a usable image: the readers
(:func:`inspect_image`, also used by VOC and COCO) decode through it, and everything that feeds a model
through :func:`decode_image` on top of it. It decodes
the whole image (``Image.load()``), which is what catches a truncated JPEG: ``Image.open`` alone reads
only the header.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config import MAX_IMAGE_PIXELS
from pipeline.data.classes import resolve_classes
from pipeline.data.sample import Reader, Sample, safe_key, unique_keys
from pipeline.errors import ImageTooLarge, InputError, WysiwycError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

# PIL format name → Sample.ext for the formats whose bytes are kept as they are (MPO is a JPEG with
# extra frames that phones write; its first frame is an ordinary JPEG any decoder reads)
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
# the formats decoded at all, told by their bytes (Pillow's ``formats=``), never by a name or a Content-Type:
# a TIFF, BMP, ICO … is refused before any of Pillow's other decoders sees it
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")  # a phone's MPO opens as a JPEG
IMAGE_FORMAT_NAMES = "PNG, JPEG or WebP"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`inspect_image` found: the bytes to store, their encoding and the stored pixel size."""

    data: bytes
    ext: str
    width: int
    height: int


def resized_rgb(image, size: int):
    """A PIL image as the models see it before normalisation: RGB (grayscale, palette and RGBA converted,
    alpha dropped), resized bilinearly to ``size``×``size``; an (S, S, 3) uint8 array (no torch: decoding
    tasks stay light)."""
    import numpy as np
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image.resize((size, size), Image.BILINEAR))  # a writable copy: torch takes it as is


def _eight_bit(image):
    """A 16-bit grayscale image (``I;16*``, or ``I`` as Pillow opens some 16-bit PNGs) scaled to 8 bits
    (``L``): Pillow's own conversion clips at 255, which turns every such image white."""
    import numpy as np
    from PIL import Image

    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def decode_image(
    data: bytes, source: str, size: int, max_pixels: int | None, limit: str = "attribute.max_image_pixels"
):
    """Encoded image bytes → ``((3, size, size) uint8 RGB array, width, height)``: resized as the model
    sees it, normalised later on the model's device (:func:`pipeline.data.transforms.normalize_uint8`), so
    decoding needs no torch and a batch travels at a quarter of its float size. Batch attribution, the
    registered pyfunc, ``wysiwyc serve`` and the shard samples of training and evaluation
    (:func:`pipeline.data.transforms.decode_sample`) decode every image with it.

    Grayscale, palette and RGBA images are converted to RGB (alpha dropped).

    Raises:
        InputError: empty, not an image, truncated, or more than ``max_pixels`` pixels (checked
            from the header, before decoding; ``limit`` names the setting in the message; None: no limit
            but PIL's decompression-bomb guard, the one ingest applies).
    """
    with decoded_image(data, source, max_pixels=max_pixels, limit=limit, draft=size) as (im, (width, height)):
        pixels = resized_rgb(im, size)
    return pixels.transpose(2, 0, 1), width, height


@contextlib.contextmanager
def decoded_image(
    data: bytes,
    source: str,
    *,
    max_pixels: int | None = None,
    limit: str = "max_pixels",
    advice: str = "",
    draft: int | None = None,
) -> Iterator[Any]:
    """``(PIL image, (width, height))`` of ``data`` as a viewer shows it, every pixel decoded (a truncated
    file fails here, not at open).

    Only :data:`IMAGE_FORMATS` are decoded, told by their bytes. The EXIF orientation is applied (the image
    and the masks line up with what a viewer shows) and 16-bit grayscale is scaled to 8 bits. ``(width,
    height)`` is the full size as shown.

    Args:
        data: the encoded image.
        source: the file or URI the bytes came from (each message starts with it).
        max_pixels: refuse larger images from the header alone, before decoding; ``limit`` names the
            setting in the message.
        advice: appended to each message (what the user can do).
        draft: the side the image will be reduced to: a JPEG is then decoded at the smallest of its DCT
            scales (1/2, 1/4, 1/8) that keeps both sides at least this (``Image.draft``), a fraction of the
            work for a large photo.

    Raises:
        InputError: empty, not an image of those formats, truncated, too large (also for an error of the
            ``with`` block itself, e.g. a conversion that the bytes make fail).
    """
    from PIL import Image, ImageOps

    if not data:
        raise InputError(f"{source}: empty file (0 bytes){advice}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"{source}: {width}x{height} image has more than {limit}={max_pixels} pixels")
            if draft is not None and im.format in ("JPEG", "MPO"):
                im.draft("RGB", (draft, draft))
            im.load()
            if width < 1 or height < 1:
                raise InputError(f"{source}: image has no pixels ({width}x{height})")
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn
                width, height = height, width
            ImageOps.exif_transpose(im, in_place=True)  # keeps im.format: a JPEG's bytes stay as they are
            yield _eight_bit(im), (width, height)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{source}: image too large to decode safely ({exc}){advice}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError … for bad bytes
        reason = str(exc) or type(exc).__name__
        if "truncat" in reason.lower():
            reason = f"truncated file ({reason})"
        elif isinstance(exc, Image.UnidentifiedImageError):
            reason = f"not an image that is decoded here ({IMAGE_FORMAT_NAMES}, told by its bytes; convert others)"
        raise InputError(f"{source}: {reason}{advice}") from exc


def inspect_image(data: bytes, source: str, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageInfo:
    """Decode ``data`` fully (:func:`decoded_image`) and describe it.

    JPEG and 8-bit PNG bytes are kept as they are (decoders apply their EXIF orientation the same way
    later). A WebP or a 16-bit grayscale PNG is re-encoded losslessly as an 8-bit PNG, as shown. Width and
    height are the size as shown (EXIF orientation applied).

    Args:
        data: the encoded image.
        source: the file or URI the bytes came from (for the error message).
        max_pixels: larger images are refused from their header (``data.max_image_pixels``).

    Returns:
        The bytes to store with their extension and size.

    Raises:
        InputError: empty, truncated, not a PNG/JPEG/WebP image, or too large.
    """
    advice = "; re-copy the file or remove it"
    with decoded_image(data, source, max_pixels=max_pixels, limit="data.max_image_pixels", advice=advice) as (
        im,
        (width, height),
    ):
        ext = _KEPT_FORMATS.get(im.format or "")  # a 16-bit PNG, now 8-bit, is stored as such
        if ext is None:
            rgb = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
    return ImageInfo(data=data, ext=ext, width=width, height=height)


def _relative(url: str, prefix: str) -> str | None:
    """The path of ``url`` below ``prefix`` with ``/`` separators, or None when it is not below it."""

    if storage.is_s3(url) or storage.is_s3(prefix):
        base = prefix.rstrip("/")
        return url[len(base) + 1 :] if url.startswith(base + "/") else None
    # local: compare filesystem paths (listings spell them differently: ~, ./x, file:// with %20)
    try:
        here, root = storage.to_local_path(url), storage.to_local_path(prefix)
    except WysiwycError:
        return None
    rel = os.path.relpath(os.path.abspath(here), os.path.abspath(root))
    if rel == "." or rel == ".." or rel.startswith(".." + os.sep):
        return None
    return rel.replace(os.sep, "/")


class ImageFolderReader(Reader):
    """Every image under a prefix, unlabelled (``labels == []``), for attribution of a corpus.

    Items are the image URLs under ``source_url`` whose names end in one of ``suffixes``
    (case-insensitive), sorted. The key is ``safe_key`` of the path relative to the prefix
    (``cats/a.jpg`` → ``cats_a_jpg``); when two paths sanitise to the same key, both get an 8-hex-digit
    hash of their path appended (:func:`~pipeline.data.sample.unique_keys`; ``renamed`` lists them).
    The source is the full URI with credentials redacted.

    Args:
        source_url: a local folder, ``file://`` URL or ``s3://bucket/prefix``.
        opts: :class:`pipeline.storage.S3Options` for ``s3://`` (None: the ``AWS_*`` environment).
        suffixes: file name endings to keep.
        classes: class names recorded with the samples (default: none).
    """

    name = "images"

    def __init__(
        self,
        source_url: str,
        opts=None,
        suffixes: Sequence[str] = IMAGE_SUFFIXES,
        classes: Sequence[str] | None = None,
    ):

        self.source_url = str(source_url)
        self.opts = opts
        self.suffixes = tuple(s.lower() if s.startswith(".") else "." + s.lower() for s in suffixes)
        if not self.suffixes:
            raise WysiwycError("images: no file suffixes given; pass e.g. suffixes=('.jpg', '.png')")
        self.classes = [] if classes is None else resolve_classes(classes, [])
        self.source = storage.redact(self.source_url)
        self._items: list[tuple[str, str]] | None = None

    def __getstate__(self):
        # workers get one item per task: do not ship the whole listing with every task
        state = dict(self.__dict__)
        state["_items"] = None
        return state

    def items(self) -> list[tuple[str, str]]:
        """``(key, url)`` of every image under the prefix, sorted by URL.

        Raises:
            WysiwycError: the prefix cannot be listed or holds no image.
        """
        if self._items is None:
            self._items = self._list()
        return list(self._items)

    def _list(self) -> list[tuple[str, str]]:

        try:
            urls = list(storage.list_prefix(self.source_url, self.opts))
        except WysiwycError:
            raise
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise WysiwycError(f"images: {self.source} does not exist or is not a folder; check --source") from exc
        found: list[tuple[str, str]] = []
        others = 0
        for url in urls:
            rel = _relative(url, self.source_url)
            if rel is None:
                continue
            if posixpath.basename(rel).lower().endswith(self.suffixes):
                found.append((rel, url))
            else:
                others += 1
        if not found:
            what = f"{others} other file(s) but" if others else "nothing:"
            raise WysiwycError(
                f"images: {self.source} holds {what} no image ending in {'/'.join(self.suffixes)}; "
                "check --source (a folder or s3:// prefix of .jpg/.png images)"
            )
        found.sort(key=lambda pair: pair[1])
        rels = [rel for rel, _ in found]
        keys, self.renamed = unique_keys([safe_key(rel) for rel in rels], rels)
        return [(key, url) for key, (_, url) in zip(keys, found)]

    def describe(self, item) -> tuple[str, str]:

        key, url = item
        return key, storage.redact(url)

    def load(self, item) -> Sample:

        key, url = item
        source = storage.redact(url)
        try:
            data = storage.read_bytes(url, self.opts)
        except InputError:
            raise
        except (FileNotFoundError, IsADirectoryError) as exc:  # storage.NotFound is one too
            raise InputError(f"{source}: gone since the listing, or not a file ({exc})") from exc
        except WysiwycError:
            raise  # a configuration problem (credentials, endpoint): every item would fail the same way
        except PermissionError as exc:
            raise InputError(f"{source}: cannot read ({exc})") from exc
        except Exception as exc:
            if _is_missing_object(exc):
                raise InputError(f"{source}: object disappeared after listing ({exc})") from exc
            raise
        info = inspect_image(data, source, self.max_pixels)
        return Sample(
            key=key,
            image=info.data,
            ext=info.ext,
            labels=[],
            width=info.width,
            height=info.height,
            source=source,
        )


def _is_missing_object(exc: Exception) -> bool:
    """True for a botocore error that means "no such object" (deleted between listing and reading)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in {"NoSuchKey", "404", "NotFound"}
