"""The run: the Ray Data pipeline (chunks of the plan → read and decode tasks → an actor pool of
predictors that write a batch's outputs and then its index parts) and :func:`attribute`, which drives a
run from its record to its manifest.

Why not Ray Data's file reads and job-level checkpointing (``DataContext.checkpoint_config``): both hold
the whole corpus in the driver — a file-based read expands every path (and its size) on the driver before
the first task, and the checkpoint filter loads every finished id into one array — so the driver's memory
would grow with the corpus, which is what this stage must not do. The resume is ours and streams: the
plan (:mod:`pipeline.attribute.plan`) cuts the input into chunks, each chunk's index rows live under
``parts/CHUNK/`` with their row and error counts in the part names, so a relaunch learns what is done from
one listing, and a read task skips the images of its chunk that a part already holds. The final index is
that directory of parts (deduplicated chunk by chunk), never one table in memory.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from pipeline import storage
from pipeline.attribute.inputs import absolute, fetch_image, open_input, shard_images
from pipeline.attribute.model import pin_model
from pipeline.attribute.outputs import (
    CLASS_MASKS_MEMBER,
    FORMAT,
    MANIFEST,
    MASK_MEMBER,
    PARTS,
    RUN_RECORD,
    chunk_parts,
    class_masks_npz,
    dedup_chunk,
    done_counts,
    index_schema,
    output_urls,
    owner,
    part_url,
    read_json,
    shard_url,
    source_key,
    table_bytes,
    tar_bytes,
    unwritable,
)
from pipeline.attribute.plan import make_plan, read_plan
from pipeline.attribute.report import index_html, summary, write_previews
from pipeline.attribute.stats import Stats, drift, drift_png, log_run, previous_run
from pipeline.config import dump_config, public_config
from pipeline.data.images import decode_image
from pipeline.data.sample import encode_png
from pipeline.errors import InputError, WysiwycError
from pipeline.method.class_rule import ClassRule
from pipeline.progress import progress as progress_bar
from pipeline.raysession import ensure_ray
from pipeline.tracking import journal_url

log = logging.getLogger(__name__)


_IO_THREADS = 8


# what a resumed run must share with the run it continues (they change the results or their layout)
_RESULT_SETTINGS = ("classes", "threshold", "top_k", "fixed_classes", "max_image_pixels", "output_format")


@dataclass(frozen=True)
class Job:
    """What the read tasks and the actors need (picklable)."""

    root: str  # output/RUN_ID
    opts: storage.S3Options
    image_size: int
    classes: tuple[str, ...]
    rule: ClassRule
    max_image_pixels: int
    amp: bool
    gpu: bool
    model_name: str
    model_version: str
    plan_kind: str  # prefix | list | shards
    output_format: str  # shards | objects
    batch_size: int  # images per model call


def _read_chunk(batch: dict, job: Job) -> dict:
    """map_batches (tasks, one chunk of the plan each): the chunk's images that no part holds yet, read
    (a shard chunk's bytes come from its tar), decoded and resized (uint8); a bad image → an error row.
    One task per chunk, its images read and decoded by a thread pool: fewer, larger blocks than a task per
    ``batch_size`` images (Ray Data's per-block work cost more than the decoding itself, measured)."""
    (chunk,), (url,) = [str(c) for c in batch["chunk"]], [str(u) for u in batch["url"]]
    done = set(chunk_parts(job.root, chunk, job.opts, columns=["source"])[0]["source"].to_pylist())
    if job.plan_kind == "shards":  # a shard sample's source is SHARD#KEY; its bytes come with it
        shard = {"url": url}
        if batch["sha256"][0]:  # checked against it (a plan written before chunks recorded it: read as it is)
            shard.update(sha256=str(batch["sha256"][0]), num_samples=int(batch["count"][0]))
        samples = [(f"{url}#{key}", key, data) for key, data in shard_images(shard, job.opts)]
    else:
        samples = [(s, "", None) for s in json.loads(storage.read_bytes(url, job.opts))]
    samples = [sample for sample in samples if sample[0] not in done]
    n = len(samples)

    def load(sample: tuple):
        source, _, data = sample
        try:
            data = data if data is not None else fetch_image(source, job.opts)
            return decode_image(data, source, job.image_size, job.max_image_pixels)
        except InputError as exc:
            return str(exc)

    with ThreadPoolExecutor(max(1, min(_IO_THREADS, n))) as pool:
        results = list(pool.map(load, samples))
    images = np.zeros((n, 3, job.image_size, job.image_size), dtype=np.uint8)
    width, height, errors = np.zeros(n, np.int64), np.zeros(n, np.int64), []
    for i, result in enumerate(results):
        if isinstance(result, str):
            errors.append(result)
        else:
            images[i], width[i], height[i] = result
            errors.append("")
    return {
        "source": np.array([s[0] for s in samples], dtype=object),
        "chunk": np.array([chunk] * n, dtype=object),
        "shard": np.array([url if job.plan_kind == "shards" else ""] * n, dtype=object),
        "member": np.array([s[1] for s in samples], dtype=object),
        "image": images,
        "width": width,
        "height": height,
        "error": np.array(errors, dtype=object),
    }


class _Attributor:
    """The stateful predictor of the actor pool: for a batch (one output shard, or ``batch_size`` images
    of the objects format) the masks, the outputs written, and the index parts last."""

    def __init__(self, job: Job, predictor_ref):
        import ray
        import torch

        self.job = job
        self.predictor = ray.get(predictor_ref)
        if job.gpu and not torch.cuda.is_available():
            log.warning("attribute: gpus_per_actor > 0 but this actor sees no CUDA device; running on the CPU")
        self.device = "cuda" if job.gpu and torch.cuda.is_available() else "cpu"
        self.predictor.to(self.device)
        self.pool = ThreadPoolExecutor(_IO_THREADS)
        self.schema = index_schema()

    def _encode(self, masks8: np.ndarray, idx: list[int], size: tuple[int, int]) -> tuple[bytes, bytes]:
        """``(aggregated mask PNG at the image's size, per-class NPZ)`` of one image."""
        from PIL import Image

        aggregated = Image.fromarray(masks8[idx].max(axis=0)).resize(size, Image.BILINEAR)
        return encode_png(np.asarray(aggregated)), class_masks_npz(masks8[idx], idx, [self.job.classes[c] for c in idx])

    def _rows(self, batch: dict, ok: np.ndarray) -> tuple[list[dict], list[tuple[int, bytes, bytes]]]:
        """Index rows of the batch and ``(row index, mask PNG, NPZ)`` of its attributed images."""
        import torch

        job, classes = self.job, self.job.classes
        rows, outputs = [], []
        ok_at = np.flatnonzero(ok)
        for start in range(0, len(ok_at), job.batch_size):  # one model call per batch_size images
            at = ok_at[start : start + job.batch_size]
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][at]))  # uint8: normalised on the device
            if self.device == "cuda":
                x = x.pin_memory().to("cuda", non_blocking=True)
            prediction = self.predictor(self.predictor.normalize(x), amp=job.amp)
            masks, probs = prediction.masks.float(), prediction.probs.float().cpu()
            areas = masks.mean(dim=(2, 3)).cpu().tolist()
            masks8 = (masks * 255).round().to(torch.uint8).cpu().numpy()
            chosen = job.rule.indices(probs, classes)
            order = torch.argsort(probs, dim=1, descending=True).tolist()
            probs = probs.tolist()  # per-image work on Python lists: indexing a tensor costs ~10 µs a time
            sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in at]
            encoded = self.pool.map(self._encode, masks8, chosen, sizes)
            for j, (i, (png, npz)) in enumerate(zip(at, encoded)):
                p, idx = probs[j], chosen[j]
                predicted = [c for c in order[j] if p[c] >= job.rule.threshold]
                rows.append(
                    {
                        "row": int(i),
                        "status": "ok",
                        "error": None,
                        "predicted_classes": [classes[c] for c in predicted],
                        "predicted_probs": [p[c] for c in predicted],
                        "probs": p,
                        "explained_classes": [classes[c] for c in idx],
                        "explained_indices": idx,
                        "mask_areas": [areas[j][c] for c in idx],
                    }
                )
                outputs.append((int(i), png, npz))
        return rows, outputs

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa

        job = self.job
        sources = [str(s) for s in batch["source"]]
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors])
        attributed, outputs = self._rows(batch, ok) if ok.any() else ([], [])
        by_row = {r.pop("row"): r for r in attributed}
        keys = [source_key(s) for s in sources]
        shard = shard_url(job.root, sources) if job.output_format == "shards" else None
        if shard is not None and outputs:  # one object for the batch, published atomically
            members = []
            for i, png, npz in outputs:
                members += [(f"{keys[i]}.{MASK_MEMBER}", png), (f"{keys[i]}.{CLASS_MASKS_MEMBER}", npz)]
            storage.write_bytes(shard, tar_bytes(members), job.opts)
        elif outputs:
            writes = [
                (url, data) for i, png, npz in outputs for url, data in zip(output_urls(job.root, keys[i]), (png, npz))
            ]
            list(self.pool.map(lambda w: storage.write_bytes(w[0], w[1], job.opts), writes))
        parts: dict[str, list[dict]] = {}
        for i, source in enumerate(sources):
            row = {
                "source": source,
                "key": keys[i],
                "chunk": str(batch["chunk"][i]),
                "shard": str(batch["shard"][i]) or None,
                "member": str(batch["member"][i]) or None,
                "width": int(batch["width"][i]),
                "height": int(batch["height"][i]),
                "model_name": job.model_name,
                "model_version": job.model_version,
            }
            if i in by_row:
                mask_url, npz_url = output_urls(job.root, keys[i]) if shard is None else (None, None)
                row.update(by_row[i], output_shard=shard, mask_uri=mask_url, class_masks_uri=npz_url)
            else:
                row.update(status="error", error=errors[i], width=None, height=None)
            parts.setdefault(row["chunk"], []).append(row)
        # the parts go last: once one exists, every output it lists exists
        for chunk, rows in parts.items():
            url = part_url(job.root, chunk, [r["source"] for r in rows], sum(r["status"] == "error" for r in rows))
            storage.write_bytes(url, table_bytes(pa.Table.from_pylist(rows, self.schema)), job.opts)
        return {"source": np.array(sources, dtype=object), "error": np.array(errors, dtype=object)}


def execute(config, job: Job, pending: list[dict], total: int, errors: int, predictor, bar) -> dict:
    """Run the Ray Data pipeline over the pending chunks of the plan; returns counts of this launch."""
    import ray
    import ray.data

    a = config.attribute
    ensure_ray(config.storage.options(), use_gpu=a.gpus_per_actor > 0)  # a local Ray gets the GPUs the actors ask for
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    predictor_ref = ray.put(replace(predictor, checkpoint={}))
    items = [{"chunk": c["name"], "url": c["url"], "count": c["count"], "sha256": c.get("sha256", "")} for c in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(pending))
    ds = ds.map_batches(_read_chunk, batch_size=1, batch_format="numpy", fn_kwargs={"job": job}, num_cpus=a.read_cpus)
    ds = ds.map_batches(
        _Attributor,
        batch_size=a.shard_size if job.output_format == "shards" else a.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"job": job, "predictor_ref": predictor_ref},
        compute=ray.data.ActorPoolStrategy(size=a.num_actors),
        num_cpus=a.cpus_per_actor,
        num_gpus=a.gpus_per_actor or None,
    )
    limit = a.max_error_fraction * total
    processed, first_errors, first_batch = 0, [], None
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
                first = f"; first of this launch: {first_errors[0]}" if first_errors else ""
                raise WysiwycError(
                    f"attribute: {errors} of {total} images failed, more than attribute.max_error_fraction="
                    f"{a.max_error_fraction}{first}. Fix or remove the bad inputs and start a "
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


def _compared_run(config, run_id: str, output: str, opts) -> str | None:
    """The run ``attribute.compare_to`` names (checked before any work), or None."""
    wanted = config.attribute.compare_to
    if not wanted:
        return None
    if wanted == "previous":
        found = previous_run(output, run_id, opts)
        if found is None:
            log.info("attribute: no earlier complete run under %s to compare with", storage.redact(output))
        return found
    if read_json(storage.join(output, wanted, MANIFEST), opts) is None:
        raise WysiwycError(
            f"attribute: attribute.compare_to={wanted}: no complete run {wanted} under {storage.redact(output)}; "
            f"give the run id of a finished run, or 'previous' for the last one"
        )
    return wanted


def _finish(config, root: str, plan: dict, model: dict, opts) -> tuple[Stats, list[str], list[dict]]:
    """Chunk by chunk (memory: one chunk): dedup its parts, check it is whole, add it to the statistics;
    returns them with the first error messages and the rows to preview."""
    a = config.attribute
    stats, errors, preview_rows = Stats(model["classes"], a.threshold), [], []
    for chunk in plan["chunks"]:
        table = dedup_chunk(root, chunk["name"], opts)
        if table.num_rows != chunk["count"]:
            raise WysiwycError(
                f"attribute: {chunk['name']} of run {storage.redact(root)} has {table.num_rows} of its "
                f"{chunk['count']} images after the run; launch the same run id again to finish it"
            )
        stats.add(table)
        status = table["status"].to_pylist()
        if len(errors) < 100 and "error" in status:
            for s, e, st in zip(table["source"].to_pylist(), table["error"].to_pylist(), status):
                if st == "error" and len(errors) < 100:
                    errors.append(e if e.startswith(s) else f"{s}: {e}")
        if len(preview_rows) < a.preview_images:
            preview_rows += [r for r in table.to_pylist() if r["status"] == "ok"][
                : a.preview_images - len(preview_rows)
            ]
    return stats, errors, preview_rows


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def attribute(config, progress: bool = True) -> dict:
    """Attribute every image of ``attribute.input`` with ``explainer.checkpoint``; resumable by run id.

    Args:
        config: the resolved :class:`pipeline.config.Config` (``explainer.checkpoint``, ``attribute``,
            ``output``, ``storage``, ``tracking.uri`` for ``models:/`` URIs and the ``attribution``
            experiment).
        progress: show a progress bar (images done / total, images/s) on stderr.

    Returns:
        The summary: ``status`` (``complete`` or ``already complete``: nothing was written), ``output``
        (the run's prefix), ``manifest``, ``index`` (the directory of index parts), ``preview``
        (index.html), ``run_id``, ``model_uri`` (version-pinned), ``model_name``, ``version``,
        ``num_samples``, ``num_ok``, ``num_errors`` (= ``skipped``), ``processed`` (this launch),
        ``resumed`` (done before it), ``images_per_second``, ``seconds``, ``errors`` (the first few),
        ``output_objects`` (objects under the run's prefix), ``peak_rss_mb`` (this driver's peak), ``drift``
        (None, or ``compared_to``, ``flagged``, ``per_class``).

    Raises:
        WysiwycError: before any work: no model, a model that does not resolve or load, a missing or
            empty input, a run id started with another model or settings, a ``compare_to`` run that does
            not exist; during the run: more failed images than ``attribute.max_error_fraction`` allows.
    """

    started = time.time()
    a = config.attribute
    opts = config.storage.options()
    if not a.input:
        raise WysiwycError(
            "attribute: give the images: --input PREFIX (local or s3://), a shard split or a file "
            "listing image URIs (attribute.input)"
        )
    run_id = a.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    output = absolute(config.output)
    root = storage.join(output, run_id)
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
        if config.tracking.enabled and storage.exists(journal_url(root), opts):
            log_run(config, finished, root, None, opts)  # what the tracking server missed last time
        return summary(finished, "already complete")

    # before any work: the run record (its first writer owns the run), the model, the input
    predictor, model = pin_model(config, record, opts)
    inputs = open_input(a.input, opts)
    compared = _compared_run(config, run_id, output, opts)
    record = _claim_run(config, run_id, record, record_url, model, inputs.url, started, opts)
    rule = ClassRule(mode=a.classes, threshold=a.threshold, top_k=a.top_k, fixed=tuple(a.fixed_classes))
    rule.fixed_indices(model["classes"], "attribute.fixed_classes")  # unknown class names: fail before any work
    plan = read_plan(root, opts) or make_plan(inputs, root, a.shard_size, opts)
    job = Job(
        root=root,
        opts=opts,
        image_size=predictor.image_size,
        classes=tuple(model["classes"]),
        rule=rule,
        max_image_pixels=a.max_image_pixels,
        amp=a.amp,
        gpu=a.gpus_per_actor > 0,
        model_name=str(model["model_name"]),
        model_version=str(model["model_version"]),
        plan_kind=plan["kind"],
        output_format=a.output_format,
        batch_size=a.batch_size,
    )
    stats, resumed = _attribute_pending(config, run_id, job, plan, predictor, progress)

    counts, errors, preview_rows = _finish(config, root, plan, model, opts)
    if counts.errors > a.max_error_fraction * plan["total"]:  # a resumed run carries its earlier errors
        raise WysiwycError(
            f"attribute: {counts.errors} of {plan['total']} images failed, more than "
            f"attribute.max_error_fraction={a.max_error_fraction}; first: {errors[0]}"
        )
    now = counts.as_dict()
    drift_result, drift_bytes = _drift(config, root, output, run_id, compared, now, opts)
    previews = write_previews(root, preview_rows, opts, fill=predictor.norm.mean)
    preview_url = None
    if previews or drift_bytes:
        preview_url = storage.join(root, "index.html")
        storage.write_text(preview_url, index_html(run_id, model, previews, drift_result), opts)
    published = {
        "preview": storage.redact(preview_url) if preview_url else None,
        "previews": [{"source": r["source"], "uri": storage.redact(u)} for r, u in previews],
        "drift": drift_result,
    }
    manifest = _manifest(config, run_id, root, plan, model, counts, stats, resumed, errors, record, started, published)
    manifest["output_objects"] = sum(1 for _ in storage.list_prefix(root, opts)) + 1  # + the manifest
    manifest["peak_rss_mb"] = _peak_rss_mb()
    storage.write_text(manifest_url, json.dumps(manifest, indent=1), opts)  # last: the run is complete
    log_run(config, manifest, root, drift_bytes, opts)
    return summary(manifest, "complete")


def _manifest(
    config,
    run_id: str,
    root: str,
    plan: dict,
    model: dict,
    counts,
    stats: dict,
    resumed: int,
    errors,
    record: dict,
    started: float,
    published: dict,
) -> dict:
    """The run's ``_manifest.json``; ``published``: its ``preview``, ``previews`` and ``drift``."""
    a = config.attribute
    return {
        "format": FORMAT,
        "run_id": run_id,
        "status": "complete",
        "output": storage.redact(root),
        "output_format": a.output_format,
        "manifest": storage.redact(storage.join(root, MANIFEST)),
        "index": storage.redact(storage.join(root, PARTS)),
        "preview": published["preview"],
        "previews": published["previews"],
        "input": {
            "kind": plan["kind"],
            "url": storage.redact(plan["url"]),
            "images": plan["total"],
            "ignored_files": plan["ignored"],
        },
        "chunks": [c["name"] for c in plan["chunks"]],
        "model": {**model, "model_uri": storage.redact(model["model_uri"])},
        "counts": {
            "images": counts.images,
            "ok": counts.images - counts.errors,
            "errors": counts.errors,
            "processed": stats["processed"],
            "resumed": resumed,
        },
        "stats": counts.as_dict(),
        "drift": published["drift"],
        "timings": _timings(record, started, stats),
        "errors": errors,
        "config": public_config(config),
        "config_yaml": dump_config(config),
    }


def _claim_run(config, run_id: str, record, record_url: str, model: dict, input_url: str, started: float, opts) -> dict:
    """The run's record: written by this launch when it is the first (exclusive create), else the first
    launch's, which must use the same model, input and result settings (a clear refusal otherwise)."""
    a = config.attribute
    settings = {k: getattr(a, k) for k in _RESULT_SETTINGS}
    if record is None:
        mine = {
            "format": FORMAT,
            "run_id": run_id,
            "input": input_url,
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
    if record["input"] != input_url or changed:
        what = "input" if record["input"] != input_url else "attribute." + ", attribute.".join(changed)
        raise WysiwycError(
            f"attribute: run {run_id} was started by {owner(record)} with another {what} "
            f"({storage.redact(record_url)}): resume it with the settings it started with, or start "
            f"a new run with another --run-id"
        )
    return record


def _attribute_pending(config, run_id: str, job: Job, plan: dict, predictor, progress: bool) -> tuple[dict, int]:
    """The chunks not yet done, through the Ray Data pipeline: ``(execution stats, images done before)``."""
    done = done_counts(job.root, job.opts)
    total = plan["total"]
    resumed = sum(min(done.get(c["name"], [0])[0], c["count"]) for c in plan["chunks"])
    pending = [c for c in plan["chunks"] if done.get(c["name"], [0])[0] < c["count"]]
    if resumed:
        log.info("attribute: run %s resumes: %d of %d images are done", run_id, resumed, total)
    bar = progress_bar(total, "attribute", unit="img", enabled=progress)
    bar.update(resumed)
    try:
        stats = (
            execute(config, job, pending, total, sum(e for _, e in done.values()), predictor, bar)
            if pending
            else {"processed": 0, "seconds": 0.0, "startup_seconds": None, "steady_rate": None}
        )
    finally:
        bar.close()
    return stats, resumed


def _drift(config, root: str, output: str, run_id: str, compared: str | None, now: dict, opts):
    """``attribute.compare_to``: ``(drift result or None, drift.png bytes or None)``, the figure written."""
    a = config.attribute
    if not a.compare_to:
        return None, None
    result = {"compared_to": compared, "flagged": [], "per_class": {}}
    if compared is None:
        return result, None
    before = read_json(storage.join(output, compared, MANIFEST), opts)
    result.update(drift(now, before["stats"], a.drift_psi, a.drift_ks, a.drift_min_images))
    figure = drift_png(now, before["stats"], result, f"run {run_id} against run {compared}")
    storage.write_bytes(storage.join(root, "drift.png"), figure, opts)
    return result, figure


def _timings(record: dict, started: float, stats: dict) -> dict:
    """The manifest's timings: the run's start, this launch's, the end, throughput and start-up."""
    return {
        "started": record["started"],
        "this_launch_started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        "attribution_seconds": round(stats["seconds"], 3),
        "images_per_second": round(stats["processed"] / stats["seconds"], 2) if stats["seconds"] else None,
        "startup_seconds": stats["startup_seconds"] and round(stats["startup_seconds"], 3),
        "steady_images_per_second": stats["steady_rate"] and round(stats["steady_rate"], 2),
    }
