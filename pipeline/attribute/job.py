"""The run: the Ray Data pipeline (read and decode tasks → an actor pool of predictors that write each
image's outputs and then the batch's index part) and :func:`attribute`, which drives a run from its
record to its manifest."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from pipeline import storage
from pipeline.attribute.inputs import Input, absolute, decode_image, fetch_image, open_input, shard_images
from pipeline.attribute.model import fixed_indices, pin_model
from pipeline.attribute.outputs import (
    FORMAT,
    INDEX,
    MANIFEST,
    PARTS,
    RUN_RECORD,
    class_masks_npz,
    compact_index,
    done_sources,
    index_schema,
    output_urls,
    owner,
    part_url,
    read_json,
    source_key,
    table_bytes,
    unwritable,
)
from pipeline.attribute.report import index_html, summary, write_previews
from pipeline.errors import InputError, WysiwycError

log = logging.getLogger(__name__)


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


def explained_classes(
    probs, mode: str, threshold: float = 0.5, top_k: int = 3, fixed: tuple[int, ...] = ()
) -> list[list[int]]:
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
        return order[:, : min(top_k, probs.shape[1])].tolist()
    above = (probs >= threshold).sum(dim=1).clamp(min=1)  # the top-1 is the floor
    return [row[:n] for row, n in zip(order.tolist(), above.tolist())]


def _shard_samples(row: dict, job: Job, done_ref) -> list[dict]:
    """flat_map: one shard → a row per sample not done yet (``source`` = ``SHARD#KEY``)."""
    import ray

    done = ray.get(done_ref)
    shard = str(row["shard"])
    return [
        {"source": f"{shard}#{key}", "shard": shard, "member": key, "data": data}
        for key, data in shard_images(shard, job.opts)
        if f"{shard}#{key}" not in done
    ]


def _prepare(batch: dict, job: Job) -> dict:
    """map_batches (tasks): read (unless the bytes came from a shard), decode, normalise; errors → rows."""
    sources = [str(s) for s in batch["source"]]
    n = len(sources)
    datas = list(batch["data"]) if "data" in batch else [None] * n

    def load(i: int):
        try:
            data = datas[i] if datas[i] is not None else fetch_image(sources[i], job.opts)
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
    return {
        "source": np.array(sources, dtype=object),
        "image": images,
        "width": width,
        "height": height,
        "error": np.array(errors, dtype=object),
        "shard": np.asarray(batch["shard"], dtype=object) if "shard" in batch else empty,
        "member": np.asarray(batch["member"], dtype=object) if "member" in batch else empty,
    }


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
            row = {
                "source": source,
                "key": key,
                "shard": str(batch["shard"][i]) or None,
                "member": str(batch["member"][i]) or None,
                "width": int(batch["width"][i]),
                "height": int(batch["height"][i]),
                "model_name": job.model_name,
                "model_version": job.model_version,
            }
            if not ok[i]:
                rows.append({**row, "status": "error", "error": errors[i], "width": None, "height": None})
                continue
            p, idx = probs[j], chosen[j]
            predicted = [c for c in torch.argsort(p, descending=True).tolist() if p[c] >= job.threshold]
            mask_url, npz_url = output_urls(job.root, key)
            aggregated = Image.fromarray(masks8[j, idx].max(axis=0)).resize(
                (row["width"], row["height"]), Image.BILINEAR
            )
            writes += [
                (mask_url, encode_png(np.asarray(aggregated))),
                (npz_url, class_masks_npz(masks8[j, idx], idx, [classes[c] for c in idx])),
            ]
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "error": None,
                    "predicted_classes": [classes[c] for c in predicted],
                    "predicted_probs": [float(p[c]) for c in predicted],
                    "probs": [float(v) for v in p.tolist()],
                    "explained_classes": [classes[c] for c in idx],
                    "explained_indices": idx,
                    "mask_areas": [float(a) for a in masks[j, idx].mean(dim=(1, 2)).tolist()],
                    "mask_uri": mask_url,
                    "class_masks_uri": npz_url,
                }
            )
            j += 1
        list(self.pool.map(lambda w: storage.write_bytes(w[0], w[1], job.opts), writes))
        # the part goes last: once it exists, every output it lists exists
        storage.write_bytes(part_url(job.root, sources), table_bytes(pa.Table.from_pylist(rows, self.schema)), job.opts)
        return {
            "source": np.array(sources, dtype=object),
            "status": np.array([r["status"] for r in rows], dtype=object),
            "error": np.array([r["error"] or "" for r in rows], dtype=object),
        }


def execute(config, job: Job, inputs: Input, todo: list[str], done: dict[str, str], predictor, bar) -> dict:
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
        ds = ray.data.from_items(
            [{"source": s} for s in todo], override_num_blocks=max(1, math.ceil(len(todo) / a.batch_size))
        )
    ds = ds.map_batches(
        _prepare, batch_size=a.batch_size, batch_format="numpy", fn_kwargs={"job": job}, num_cpus=a.read_cpus
    )
    ds = ds.map_batches(
        _Attributor,
        batch_size=a.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"job": job, "predictor_ref": predictor_ref},
        compute=ray.data.ActorPoolStrategy(size=a.num_actors),
        num_cpus=a.cpus_per_actor,
        num_gpus=a.gpus_per_actor or None,
    )
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
                    f"them (every failure is an error row in {storage.redact(storage.join(job.root, PARTS))})"
                )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    seconds = time.perf_counter() - started
    steady = (processed - first_batch[1]) / (seconds - first_batch[0]) if processed > first_batch[1] else None
    return {"processed": processed, "seconds": seconds, "startup_seconds": first_batch[0], "steady_rate": steady}


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
        raise WysiwycError(
            "attribute: give the images: --input PREFIX (local or s3://), a shard split or a file "
            "listing image URIs (attribute.input)"
        )
    run_id = a.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    root = storage.join(absolute(config.output), run_id)
    manifest_url, record_url = storage.join(root, MANIFEST), storage.join(root, RUN_RECORD)
    try:
        finished, record = read_json(manifest_url, opts), read_json(record_url, opts)
    except WysiwycError as exc:  # e.g. a path below a file, a folder this user may not enter
        raise unwritable(config.output, exc) from None
    if finished is not None:
        if finished["model"]["model"] != config.explainer.checkpoint:
            raise WysiwycError(
                f"attribute: run {run_id} is complete, made by "
                f"{owner(record or {'started': finished['timings']['started']})} "
                f"with --model {finished['model']['model']}, not {config.explainer.checkpoint}: start a "
                f"new run with another --run-id"
            )
        return summary(finished, "already complete")

    # before any work: the run record (its first writer owns the run), the model, the input
    predictor, model = pin_model(config, record, opts)
    inputs = open_input(a.input, opts)
    settings = {k: getattr(a, k) for k in _RESULT_SETTINGS}
    if record is None:
        mine = {
            "format": FORMAT,
            "run_id": run_id,
            "input": inputs.url,
            "model": model,
            "settings": settings,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        try:
            created = storage.create_exclusive(record_url, json.dumps(mine, indent=1).encode(), opts)
        except WysiwycError as exc:
            raise unwritable(config.output, exc) from None
        if created:
            record = mine
        else:  # another launch created the run between our look and our write: it owns the run
            record = read_json(record_url, opts)
            if record["model"]["explainer_sha256"] != model["explainer_sha256"]:
                raise WysiwycError(
                    f"attribute: run {run_id} belongs to {owner(record)}, which attributes with "
                    f"{record['model']['model_name']} version {record['model']['model_version']}; this launch "
                    f"resolved version {model['model_version']}: wait for that launch to finish (rerunning the run "
                    f"then writes nothing), or start a new run with another --run-id"
                )
            log.info(
                "attribute: run %s was started at the same time by %s with the same model; joining it",
                run_id,
                owner(record),
            )
    changed = [k for k in _RESULT_SETTINGS if record["settings"].get(k) != settings[k]]
    if record["input"] != inputs.url or changed:
        what = "input" if record["input"] != inputs.url else "attribute." + ", attribute.".join(changed)
        raise WysiwycError(
            f"attribute: run {run_id} was started by {owner(record)} with another {what} "
            f"({storage.redact(record_url)}): resume it with the settings it started with, or start "
            f"a new run with another --run-id"
        )
    fixed = fixed_indices(a.fixed_classes, model["classes"]) if a.classes == "fixed" else ()
    job = Job(
        root=root,
        opts=opts,
        image_size=predictor.image_size,
        classes=tuple(model["classes"]),
        mode=a.classes,
        threshold=a.threshold,
        top_k=a.top_k,
        fixed=fixed,
        max_image_pixels=a.max_image_pixels,
        amp=a.amp,
        gpu=a.gpus_per_actor > 0,
        model_name=str(model["model_name"]),
        model_version=str(model["model_version"]),
    )

    done = done_sources(root, opts)
    todo = [s for s in inputs.sources if s not in done]
    resumed = len(done)
    if resumed:
        log.info("attribute: run %s resumes: %d of %d images are done", run_id, resumed, inputs.total)
    bar = progress_bar(inputs.total, "attribute", unit="img", enabled=progress)
    bar.update(min(resumed, inputs.total))
    try:
        remaining = len(todo) if inputs.kind != "shards" else inputs.total - resumed
        stats = (
            execute(config, job, inputs, todo, done, predictor, bar)
            if remaining > 0
            else {"processed": 0, "seconds": 0.0, "startup_seconds": None, "steady_rate": None}
        )
    finally:
        bar.close()

    table = compact_index(root, opts)
    errors = [
        f"{s}: {e}" if not e.startswith(s) else e
        for s, e, st in zip(table["source"].to_pylist(), table["error"].to_pylist(), table["status"].to_pylist())
        if st == "error"
    ]
    if len(errors) > a.max_error_fraction * inputs.total:  # a resumed run carries its earlier errors
        raise WysiwycError(
            f"attribute: {len(errors)} of {inputs.total} images failed, more than "
            f"attribute.max_error_fraction={a.max_error_fraction}; first: {errors[0]}"
        )
    previews = write_previews(root, table, a.preview_images, opts) if a.preview_images else {}
    table = table.append_column(
        "preview_uri", pa.array([previews.get(s) for s in table["source"].to_pylist()], pa.string())
    )
    index_url = storage.join(root, INDEX)
    storage.write_bytes(index_url, table_bytes(table), opts)
    preview_url = None
    if previews:
        preview_url = storage.join(root, "index.html")
        storage.write_text(preview_url, index_html(run_id, model, table, previews), opts)
    num_ok = table.num_rows - len(errors)
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "status": "complete",
        "output": storage.redact(root),
        "manifest": storage.redact(manifest_url),
        "index": storage.redact(index_url),
        "preview": storage.redact(preview_url) if preview_url else None,
        "input": {
            "kind": inputs.kind,
            "url": storage.redact(inputs.url),
            "images": inputs.total,
            "ignored_files": inputs.ignored,
        },
        "model": {**model, "model_uri": storage.redact(model["model_uri"])},
        "counts": {
            "images": table.num_rows,
            "ok": num_ok,
            "errors": len(errors),
            "processed": stats["processed"],
            "resumed": resumed,
        },
        "timings": {
            "started": record["started"],
            "this_launch_started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
            "attribution_seconds": round(stats["seconds"], 3),
            "images_per_second": round(stats["processed"] / stats["seconds"], 2) if stats["seconds"] else None,
            "startup_seconds": stats["startup_seconds"] and round(stats["startup_seconds"], 3),
            "steady_images_per_second": stats["steady_rate"] and round(stats["steady_rate"], 2),
        },
        "errors": errors[:100],
        "config": public_config(config),
        "config_yaml": dump_config(config),
    }
    storage.write_text(manifest_url, json.dumps(manifest, indent=1), opts)  # last: the run is complete
    return summary(manifest, "complete")
