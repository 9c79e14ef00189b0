"""Ray Train: the worker loop of :mod:`pipeline.train.trainer` in every worker of a ``TorchTrainer``.

Ray Train 2.60 (Train V2) pattern, as in Ray's checkpoint and fault-tolerance guides:

* ``ray.train.get_checkpoint()`` at the start of the loop: the latest reported checkpoint of this run
  (after a worker-group restart, or when the same ``RunConfig(name)`` is launched again);
* at the end of each epoch rank 0 writes the checkpoint dict (``torch.save`` of plain tensors and
  dicts, loaded back with ``weights_only=True``) into a temporary directory and every rank calls
  ``ray.train.report(metrics, checkpoint=...)`` (rank 0 with it, the others with None);
* ``CheckpointConfig`` keeps the best ``trainer.keep_checkpoints`` by validation loss (Ray always keeps
  the latest too), ``FailureConfig(max_failures)`` restarts a failed worker group from the latest;
* the run lives in ``RunConfig(storage_path=trainer.storage, name=RUN)``: a local directory or
  ``s3://bucket/prefix`` (through a pyarrow ``S3FileSystem`` built from ``storage.*`` / ``AWS_*``).

Ray itself: :func:`pipeline.raysession.ensure_ray` (an existing session, ``RAY_ADDRESS``'s cluster, or a
local one; credentials never in a ``runtime_env``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline import storage, tracking
from pipeline.config import Config
from pipeline.errors import WysiwycError
from pipeline.raysession import ensure_ray
from pipeline.train.trainer import run_name, worker_loop

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCORE = "monitored_loss"  # val_loss, or train_loss without a validation split


class RayRun:
    """The run object of :func:`pipeline.train.trainer.worker_loop` inside a Ray Train worker."""

    def __init__(self, config: Config, name: str):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.name = name
        self.root = storage.join(config.trainer.storage, name)
        self.opts = config.storage.options()

    def latest(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state, _ = ckpt.load_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
        return state

    def commit(self, state: dict | None, metrics: dict, best: bool) -> None:
        import ray.train

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if state is None:
            ray.train.report(numeric, checkpoint=None)
            return
        folder = tempfile.mkdtemp(prefix="wysiwyc-ckpt-")
        try:
            ckpt.save_checkpoint(state, os.path.join(folder, CHECKPOINT_FILE))
            ray.train.report(numeric, checkpoint=ray.train.Checkpoint.from_directory(folder))
        finally:  # report has persisted it to storage_path
            shutil.rmtree(folder, ignore_errors=True)
        if best:  # a stable URI for presets and scripts: RUN/best.pt, as with the local backend
            ckpt.save_checkpoint(state, storage.join(self.root, "best.pt"), self.opts)

    def write(self, file: str, text: str) -> None:
        storage.write_bytes(storage.join(self.root, file), text.encode(), self.opts)


def _train_func(payload: dict) -> dict:
    """Entry point of every Ray Train worker."""
    config, kind = payload["config"], payload["kind"]
    run = RayRun(config, payload["name"])
    return worker_loop(
        kind,
        config,
        run,
        payload["where"] if run.rank == 0 else None,
        progress=False,
        on_epoch_start=payload.get("on_epoch_start"),
    )


# ---------------------------------------------------------------- driver side


def absolute_paths(config: Config) -> Config:
    """A copy of ``config`` with local paths made absolute (Ray workers run in other directories)."""

    def fix(value: str | None) -> str | None:
        if not value or storage.is_s3(value) or "://" in value or value.startswith("models:/"):
            return value
        return str(Path(value).resolve())

    out = config.model_copy(deep=True)
    out.data.train, out.data.val, out.data.test = fix(out.data.train), fix(out.data.val), fix(out.data.test)
    out.trainer.storage = fix(out.trainer.storage)
    e = out.explanandum
    e.model, e.weights = fix(e.model), fix(e.weights)
    if isinstance(e.classes, str):
        e.classes = fix(e.classes)
    out.explanandum.pretrained_backbone = fix(out.explanandum.pretrained_backbone)
    out.explainer.backbone_weights = fix(out.explainer.backbone_weights)
    if out.tracking.uri and not out.tracking.uri.startswith(("http://", "https://", "sqlite:", "databricks")):
        out.tracking.uri = fix(out.tracking.uri)
    return out


def storage_target(config: Config, root: str | None = None) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig`` of ``root`` (default ``trainer.storage``):
    the local path, or bucket/prefix + a pyarrow S3 filesystem."""
    root = root or config.trainer.storage
    if not storage.is_s3(root):
        return root, None
    bucket, prefix = storage.split_s3(root)
    return f"{bucket}/{prefix}".rstrip("/"), storage.arrow_filesystem(config.storage.options())


def checkpoint_uri(root: str, path: str) -> str:
    """URI of the checkpoint file in a Ray checkpoint directory ``path`` (as Ray reports it) under ``root``."""
    path = path.rstrip("/") + "/" + CHECKPOINT_FILE
    return storage.redact("s3://" + path if storage.is_s3(root) else path)


def _unwrap(exc: BaseException) -> BaseException:
    """The first worker's own error of a Ray ``TrainingFailedError`` (a WysiwycError reads best)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for error in failures.values():
        if isinstance(error, WysiwycError):
            return error
        cause = getattr(error, "cause", None) or error.__cause__
        if isinstance(cause, WysiwycError):
            return cause
    return exc


def fit_ray(kind: str, config: Config, on_epoch_start=None, callbacks: list | None = None) -> dict:
    """Train on Ray Train (``trainer.num_workers`` DDP workers); resumable by run name.

    Args:
        kind: ``"classifier"`` or ``"explainer"``.
        config: the resolved config.
        on_epoch_start: optional picklable callable ``(epoch, rank)`` that every worker runs before
            each epoch (see :func:`pipeline.train.trainer.worker_loop`): instrumentation or fault
            injection; ``None`` in the CLI.
        callbacks: Ray Train callbacks of the run, e.g. ``TuneReportCallback`` in a sweep's trial (so
            Tune sees every epoch's metrics).

    Returns:
        The worker loop's summary (rank 0) plus ``checkpoint`` (URI of the best checkpoint by
        validation loss), ``last_checkpoint`` (the last epoch's), ``metrics`` (history.json URI),
        ``storage`` (the Ray run directory).
    """
    name = run_name(kind, config)  # from the config as given: the same name for the same run
    config = absolute_paths(config)
    where = tracking.resolve(config, name)
    t = config.trainer
    ensure_ray(
        config.storage.options(),
        num_cpus=max(os.cpu_count() or 1, int(t.num_workers * t.cpus_per_worker + 0.999)),
        use_gpu=t.use_gpu,
    )
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = storage_target(config)
    trainer = TorchTrainer(
        _train_func,
        train_loop_config={
            "kind": kind,
            "config": config,
            "name": name,
            "where": where,
            "on_epoch_start": on_epoch_start,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="min"
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
    summary = dict(result.return_value or {})
    best = result.get_best_checkpoint(SCORE, "min") or result.checkpoint
    if best is None:
        raise WysiwycError(f"run {name} reported no checkpoint (see the Ray logs)")
    uri = checkpoint_uri(config.trainer.storage, best.path)
    root = storage.join(config.trainer.storage, name)
    tracking.finish(where, summary.get("mlflow_run_id"), uri, root, config.storage.options())
    last = checkpoint_uri(config.trainer.storage, result.checkpoint.path) if result.checkpoint else uri
    return {
        "checkpoint": uri,
        "last_checkpoint": last,
        "metrics": storage.redact(storage.join(root, "history.json")),
        "storage": storage.redact(root),
        "num_workers": t.num_workers,
        **summary,
    }
