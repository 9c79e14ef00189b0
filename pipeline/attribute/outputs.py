"""The layout of an attribution run's outputs (see :mod:`pipeline.attribute`): names, the two output
formats (``shards``: one tar per batch; ``objects``: two files per image), the index schema and its parts
(one directory of parquet files, read in chunks, never whole), the run record's helpers, and the reader
of a run's masks (:func:`read_index`, :func:`read_masks`, :func:`iter_masks`)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.attribute.inputs import absolute
from pipeline.errors import WysiwycError

FORMAT = "wysiwyc-attribution/2"


MANIFEST = "_manifest.json"


RUN_RECORD = "_run.json"


PARTS = "parts"


SHARDS = "shards"


MASK_MEMBER, CLASS_MASKS_MEMBER = "mask.png", "class_masks.npz"  # a shard's members: KEY.mask.png, …


_PART = re.compile(r"part-[0-9a-f]+-(\d+)r(\d+)e\.parquet$")


def source_key(source: str) -> str:
    """The deterministic output key of a source URI (24 hex digits of its sha256)."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _digest(sources: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sources)).encode()).hexdigest()[:24]


def output_urls(root: str, key: str) -> tuple[str, str]:
    """Format ``objects``: ``(aggregated mask PNG, per-class NPZ)`` URLs of the image with key ``key``."""
    return (
        storage.join(root, "masks", key[:2], key + ".png"),
        storage.join(root, "class_masks", key[:2], key + ".npz"),
    )


def shard_url(root: str, sources: list[str]) -> str:
    """Format ``shards``: the output shard of a batch, named by a hash of its (sorted) source URIs."""
    return storage.join(root, SHARDS, f"shard-{_digest(sources)}.tar")


def part_url(root: str, chunk: str, sources: list[str], errors: int) -> str:
    """The index part of a batch's images of one chunk: ``parts/CHUNK/part-HASH-{rows}r{errors}e.parquet``
    (the counts in the name let a resume count what is done from the listing alone)."""
    return storage.join(root, PARTS, chunk, f"part-{_digest(sources)}-{len(sources)}r{errors}e.parquet")


def done_counts(root: str, opts) -> dict[str, list[int]]:
    """``{chunk: [rows, error rows]}`` of the parts under ``root/parts`` (from their names: one listing)."""
    counts: dict[str, list[int]] = {}
    for url in storage.list_prefix(storage.join(root, PARTS), opts):
        match = _PART.search(url)
        if match:
            chunk = url.rsplit("/", 2)[-2]
            entry = counts.setdefault(chunk, [0, 0])
            entry[0] += int(match.group(1))
            entry[1] += int(match.group(2))
    return counts


def chunk_parts(root: str, chunk: str, opts, columns: list[str] | None = None, attempts: int = 5):
    """``(table of the chunk's index rows, part URLs)``; a source may appear in two parts (two launches
    that joined one run), see :func:`dedup_chunk`. A part listed and then deleted before it is read (a joined
    launch merged it: the merged part is written before its sources are deleted) makes the listing start over."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for attempt in range(attempts):
        urls = [u for u in storage.list_prefix(storage.join(root, PARTS, chunk), opts) if _PART.search(u)]
        try:
            tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, opts)), columns=columns) for u in urls]
            break
        except storage.NotFound:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    if not tables:
        schema = index_schema()
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table(), urls
    return pa.concat_tables(tables), urls


def dedup_chunk(root: str, chunk: str, opts):
    """The chunk's index rows, one per source: duplicates are merged into one part and the parts they came
    from deleted (idempotent: a merge interrupted half way is merged again)."""
    import pyarrow as pa

    table, urls = chunk_parts(root, chunk, opts)
    sources = table["source"].to_pylist()
    first = {}
    for i, s in enumerate(sources):
        first.setdefault(s, i)
    if len(first) == len(sources):
        return table
    table = table.take(pa.array(sorted(first.values()), pa.int64()))
    errors = sum(1 for st in table["status"].to_pylist() if st == "error")
    merged = part_url(root, chunk, table["source"].to_pylist(), errors)
    storage.write_bytes(merged, table_bytes(table), opts)
    for url in urls:
        if url != merged:
            try:
                storage.delete(url, opts)
            except storage.NotFound:  # a joined launch merged it at the same time
                pass
    return table


def table_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def class_masks_npz(masks: np.ndarray, classes: list[int], names: list[str]) -> bytes:
    """The per-class mask file: ``masks`` (K, S, S) uint8, ``classes`` (K,) indices, ``names`` (K,)."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, masks=masks, classes=np.asarray(classes, dtype=np.int32), names=np.asarray(names, dtype=str)
    )
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar (a WebDataset shard) of ``(name, data)`` in the given order."""
    buf, mtime = io.BytesIO(), time.time()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def index_schema():
    """The columns of the index parts."""
    import pyarrow as pa

    strings, floats = pa.list_(pa.string()), pa.list_(pa.float32())
    return pa.schema(
        [
            ("source", pa.string()),
            ("key", pa.string()),
            ("chunk", pa.string()),
            ("shard", pa.string()),
            ("member", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("predicted_classes", strings),
            ("predicted_probs", floats),
            ("probs", floats),
            ("explained_classes", strings),
            ("explained_indices", pa.list_(pa.int32())),
            ("mask_areas", floats),
            ("output_shard", pa.string()),
            ("mask_uri", pa.string()),
            ("class_masks_uri", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
        ]
    )


# ---------------------------------------------------------------------------- reading a run's masks


@dataclass
class Masks:
    """One image's attribution: ``mask`` (H, W) uint8 aggregated at the image's own size, ``masks``
    (K, S, S) uint8 per explained class at the model's size (value/255), their ``classes`` (indices) and
    ``names``."""

    source: str
    mask: np.ndarray
    masks: np.ndarray
    classes: list[int]
    names: list[str]


def read_index(run: str, opts=None, columns: list[str] | None = None):
    """The index of a complete run (``OUTPUT/RUN_ID``) as one pyarrow table (fine for a few million rows
    of the columns you pick; for more, read ``RUN/parts/`` with ``pyarrow.dataset``)."""
    import pyarrow.dataset as ds

    manifest = _complete(run, opts)
    if storage.is_s3(manifest["index"]):
        base = storage.split_s3(manifest["index"])
        return ds.dataset(f"{base[0]}/{base[1]}", format="parquet", filesystem=storage.arrow_filesystem(opts)).to_table(
            columns=columns
        )
    return ds.dataset(manifest["index"], format="parquet").to_table(columns=columns)


def _complete(run: str, opts) -> dict:
    run = absolute(run)
    manifest = read_json(storage.join(run, MANIFEST), opts)
    if manifest is None:
        raise WysiwycError(
            f"attribute: {storage.redact(run)} is not a complete attribution run (no {MANIFEST}): give "
            f"OUTPUT/RUN_ID of a run that finished"
        )
    manifest["index"] = storage.join(run, PARTS)
    return manifest


def _decode(row: dict, mask_png: bytes, npz: bytes) -> Masks:
    from PIL import Image

    with Image.open(io.BytesIO(mask_png)) as im:
        mask = np.array(im)
    with np.load(io.BytesIO(npz)) as z:
        return Masks(row["source"], mask, z["masks"], z["classes"].tolist(), z["names"].tolist())


def _shard_members(url: str, keys: set[str], opts) -> dict[str, bytes]:
    out = {}
    with storage.open_read(url, opts) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            if info.isfile() and info.name.split(".", 1)[0] in keys:
                out[info.name] = tar.extractfile(info).read()
    return out


def read_masks(run: str, source: str, opts=None) -> Masks:
    """The masks of one image of a complete run (``OUTPUT/RUN_ID``), whichever its output format.

    Raises:
        WysiwycError: not a complete run, an image the run did not attribute or could not read.
    """
    import pyarrow.compute as pc

    table = read_index(run, opts)
    rows = table.filter(pc.equal(table["source"], source)).to_pylist()
    if not rows or rows[0]["status"] != "ok":
        why = "has no row for it" if not rows else f"failed on it ({rows[0]['error']})"
        raise WysiwycError(f"attribute: run {storage.redact(absolute(run))} {why}: {storage.redact(source)}")
    return _decode(*next(output_bytes([rows[0]], opts)))


def iter_masks(run: str, opts=None) -> Iterator[Masks]:
    """Every attributed image of a complete run, one output shard (or object pair) at a time."""
    manifest = _complete(run, opts)
    for chunk in manifest["chunks"]:
        table, _ = chunk_parts(absolute(run), chunk, opts)
        for raw in output_bytes([r for r in table.to_pylist() if r["status"] == "ok"], opts):
            yield _decode(*raw)


def output_bytes(rows: list[dict], opts) -> Iterator[tuple[dict, bytes, bytes]]:
    """``(row, aggregated mask PNG, per-class NPZ)`` of index rows of attributed images (each output
    shard read once)."""
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        if row["output_shard"]:
            by_shard.setdefault(row["output_shard"], []).append(row)
        else:
            yield row, storage.read_bytes(row["mask_uri"], opts), storage.read_bytes(row["class_masks_uri"], opts)
    for url, shard_rows in by_shard.items():
        members = _shard_members(url, {r["key"] for r in shard_rows}, opts)
        for row in shard_rows:
            key = row["key"]
            yield row, members[f"{key}.{MASK_MEMBER}"], members[f"{key}.{CLASS_MASKS_MEMBER}"]


def read_json(url: str, opts) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url, opts))
    except storage.NotFound:
        return None


def unwritable(output: str, exc: WysiwycError) -> WysiwycError:
    return WysiwycError(
        f"attribute: cannot write the output {storage.redact(absolute(output))} ({exc}): give an "
        f"--output this process can write"
    )


def owner(record: dict) -> str:
    """Who started a run, for messages: ``the launch on HOST (pid P) started T``."""
    owner = record.get("owner") or {}
    where = f" on {owner['host']} (pid {owner['pid']})" if owner else ""
    return f"the launch{where} started {record['started']}"
