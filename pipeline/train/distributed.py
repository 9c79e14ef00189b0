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

Ray itself: an existing session (``ray.init`` done by the caller, or ``RAY_ADDRESS``) is used as is;
otherwise a local one is started with ``num_cpus`` = max(cores, workers × cpus_per_worker), no
dashboard, token auth off and its session files under ``runs/ray/r`` (``runs/ray``: or
``$WYSIWYC_RAY_TMP``, a folder only its owner can enter, 0700; :func:`ray_temp_dir`).

Credentials never travel in a ``runtime_env``: Ray writes a job's runtime environment into the
session's logs (``runtime_env_agent.log``). A local Ray is started with them in its environment,
so its workers inherit them; on a cluster (``RAY_ADDRESS``) the workers take them from the pod's
identity (IRSA) or a mounted secret, and the ``runtime_env`` carries only the settings that are no
secret (endpoint, region, tracking URI, ...): :func:`worker_env`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import WysiwycError
from pipeline.train import checkpoint as ckpt
from pipeline.train import tracking

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCORE = "monitored_loss"  # val_loss, or train_loss without a validation split
_ENV_PREFIXES = ("AWS_", "MLFLOW_")


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
    from pipeline.train.trainer import worker_loop

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
        if not value or storage.is_s3(value) or "://" in value:
            return value
        return str(Path(value).resolve())

    out = config.model_copy(deep=True)
    out.data.train, out.data.val, out.data.test = fix(out.data.train), fix(out.data.val), fix(out.data.test)
    out.trainer.storage = fix(out.trainer.storage)
    out.explanandum.checkpoint = fix(out.explanandum.checkpoint)
    out.explanandum.pretrained_backbone = fix(out.explanandum.pretrained_backbone)
    out.explainer.backbone_weights = fix(out.explainer.backbone_weights)
    if out.tracking.uri and not out.tracking.uri.startswith(("http://", "https://", "sqlite:", "databricks")):
        out.tracking.uri = fix(out.tracking.uri)
    return out


def worker_env(config: Config, credentials: bool = False) -> dict[str, str]:
    """Environment for the workers: ``AWS_*`` / ``MLFLOW_*`` of this process and of ``storage.*``.

    Args:
        credentials: keep the credentials (``storage.CREDENTIAL_ENV_VARS``): only for a local Ray's own
            environment, never for a ``runtime_env`` (see the module docstring).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    env.update(config.storage.options().to_env())
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if credentials:
        return env
    return {k: v for k, v in env.items() if k not in storage.CREDENTIAL_ENV_VARS}


def ensure_ray(config: Config, num_cpus: int | None = None) -> None:
    """Use the running Ray session, or ``RAY_ADDRESS``'s cluster, or start a local one.

    ``num_cpus``: logical CPUs of a local cluster (default: max(cores, the workers' reservation)).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # 2.60 turns token auth on for local clusters
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": worker_env(config)}, log_to_driver=False)
        return
    t = config.trainer
    cpus = num_cpus or max(os.cpu_count() or 1, int(t.num_workers * t.cpus_per_worker + 0.999))
    temp = ray_temp_dir()
    # the local Ray's processes (and so every worker) inherit this process's environment at ray.init:
    # the credentials of storage.* join it for the start, and no runtime_env (which Ray logs) is needed
    saved = dict(os.environ)
    os.environ.update(worker_env(config, credentials=True))
    try:
        ray.init(
            num_cpus=cpus,
            num_gpus=None if t.use_gpu else 0,
            include_dashboard=False,
            _temp_dir=str(temp),
            log_to_driver=False,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


# what Ray appends to its temp dir for a socket: /session_2026-12-05_19-10-34_654405_29151/sockets/plasma_store
_RAY_SOCKET_SUFFIX = 62
_MAX_SOCKET_PATH = 107  # AF_UNIX


def ray_temp_dir() -> Path:
    """The local Ray's temp dir: ``r`` in ``$WYSIWYC_RAY_TMP``, else in ``runs/ray`` of the working folder.

    Ray makes its folders 0777 (every process it starts applies it again): they live in a folder of ours
    that only its owner may enter (0700), so the session's logs and sockets are that user's alone. A
    session's socket paths must stay under 108 bytes: when the folder is too deep for that (a deep working
    folder), ``/tmp/wysiwyc-ray-UID`` is used instead (said in a log line).

    Raises:
        WysiwycError: the fallback folder exists and belongs to another user.
    """
    private = Path(os.environ.get("WYSIWYC_RAY_TMP", "runs/ray")).resolve()
    if len(str(private / "r")) + _RAY_SOCKET_SUFFIX > _MAX_SOCKET_PATH:
        fallback = Path("/tmp") / f"wysiwyc-ray-{os.getuid()}"
        log.info("Ray's session folder goes to %s: %s is too deep for its socket paths", fallback, private)
        private = fallback
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private.stat().st_uid != os.getuid():
        raise WysiwycError(f"{private} belongs to another user: set WYSIWYC_RAY_TMP to a short folder of yours")
    private.chmod(0o700)
    return private / "r"


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
    from pipeline.train.trainer import run_name

    name = run_name(kind, config)  # from the config as given: the same name for the same run
    config = absolute_paths(config)
    where = tracking.resolve(config, name)
    ensure_ray(config)
    import ray.train
    from ray.train.torch import TorchTrainer

    t = config.trainer
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
