"""The ingest stage: a reader → WebDataset shards + manifest, encoded in parallel worker processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.data import shards
from pipeline.data.sample import Reader, Sample, Skipped
from pipeline.errors import WysiwycError
from pipeline.lease import Lease
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)

_worker_reader: Reader | None = None

LEASE_SUFFIX = ".ingest.lease"  # OUT/SPLIT.ingest.lease: the one ingest writing SPLIT (pipeline.lease)
INGEST_LEASE_S = 12 * 3600  # a crashed ingest on another host frees the split after this; on this host at once
POOL_ITEMS_PER_WORKER = 256  # ingest.workers unset: at most one process per 256 items (1 for ≤ 511)


def _init_worker(reader: Reader) -> None:
    global _worker_reader
    _worker_reader = reader


def _load_chunk(items: list) -> list[Sample | Skipped]:
    return [_worker_reader.load_or_skip(item) for item in items]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_all(reader: Reader, items: list, workers: int, chunk: int = 16) -> Iterator[Sample | Skipped]:
    """``reader.load_or_skip`` over ``items`` in order, on ``workers`` processes with bounded look-ahead."""
    if workers <= 1:
        for item in items:
            yield reader.load_or_skip(item)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold boto3 threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(reader,)) as pool:
        pending: deque = deque()
        for part in _chunks(items, chunk):
            pending.append(pool.submit(_load_chunk, part))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def ingest(
    reader: Reader,
    out: str,
    split: str,
    config: IngestConfig,
    opts=None,
    progress: bool = True,
    max_pixels: int | None = None,
) -> dict:
    """Write ``reader``'s samples as ``{split}-RUN-NNNNNN.tar`` shards + ``{split}.manifest.json`` under ``out``.

    Args:
        reader: the source (VOC, COCO, synthetic, images).
        out: output prefix, a local directory or ``s3://bucket/prefix``.
        split: split name used in the shard and manifest names.
        config: shard size, error policy, overwrite, workers.
        opts: object-storage options.
        progress: show a progress bar on stderr.
        max_pixels: ``data.max_image_pixels``: larger images are skipped (read from the header) or fail the
            ingest with ``on_error=fail`` (None: the reader's default).

    Returns:
        The summary: ``manifest``, ``output``, ``num_samples``, ``skipped``, ``renamed_keys`` (inputs
        whose key was disambiguated, listed in the manifest's ``renamed``), ``shards``, ``digest``,
        ``images_per_second`` …

    Raises:
        WysiwycError: the output already holds this split (without ``overwrite``), the source is empty,
            no sample is usable, or an input is bad and ``on_error`` is ``fail``; nothing is published then.
    """
    started = time.perf_counter()
    manifest_url = storage.join(out, split + shards.MANIFEST_SUFFIX)
    # one writer per split: a second ingest into the same split is refused while this one holds it
    lease_url = storage.join(out, split + LEASE_SUFFIX)
    what = f"the split '{split}' of {storage.redact(out)} (being ingested)"
    with Lease.take(lease_url, what, INGEST_LEASE_S, opts, howto=", or ingest into another --out or --split") as lease:
        had_manifest = storage.exists(manifest_url, opts)
        if had_manifest and not config.overwrite:
            raise WysiwycError(
                f"{storage.redact(out)} already holds split '{split}' ({split}{shards.MANIFEST_SUFFIX}): "
                f"pass --overwrite to replace it, or choose another --out"
            )
        if max_pixels is not None:
            reader.max_pixels = max_pixels  # before the reader is pickled to the worker processes
        items = reader.items()
        if not items:
            raise WysiwycError(f"{reader.source}: split '{split}' is empty: nothing to ingest")
        # the old split stays readable until the new manifest replaces it: the new shards have names of their own
        stale = set(shards.existing_shards(out, split, opts))
        if stale and not had_manifest:
            log.warning(
                "%s: %d shard(s) of an unfinished ingest of '%s' will be replaced",
                storage.redact(out),
                len(stale),
                split,
            )

        # ingest.workers, else the cores, but a process pool pays ~3 s to start (spawn): without a setting,
        # one worker per POOL_ITEMS_PER_WORKER items at most
        workers = config.workers or min(os.cpu_count() or 1, max(1, len(items) // POOL_ITEMS_PER_WORKER))
        writer = shards.ShardWriter(out, split, config.shard_size, config.shard_max_bytes, opts)
        skipped: list[Skipped] = []
        has_seg = False
        bar = progress_bar(len(items), f"ingest {reader.name} {split}", "img", enabled=progress)
        try:
            for result in load_all(reader, items, workers):
                bar.update(1)
                if isinstance(result, Skipped):
                    if config.on_error == "fail":
                        raise WysiwycError(
                            f"ingest {reader.name}: {result.source}: {result.reason} "
                            f"(--on-error fail: nothing was published)"
                        )
                    skipped.append(result)
                    bar.set_postfix(skipped=len(skipped))
                    continue
                has_seg = has_seg or result.seg is not None
                writer.write(result)
            published = writer.close()
        except BaseException:
            writer.unpublish()
            raise
        finally:
            bar.close()
        if not published:
            first = f"; first: {skipped[0].source}: {skipped[0].reason}" if skipped else ""
            raise WysiwycError(
                f"ingest {reader.name}: none of the {len(items)} inputs of {reader.source} was usable{first}"
            )

        source = {"kind": reader.name, "path": storage.redact(reader.source)}
        manifest = shards.build_manifest(split, published, reader.classes, source, skipped, has_seg, reader.renamed)
        seconds = time.perf_counter() - started
        manifest["seconds"] = round(seconds, 3)
        if not lease.still_held():  # expired and taken over: the other ingest's split wins (its shards, its names)
            raise WysiwycError(
                f"ingest {reader.name}: {what}: the lease {storage.redact(lease_url)} expired and was taken by another "
                "ingest; this one published no manifest (run it again when that one is done)"
            )
        shards.write_manifest(out, split, manifest, opts)
        current = {storage.join(out, s["name"]) for s in published}
        for url in stale - current:  # the replaced split's shards (and any of an unfinished ingest)
            storage.delete(url, opts)

    return {
        "manifest": storage.redact(manifest_url),
        "output": storage.redact(out),
        "split": split,
        "source": source["path"],
        "num_samples": manifest["num_samples"],
        "skipped": len(skipped),
        "first_skipped": skipped[0].as_dict() if skipped else None,
        "renamed_keys": len(reader.renamed),
        "shards": len(published),
        "digest": manifest["digest"],
        "classes": len(reader.classes),
        "has_segmentation": has_seg,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(items) / max(seconds, 1e-9), 1),
    }
