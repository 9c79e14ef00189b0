"""The layout of an attribution run's outputs (see :mod:`pipeline.attribute`): names, the index schema and
its parts, the run record's helpers, and the compaction of the parts into ``index.parquet``."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from pipeline import storage
from pipeline.attribute.inputs import absolute
from pipeline.errors import WysiwycError

FORMAT = "wysiwyc-attribution/1"


MANIFEST = "_manifest.json"


RUN_RECORD = "_run.json"


INDEX = "index.parquet"


PARTS = "parts"


def source_key(source: str) -> str:
    """The deterministic output key of a source URI (24 hex digits of its sha256)."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def output_urls(root: str, key: str) -> tuple[str, str]:
    """``(aggregated mask PNG, per-class NPZ)`` URLs of the image with output key ``key``."""
    return (
        storage.join(root, "masks", key[:2], key + ".png"),
        storage.join(root, "class_masks", key[:2], key + ".npz"),
    )


def part_url(root: str, sources: list[str]) -> str:
    """The index part of a batch: named by a hash of its (sorted) source URIs."""
    digest = hashlib.sha256("\n".join(sorted(sources)).encode()).hexdigest()[:24]
    return storage.join(root, PARTS, f"part-{digest}.parquet")


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


def index_schema():
    """The columns of the index parts and of ``index.parquet`` (which adds ``preview_uri``)."""
    import pyarrow as pa

    strings, floats = pa.list_(pa.string()), pa.list_(pa.float32())
    return pa.schema(
        [
            ("source", pa.string()),
            ("key", pa.string()),
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
            ("mask_uri", pa.string()),
            ("class_masks_uri", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
        ]
    )


def done_sources(root: str, opts) -> dict[str, str]:
    """``{source: error ('' when ok)}`` of every image an index part under ``root/parts`` holds."""
    import pyarrow.parquet as pq

    done: dict[str, str] = {}
    for url in storage.list_prefix(storage.join(root, PARTS), opts):
        if url.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(storage.read_bytes(url, opts)), columns=["source", "error"])
            done.update(zip(table["source"].to_pylist(), (e or "" for e in table["error"].to_pylist())))
    return done


def compact_index(root: str, opts):
    """Every part's rows, one per source URI (a batch retried after a crash may appear twice), sorted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(u, opts)))
        for u in storage.list_prefix(storage.join(root, PARTS), opts)
        if u.endswith(".parquet")
    ]
    table = pa.concat_tables(tables).sort_by("source") if tables else index_schema().empty_table()
    sources = table["source"].to_pylist()
    keep = [i for i, s in enumerate(sources) if i == 0 or s != sources[i - 1]]
    return table.take(pa.array(keep, pa.int64())) if len(keep) < len(sources) else table


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
