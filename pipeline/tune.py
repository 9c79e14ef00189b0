"""λ sweeps on Ray Tune: ``run_sweep(config) -> summary`` and ``read_sweep(name, config)``.

A sweep file (``configs/sweeps/*.yaml``) holds a ``sweep`` section (:class:`pipeline.config.SweepConfig`)
and, optionally, any other section. :func:`load_sweep` builds the trials' base config: the ``sweep.base``
training config (a relative path is relative to the sweep file's folder), then the sweep file's other
sections, then the command-line overrides; each trial adds its sampled ``sweep.space`` values.

Ray Tune over Ray Train (the Train V2 API): a function trainable per trial builds the trial's config
and calls :func:`pipeline.train.distributed.fit_ray` — the one training loop — with a
``TuneReportCallback``, so Tune (and ASHA) sees every epoch's validation metrics. The trial's training
run is ``trainer.run_name = NAME-TRIAL_ID`` under ``sweep.storage/NAME/trials/`` (checkpoints,
``history.json``; ``trial.json`` once it finished). Everything of a sweep lives under
``sweep.storage/NAME/``: Tune's experiment state, the trials, and at the end ``sweep.json``, ``table.md``,
``table.csv`` and ``selection.png``.

* A failed trial is recorded (status ``failed`` with its error) and the others go on. A trial that Tune
  stops (ASHA) or that fails has its TorchTrainer's placement group released by the driver (a Ray 2.60
  workaround, see :func:`_release_callback`), so the next trials get the CPUs/GPUs.
* Launching the same NAME again resumes (``Tuner.restore``): finished trials are kept as they are,
  unfinished ones continue (their training run resumes from its own latest checkpoint), failed ones are
  rerun when ``sweep.retry_failed``. A trial whose ``trial.json`` exists is never trained again (Tune
  snapshots its state every ~10 s: a kill right after a trial ended would otherwise rerun it).
* MLflow: one parent run ``NAME`` (sweep settings and ``space.*`` as params; at the end ``best.*``
  params/tags, the table, the plot and ``sweep.json`` as artifacts) and one child run per trial
  (``tracking.parent_run_id``: the training run's own tracking, tag ``mlflow.parentRunId``) with the
  whole trial config as params (``loss.entropy_regularizer`` … — the paper's λ names) and the
  per-epoch metrics. Parent and children use one tracking URI, by the rule training and the registry
  follow: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else an sqlite file
  ``sweep.storage/NAME/mlflow.db`` (``runs/mlflow.db`` when the storage is s3://).
* Selection: ``sweep.metric`` of each trial's last reported epoch (default ``val_selection``, the
  classifier-only score defined in :mod:`pipeline.train.steps`; ``val_c_iou`` / ``val_d_f1`` when
  the validation split has segmentation); the trial's checkpoint is the one of that same epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline import figures, storage, tracking
from pipeline.config import Config, config_field, config_file, load_config, section_of
from pipeline.errors import WysiwycError
from pipeline.raysession import ensure_ray
from pipeline.train.distributed import absolute_paths, checkpoint_uri, fit_ray, storage_target

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
STATE_FILE = "state.json"
TRIAL_FILE = "trial.json"
PLACEMENT_GROUP_FILE = "placement_group"
TRIALS = "trials"
# space keys the sweep itself sets (where a trial runs and is tracked) or that hold secrets
_RESERVED = ("sweep.", "tracking.", "storage.", "trainer.run_name", "trainer.storage")
# metrics shown in the table besides sweep.metric (when the trials report them)
_TABLE_METRICS = ("val_selection", "val_f1", "val_mask_area", "val_loss", "val_c_iou", "val_d_f1")


# ---------------------------------------------------------------- config


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """The trials' base config with the sweep file's ``sweep`` section (``sweep.base`` made absolute).

    Args:
        path: the sweep file.
        overrides: ``key=value`` strings; they apply to the sweep file (``sweep.*`` and every other key).

    Raises:
        WysiwycError: an invalid sweep file, base config or space key.
    """
    overrides = list(overrides or [])
    path = config_file(path)
    # the sweep file itself, with its sweep.* overrides; every other override is validated below, on top of
    # the base config (rules across keys, e.g. explainer.backbone_weights with the base's explainer.init,
    # only hold there)
    sweep_file = load_config(path, [o for o in overrides if o.strip().startswith("sweep.")])
    s = sweep_file.sweep
    if not s.base:
        raise WysiwycError(
            f"{path}: set sweep.base to the training config the trials start from "
            f"(e.g. ../cpu/explainer.yaml, relative to the sweep file's folder)"
        )
    base = Path(s.base)
    if not base.is_absolute():
        base = Path(path).parent / base
    if not base.is_file():
        raise WysiwycError(
            f"{path}: sweep.base {s.base} → {base} does not exist (a relative base is relative "
            f"to the sweep file's folder)"
        )
    raw = yaml.safe_load(Path(path).read_text()) or {}
    # the sweep file's other sections, then the command-line overrides, on top of the base file
    layered = [f"{k}={json.dumps(v)}" for k, v in _flatten({k: v for k, v in raw.items() if k != "sweep"}).items()]
    command_line = [o for o in overrides if not o.strip().startswith("sweep.")]
    config = load_config(base, layered + command_line)
    config.sweep = s.model_copy(update={"base": str(base.resolve())})
    _check_space(config)
    return config


def _field_path(key: str) -> None:
    """Fail unless the dotted ``key`` names a config field the space may set."""
    if key.startswith(_RESERVED) or key in (r.rstrip(".") for r in _RESERVED):
        raise WysiwycError(
            f"sweep.space key {key!r}: the sweep sets it itself (or it holds secrets); "
            f"sweep other keys (loss.*, optim.*, trainer.epochs …)"
        )
    try:
        field = config_field(key)
    except WysiwycError as exc:
        raise WysiwycError(f"sweep.space key {key!r}: {exc}") from None
    if section_of(field) is not None:
        raise WysiwycError(f"sweep.space key {key!r} is a section; name one of its keys")


def apply_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of ``config`` with dotted ``values`` set (validated as the config file would be)."""
    out = config.model_copy(deep=True)
    for key, value in values.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = getattr(node, part)
        try:
            setattr(node, last, value)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise WysiwycError(f"sweep.space {key}={value!r}: {reason}") from None
    return out


def _check_space(config: Config) -> None:
    s = config.sweep
    if not s.space:
        raise WysiwycError(
            "sweep.space is empty: give at least one key, e.g. loss.entropy_regularizer: {grid: [0.5, 1.0, 2.0]}"
        )
    for key, dim in s.space.items():
        _field_path(key)
        values = next(iter(dim.values()))
        for value in values:  # each value (or bound) must be valid on its own
            apply_values(config, {key: value})
    if s.kind == "classifier" and s.metric.endswith(("selection", "mask_area", "c_iou", "d_f1", "c_f1")):
        raise WysiwycError(
            f"sweep.metric {s.metric} is an Explainer metric; a classifier sweep reports "
            f"val_f1, val_accuracy, val_loss (and train_*)"
        )
    if s.metric.startswith("val_") and not config.data.val:
        raise WysiwycError(f"sweep.metric {s.metric} is a validation metric but data.val is not set")
    if s.kind == "explainer" and config.explainer.init == "distilled":
        raise WysiwycError(
            "sweep: explainer.init=distilled would distil the classifier again in every trial, and "
            f"its distillation epochs report no {s.metric} (Tune needs the metric from every epoch): "
            "sweep with explainer.init=scratch (as configs/cpu/sweep.yaml does) or backbone_file"
        )
    if s.scheduler == "asha" and s.grace_period > (s.max_t or config.trainer.epochs):
        raise WysiwycError(
            f"sweep.grace_period {s.grace_period} exceeds the epochs a trial runs "
            f"({s.max_t or config.trainer.epochs}): lower it or raise trainer.epochs / sweep.max_t"
        )


def _fingerprint(config: Config) -> str:
    """What must not change when a sweep is launched again under the same name."""
    s = config.sweep
    data = {
        "sweep": s.model_dump(
            mode="json", exclude={"max_concurrent_trials", "cpus_per_trial", "retry_failed", "storage"}
        ),
        "base": {k: v for k, v in config.model_dump(mode="json").items() if k not in ("sweep", "tracking")},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the trial (runs in a Tune actor)


def _trial(values: dict, base: Config, name: str, kind: str) -> None:
    """One trial: the base config + ``values``, trained by :func:`fit_ray` with Tune reporting."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = apply_values(base, values)
    config.trainer.run_name = f"{name}-{trial_id}"
    opts = config.storage.options()
    done_url = storage.join(config.trainer.storage, config.trainer.run_name, TRIAL_FILE)
    if storage.exists(done_url, opts):  # finished before the sweep was interrupted: report, don't retrain
        tune.report(json.loads(storage.read_text(done_url, opts))["metrics"])
        return
    pg_url = storage.join(config.trainer.storage, config.trainer.run_name, PLACEMENT_GROUP_FILE)
    summary = fit_ray(
        kind, config, on_epoch_start=_RecordPlacementGroup(pg_url, opts), callbacks=[TuneReportCallback()]
    )
    history = json.loads(storage.read_text(summary["metrics"], opts))
    storage.write_text(
        done_url,
        json.dumps(
            {
                "trial": trial_id,
                "params": values,
                "metrics": history[-1],
                "checkpoint": summary["last_checkpoint"],
                "best_loss_checkpoint": summary["checkpoint"],
                "mlflow_run_id": summary["mlflow_run_id"],
                "run_name": config.trainer.run_name,
            },
            indent=1,
        ),
        opts,
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _RecordPlacementGroup:
    """Rank 0, each epoch: note the worker group's placement group (see :func:`_release_callback`)."""

    def __init__(self, url: str, opts):
        self.url, self.opts = url, opts

    def __call__(self, epoch: int, rank: int) -> None:
        import ray.util

        group = ray.util.get_current_placement_group()
        if rank == 0 and group is not None:
            storage.write_text(self.url, group.id.hex(), self.opts)


def _release_callback(base: Config):
    """A Tune callback that removes the Ray Train placement group of a trial Tune stopped or failed.

    Ray 2.60: a trial stopped by Tune (ASHA) kills the trial's actor, but its TorchTrainer's worker
    placement group stays reserved until the driver exits — Train's own PlacementGroupCleaner needs the
    dashboard's state API (ray-project/ray#54305) — so later trials would wait for CPUs forever.
    """
    from ray import tune

    class ReleaseStoppedTrials(tune.Callback):
        def _release(self, trial) -> None:
            import ray
            from ray.util import placement_group_table, remove_placement_group
            from ray.util.placement_group import PlacementGroup

            url = storage.join(base.trainer.storage, f"{base.sweep.name}-{trial.trial_id}", PLACEMENT_GROUP_FILE)
            opts = base.storage.options()
            if not storage.exists(url, opts):
                return
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(storage.read_text(url, opts).strip())))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                log.info("sweep %s: releasing the workers of stopped trial %s", base.sweep.name, trial.trial_id)
                remove_placement_group(group)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleaseStoppedTrials()


def _domain(dim: dict):
    from ray import tune

    kind, values = next(iter(dim.items()))
    return (
        {"grid": tune.grid_search, "choice": tune.choice}[kind](list(values))
        if kind in ("grid", "choice")
        else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*values)
    )


# ---------------------------------------------------------------- the driver


def _storage(config: Config) -> str:
    """``sweep.storage``, made absolute when local."""
    root = config.sweep.storage
    return root if storage.is_s3(root) or "://" in root else str(Path(root).resolve())


def run_sweep(config: Config) -> dict:
    """Stage: run (or resume) the sweep ``sweep.name`` on Ray Tune; see the module docstring.

    Args:
        config: from :func:`load_sweep`: the trials' base config and the ``sweep`` section.

    Returns:
        ``name``, ``checkpoint`` (the best trial's), ``mlflow_run_id`` (the parent run), ``output`` (the
        sweep folder), ``sweep`` (sweep.json), ``report`` (table.md), ``plot``, ``metric``, ``best``
        (trial, value, params), ``trials`` (count by status: finished, stopped, failed), ``seconds``.

    Raises:
        WysiwycError: bad settings, a sweep of that name started with another config, or no trial
            that reported ``sweep.metric`` (sweep.json is written first).
    """

    started = time.perf_counter()
    s = config.sweep
    if not s.name:
        raise WysiwycError("sweep.name is not set: name the sweep (its results go to sweep.storage/NAME)")
    _check_space(config)
    config = absolute_paths(config)  # trials run in their own directories
    root = storage.join(_storage(config), s.name)
    opts = config.storage.options()
    base = config.model_copy(deep=True)
    base.trainer.storage = storage.join(root, TRIALS)
    base.tracking.uri = tracking.resolve_uri(config.tracking.uri, root)

    # the same name resumes, but only the same sweep
    fingerprint = _fingerprint(base)
    state_url = storage.join(root, STATE_FILE)
    state = json.loads(storage.read_text(state_url, opts)) if storage.exists(state_url, opts) else {}
    if state and state.get("fingerprint") != fingerprint:
        raise WysiwycError(
            f"sweep {s.name} at {storage.redact(root)} was started with another space or base "
            f"config: choose another sweep.name, or delete {storage.redact(root)} to start over"
        )

    where = tracking.resolve(base, s.name)
    parent = None
    if where is not None:
        parent = tracking.Tracker(where, s.name, state.get("parent_run_id"))
        parent.set_tags({"wysiwyc.sweep": s.name})
        parent.log_params(
            {
                "sweep.kind": s.kind,
                "sweep.base": s.base or "",
                "sweep.metric": s.metric,
                "sweep.mode": s.mode,
                "sweep.num_samples": str(s.num_samples),
                "sweep.scheduler": s.scheduler,
                "sweep.storage": storage.redact(root),
                **(
                    {
                        "sweep.grace_period": str(s.grace_period),
                        "sweep.reduction_factor": str(s.reduction_factor),
                        "sweep.max_t": str(s.max_t or base.trainer.epochs),
                    }
                    if s.scheduler == "asha"
                    else {}
                ),
                **{f"space.{k}": f"{next(iter(d))} {next(iter(d.values()))}" for k, d in s.space.items()},
            }
        )
        base.tracking.parent_run_id = parent.run_id
    storage.write_text(
        state_url, json.dumps({"fingerprint": fingerprint, "parent_run_id": parent.run_id if parent else None}), opts
    )

    status = "FAILED"
    try:
        t = base.trainer
        need = s.max_concurrent_trials * (s.cpus_per_trial + t.num_workers * t.cpus_per_worker)
        ensure_ray(
            base.storage.options(), num_cpus=max(os.cpu_count() or 1, math.ceil(need)), use_gpu=base.trainer.use_gpu
        )
        results = _fit(base, _storage(config))
        rows = _rows(base, results)
        if parent is not None:
            _tidy_children(parent.client, parent.run_id, s.name, rows)
        summary = _publish(base, root, rows, parent)
        status = "FINISHED" if summary["checkpoint"] else "FAILED"
    finally:
        if parent is not None:
            parent.end(status)
    if not summary["checkpoint"]:
        raise WysiwycError(
            f"sweep {s.name}: no trial reported {s.metric} ({summary['trials']}); see "
            f"{summary['report']} for each trial's status and error"
        )
    return {**summary, "seconds": round(time.perf_counter() - started, 1)}


def _fit(base: Config, sweep_storage: str):
    """Tune: a new experiment ``sweep_storage/NAME``, or the restored one of the same name."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    s = base.sweep
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, name=s.name, kind=s.kind), {"CPU": s.cpus_per_trial}
    )
    storage_path, filesystem = storage_target(base, sweep_storage)
    experiment = f"{storage_path.rstrip('/')}/{s.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log.info("sweep %s: resuming %s", s.name, experiment)
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, restart_errored=s.retry_failed, storage_filesystem=filesystem
        )
    else:
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=s.max_t or base.trainer.epochs,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            )
            if s.scheduler == "asha"
            else None
        )
        tuner = tune.Tuner(
            trainable,
            param_space={key: _domain(dim) for key, dim in s.space.items()},
            tune_config=tune.TuneConfig(
                metric=s.metric,
                mode=s.mode,
                num_samples=s.num_samples,
                scheduler=scheduler,
                max_concurrent_trials=s.max_concurrent_trials,
                trial_dirname_creator=_trial_dirname,
                search_alg=BasicVariantGenerator(random_state=base.trainer.seed),
            ),
            run_config=tune.RunConfig(
                name=s.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                verbose=1,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_release_callback(base)],
            ),
        )
    return tuner.fit()


def _rows(base: Config, results) -> list[dict]:
    """One record per trial: params, last-epoch metrics, status, checkpoint, error."""

    s, opts = base.sweep, base.storage.options()
    budget = min(base.trainer.epochs, s.max_t or base.trainer.epochs) if s.scheduler == "asha" else base.trainer.epochs
    rows = []
    for result in results:
        trial = Path(result.path.rstrip("/")).name
        run = f"{s.name}-{trial}"
        done_url = storage.join(base.trainer.storage, run, TRIAL_FILE)
        done = json.loads(storage.read_text(done_url, opts)) if storage.exists(done_url, opts) else None
        metrics = dict(result.metrics or {})
        checkpoint = (
            done["checkpoint"]
            if done
            else (
                checkpoint_uri(base.trainer.storage, metrics["checkpoint_path"])
                if metrics.get("checkpoint_path")
                else None
            )
        )
        numeric = {
            k: float(v) for k, v in metrics.items() if k.startswith(("val_", "train_")) and isinstance(v, (int, float))
        }
        epochs = int(metrics.get("epoch", 0))
        error = None
        if result.error is not None:
            status = "failed"
            error = (
                str(result.error).strip().splitlines()[-1][:300]
                if str(result.error).strip()
                else type(result.error).__name__
            )
        elif done is not None or epochs >= budget:
            status = "finished"
        else:
            status = "stopped" if epochs else "failed"  # stopped early by ASHA
        params = {k: result.config.get(k) for k in s.space}
        rows.append(
            {
                "trial": trial,
                "run_name": run,
                "params": params,
                "status": status,
                "epochs": epochs,
                "metrics": numeric,
                "checkpoint": checkpoint if status != "failed" else None,
                "mlflow_run_id": done["mlflow_run_id"] if done else None,
                "error": error,
            }
        )
    return sorted(rows, key=lambda r: r["trial"])


def _tidy_children(client, parent_id: str, name: str, rows: list[dict]) -> None:
    """Match each trial to its child run; close runs left RUNNING by stopped or interrupted trials."""
    from mlflow.entities import RunStatus

    by_run = {r["run_name"]: r for r in rows}
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        max_results=5000,
    )
    newest: dict[str, Any] = {}
    for child in sorted(children, key=lambda c: c.info.start_time or 0):
        run_name = child.data.tags.get("wysiwyc.run_name")
        if run_name in newest and newest[run_name].info.status == "RUNNING":
            client.set_terminated(newest[run_name].info.run_id, status="KILLED")  # superseded after a kill
        newest[run_name] = child
    for run_name, child in newest.items():
        row = by_run.get(run_name)
        if row is None:
            continue
        row["mlflow_run_id"] = row["mlflow_run_id"] or child.info.run_id
        if child.info.status == RunStatus.to_string(RunStatus.RUNNING):
            client.set_terminated(child.info.run_id, status="FAILED" if row["status"] == "failed" else "FINISHED")
        client.set_tag(child.info.run_id, "wysiwyc.sweep", name)
        client.set_tag(child.info.run_id, "wysiwyc.sweep.trial", row["trial"])
        client.set_tag(child.info.run_id, "wysiwyc.sweep.status", row["status"])


def _best(rows: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if r["status"] != "failed" and math.isfinite(r["metrics"].get(metric, math.nan))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r["metrics"][metric])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(rows: list[dict], keys: list[str], metrics: list[str]) -> tuple[str, str]:
    """(Markdown, CSV) of the trials: swept values, metrics, status, epochs, checkpoint, run, error."""
    header = ["trial", *keys, *metrics, "status", "epochs", "checkpoint", "mlflow_run_id", "error"]
    lines = [
        [
            r["trial"],
            *(r["params"].get(k) for k in keys),
            *(r["metrics"].get(m) for m in metrics),
            r["status"],
            r["epochs"],
            r["checkpoint"],
            r["mlflow_run_id"],
            r["error"],
        ]
        for r in rows
    ]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in line) + " |" for line in lines]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in line] for line in lines])
    return "\n".join(md) + "\n", buf.getvalue()


def _plot_png(rows: list[dict], space: dict, metric: str, best: dict | None) -> bytes:
    """``metric`` against each swept key, one panel per key (failed trials left out; best starred)."""
    keys = list(space)
    fig = figures.new_figure(3.6 * len(keys), 3.2)
    scored = [r for r in rows if r["status"] != "failed" and metric in r["metrics"]]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        xs = [r["params"].get(key) for r in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs})
        for r in scored:
            x = r["params"].get(key)
            x, y = (x if numeric else labels.index(str(x))), r["metrics"][metric]
            is_best = best is not None and r["trial"] == best["trial"]
            ax.scatter(
                [x],
                [y],
                marker="*" if is_best else "o",
                s=140 if is_best else 36,
                color="tab:red" if is_best else ("tab:blue" if r["status"] == "finished" else "tab:gray"),
            )
        kind = next(iter(space[key]))
        if numeric and xs and (kind == "loguniform" or (min(xs) > 0 and max(xs) / min(xs) >= 10)):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key.split(".")[-1])
        ax.set_ylabel(metric if i == 0 else "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial (★ best, grey: stopped early)", fontsize=10)
    return figures.png(fig)


def _publish(base: Config, root: str, rows: list[dict], parent) -> dict:
    """Write sweep.json, table.md/.csv and selection.png (and log them to the parent run)."""
    s, opts = base.sweep, base.storage.options()
    best = _best(rows, s.metric, s.mode)
    metrics = [s.metric, *(m for m in _TABLE_METRICS if m != s.metric and any(m in r["metrics"] for r in rows))]
    markdown, table_csv = _table(rows, list(s.space), metrics)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("finished", "stopped", "failed")}
    record = {
        "name": s.name,
        "metric": s.metric,
        "mode": s.mode,
        "parent_run_id": parent.run_id if parent else None,
        "best": {
            "trial": best["trial"],
            "params": best["params"],
            "metrics": best["metrics"],
            "checkpoint": best["checkpoint"],
            "mlflow_run_id": best["mlflow_run_id"],
        }
        if best
        else None,
        "trials": rows,
        "counts": counts,
        "space": s.space,
        "kind": s.kind,
        "base": s.base,
        "tracking_uri": storage.redact(base.tracking.uri or ""),
    }
    files = {
        "table.md": markdown.encode(),
        "table.csv": table_csv.encode(),
        "selection.png": _plot_png(rows, s.space, s.metric, best),
        SWEEP_FILE: json.dumps(record, indent=1).encode(),
    }  # last: its presence means "finished"
    for file, data in files.items():
        storage.write_bytes(storage.join(root, file), data, opts)
        if parent is not None:
            parent.log_bytes(data, file)
    if parent is not None and best is not None:
        parent.log_params({f"best.{k}": str(v) for k, v in best["params"].items()})
        client = parent.client
        for key, value in (
            ("best.trial", best["trial"]),
            ("best.checkpoint", best["checkpoint"]),
            ("best.mlflow_run_id", best["mlflow_run_id"] or ""),
        ):
            client.set_tag(parent.run_id, key, value)
        client.log_metric(parent.run_id, f"best_{s.metric}", best["metrics"][s.metric])
    return {
        "name": s.name,
        "run_name": s.name,
        "checkpoint": best["checkpoint"] if best else None,
        "mlflow_run_id": parent.run_id if parent else None,
        "output": storage.redact(root),
        "sweep": storage.redact(storage.join(root, SWEEP_FILE)),
        "report": storage.redact(storage.join(root, "table.md")),
        "plot": storage.redact(storage.join(root, "selection.png")),
        "metric": s.metric,
        "best": {"trial": best["trial"], s.metric: round(best["metrics"][s.metric], 4), **best["params"]}
        if best
        else None,
        "trials": counts,
    }


def read_sweep(name: str, config: Config) -> dict:
    """``sweep.storage/NAME/sweep.json`` of a finished sweep (the record :func:`run_sweep` wrote).

    Raises:
        WysiwycError: the sweep does not exist, is unfinished, or has no successful trial.
    """
    root = storage.join(_storage(config), name)
    opts = config.storage.options()
    url = storage.join(root, SWEEP_FILE)
    if not storage.exists(url, opts):
        if storage.exists(storage.join(root, STATE_FILE), opts):
            raise WysiwycError(
                f"sweep {name} at {storage.redact(root)} is unfinished: launch `wysiwyc sweep` "
                f"with its config again to resume it"
            )
        raise WysiwycError(
            f"no sweep {name} under sweep.storage={storage.redact(config.sweep.storage)} "
            f"(run `wysiwyc sweep -c configs/sweeps/NAME.yaml`, or set sweep.storage)"
        )
    record = json.loads(storage.read_text(url, opts))
    if record.get("best") is None:
        raise WysiwycError(f"sweep {name}: no trial succeeded (see {storage.redact(storage.join(root, 'table.md'))})")
    return record
