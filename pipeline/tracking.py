"""MLflow tracking of a training run (rank 0 only), which never costs training work.

The driver resolves *where* (:func:`resolve`: tracking URI, experiment) before any worker starts,
so that every process agrees and relative paths do not depend on a Ray worker's working directory.
Rank 0 then opens a :class:`Tracker` inside the worker loop; a resumed run passes the MLflow run id it
found in the checkpoint, so the relaunched job continues the same MLflow run.

What a run holds: params = the whole resolved config flattened (``loss.entropy_regularizer`` …,
secrets masked), metrics per optimizer step (every loss term, ``step/…``) and per epoch
(``train_…``, ``val_…``, ``images_per_second``, ``data_wait_share``), the training input (shard
manifest digest) via ``mlflow.log_input``, the resolved config YAML, a mask overlay grid of fixed
validation images per epoch (Explainer) and the best checkpoint URI as the tag ``best_checkpoint``.
With ``tracking.parent_run_id`` (a sweep's trial) the run is created as a child of that run.

A tracking server that stops answering costs no training: every call is bounded (:func:`bounded`:
a 10 s timeout and one retry, where MLflow's defaults retry a dead server for ~4 minutes), the worker
loop saves each epoch's checkpoint *before* it logs, and a failed call turns the tracker offline with
one warning. Offline, every record waits in a queue; at each epoch's end one bounded probe checks the
server, and when it answers the queue is sent in order. What is still unsent at the end of the run
is kept in ``RUN/tracking_pending.json`` (:data:`PENDING_FILE`, written after the checkpoint) and sent
by the next launch of the same run (a resume, or relaunching a finished run) before anything else.
The MLflow run ends with its real status (``FINISHED`` / ``FAILED``) once the server has it.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import WysiwycError

log = logging.getLogger(__name__)

# MLflow prints "View run NAME at: TRACKING_URI/#/…" on stdout when a run ends: with credentials inside the URI
# (http://user:password@host, which some teams write) that line puts the password into every log. Every process
# that logs through this module (the CLI, Ray's workers) imports it; an explicit setting is kept
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PENDING_FILE = "tracking_pending.json"
# MLflow's HTTP client settings while this module talks to the server; a value the user exported wins
_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
_PARAMS_PER_CALL = 100


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """MLflow calls inside the block give up after ~20 s at most (timeout 10 s, one retry), and urllib3's
    per-retry warnings stay quiet; the environment is as it was afterwards."""
    saved = {k: os.environ.get(k) for k in _BOUNDS}
    for key, value in _BOUNDS.items():
        os.environ.setdefault(key, value)
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(exc: BaseException) -> str:
    return storage.redact(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


@dataclass(frozen=True)
class Where:
    """Where a run is tracked (resolved on the driver): URI, experiment name and, when the server
    answered, its id; optional parent run."""

    uri: str
    experiment: str
    experiment_id: str | None = None  # None: the server did not answer; found or created when it does
    parent_run_id: str | None = None  # a sweep's run: the run is its child (tag mlflow.parentRunId)


def resolve_uri(configured: str | None, embedded_folder: str) -> str:
    """The one rule for a tracking URI: ``configured`` (``tracking.uri``), else ``MLFLOW_TRACKING_URI``
    (MLflow's own convention), else the embedded store ``embedded_folder/mlflow.db`` (``runs/mlflow.db``
    when the folder is on s3, where sqlite cannot live)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return embedded_uri("runs" if storage.is_s3(embedded_folder) else embedded_folder)


def embedded_uri(folder: str | os.PathLike) -> str:
    """The embedded tracking store of a local folder: the sqlite file ``folder/mlflow.db`` (the folder is
    made)."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_uri(config) -> str:
    """The training runs' and registry's tracking URI (:func:`resolve_uri`; embedded: one sqlite file for
    every run, ``trainer.storage/mlflow.db``)."""
    return resolve_uri(config.tracking.uri, config.trainer.storage)


# ---------------------------------------------------------------- the registry: where it is, what a URI names

REGISTRY_PREFIX = "models:/"
# the version tags holding a checkpoint's sha256 (how a rerun finds its version, an Explainer its classifier, a
# loader that the downloaded file is the registered one)
EXPLAINER_SHA, CLASSIFIER_SHA = "wysiwyc.explainer_sha256", "wysiwyc.classifier_sha256"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def current_user() -> str:
    """Who acts (``promoted_by``, ``registered_by``, a lease's holder): the MLflow identity the client
    authenticates as (``MLFLOW_TRACKING_USERNAME``), else the operating-system user."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def registry_uri(config=None) -> str:
    """The registry's tracking URI: the one training logs to (:func:`default_uri`:
    ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded ``trainer.storage/mlflow.db``)."""
    return default_uri(config or Config())


def mlflow_client(uri: str):
    """A tracking + registry client of ``uri``."""
    from mlflow.tracking import MlflowClient  # mlflow: ~3 s to import, not for `wysiwyc --help`

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def alias_versions(client, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model."""
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/V`` or ``models:/NAME@alias``.

    Raises:
        WysiwycError: not a registry URI, or it does not resolve (no such model, version or alias,
            or no registry answering at the tracking URI).
    """
    from mlflow.exceptions import MlflowException  # mlflow: ~3 s to import, not for `wysiwyc --help`

    match = _MODEL_URI.match(str(model_uri))
    if not match:
        raise WysiwycError(
            f"{model_uri!r} is not a registry URI: use models:/NAME/VERSION or models:/NAME@ALIAS "
            f"(e.g. models:/my-explainer@champion)"
        )
    uri = tracking_uri or registry_uri()
    client = mlflow_client(uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        aliases = alias_versions(client, name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException as exc:
        if is_missing(exc):
            raise WysiwycError(
                f"{model_uri}: no registered model {name!r} in the registry at {storage.redact(uri)}; "
                f"register one with `wysiwyc register --checkpoint URI --name {name}` (or check "
                f"tracking.uri / MLFLOW_TRACKING_URI)"
            ) from None
        code, first = getattr(exc, "error_code", ""), (str(exc).splitlines() or [""])[0]
        if code == "PERMISSION_DENIED" or "403" in first:
            # MLflow's basic-auth answers 403 for a model the identity may not read and for one that does not exist
            raise WysiwycError(
                f"{model_uri}: the registry at {storage.redact(uri)} refused {current_user()!r} (permission "
                f"denied): no registered model {name!r} that this identity may read. Check the name, the identity "
                f"(MLFLOW_TRACKING_USERNAME / _PASSWORD), or have the model's owner grant READ (registry.readers); "
                f"register one with `wysiwyc register --checkpoint URI --name {name}`"
            ) from None
        if code == "UNAUTHENTICATED" or "401" in first:
            raise WysiwycError(
                f"{model_uri}: the registry at {storage.redact(uri)} needs credentials: set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the local stack's: `source` its env file)"
            ) from None
        raise WysiwycError(
            f"{model_uri}: the registry at {storage.redact(uri)} did not answer "
            f"({first[:200]}); check tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    found = aliases.get(alias) if alias else (version if int(version) in versions else None)
    if found is not None:
        return name, found
    what = f"alias {alias!r}" if alias else f"version {version}"
    have = ", ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or "no aliases"
    raise WysiwycError(
        f"{model_uri}: registered model {name!r} has no {what} (versions {versions}, {have}); "
        f"use an existing version, or promote one: `wysiwyc promote --name {name} --version V`"
    )


@dataclass
class Downloaded:
    """A registered version's files in a temporary folder (:func:`downloaded_version`)."""

    name: str
    version: str
    folder: Path  # the version's model folder (MLmodel, artifacts/, data/ …)
    tags: dict


@contextlib.contextmanager
def downloaded_version(model_uri: str, tracking_uri: str | None = None) -> Iterator[Downloaded]:
    """Resolve ``models:/NAME@alias`` or ``models:/NAME/V`` once and download the version's model folder
    into a temporary folder, removed when the ``with`` block ends.

    Raises:
        WysiwycError: the URI does not resolve or its files cannot be downloaded.
    """
    import mlflow.artifacts  # mlflow: ~3 s to import, only for a registered version
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or registry_uri()
    name, version = resolve_model(model_uri, uri)
    client = mlflow_client(uri)
    with tempfile.TemporaryDirectory(prefix="wysiwyc-model-") as tmp:
        try:
            source = client.get_model_version_download_uri(name, version)
            folder = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        except MlflowException as exc:
            raise WysiwycError(
                f"{model_uri} (version {version}): its files could not be downloaded from the "
                f"registry at {storage.redact(uri)}: {str(exc).splitlines()[0][:300]}"
            ) from None
        log.info("%s resolved to models:/%s/%s", model_uri, name, version)
        yield Downloaded(name, str(version), Path(folder), dict(client.get_model_version(name, version).tags))


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, created if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # a file store / sqlite store puts artifacts under ./mlruns of whoever creates the experiment (a
    # Ray worker's working directory): pin them next to the database instead
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def resolve(config, name: str) -> Where | None:
    """Tracking URI and experiment of ``config`` (creates the experiment); None when tracking is off.

    A server that does not answer is no error: the run trains and its tracker works offline (one
    warning here) until the server answers.
    """
    if not config.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    uri = default_uri(config)
    experiment, parent = config.tracking.experiment, config.tracking.parent_run_id
    try:
        with bounded():
            return Where(uri, experiment, _experiment_id(MlflowClient(tracking_uri=uri), uri, experiment), parent)
    except Exception as exc:  # noqa: BLE001 - tracking must not stop training
        log.warning(
            "tracking: MLflow at %s does not answer (%s); run %s trains anyway and logs when it answers",
            storage.redact(uri),
            _reason(exc),
            name,
        )
        return Where(uri, experiment, None, parent)


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
    """One MLflow run, written by rank 0: params, buffered step metrics, epoch metrics, artifacts.

    No method raises for the server (see the module docstring): records go through a queue that is
    sent in order while the server answers and waits while it does not.

    Args:
        where: from :func:`resolve`.
        run_name: the run's name (tag ``wysiwyc.run_name``).
        run_id: the MLflow run to continue (a resumed run's), or None for a new one.
        journal: URL of ``RUN/tracking_pending.json``: records an earlier launch could not send are
            sent first, and what this one cannot send is kept there (:meth:`save`); None: in memory.
        opts: storage options of ``journal``.
    """

    def __init__(self, where: Where, run_name: str, run_id: str | None = None, journal: str | None = None, opts=None):
        from mlflow.tracking import MlflowClient

        self.uri, self.where, self.run_name = where.uri, where, run_name
        self.client = MlflowClient(tracking_uri=where.uri)
        self.journal, self.opts = journal, opts
        self.run_id: str | None = None
        self._existing_params: dict[str, str] = {}
        self._queue: list[dict] = []
        self._online, self._warned, self._journal_written = True, False, False
        earlier = self._load_journal()
        self._queue.append({"op": "open", "run_id": run_id or earlier.get("run_id") or None})
        # an earlier launch's end status is dropped: this launch ends the run with its own
        self._queue.extend(op for op in earlier.get("ops", []) if op["op"] not in ("open", "status"))
        self._steps: list = []
        self._last_flush = time.monotonic()
        self._send()

    # ------------------------------------------------------------------ what the loop calls

    @property
    def pending(self) -> int:
        """Records not sent yet."""
        return len(self._queue) + len(self._steps)

    def log_params(self, params: dict[str, str]) -> None:
        """Log params not logged yet; a resumed run with changed values records them as tags."""
        self._submit({"op": "params", "params": dict(params)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"op": "tags", "tags": dict(tags)})

    def log_input(self, manifest: dict, context: str) -> None:
        """The shard manifest as the run's dataset input (name, digest, source URI)."""
        self._submit(
            {
                "op": "input",
                "source": storage.redact(manifest["url"]),
                "name": manifest.get("split") or Path(manifest["url"]).name,
                "digest": manifest["digest"][:36],
                "context": context,
            }
        )

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer per-step metrics (sent every 10 s and at each epoch)."""
        now = int(time.time() * 1000)
        self._steps.extend([f"step/{k}", float(v), now, step] for k, v in metrics.items())
        if self._online and time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        """Send the buffered step metrics (or queue them while the server is away)."""
        steps, self._steps, self._last_flush = self._steps, [], time.monotonic()
        for i in range(0, len(steps), _METRICS_PER_CALL):
            self._submit({"op": "metrics", "metrics": steps[i : i + _METRICS_PER_CALL]})

    def log_epoch(self, step: int, record: dict) -> None:
        """An epoch's metrics; while offline, first one bounded probe of the server."""
        self.flush()
        now = int(time.time() * 1000)
        self._submit(
            {
                "op": "metrics",
                "metrics": [
                    [k, float(v), now, step] for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
                ],
            },
            probe=True,
        )

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Write ``data`` as the artifact ``artifact_file`` (e.g. ``overlays/epoch_001.png``)."""
        self._submit({"op": "artifact", "file": artifact_file, "data": base64.b64encode(data).decode()})

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status``; what the server did not take stays in the journal."""
        self.flush()
        self._submit({"op": "status", "status": status}, probe=True)
        self.save()
        if self._queue:
            where = f"in {storage.redact(self.journal)}" if self.journal else "in memory and are lost"
            log.warning(
                "tracking: %d records of run %s wait %s; launching the same run again sends them",
                len(self._queue),
                self.run_name,
                where,
            )

    def save(self) -> None:
        """Keep the unsent records in the journal (and empty it once everything is sent)."""
        if self.journal is None or (not self._queue and not self._journal_written):
            return
        body = {"run_id": self.run_id, "ops": self._queue}
        try:
            storage.write_text(self.journal, json.dumps(body), self.opts)
            self._journal_written = bool(self._queue)
        except Exception as exc:  # noqa: BLE001 - a failed journal write must not stop training either
            log.warning("tracking: could not write %s (%s)", storage.redact(self.journal), _reason(exc))

    # ------------------------------------------------------------------ the queue

    def _load_journal(self) -> dict:
        if self.journal is None:
            return {}
        try:
            earlier = json.loads(storage.read_text(self.journal, self.opts))
        except storage.NotFound:
            return {}
        except Exception as exc:  # noqa: BLE001
            log.warning("tracking: ignoring unreadable %s (%s)", storage.redact(self.journal), _reason(exc))
            return {}
        self._journal_written = True
        if earlier.get("ops"):
            log.info(
                "tracking: sending %d records an earlier launch of %s could not send",
                len(earlier["ops"]),
                self.run_name,
            )
        return earlier

    def _submit(self, op: dict, probe: bool = False) -> None:
        self._queue.append(op)
        if self._online or probe:
            self._send()

    def _send(self) -> None:
        """Send the queue in order; at the first failure go offline (one warning) and keep the rest."""
        with bounded():
            while self._queue:
                try:
                    self._apply(self.client, self._queue[0])
                except Exception as exc:  # noqa: BLE001 - tracking must never cost training work
                    if self._online and not self._warned:
                        log.warning(
                            "tracking: MLflow at %s stopped answering (%s); training goes on and the "
                            "records wait until it answers again",
                            storage.redact(self.uri),
                            _reason(exc),
                        )
                        self._warned = True
                    self._online = False
                    return
                self._queue.pop(0)
        if not self._online:
            log.warning("tracking: MLflow at %s answers again; the waiting records are sent", storage.redact(self.uri))
        self._online = True

    def _apply(self, client, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "open":
            self._open(client, op["run_id"])
        elif kind == "params":
            params = op["params"]
            new = [Param(k, v) for k, v in params.items() if k not in self._existing_params]
            changed = [
                RunTag(f"resumed_with.{k}", v)
                for k, v in params.items()
                if k in self._existing_params and self._existing_params[k] != v
            ]
            for i in range(0, len(new), _PARAMS_PER_CALL):
                client.log_batch(self.run_id, params=new[i : i + _PARAMS_PER_CALL])
            if changed:
                client.log_batch(self.run_id, tags=changed)
            self._existing_params.update(params)
        elif kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "input":
            self._log_input(client, op)
        elif kind == "artifact":
            folder, _, name = op["file"].rpartition("/")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(base64.b64decode(op["data"]))
                client.log_artifact(self.run_id, str(path), artifact_path=folder or None)
        elif kind == "status":
            client.set_terminated(self.run_id, status=op["status"])
        else:  # pragma: no cover - written by this class only
            raise ValueError(f"unknown tracking record {kind!r}")

    def _open(self, client, run_id: str | None) -> None:
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except Exception as exc:
                if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise  # the server is away: try again later
                log.warning(
                    "MLflow run %s of the checkpoint is not on this server (%s); starting a new one",
                    run_id,
                    _reason(exc),
                )
                run_id = None
            else:
                client.update_run(run_id, status="RUNNING")
        if run_id is None:
            experiment_id = self.where.experiment_id or _experiment_id(client, self.uri, self.where.experiment)
            tags = {"wysiwyc.run_name": self.run_name}
            if self.where.parent_run_id:
                tags["mlflow.parentRunId"] = self.where.parent_run_id
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._existing_params = dict(run.data.params)

    def _log_input(self, client, op: dict) -> None:
        import mlflow.data
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = mlflow.data.dataset_source_registry.resolve_dataset_source(op["source"])
        dataset = MetaDataset(source=source, name=op["name"], digest=op["digest"])
        client.log_inputs(
            self.run_id,
            datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", op["context"])])],
        )


def journal_url(root: str) -> str:
    """``RUN/tracking_pending.json`` of the run directory ``root``."""
    return storage.join(root, PENDING_FILE)


def finish(where: Where | None, run_id: str | None, best_checkpoint: str, root: str, opts=None) -> None:
    """Tag the run with its best checkpoint URI (driver side, after training); while the server is away
    (or the run was never created on it) the tag joins the records waiting in the run's journal."""
    if where is None:
        return
    from mlflow.tracking import MlflowClient

    tags = {"best_checkpoint": best_checkpoint}
    url = journal_url(root)
    try:
        waiting = json.loads(storage.read_text(url, opts))
    except storage.NotFound:
        waiting = {}
    if run_id and not waiting.get("ops"):
        try:
            with bounded():
                MlflowClient(tracking_uri=where.uri).set_tag(run_id, "best_checkpoint", best_checkpoint)
            return
        except Exception as exc:  # noqa: BLE001 - the training is done and saved: never fail it here
            log.warning("tracking: could not tag run %s (%s)", run_id, _reason(exc))
    waiting = {
        "run_id": waiting.get("run_id") or run_id,
        "ops": [*waiting.get("ops", []), {"op": "tags", "tags": tags}],
    }
    storage.write_text(url, json.dumps(waiting), opts)
    log.warning(
        "tracking: MLflow at %s did not take %d records of this run (the training itself is complete and "
        "saved); they wait in %s and are sent when the same run is launched again",
        storage.redact(where.uri),
        len(waiting["ops"]),
        storage.redact(url),
    )
