"""WebDataset shards: the writer used by ingest and the training reader (the data contract: README, "Shards").

Layout of one split under an output prefix ``OUT``::

    OUT/{split}-RUN-000000.tar, OUT/{split}-RUN-000001.tar, ...   (published atomically, one by one; RUN: 8 hex
                                                                  digits, the writing ingest's own)
    OUT/{split}.manifest.json                                     (written last: the commit marker)

A split is addressed as ``OUT/{split}`` (its *prefix*) or by its manifest URL. Readers only trust
shards that the manifest lists, so an interrupted ingest (shards, no manifest) is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import secrets
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch.utils.data as tud

from pipeline import __version__, storage
from pipeline.config import MAX_IMAGE_PIXELS
from pipeline.data.sample import Sample, Skipped, encode_png
from pipeline.data.transforms import IMAGENET, Normalization, decode_sample
from pipeline.errors import WysiwycError

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "wysiwyc-shards/1"


def shard_name(split: str, index: int, run: str) -> str:
    """``SPLIT-RUN-NNNNNN.tar``: ``run`` names the writing ingest, so two ingests never write one object."""
    return f"{split}-{run}-{index:06d}.tar"


def _shard_pattern(split: str) -> re.Pattern:
    # SPLIT-RUN-NNNNNN.tar, and SPLIT-NNNNNN.tar of the shards written before the ingest's own name
    return re.compile(rf"^{re.escape(split)}-(?:[0-9a-f]{{8}}-)?\d{{6}}\.tar$")


def manifest_url(spec: str) -> str:
    """The manifest URL of a split given as ``OUT/split`` or as the manifest URL itself."""
    spec = spec.rstrip("/")
    return spec if spec.endswith(MANIFEST_SUFFIX) else spec + MANIFEST_SUFFIX


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def dataset_digest(classes: list[str], shards: list[dict]) -> str:
    """sha256 over the class list and the shards' sha256 in order (the training input's identity): their bytes, not
    their names, which each ingest makes its own, so identical inputs give one digest."""
    canonical = json.dumps(
        {"classes": classes, "shards": [s["sha256"] for s in shards]},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical shards for identical inputs
    tar.addfile(info, io.BytesIO(data))


def _tar_size(offset: int, members: list[tuple[str, bytes]]) -> int:
    """Size of a tar at ``offset`` once ``members`` are added and it is closed (USTAR blocks + record)."""
    end = offset + sum(tarfile.BLOCKSIZE + -(-len(d) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, d in members)
    end += 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class ShardWriter:
    """Writes samples into size-capped tar shards and publishes each one atomically.

    A shard is built in a local temporary file and published with :func:`storage.upload_file`
    (``os.replace`` locally; a completed upload on S3), so readers never see half a shard. Its name carries
    ``run``, random per writer: no two ingests (one that lost its lease, say) ever write the same object.
    """

    out: str
    split: str
    shard_size: int = 1000
    max_bytes: int = 256 * 2**20
    opts: storage.S3Options | None = None
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    shards: list[dict] = field(default_factory=list)
    _tar: tarfile.TarFile | None = field(default=None, repr=False)
    _tmp: str | None = field(default=None, repr=False)
    _count: int = 0

    def write(self, sample: Sample) -> None:
        """Add one sample (``__key__`` = ``sample.key``) to the open shard, rolling over when full."""
        members = [
            (f"{sample.key}.{sample.ext}", sample.image),
            (f"{sample.key}.json", json.dumps(sample.meta(), sort_keys=True).encode()),
        ]
        if sample.seg is not None:
            members.append((f"{sample.key}.seg.png", encode_png(sample.seg)))
        if self._tar is not None and (
            self._count >= self.shard_size or _tar_size(self._tar.offset, members) > self.max_bytes
        ):
            self._publish()
        if self._tar is None:
            fd, self._tmp = tempfile.mkstemp(suffix=".tar", prefix="wysiwyc-shard-")
            os.close(fd)
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        for name, data in members:
            _add_member(self._tar, name, data)
        self._count += 1

    def _publish(self) -> None:
        self._tar.close()
        name = shard_name(self.split, len(self.shards), self.run)
        digest = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        storage.upload_file(self._tmp, storage.join(self.out, name), self.opts)
        self.shards.append(
            {
                "name": name,
                "num_samples": self._count,
                "bytes": os.path.getsize(self._tmp),
                "sha256": digest.hexdigest(),
            }
        )
        os.unlink(self._tmp)
        self._tar, self._tmp, self._count = None, None, 0

    def close(self) -> list[dict]:
        """Publish the last shard; returns the list of published shards."""
        if self._tar is not None and self._count:
            self._publish()
        self.discard()
        return self.shards

    def discard(self) -> None:
        """Drop the shard being built (nothing of it becomes visible)."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tar, self._tmp, self._count = None, None, 0

    def unpublish(self) -> None:
        """Delete every shard this writer published (used when ingest fails with ``on_error=fail``)."""
        self.discard()
        for shard in self.shards:
            storage.delete(storage.join(self.out, shard["name"]), self.opts)
        self.shards = []


def existing_shards(out: str, split: str, opts=None) -> list[str]:
    """URLs of shard files of ``split`` directly under ``out`` (whether a manifest lists them or not)."""
    pattern = _shard_pattern(split)
    return [u for u in storage.list_prefix(out, opts) if pattern.match(u.rsplit("/", 1)[-1])]


def write_manifest(out: str, split: str, manifest: dict, opts=None) -> str:
    url = storage.join(out, split + MANIFEST_SUFFIX)
    storage.write_bytes(url, json.dumps(manifest, indent=1).encode(), opts)
    return url


def build_manifest(
    split: str,
    shards: list[dict],
    classes: list[str],
    source: dict,
    skipped: list[Skipped],
    has_segmentation: bool,
    renamed: Mapping[str, str] | None = None,
) -> dict:
    """The ``{split}.manifest.json`` document (``renamed``: input id → key of disambiguated keys)."""

    return {
        "format": FORMAT,
        "split": split,
        "classes": list(classes),
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "digest": dataset_digest(list(classes), shards),
        "source": source,
        "has_segmentation": has_segmentation,
        "num_skipped": len(skipped),
        "skipped": [s.as_dict() for s in skipped],
        "renamed": dict(sorted((renamed or {}).items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wysiwyc_version": __version__,
    }


def read_manifest(spec: str, opts=None) -> dict:
    """The manifest of a split (``OUT/split`` or its manifest URL), with ``shard_urls`` resolved."""
    url = manifest_url(spec)
    try:
        manifest = json.loads(storage.read_bytes(url, opts))
    except storage.NotFound:
        raise WysiwycError(
            f"no shard manifest at {storage.redact(url)}: the split was never ingested or its ingest did "
            f"not finish; run `wysiwyc ingest ... --out {storage.redact(_parent(url))}` first"
        ) from None
    except json.JSONDecodeError as exc:
        raise WysiwycError(f"shard manifest {storage.redact(url)} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise WysiwycError(f"{storage.redact(url)} is not a wysiwyc shard manifest (format {FORMAT})")
    manifest["url"] = url
    manifest["shard_urls"] = [storage.join(_parent(url), s["name"]) for s in manifest["shards"]]
    return manifest


# ---------------------------------------------------------------- training reader


def current_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_sources(manifest: dict, urls: list[str] | None = None) -> list[dict]:
    """The shards ``urls`` of a split (default: all of them), each with what its manifest says it holds
    (``url``, ``sha256``, ``num_samples``): :func:`raw_samples` checks them before reading a sample."""
    entries = dict(zip(manifest["shard_urls"], manifest["shards"]))
    return [
        {"url": url, "sha256": entries[url]["sha256"], "num_samples": entries[url]["num_samples"]}
        for url in (manifest["shard_urls"] if urls is None else urls)
    ]


def check_shard(source: dict, data: bytes) -> None:
    """A shard's bytes against its manifest entry: the sha256, then the number of samples; a mismatch
    names the shard and what to do (nothing of it has been read yet)."""
    url = storage.redact(source["url"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != source["sha256"]:
        raise WysiwycError(
            f"shard {url} does not match its manifest (sha256 {source['sha256'][:12]}… recorded, "
            f"{digest[:12]}… read: {len(data)} bytes): it was changed, truncated or overwritten after its "
            f"ingest; re-ingest the split (`wysiwyc ingest … --overwrite`) or restore the shard"
        )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # webdataset's grouping: the key before the first dot
        keys = {m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    if len(keys) != source["num_samples"]:
        raise WysiwycError(
            f"shard {url} holds {len(keys)} samples, its manifest says {source['num_samples']}: the manifest "
            f"does not describe this split; re-ingest it (`wysiwyc ingest … --overwrite`)"
        )


class OpenShards:
    """Pipeline stage: ``{"url", "sha256"?, "num_samples"?}`` → ``{"url", "stream"}`` through
    :mod:`pipeline.storage` (boto3 for s3). A shard with a manifest entry is read whole and checked
    (:func:`check_shard`) before any of its samples goes on (shards are bounded in size)."""

    def __init__(self, opts):
        self.opts = opts

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            if "sha256" in source:
                data = storage.read_bytes(source["url"], self.opts)
                check_shard(source, data)
                stream = io.BytesIO(data)
            else:
                stream = storage.open_read(source["url"], self.opts)
            try:
                yield {"url": source["url"], "stream": stream}
            finally:
                stream.close()


def raw_samples(sources: list[dict | str], opts=None, *stages):
    """The undecoded samples (``{"__key__", "json", "png" | "jpg", "seg.png"?}``) of the shards in order,
    through :class:`OpenShards`: ``sources`` from :func:`shard_sources` (checked against the manifest) or
    bare URLs (read as they are); ``stages``: more pipeline stages after grouping (e.g. a shuffle)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    listed = [source if isinstance(source, dict) else {"url": source} for source in sources]
    return wds.DataPipeline(lambda: iter(listed), OpenShards(opts), tar_file_expander, group_by_keys, *stages)


class ShardDataset(tud.IterableDataset):
    """Streams the samples of a split: shard shuffle → split by rank → split by worker → samples.

    With ``shuffle`` the shard order (seeded by ``seed`` and :meth:`set_epoch`, the same on every
    rank) and the samples (a buffer of ``shuffle_buffer``) are shuffled. Every sample comes exactly
    once per epoch across ranks × DataLoader workers; there is no resampling.

    By default every rank × worker must get at least one shard (a rank without data would stall the
    DDP gradient all-reduce). ``allow_idle_ranks=True`` lifts that for evaluation-only splits (the
    validation split): rank r reads ``shards[r::world]`` and ranks or workers past the last shard
    simply yield nothing, so a 1-shard validation split works with any number of ranks.
    """

    def __init__(
        self,
        spec: str,
        *,
        image_size: int,
        train: bool,
        flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        opts=None,
        classes: list[str] | None = None,
        allow_idle_ranks: bool = False,
        norm: Normalization = IMAGENET,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.manifest = read_manifest(spec, opts)
        self.classes = self.manifest["classes"]
        if classes is not None and list(classes) != list(self.classes):
            raise WysiwycError(
                f"data.classes {classes} differ from the classes of {self.manifest['url']}: {self.classes}"
            )
        if rank is None or world_size is None:
            rank, world_size = current_rank_and_world()
        self.rank, self.world_size = rank, world_size
        self.urls = self.manifest["shard_urls"]
        self.image_size, self.train, self.flip = image_size, train, flip and train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.seed, self.epoch, self.opts = seed, 0, opts
        self.allow_idle_ranks = allow_idle_ranks
        self.norm = norm  # the explained classifier's normalisation (ImageNet's by default)
        self.max_pixels = max_pixels  # data.max_image_pixels
        if len(self.urls) < world_size and not allow_idle_ranks:
            raise WysiwycError(self._too_few_shards(world_size, 1))

    def _too_few_shards(self, ranks: int, workers: int) -> str:
        return (
            f"{self.manifest['url']} has {len(self.urls)} shard(s) but {ranks} rank(s) × {workers} loader "
            f"worker(s) need at least {ranks * workers}: re-ingest with a smaller --shard-size "
            f"(it holds {self.manifest['num_samples']} samples) or lower data.loader_workers / "
            f"trainer.num_workers"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check_workers(self, num_workers: int) -> None:
        """Fail clearly when some rank × worker would get no shard (unless ``allow_idle_ranks``)."""
        if len(self.urls) < self.world_size * max(1, num_workers) and not self.allow_idle_ranks:
            raise WysiwycError(self._too_few_shards(self.world_size, max(1, num_workers)))

    def local_shards(self) -> list[str]:
        """This rank's and this DataLoader worker's shards for the current epoch."""
        urls = list(self.urls)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        urls = urls[self.rank :: self.world_size]
        info = tud.get_worker_info()
        if info is not None:
            urls = urls[info.id :: info.num_workers]
        return urls

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = tud.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        shards = self.local_shards()
        if not shards:  # an idle rank / worker (allow_idle_ranks): webdataset refuses an empty list
            return
        stages = []
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        for raw in raw_samples(shard_sources(self.manifest, shards), self.opts, *stages):
            yield decode_sample(
                raw,
                image_size=self.image_size,
                num_classes=len(self.classes),
                flip=self.flip and rng.random() < 0.5,
                norm=self.norm,
                max_pixels=self.max_pixels,
            )


def make_loader(dataset: ShardDataset, batch_size: int, num_workers: int):
    """A DataLoader over ``dataset`` (checks that every rank × worker gets at least one shard)."""
    dataset.check_workers(num_workers)
    return tud.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, pin_memory=False
    )
