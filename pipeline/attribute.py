"""The ``attribute`` stage: batch attribution of an image corpus on Ray Data, resumable and idempotent.

The model (``explainer.checkpoint``: a checkpoint URI or ``models:/NAME@alias``) is resolved **once**
at the start (alias → version) and loaded on the driver, so a model that does not resolve or load
fails before any work; the loaded :class:`~pipeline.models.predictor.Predictor` (Explainer + the
Explanandum it explains) is shipped to the actors through the object store. The input
(``attribute.input``) is one of

- an image prefix (local folder or ``s3://``): every ``.jpg/.jpeg/.png`` under it, listed page by page;
- a shard split written by ``wysiwyc ingest`` (``OUT/split`` or its ``.manifest.json``);
- a file listing image URIs (one per line, or a JSON list; relative entries are read from its folder).

Compute (Ray Data): ``from_items`` → ``map_batches(_prepare)`` (tasks with ``attribute.read_cpus``:
read the bytes through :mod:`pipeline.storage`, decode, convert to RGB and normalise, so a bad image
becomes an error row instead of failing Ray's reader) → ``map_batches(_Attributor,
compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)``: one
Explainer pass gives the masks of every class and the Explanandum's probabilities; the actor writes
each image's outputs and then, atomically, the batch's index part. Shard inputs read their tar files in
a ``flat_map`` first.

Outputs under ``output/RUN_ID/`` (``RUN_ID``: ``attribute.run_id``, default the UTC start time)::

    masks/KK/KEY.png            aggregated mask (pixel-wise max over the explained classes), uint8,
                                at the source image's size
    class_masks/KK/KEY.npz      per-class masks of the explained classes at the model's size:
                                masks (K, S, S) uint8 (value/255), classes (K,) indices, names (K,)
    parts/part-HASH.parquet     index rows of one batch (HASH of its source URIs), written atomically
    index.parquet               one row per image (deduplicated by source URI, sorted by it)
    previews/KEY.png, index.html   mask overlay + masked image of the first attribute.preview_images
    _run.json                   what the run was started with (model version, input, class choice) and
                                by whom (host, pid, start time): created exclusively, its writer owns the run
    _manifest.json              written last: counts, timings, model, config; marks the run complete

``KEY`` is a hash of the source URI (``KK`` its first two characters), so output names are
deterministic. Resume: the same run id again processes only the images that no part file holds yet
(error rows count as done), pinned to the model version recorded in ``_run.json``; a run whose
``_manifest.json`` exists is complete and is left untouched.

One writer per run: ``_run.json`` is created exclusively (locally a hard link, on S3 a conditional
``PUT`` with ``If-None-Match: *``), so of two launches with the same run id that start at once exactly
one creates it. The other reads it and joins only if it would attribute with the same model (same
Explainer sha256), input and settings — the outputs are deterministic, so both write the same bytes
and the index keeps one row per image; otherwise it refuses, naming the owner and its start time.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import os
import posixpath
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from pipeline import storage
from pipeline.errors import InputError, WysiwycError

log = logging.getLogger(__name__)

FORMAT = "wysiwyc-attribution/1"
MANIFEST = "_manifest.json"
RUN_RECORD = "_run.json"
INDEX = "index.parquet"
PARTS = "parts"
_REGISTRY_PREFIX = "models:/"
_IO_THREADS = 8
# what a resumed run must share with the run it continues (they change the results)
_RESULT_SETTINGS = ("classes", "threshold", "top_k", "fixed_classes", "max_image_pixels")


@dataclass(frozen=True)
class Job:
    """What the read tasks and the actors need (picklable)."""

    root: str  # output/RUN_ID
    opts: storage.S3Options
    image_size: int
    classes: tuple[str, ...]
    mode: str
    threshold: float
    top_k: int
    fixed: tuple[int, ...]
    max_image_pixels: int
    amp: bool
    gpu: bool
    model_name: str
    model_version: str


# ------------------------------------------------------------------------------------ pure helpers


def source_key(source: str) -> str:
    """The deterministic output key of a source URI (24 hex digits of its sha256)."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def output_urls(root: str, key: str) -> tuple[str, str]:
    """``(aggregated mask PNG, per-class NPZ)`` URLs of the image with output key ``key``."""
    return (storage.join(root, "masks", key[:2], key + ".png"),
            storage.join(root, "class_masks", key[:2], key + ".npz"))


def explained_classes(probs, mode: str, threshold: float = 0.5, top_k: int = 3,
                      fixed: tuple[int, ...] = ()) -> list[list[int]]:
    """Per image, the class indices to explain, most probable first (fixed: in the given order).

    Args:
        probs: (B, C) the Explanandum's probabilities.
        mode: ``threshold`` (p ≥ threshold, at least the top-1), ``topk`` (the top_k) or ``fixed``.
    """
    import torch

    if mode == "fixed":
        return [list(fixed) for _ in range(probs.shape[0])]
    order = torch.argsort(probs, dim=1, descending=True)
    if mode == "topk":
        return order[:, :min(top_k, probs.shape[1])].tolist()
    above = (probs >= threshold).sum(dim=1).clamp(min=1)  # the top-1 is the floor
    return [row[:n] for row, n in zip(order.tolist(), above.tolist())]


def decode_image(data: bytes, source: str, size: int, max_pixels: int):
    """Encoded image bytes → ``(normalised (3, size, size) float32 array, width, height)``.

    Grayscale, palette and RGBA images are converted to RGB (alpha dropped).

    Raises:
        InputError: empty, not an image, truncated, or more than ``max_pixels`` pixels (checked
            from the header, before decoding).
    """
    from PIL import Image

    from pipeline.data.transforms import image_to_tensor

    if not data:
        raise InputError(f"{source}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise InputError(f"{source}: {width}x{height} image has more than attribute.max_image_pixels="
                                 f"{max_pixels} pixels")
            im.load()  # decodes every pixel: a truncated file fails here
            tensor = image_to_tensor(im, size)
    except InputError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError …
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not an image (PIL cannot identify it)"
        elif "truncat" in reason.lower():
            reason = f"truncated file ({reason})"
        raise InputError(f"{source}: {reason}") from exc
    return tensor.numpy(), width, height


def _fetch(source: str, opts) -> bytes:
    """The bytes of one input image; a missing or unreadable object is an InputError (an error row)."""
    try:
        return storage.read_bytes(source, opts)
    except (storage.CredentialsError, storage.EndpointUnreachable, storage.BucketNotFound):
        raise  # the same for every image: stop the run
    except storage.NotFound:
        raise InputError(f"{source}: gone since the listing") from None
    except (WysiwycError, OSError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from None


def _shard_images(url: str, opts):
    """``(member key, image bytes)`` of every sample of one shard, in tar order."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from pipeline.data.shards import OpenShards

    for raw in wds.DataPipeline(wds.SimpleShardList([url]), OpenShards(opts), tar_file_expander, group_by_keys):
        yield raw["__key__"], raw.get("jpg") or raw.get("png") or b""


# ------------------------------------------------------------------------------- Ray Data stages


def _shard_samples(row: dict, job: Job, done_ref) -> list[dict]:
    """flat_map: one shard → a row per sample not done yet (``source`` = ``SHARD#KEY``)."""
    import ray

    done = ray.get(done_ref)
    shard = str(row["shard"])
    return [{"source": f"{shard}#{key}", "shard": shard, "member": key, "data": data}
            for key, data in _shard_images(shard, job.opts) if f"{shard}#{key}" not in done]


def _prepare(batch: dict, job: Job) -> dict:
    """map_batches (tasks): read (unless the bytes came from a shard), decode, normalise; errors → rows."""
    sources = [str(s) for s in batch["source"]]
    n = len(sources)
    datas = list(batch["data"]) if "data" in batch else [None] * n

    def load(i: int):
        try:
            data = datas[i] if datas[i] is not None else _fetch(sources[i], job.opts)
            return decode_image(bytes(data), sources[i], job.image_size, job.max_image_pixels)
        except InputError as exc:
            return str(exc)

    with ThreadPoolExecutor(min(_IO_THREADS, n)) as pool:
        results = list(pool.map(load, range(n)))
    images = np.zeros((n, 3, job.image_size, job.image_size), dtype=np.float32)
    width, height, errors = np.zeros(n, np.int64), np.zeros(n, np.int64), []
    for i, result in enumerate(results):
        if isinstance(result, str):
            errors.append(result)
        else:
            images[i], width[i], height[i] = result
            errors.append("")
    empty = np.array([""] * n, dtype=object)
    return {"source": np.array(sources, dtype=object), "image": images, "width": width, "height": height,
            "error": np.array(errors, dtype=object),
            "shard": np.asarray(batch["shard"], dtype=object) if "shard" in batch else empty,
            "member": np.asarray(batch["member"], dtype=object) if "member" in batch else empty}


def part_url(root: str, sources: list[str]) -> str:
    """The index part of a batch: named by a hash of its (sorted) source URIs."""
    digest = hashlib.sha256("\n".join(sorted(sources)).encode()).hexdigest()[:24]
    return storage.join(root, PARTS, f"part-{digest}.parquet")


def _table_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def class_masks_npz(masks: np.ndarray, classes: list[int], names: list[str]) -> bytes:
    """The per-class mask file: ``masks`` (K, S, S) uint8, ``classes`` (K,) indices, ``names`` (K,)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=masks, classes=np.asarray(classes, dtype=np.int32),
                        names=np.asarray(names, dtype=str))
    return buf.getvalue()


class _Attributor:
    """The stateful predictor of the actor pool: masks for a batch, outputs written, index part last."""

    def __init__(self, job: Job, predictor_ref):
        import ray
        import torch

        self.job = job
        self.predictor = ray.get(predictor_ref)
        if job.gpu and not torch.cuda.is_available():
            log.warning("attribute: gpus_per_actor > 0 but this actor sees no CUDA device; running on the CPU")
        self.predictor.to("cuda" if job.gpu and torch.cuda.is_available() else "cpu")
        self.pool = ThreadPoolExecutor(_IO_THREADS)
        self.schema = index_schema()

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import torch
        from PIL import Image

        from pipeline.data.sample import encode_png

        job, classes = self.job, self.job.classes
        sources = [str(s) for s in batch["source"]]
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors])
        rows, writes = [], []
        if ok.any():
            prediction = self.predictor(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])), amp=job.amp)
            masks, probs = prediction.masks.cpu(), prediction.probs.cpu()
            chosen = explained_classes(probs, job.mode, job.threshold, job.top_k, job.fixed)
            masks8 = (masks * 255).round().to(torch.uint8).numpy()
        j = 0
        for i, source in enumerate(sources):
            key = source_key(source)
            row = {"source": source, "key": key, "shard": str(batch["shard"][i]) or None,
                   "member": str(batch["member"][i]) or None, "width": int(batch["width"][i]),
                   "height": int(batch["height"][i]), "model_name": job.model_name,
                   "model_version": job.model_version}
            if not ok[i]:
                rows.append({**row, "status": "error", "error": errors[i], "width": None, "height": None})
                continue
            p, idx = probs[j], chosen[j]
            predicted = [c for c in torch.argsort(p, descending=True).tolist() if p[c] >= job.threshold]
            mask_url, npz_url = output_urls(job.root, key)
            aggregated = Image.fromarray(masks8[j, idx].max(axis=0)).resize((row["width"], row["height"]),
                                                                            Image.BILINEAR)
            writes += [(mask_url, encode_png(np.asarray(aggregated))),
                       (npz_url, class_masks_npz(masks8[j, idx], idx, [classes[c] for c in idx]))]
            rows.append({**row, "status": "ok", "error": None,
                         "predicted_classes": [classes[c] for c in predicted],
                         "predicted_probs": [float(p[c]) for c in predicted],
                         "probs": [float(v) for v in p.tolist()],
                         "explained_classes": [classes[c] for c in idx], "explained_indices": idx,
                         "mask_areas": [float(a) for a in masks[j, idx].mean(dim=(1, 2)).tolist()],
                         "mask_uri": mask_url, "class_masks_uri": npz_url})
            j += 1
        list(self.pool.map(lambda w: storage.write_bytes(w[0], w[1], job.opts), writes))
        # the part goes last: once it exists, every output it lists exists
        storage.write_bytes(part_url(job.root, sources), _table_bytes(pa.Table.from_pylist(rows, self.schema)),
                            job.opts)
        return {"source": np.array(sources, dtype=object),
                "status": np.array([r["status"] for r in rows], dtype=object),
                "error": np.array([r["error"] or "" for r in rows], dtype=object)}


def index_schema():
    """The columns of the index parts and of ``index.parquet`` (which adds ``preview_uri``)."""
    import pyarrow as pa

    strings, floats = pa.list_(pa.string()), pa.list_(pa.float32())
    return pa.schema([
        ("source", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
        ("status", pa.string()), ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("predicted_classes", strings), ("predicted_probs", floats), ("probs", floats),
        ("explained_classes", strings), ("explained_indices", pa.list_(pa.int32())), ("mask_areas", floats),
        ("mask_uri", pa.string()), ("class_masks_uri", pa.string()),
        ("model_name", pa.string()), ("model_version", pa.string()),
    ])


# ------------------------------------------------------------------------------------ the driver


@dataclass
class Input:
    """A resolved ``attribute.input``: ``kind`` prefix | list | shards."""

    kind: str
    url: str
    total: int
    sources: list[str]  # prefix and list inputs: every image URI, sorted
    shards: list[str]  # shard inputs: the shard URLs of the manifest
    ignored: int = 0  # prefix inputs: files without an image suffix


def _absolute(url: str) -> str:
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
    entries = [e if "://" in e or e.startswith("/") else storage.join(parent, e)
               for e in entries if e and not e.startswith("#")]
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

    url = _absolute(spec)
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
        raise WysiwycError(f"attribute: {storage.redact(url)} holds {what} no image ending in "
                           f"{'/'.join(IMAGE_SUFFIXES)}; check --input (an image prefix, a shard split "
                           f"OUT/split or a file listing image URIs)")
    return Input("prefix", url, len(sources), sorted(sources), [], ignored)


def _read_json(url: str, opts) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url, opts))
    except storage.NotFound:
        return None


def _unwritable(output: str, exc: WysiwycError) -> WysiwycError:
    return WysiwycError(f"attribute: cannot write the output {storage.redact(_absolute(output))} ({exc}): give an "
                        f"--output this process can write")


def _owner(record: dict) -> str:
    """Who started a run, for messages: ``the launch on HOST (pid P) started T``."""
    owner = record.get("owner") or {}
    where = f" on {owner['host']} (pid {owner['pid']})" if owner else ""
    return f"the launch{where} started {record['started']}"


def _load_predictor(uri: str, config, opts):
    if uri.startswith(_REGISTRY_PREFIX):
        from pipeline.registry import load_explainer, registry_uri

        return load_explainer(uri, registry_uri(config))
    from pipeline.models.predictor import load_predictor

    return load_predictor(uri, config.explanandum.checkpoint, opts)


def resolve_model(config, record: dict | None, opts=None):
    """Resolve ``explainer.checkpoint`` once (alias → version) and load it: ``(predictor, model record)``.

    A resumed run (``record`` from its ``_run.json``) uses the version it started with.
    """
    given = config.explainer.checkpoint
    if not given:
        raise WysiwycError("attribute: give the model: --model models:/NAME@champion or a checkpoint URI "
                           "(explainer.checkpoint)")
    if record is not None:
        if record["model"]["model"] != given:
            raise WysiwycError(f"attribute: run {record['run_id']} was started by {_owner(record)} with --model "
                               f"{record['model']['model']}, not {given}: resume it with that model, or start a "
                               f"new run with another --run-id")
        pinned = record["model"]["model_uri"]
    elif given.startswith(_REGISTRY_PREFIX):
        from pipeline.registry import registry_uri
        from pipeline.registry import resolve_model as resolve_registered

        name, version = resolve_registered(given, registry_uri(config))
        pinned = f"{_REGISTRY_PREFIX}{name}/{version}"
    else:
        pinned = _absolute(given)
    try:
        predictor = _load_predictor(pinned, config, opts)
    except WysiwycError as exc:
        raise WysiwycError(f"attribute: {exc}") from None
    if record is not None and predictor.explainer_sha256 != record["model"]["explainer_sha256"]:
        raise WysiwycError(f"attribute: the model {storage.redact(pinned)} has changed since run "
                           f"{record['run_id']} started (sha256 differs): start a new run with another --run-id")
    registered = pinned.startswith(_REGISTRY_PREFIX)
    model = {
        "model": given,
        "model_uri": pinned,
        "model_name": predictor.model_name if registered else storage.redact(pinned),
        "model_version": str(predictor.model_version) if registered else predictor.explainer_sha256[:12],
        "explainer_sha256": predictor.explainer_sha256,
        "explanandum_uri": storage.redact(predictor.explanandum_uri),
        "explanandum_sha256": predictor.explanandum_sha256,
        "classes": list(predictor.classes),
        "image_size": predictor.image_size,
    }
    return predictor, model


def _fixed_indices(names: list[str], classes: list[str]) -> tuple[int, ...]:
    unknown = [n for n in names if n not in classes]
    if unknown or not names:
        raise WysiwycError(f"attribute: classes=fixed needs attribute.fixed_classes from the model's classes "
                           f"{classes}" + (f"; unknown: {unknown}" if unknown else ""))
    return tuple(classes.index(n) for n in names)


def _done(root: str, opts) -> dict[str, str]:
    """``{source: error ('' when ok)}`` of every image an index part under ``root/parts`` holds."""
    import pyarrow.parquet as pq

    done: dict[str, str] = {}
    for url in storage.list_prefix(storage.join(root, PARTS), opts):
        if url.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(storage.read_bytes(url, opts)), columns=["source", "error"])
            done.update(zip(table["source"].to_pylist(), (e or "" for e in table["error"].to_pylist())))
    return done


def _execute(config, job: Job, inputs: Input, todo: list[str], done: dict[str, str], predictor, bar) -> dict:
    """Run the Ray Data pipeline over the images not done yet; returns counts of this launch."""
    import ray
    import ray.data

    from pipeline.train.distributed import ensure_ray

    a = config.attribute
    ray_config = config.model_copy(deep=True)
    ray_config.trainer.use_gpu = a.gpus_per_actor > 0  # a local Ray gets the GPUs the actors ask for
    ensure_ray(ray_config)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    predictor_ref = ray.put(replace(predictor, checkpoint={}))
    if inputs.kind == "shards":
        done_ref = ray.put(frozenset(done))
        ds = ray.data.from_items([{"shard": u} for u in inputs.shards], override_num_blocks=len(inputs.shards))
        ds = ds.flat_map(_shard_samples, fn_kwargs={"job": job, "done_ref": done_ref}, num_cpus=a.read_cpus)
    else:
        ds = ray.data.from_items([{"source": s} for s in todo],
                                 override_num_blocks=max(1, math.ceil(len(todo) / a.batch_size)))
    ds = ds.map_batches(_prepare, batch_size=a.batch_size, batch_format="numpy", fn_kwargs={"job": job},
                        num_cpus=a.read_cpus)
    ds = ds.map_batches(_Attributor, batch_size=a.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"job": job, "predictor_ref": predictor_ref},
                        compute=ray.data.ActorPoolStrategy(size=a.num_actors), num_cpus=a.cpus_per_actor,
                        num_gpus=a.gpus_per_actor or None)
    limit = a.max_error_fraction * inputs.total
    errors = sum(1 for e in done.values() if e)
    processed, first_errors, first_batch = 0, [e for e in done.values() if e][:5], None
    started = time.perf_counter()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for out in batches:
            if first_batch is None:  # actor start-up (process, imports, model) ends with the first batch
                first_batch = (time.perf_counter() - started, len(out["source"]))
            new_errors = [str(e) for e in out["error"] if e]
            processed += len(out["source"])
            errors += len(new_errors)
            first_errors += new_errors[: max(0, 5 - len(first_errors))]
            bar.update(len(out["source"]))
            bar.set_postfix(errors=errors)
            if errors > limit:
                raise WysiwycError(
                    f"attribute: {errors} of {inputs.total} images failed, more than attribute.max_error_fraction="
                    f"{a.max_error_fraction}; first: {first_errors[0]}. Fix or remove the bad inputs and start a "
                    f"new --run-id, or rerun this run id with a higher attribute.max_error_fraction to accept "
                    f"them (every failure is an error row in {storage.redact(storage.join(job.root, PARTS))})")
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    seconds = time.perf_counter() - started
    steady = (processed - first_batch[1]) / (seconds - first_batch[0]) if processed > first_batch[1] else None
    return {"processed": processed, "seconds": seconds, "startup_seconds": first_batch[0], "steady_rate": steady}


def _compact(root: str, opts):
    """Every part's rows, one per source URI (a batch retried after a crash may appear twice), sorted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, opts)))
              for u in storage.list_prefix(storage.join(root, PARTS), opts) if u.endswith(".parquet")]
    table = pa.concat_tables(tables).sort_by("source") if tables else index_schema().empty_table()
    sources = table["source"].to_pylist()
    keep = [i for i, s in enumerate(sources) if i == 0 or s != sources[i - 1]]
    return table.take(pa.array(keep, pa.int64())) if len(keep) < len(sources) else table


def _preview_png(image: bytes, mask: bytes, max_side: int = 256) -> bytes:
    """Two panels: the aggregated mask over the image (jet) and the masked image (hidden → mean colour),
    the longer side scaled to ``max_side`` (small images are enlarged so that they can be seen)."""
    from matplotlib import colormaps
    from PIL import Image

    from pipeline.data.sample import encode_png
    from pipeline.data.transforms import IMAGENET_MEAN

    with Image.open(io.BytesIO(image)) as im, Image.open(io.BytesIO(mask)) as mk:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        x = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255
        m = np.asarray(mk.convert("L").resize(size, Image.BILINEAR), dtype=np.float32)[..., None] / 255
    overlay = 0.5 * x + 0.5 * colormaps["jet"](m[..., 0])[..., :3]
    masked = m * x + (1 - m) * np.asarray(IMAGENET_MEAN, dtype=np.float32)
    gap = np.ones((size[1], 4, 3), dtype=np.float32)
    return encode_png((np.concatenate([overlay, gap, masked], axis=1) * 255).round().astype(np.uint8))


def _previews(root: str, table, n: int, opts) -> dict[str, str]:
    """``{source: preview URL}`` for the first ``n`` ok rows of the index (PNG files written)."""
    rows = [r for r in table.select(["source", "key", "shard", "member", "status", "mask_uri"]).to_pylist()
            if r["status"] == "ok"][:n]
    shard_cache: dict[str, dict[str, bytes]] = {}

    def image_bytes(row) -> bytes:
        if not row["shard"]:
            return storage.read_bytes(row["source"], opts)
        if row["shard"] not in shard_cache:
            wanted = {r["member"] for r in rows if r["shard"] == row["shard"]}
            shard_cache[row["shard"]] = {k: d for k, d in _shard_images(row["shard"], opts) if k in wanted}
        return shard_cache[row["shard"]][row["member"]]

    out = {}
    for row in rows:
        url = storage.join(root, "previews", row["key"] + ".png")
        storage.write_bytes(url, _preview_png(image_bytes(row), storage.read_bytes(row["mask_uri"], opts)), opts)
        out[row["source"]] = url
    return out


def _index_html(run_id: str, model: dict, table, previews: dict[str, str]) -> str:
    rows = {r["source"]: r for r in table.select(["source", "explained_classes", "probs", "mask_areas"]).to_pylist()
            if r["source"] in previews}
    cards = []
    classes = model["classes"]
    for source, url in previews.items():
        r = rows[source]
        label = ", ".join(f"{c} {r['probs'][classes.index(c)]:.2f}" for c in r["explained_classes"])
        area = max(r["mask_areas"]) if r["mask_areas"] else 0.0
        cards.append(f'<figure><img src="previews/{posixpath.basename(url)}" alt="">'
                     f'<figcaption><b>{html.escape(posixpath.basename(source))}</b><br>{html.escape(label)}'
                     f' · largest mask area {area:.2f}</figcaption></figure>')
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>wysiwyc attribution {html.escape(run_id)}</title><style>"
        "body{font-family:sans-serif;margin:1em} .grid{display:grid;"
        "grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:14px} figure{margin:0}"
        " img{width:100%;image-rendering:pixelated} figcaption{font-size:12px}</style></head><body>"
        f"<h1>Attribution run {html.escape(run_id)}</h1>"
        f"<p>model {html.escape(str(model['model_name']))} version {html.escape(str(model['model_version']))}: "
        f"the first {len(cards)} images; left: the mask of the explained classes (pixel-wise max) over the "
        "image, right: the image as the classifier sees it through that mask. Classes with the Explanandum's "
        "probability.</p>\n<div class=\"grid\">\n" + "\n".join(cards) + "\n</div></body></html>\n")


def _summary(manifest: dict, status: str) -> dict:
    counts = manifest["counts"]
    return {
        "status": status,
        "output": manifest["output"],
        "manifest": manifest["manifest"],
        "index": manifest["index"],
        "preview": manifest["preview"],
        "run_id": manifest["run_id"],
        "model_uri": manifest["model"]["model_uri"],
        "model_name": manifest["model"]["model_name"],
        "version": manifest["model"]["model_version"],
        "input": manifest["input"]["url"],
        "num_samples": counts["images"],
        "num_ok": counts["ok"],
        "num_errors": counts["errors"],
        "skipped": counts["errors"],
        "processed": counts["processed"] if status == "complete" else 0,
        "resumed": counts["resumed"] if status == "complete" else counts["images"],
        "images_per_second": manifest["timings"]["images_per_second"] if status == "complete" else None,
        "seconds": manifest["timings"]["seconds"] if status == "complete" else 0.0,
        "errors": manifest["errors"][:5],
    }


def attribute(config, progress: bool = True) -> dict:
    """Attribute every image of ``attribute.input`` with ``explainer.checkpoint``; resumable by run id.

    Args:
        config: the resolved :class:`pipeline.config.Config` (``explainer.checkpoint``, ``attribute``,
            ``output``, ``storage``, ``tracking.uri`` for ``models:/`` URIs).
        progress: show a progress bar (images done / total, images/s) on stderr.

    Returns:
        The summary: ``status`` (``complete`` or ``already complete``: nothing was written), ``output``
        (the run's prefix), ``manifest``, ``index``, ``preview`` (index.html), ``run_id``,
        ``model_uri`` (version-pinned), ``model_name``, ``version``, ``num_samples``, ``num_ok``,
        ``num_errors`` (= ``skipped``), ``processed`` (this launch), ``resumed`` (done before it),
        ``images_per_second``, ``seconds``, ``errors`` (the first few).

    Raises:
        WysiwycError: before any work: no model, a model that does not resolve or load, a missing or
            empty input, a run id started with another model or settings; during the run: more failed
            images than ``attribute.max_error_fraction`` allows.
    """
    import pyarrow as pa

    from pipeline.config import dump_config
    from pipeline.progress import progress as progress_bar
    from pipeline.train.checkpoint import public_config

    started = time.time()
    a = config.attribute
    opts = config.storage.options()
    if not a.input:
        raise WysiwycError("attribute: give the images: --input PREFIX (local or s3://), a shard split or a file "
                           "listing image URIs (attribute.input)")
    run_id = a.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    root = storage.join(_absolute(config.output), run_id)
    manifest_url, record_url = storage.join(root, MANIFEST), storage.join(root, RUN_RECORD)
    try:
        finished, record = _read_json(manifest_url, opts), _read_json(record_url, opts)
    except WysiwycError as exc:  # e.g. a path below a file, a folder this user may not enter
        raise _unwritable(config.output, exc) from None
    if finished is not None:
        if finished["model"]["model"] != config.explainer.checkpoint:
            raise WysiwycError(f"attribute: run {run_id} is complete, made by {_owner(record or {'started': finished['timings']['started']})} "
                               f"with --model {finished['model']['model']}, not {config.explainer.checkpoint}: start a "
                               f"new run with another --run-id")
        return _summary(finished, "already complete")

    # before any work: the run record (its first writer owns the run), the model, the input
    predictor, model = resolve_model(config, record, opts)
    inputs = open_input(a.input, opts)
    settings = {k: getattr(a, k) for k in _RESULT_SETTINGS}
    if record is None:
        mine = {"format": FORMAT, "run_id": run_id, "input": inputs.url, "model": model, "settings": settings,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
        try:
            created = storage.create_exclusive(record_url, json.dumps(mine, indent=1).encode(), opts)
        except WysiwycError as exc:
            raise _unwritable(config.output, exc) from None
        if created:
            record = mine
        else:  # another launch created the run between our look and our write: it owns the run
            record = _read_json(record_url, opts)
            if record["model"]["explainer_sha256"] != model["explainer_sha256"]:
                raise WysiwycError(
                    f"attribute: run {run_id} belongs to {_owner(record)}, which attributes with "
                    f"{record['model']['model_name']} version {record['model']['model_version']}; this launch "
                    f"resolved version {model['model_version']}: wait for that launch to finish (rerunning the run "
                    f"then writes nothing), or start a new run with another --run-id")
            log.info("attribute: run %s was started at the same time by %s with the same model; joining it",
                     run_id, _owner(record))
    changed = [k for k in _RESULT_SETTINGS if record["settings"].get(k) != settings[k]]
    if record["input"] != inputs.url or changed:
        what = "input" if record["input"] != inputs.url else "attribute." + ", attribute.".join(changed)
        raise WysiwycError(f"attribute: run {run_id} was started by {_owner(record)} with another {what} "
                           f"({storage.redact(record_url)}): resume it with the settings it started with, or start "
                           f"a new run with another --run-id")
    fixed = _fixed_indices(a.fixed_classes, model["classes"]) if a.classes == "fixed" else ()
    job = Job(root=root, opts=opts, image_size=predictor.image_size, classes=tuple(model["classes"]),
              mode=a.classes, threshold=a.threshold, top_k=a.top_k, fixed=fixed,
              max_image_pixels=a.max_image_pixels, amp=a.amp, gpu=a.gpus_per_actor > 0,
              model_name=str(model["model_name"]), model_version=str(model["model_version"]))

    done = _done(root, opts)
    todo = [s for s in inputs.sources if s not in done]
    resumed = len(done)
    if resumed:
        log.info("attribute: run %s resumes: %d of %d images are done", run_id, resumed, inputs.total)
    bar = progress_bar(inputs.total, "attribute", unit="img", enabled=progress)
    bar.update(min(resumed, inputs.total))
    try:
        remaining = len(todo) if inputs.kind != "shards" else inputs.total - resumed
        stats = (_execute(config, job, inputs, todo, done, predictor, bar) if remaining > 0
                 else {"processed": 0, "seconds": 0.0, "startup_seconds": None, "steady_rate": None})
    finally:
        bar.close()

    table = _compact(root, opts)
    errors = [f"{s}: {e}" if not e.startswith(s) else e
              for s, e, st in zip(table["source"].to_pylist(), table["error"].to_pylist(),
                                  table["status"].to_pylist()) if st == "error"]
    if len(errors) > a.max_error_fraction * inputs.total:  # a resumed run carries its earlier errors
        raise WysiwycError(f"attribute: {len(errors)} of {inputs.total} images failed, more than "
                           f"attribute.max_error_fraction={a.max_error_fraction}; first: {errors[0]}")
    previews = _previews(root, table, a.preview_images, opts) if a.preview_images else {}
    table = table.append_column("preview_uri", pa.array([previews.get(s) for s in table["source"].to_pylist()],
                                                        pa.string()))
    index_url = storage.join(root, INDEX)
    storage.write_bytes(index_url, _table_bytes(table), opts)
    preview_url = None
    if previews:
        preview_url = storage.join(root, "index.html")
        storage.write_text(preview_url, _index_html(run_id, model, table, previews), opts)
    num_ok = table.num_rows - len(errors)
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "status": "complete",
        "output": storage.redact(root),
        "manifest": storage.redact(manifest_url),
        "index": storage.redact(index_url),
        "preview": storage.redact(preview_url) if preview_url else None,
        "input": {"kind": inputs.kind, "url": storage.redact(inputs.url), "images": inputs.total,
                  "ignored_files": inputs.ignored},
        "model": {**model, "model_uri": storage.redact(model["model_uri"])},
        "counts": {"images": table.num_rows, "ok": num_ok, "errors": len(errors), "processed": stats["processed"],
                   "resumed": resumed},
        "timings": {"started": record["started"], "this_launch_started":
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "seconds": round(time.time() - started, 3), "attribution_seconds": round(stats["seconds"], 3),
                    "images_per_second": round(stats["processed"] / stats["seconds"], 2) if stats["seconds"] else None,
                    "startup_seconds": stats["startup_seconds"] and round(stats["startup_seconds"], 3),
                    "steady_images_per_second": stats["steady_rate"] and round(stats["steady_rate"], 2)},
        "errors": errors[:100],
        "config": public_config(config),
        "config_yaml": dump_config(config),
    }
    storage.write_text(manifest_url, json.dumps(manifest, indent=1), opts)  # last: the run is complete
    return _summary(manifest, "complete")
