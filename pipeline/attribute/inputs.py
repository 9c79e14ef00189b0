"""What ``attribute.input`` names (:func:`open_input`) and its images streamed in a deterministic order
(:func:`iter_sources`); reading one image (:func:`fetch_image`; :func:`pipeline.data.images.decode_image`
decodes it: a bad image is an :class:`~pipeline.errors.InputError`, i.e. an error row)."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data.images import IMAGE_SUFFIXES
from pipeline.data.shards import MANIFEST_SUFFIX, manifest_url, raw_samples, read_manifest, shard_sources
from pipeline.errors import InputError, WysiwycError


@dataclass
class Input:
    """A resolved ``attribute.input``: ``kind`` prefix | list | shards. Nothing here grows with the corpus
    but ``shards`` (one URL per ~1,000 samples); the images themselves are streamed by
    :func:`iter_sources`."""

    kind: str
    url: str
    # shard inputs: the manifest's shards, each {"url", "sha256", "num_samples"} (pipeline.data.shards.shard_sources)
    shards: list[dict] = field(default_factory=list)


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


def _uri_list(url: str, opts) -> Iterator[str]:
    """The entries of a file of image URIs, in its order: one per line (streamed; blank lines and ``#``
    comments skipped) or a JSON list (read whole: use one per line for millions)."""
    parent = url.rsplit("/", 1)[0]
    with storage.open_read(url, opts) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8")
        first = next((line for line in lines if line.strip()), "")
        if first.lstrip().startswith("["):
            try:
                entries = json.loads(first + lines.read())
            except json.JSONDecodeError as exc:
                what = f"attribute: {storage.redact(url)} is not a valid JSON list of URIs ({exc})"
                raise WysiwycError(what) from None
            if not all(isinstance(e, str) for e in entries):
                raise WysiwycError(f"attribute: {storage.redact(url)} must be a JSON list of strings (image URIs)")
        else:
            entries = (line.strip() for line in itertools.chain([first], lines))
        for e in entries:
            if e and not e.startswith("#"):
                yield e if "://" in e or e.startswith("/") else storage.join(parent, e)


class Listing:
    """The images of a prefix or list input, streamed in a deterministic order (a prefix: the storage
    listing's sorted order; a list: the file's); :attr:`ignored` counts a prefix's files without an
    image suffix once the iteration is done."""

    def __init__(self, inputs: Input, opts):
        self.inputs, self.opts, self.ignored = inputs, opts, 0

    def __iter__(self) -> Iterator[str]:

        if self.inputs.kind == "list":
            yield from _uri_list(self.inputs.url, self.opts)
            return
        for item in storage.list_prefix(self.inputs.url, self.opts):  # streamed page by page
            if item.lower().endswith(IMAGE_SUFFIXES):
                yield item
            else:
                self.ignored += 1


def open_input(spec: str, opts=None) -> Input:
    """Resolve ``attribute.input`` to a prefix, a URI list or a shard split, and check that it holds an
    image (streams the listing up to the first image: constant memory).

    Raises:
        WysiwycError: nothing there (a missing or empty prefix, an empty list), a bucket that does not
            exist, …
    """

    url = absolute(spec)
    if url.endswith(MANIFEST_SUFFIX) or (not url.endswith("/") and storage.exists(manifest_url(url), opts)):
        manifest = read_manifest(url, opts)
        return Input("shards", manifest["url"], shard_sources(manifest))
    inputs = Input("list" if _is_file(url, opts) else "prefix", url)
    listing = Listing(inputs, opts)
    if next(iter(listing), None) is None:
        if inputs.kind == "list":
            raise WysiwycError(f"attribute: {storage.redact(url)} lists no image URI; one per line or a JSON list")
        what = f"{listing.ignored} other file(s) but" if listing.ignored else "nothing:"
        raise WysiwycError(
            f"attribute: {storage.redact(url)} holds {what} no image ending in "
            f"{'/'.join(IMAGE_SUFFIXES)}; check --input (an image prefix, a shard split "
            f"OUT/split or a file listing image URIs)"
        )
    return inputs


def fetch_image(source: str, opts) -> bytes:
    """The bytes of one input image; a missing or unreadable object is an InputError (an error row)."""
    try:
        return storage.read_small(source, opts)
    except (storage.CredentialsError, storage.EndpointUnreachable, storage.BucketNotFound):
        raise  # the same for every image: stop the run
    except storage.NotFound:
        raise InputError(f"{source}: gone since the listing") from None
    except (WysiwycError, OSError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from None


def shard_images(source: dict, opts):
    """``(member key, image bytes)`` of every sample of one shard (``{"url", "sha256", "num_samples"}``, checked
    against them before any sample is read), in tar order."""

    for raw in raw_samples([source], opts):
        yield raw["__key__"], raw.get("jpg") or raw.get("png") or b""
