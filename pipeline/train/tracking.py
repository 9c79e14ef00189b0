"""MLflow tracking of a training run (rank 0 only).

The driver resolves *where* (:func:`resolve`: tracking URI, experiment id) before any worker starts,
so that every process agrees and relative paths do not depend on a Ray worker's working directory.
Rank 0 then opens a :class:`Tracker` inside the worker loop; a resumed run passes the MLflow run id it
found in the checkpoint, so the relaunched job continues the same MLflow run.

What a run holds: params = the whole resolved config flattened (``loss.entropy_regularizer`` …,
secrets masked), metrics per optimizer step (every loss term, ``step/…``) and per epoch
(``train_…``, ``val_…``, ``images_per_second``, ``data_wait_share``), the training input (shard
manifest digest) via ``mlflow.log_input``, the resolved config YAML, a mask overlay grid of fixed
validation images per epoch (Explainer) and the best checkpoint URI as the tag ``best_checkpoint``.
With ``tracking.parent_run_id`` (a sweep's trial) the run is created as a child of that run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)

# keep MLflow from phoning home (STACK.md); set before mlflow is imported anywhere
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass(frozen=True)
class Where:
    """Where a run is tracked: URI, experiment id (both resolved on the driver), optional parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str | None = None  # a sweep's run: the run is its child (tag mlflow.parentRunId)


def default_uri(config) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded store: one sqlite file for every
    run, ``trainer.storage/mlflow.db`` (``runs/mlflow.db`` when ``trainer.storage`` is on s3)."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(config.trainer.storage) if not storage.is_s3(config.trainer.storage) else Path("runs")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve(config, name: str) -> Where | None:
    """Tracking URI and experiment id of ``config`` (creates the experiment); None when tracking is off."""
    if not config.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    uri = default_uri(config)
    client = MlflowClient(tracking_uri=uri)
    parent = config.tracking.parent_run_id
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return Where(uri, experiment.experiment_id, parent)
    # a file store / sqlite store puts artifacts under ./mlruns of whoever creates the experiment (a
    # Ray worker's working directory): pin them next to the database instead
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return Where(uri, client.create_experiment(config.tracking.experiment, artifact_location=location), parent)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"loss": {"entropy_regularizer": 1.0}}`` → ``{"loss.entropy_regularizer": "1.0"}``."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = str(value)[:6000]
    return out


class Tracker:
    """One MLflow run, written by rank 0: params, buffered step metrics, epoch metrics, artifacts."""

    def __init__(self, where: Where, run_name: str, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=where.uri)
        self.uri = where.uri
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except Exception as exc:  # deleted or another tracking server
                log.warning("MLflow run %s of the checkpoint is not reachable (%s); starting a new one", run_id, exc)
                run_id = None
        if run_id is None:
            tags = {"wysiwyc.run_name": run_name}
            if where.parent_run_id:
                tags["mlflow.parentRunId"] = where.parent_run_id
            run = self.client.create_run(where.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._existing_params = dict(run.data.params)
        self._steps: list = []
        self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, str]) -> None:
        """Log params not logged yet; a resumed run with changed values records them as tags."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in params.items() if k not in self._existing_params]
        changed = [RunTag(f"resumed_with.{k}", v) for k, v in params.items()
                   if k in self._existing_params and self._existing_params[k] != v]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)
        self._existing_params.update(params)

    def log_input(self, manifest: dict, context: str) -> None:
        """The shard manifest as the run's dataset input (name, digest, source URI)."""
        import mlflow.data
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = mlflow.data.dataset_source_registry.resolve_dataset_source(storage.redact(manifest["url"]))
        dataset = MetaDataset(source=source, name=manifest.get("split") or Path(manifest["url"]).name,
                              digest=manifest["digest"][:36])
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer per-step metrics (flushed every 10 s and at each epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._steps.extend(Metric(f"step/{k}", float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._steps), 1000):
            self.client.log_batch(self.run_id, metrics=self._steps[i:i + 1000])
        self._steps, self._last_flush = [], time.monotonic()

    def log_epoch(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        self.flush()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in record.items()
                                                    if isinstance(v, (int, float)) and k != "step"])

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Write ``data`` as the artifact ``artifact_file`` (e.g. ``overlays/epoch_001.png``)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def finish(where: Where | None, run_id: str | None, best_checkpoint: str) -> None:
    """Tag the run with its best checkpoint URI (driver side, after training)."""
    if where is None or run_id is None:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=where.uri).set_tag(run_id, "best_checkpoint", best_checkpoint)
