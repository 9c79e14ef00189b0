"""What ``attribute.input`` names, resolved to the images to explain: an image prefix, a file of image
URIs or a shard split (:func:`open_input`); reading and decoding one image (:func:`fetch_image`,
:func:`decode_image`: a bad image is an :class:`~pipeline.errors.InputError`, i.e. an error row)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import storage
from pipeline.errors import InputError, WysiwycError


@dataclass
class Input:
    """A resolved ``attribute.input``: ``kind`` prefix | list | shards."""

    kind: str
    url: str
    total: int
    sources: list[str]  # prefix and list inputs: every image URI, sorted
    shards: list[str]  # shard inputs: the shard URLs of the manifest
    ignored: int = 0  # prefix inputs: files without an image suffix


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URLs unchanged."""
    return url if storage.is_s3(url) else str(storage.to_local_path(url).resolve())


def _is_file(url: str, opts) -> bool:
    if not storage.is_s3(url):
        return storage.to_local_path(url).is_file()
    if url.endswith("/") or not storage.split_s3(url)[1]:
        return False
    try:
        storage.size(url, opts)
        return True
    except storage.NotFound:
        return False


def _read_uri_list(url: str, opts) -> list[str]:
    """A file of image URIs: a JSON list, or one per line (blank lines and ``#`` comments skipped)."""
    text = storage.read_text(url, opts)
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WysiwycError(f"attribute: {storage.redact(url)} is not a valid JSON list of URIs ({exc})") from None
        if not all(isinstance(e, str) for e in entries):
            raise WysiwycError(f"attribute: {storage.redact(url)} must be a JSON list of strings (image URIs)")
    else:
        entries = [line.strip() for line in text.splitlines()]
    parent = url.rsplit("/", 1)[0]
    entries = [
        e if "://" in e or e.startswith("/") else storage.join(parent, e)
        for e in entries
        if e and not e.startswith("#")
    ]
    if not entries:
        raise WysiwycError(f"attribute: {storage.redact(url)} lists no image URI; one per line or a JSON list")
    return sorted(set(entries))


def open_input(spec: str, opts=None) -> Input:
    """Resolve ``attribute.input`` to the images of a prefix, a URI list or a shard split.

    Raises:
        WysiwycError: nothing there (a missing or empty prefix), a bucket that does not exist, …
    """
    from pipeline.data.images import IMAGE_SUFFIXES
    from pipeline.data.shards import MANIFEST_SUFFIX, manifest_url, read_manifest

    url = absolute(spec)
    if url.endswith(MANIFEST_SUFFIX) or (not url.endswith("/") and storage.exists(manifest_url(url), opts)):
        manifest = read_manifest(url, opts)
        return Input("shards", manifest["url"], int(manifest["num_samples"]), [], manifest["shard_urls"])
    if _is_file(url, opts):
        sources = _read_uri_list(url, opts)
        return Input("list", url, len(sources), sources, [])
    sources, ignored = [], 0
    for item in storage.list_prefix(url, opts):  # streamed page by page
        if item.lower().endswith(IMAGE_SUFFIXES):
            sources.append(item)
        else:
            ignored += 1
    if not sources:
        what = f"{ignored} other file(s) but" if ignored else "nothing:"
        raise WysiwycError(
            f"attribute: {storage.redact(url)} holds {what} no image ending in "
            f"{'/'.join(IMAGE_SUFFIXES)}; check --input (an image prefix, a shard split "
            f"OUT/split or a file listing image URIs)"
        )
    return Input("prefix", url, len(sources), sorted(sources), [], ignored)


def fetch_image(source: str, opts) -> bytes:
    """The bytes of one input image; a missing or unreadable object is an InputError (an error row)."""
    try:
        return storage.read_bytes(source, opts)
    except (storage.CredentialsError, storage.EndpointUnreachable, storage.BucketNotFound):
        raise  # the same for every image: stop the run
    except storage.NotFound:
        raise InputError(f"{source}: gone since the listing") from None
    except (WysiwycError, OSError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from None


def decode_image(data: bytes, source: str, size: int, max_pixels: int):
    """Encoded image bytes → ``(normalised (3, size, size) float32 array, width, height)``.

    Grayscale, palette and RGBA images are converted to RGB (alpha dropped).

    Raises:
        InputError: empty, not an image, truncated, or more than ``max_pixels`` pixels (checked
            from the header, before decoding).
    """
    from pipeline.data.images import decoded_image
    from pipeline.data.transforms import image_to_tensor

    with decoded_image(data, source, max_pixels=max_pixels, limit="attribute.max_image_pixels") as im:
        width, height = im.size
        tensor = image_to_tensor(im, size)
    return tensor.numpy(), width, height


def shard_images(url: str, opts):
    """``(member key, image bytes)`` of every sample of one shard, in tar order."""
    from pipeline.data.shards import raw_samples

    for raw in raw_samples([url], opts):
        yield raw["__key__"], raw.get("jpg") or raw.get("png") or b""
