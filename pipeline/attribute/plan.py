"""The plan of a run: its images cut into numbered chunks of ``attribute.shard_size``, written once at the
first launch and read by every later one (:func:`make_plan`, :func:`read_plan`).

A chunk is the unit of resume and of the index: the index rows of its images live under
``parts/CHUNK/``, and it is done when those parts hold all its images. The driver holds the plan (one
entry per chunk: ~1,000 times fewer than images), never the images: the listing is streamed into the
chunk files (``plan/CHUNK-HASH.json``, a JSON list of source URIs each) as it is read. A shard input needs
no chunk files: a chunk is a shard of the manifest.

The run attributes what the input held when its plan was made: images added under the prefix later
belong to the next run. A URI list is taken in its order; a URI it names twice within one chunk is
attributed once (a list should name each image once: across chunks, each occurrence gets its row).
``_plan.json`` is created exclusively, so of two launches planning at once one plan wins (the chunk
files are named by their contents, so a losing plan never overwrites the winner's).
"""

from __future__ import annotations

import hashlib
import json

from pipeline import storage
from pipeline.attribute.inputs import Input, Listing
from pipeline.errors import WysiwycError

PLAN = "_plan.json"


def _chunk_name(i: int) -> str:
    return f"chunk-{i:06d}"


def make_plan(inputs: Input, root: str, chunk_size: int, opts) -> dict:
    """Write the plan of a run (or read the one a concurrent launch published first).

    Returns:
        ``{"kind", "url", "total", "ignored", "chunks": [{"name", "url", "count"}]}``; ``url`` of a chunk:
        its chunk file, or its shard for a shard input (whose chunk also has the shard's ``sha256``).
    """
    if inputs.kind == "shards":
        chunks = [
            {"name": _chunk_name(i), "url": s["url"], "count": s["num_samples"], "sha256": s["sha256"]}
            for i, s in enumerate(inputs.shards)
        ]
        ignored = 0
    else:
        listing, chunks, batch = Listing(inputs, opts), [], []

        def flush() -> None:
            body = json.dumps(batch).encode()
            name = _chunk_name(len(chunks))
            url = storage.join(root, "plan", f"{name}-{hashlib.sha256(body).hexdigest()[:16]}.json")
            storage.write_bytes(url, body, opts)
            chunks.append({"name": name, "url": url, "count": len(batch)})

        seen: set[str] = set()  # a URI listed twice within one chunk is attributed once
        for source in listing:
            if source in seen:
                continue
            seen.add(source)
            batch.append(source)
            if len(batch) == chunk_size:
                flush()
                batch, seen = [], set()
        if batch:
            flush()
        ignored = listing.ignored
        if not chunks:
            raise WysiwycError(f"attribute: {storage.redact(inputs.url)} holds no image any more; check --input")
    plan = {
        "kind": inputs.kind,
        "url": inputs.url,
        "total": sum(c["count"] for c in chunks),
        "ignored": ignored,
        "chunk_size": chunk_size,
        "chunks": chunks,
    }
    if storage.create_exclusive(storage.join(root, PLAN), json.dumps(plan).encode(), opts):
        return plan
    return read_plan(root, opts)  # another launch planned first: its plan is the run's


def read_plan(root: str, opts) -> dict | None:
    """The plan of the run at ``root``, None before one was written."""
    try:
        return json.loads(storage.read_bytes(storage.join(root, PLAN), opts))
    except storage.NotFound:
        return None
