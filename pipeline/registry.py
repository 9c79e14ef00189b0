"""The model registry: Explainers as MLflow model versions, promotion gates, aliases and lineage.

A registered version is an MLflow ``pyfunc`` model that carries everything a consumer needs, so that
the model URI alone is enough to use it:

- ``artifacts/explainer.pt`` and ``artifacts/explanandum.pt``: the Explainer checkpoint and the frozen
  classifier it explains (the very bytes; their sha256 are tags), ``artifacts/config.yaml`` (the
  resolved training config) and ``artifacts/wysiwyc.json`` (classes, input size and normalisation,
  sources, dataset digest, λ values, training metrics, git commit — also the ``metadata`` of MLmodel);
- tags on the version for lineage (``wysiwyc.*``: checkpoint and Explanandum URIs + sha256, dataset
  digest, λ values under their paper names, git commit, training run) and, once evaluated, the
  evaluation metrics per split (``wysiwyc.eval.<manifest digest>``); every promotion and rollback
  adds tags (gate inputs, results, time, user) and an event on the registered model.

Aliases: ``candidate`` (newly registered), ``champion`` (serving), ``previous-champion`` (rollback).

Consumers load a version with :func:`load_explainer` (a :class:`~pipeline.models.predictor.Predictor`)
or, without this package's API, with ``mlflow.pyfunc.load_model(uri).predict(images)`` where
``images`` is a float32 (B, 3, S, S) ImageNet-normalised array; that returns
``{"masks": (B, C, S, S), "probs": (B, C)}``.

The registry lives at the tracking URI: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the
embedded sqlite file beside ``trainer.storage`` (the registry needs a database store).
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import logging
import math
import re
import subprocess
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.models.predictor import Predictor

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
LAMBDAS = ("entropy_regularizer", "mask_variation_regularizer", "mask_area_constraint_regularizer",
           "mask_total_area_regularizer", "ncmask_total_area_regularizer", "class_mask_min_area",
           "class_mask_max_area")
LOWER_IS_BETTER = ("saliency", "background_coverage")  # every other metrics.json value: higher is better
MODEL_DIR = "model"  # the pyfunc model under the register run's artifacts
PACKAGE_FORMAT = "wysiwyc-registered-explainer/1"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------ where and what


def registry_uri(config=None) -> str:
    """The registry's tracking URI: the one training logs to (:func:`pipeline.train.tracking.default_uri`:
    ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded ``trainer.storage/mlflow.db``)."""
    from pipeline.config import Config
    from pipeline.train.tracking import default_uri

    return default_uri(config or Config())


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(config, uri: str) -> str:
    """The experiment ``tracking.experiment`` at ``uri`` (created with its artifacts beside an sqlite file)."""
    from pipeline.train.tracking import resolve

    pinned = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri, "enabled": True})})
    return resolve(pinned, "").experiment_id


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def git_commit() -> str:
    """The commit of this code (``-dirty`` when it has local changes), or ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], check=False, cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def _aliases(client, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model."""
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/V`` or ``models:/NAME@alias``.

    Raises:
        WysiwycError: not a registry URI, or it does not resolve (no such model, version or alias,
            or no registry answering at the tracking URI).
    """
    match = _MODEL_URI.match(str(model_uri))
    if not match:
        raise WysiwycError(f"{model_uri!r} is not a registry URI: use models:/NAME/VERSION or models:/NAME@ALIAS "
                           f"(e.g. models:/my-explainer@champion)")
    uri = tracking_uri or registry_uri()
    client = _client(uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        aliases = _aliases(client, name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException as exc:
        if _is_missing(exc):
            raise WysiwycError(f"{model_uri}: no registered model {name!r} in the registry at {storage.redact(uri)}; "
                               f"register one with `wysiwyc register --checkpoint URI --name {name}` (or check "
                               f"tracking.uri / MLFLOW_TRACKING_URI)") from None
        raise WysiwycError(f"{model_uri}: the registry at {storage.redact(uri)} did not answer "
                           f"({str(exc).splitlines()[0][:200]}); check tracking.uri / MLFLOW_TRACKING_URI") from None
    found = aliases.get(alias) if alias else (version if int(version) in versions else None)
    if found is not None:
        return name, found
    what = f"alias {alias!r}" if alias else f"version {version}"
    have = ", ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or "no aliases"
    raise WysiwycError(f"{model_uri}: registered model {name!r} has no {what} (versions {versions}, {have}); "
                       f"use an existing version, or promote one: `wysiwyc promote --name {name} --version V`")


# -------------------------------------------------------------------------------- loading


class ExplainerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a registered Explainer: normalised images → per-class masks + probabilities.

    ``predict(images)``: ``images`` a float32 (B, 3, S, S) ImageNet-normalised array, any B; returns
    ``{"masks": (B, C, S, S) in [0, 1], "probs": (B, C)}`` (numpy, float32). Runs on CUDA when present.
    """

    batch_size = 64  # images per forward pass (bounds memory; any input batch size works)

    def load_context(self, context) -> None:
        from pipeline.models.predictor import load_predictor

        self.predictor = load_predictor(context.artifacts["explainer"], context.artifacts["explanandum"])
        if torch.cuda.is_available():
            self.predictor.to("cuda")

    def predict(self, context, model_input: np.ndarray, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim != 4 or x.shape[1] != 3:
            raise WysiwycError(f"predict: expected a (B, 3, S, S) float32 array of normalised images, got shape "
                               f"{tuple(x.shape)} (use Predictor.preprocess or pipeline.data.transforms)")
        outputs = [self.predictor(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        return {"masks": torch.cat([o.masks for o in outputs]).cpu().numpy(),
                "probs": torch.cat([o.probs for o in outputs]).cpu().numpy()}


def load_explainer(model_uri: str, tracking_uri: str | None = None, device=None,
                   image_size: int | None = None) -> Predictor:
    """A ready :class:`~pipeline.models.predictor.Predictor` for a registered Explainer (or a checkpoint).

    ``models:/NAME@alias`` is resolved once, here: the returned predictor has ``model_name`` and
    ``model_version`` set (record them), ``explainer_uri`` is ``models:/NAME/V``; the resolution is
    logged. A plain checkpoint URI (local path or ``s3://``) loads through
    :func:`~pipeline.models.predictor.load_predictor` with the ``AWS_*`` environment.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/V`` or an Explainer checkpoint URI.
        tracking_uri: the registry (default: ``MLFLOW_TRACKING_URI``, else the embedded sqlite file).
        device: move the nets there (``"cuda"``, ``"cpu"``); default CPU.
        image_size: run at this size (default: the size the Explainer was trained at).

    Raises:
        WysiwycError: the URI does not resolve or its files do not load.
    """
    from pipeline.models.predictor import load_predictor

    if not str(model_uri).startswith("models:/"):
        predictor = load_predictor(model_uri, image_size=image_size)
    else:
        uri = tracking_uri or registry_uri()
        name, version = resolve_model(model_uri, uri)
        client = _client(uri)
        with tempfile.TemporaryDirectory(prefix="wysiwyc-model-") as tmp:
            try:
                source = client.get_model_version_download_uri(name, version)
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts", dst_path=tmp,
                                                                  tracking_uri=uri))
            except MlflowException as exc:
                raise WysiwycError(f"{model_uri} (version {version}): its files could not be downloaded from the "
                                   f"registry at {storage.redact(uri)}: {str(exc).splitlines()[0][:300]}") from None
            if not (folder / "explainer.pt").is_file():
                raise WysiwycError(f"{model_uri} (version {version}) is not a wysiwyc Explainer package "
                                   f"(no artifacts/explainer.pt); register it with `wysiwyc register`")
            predictor = load_predictor(str(folder / "explainer.pt"), str(folder / "explanandum.pt"),
                                       image_size=image_size)
        tags = client.get_model_version(name, version).tags
        predictor.explainer_uri = f"models:/{name}/{version}"
        predictor.explanandum_uri = tags.get("wysiwyc.explanandum", predictor.explanandum_uri)
        predictor.model_name, predictor.model_version = name, version
        log.info("%s resolved to models:/%s/%s", model_uri, name, version)
    if device is not None:
        predictor.to(device)
    return predictor


# ----------------------------------------------------------------------------- registering


def _dataset_digest(train: str | None, opts) -> str:
    """The digest of the training split's manifest, or ``unknown`` when it cannot be read now."""
    from pipeline.data.shards import read_manifest

    if not train:
        return "unknown"
    try:
        return str(read_manifest(train, opts)["digest"])
    except WysiwycError as exc:
        log.warning("register: dataset digest unknown: %s", exc)
        return "unknown"


def _read(uri: str, what: str, opts) -> bytes:
    try:
        return storage.read_bytes(uri, opts)
    except storage.NotFound:
        raise WysiwycError(f"register: the {what} {storage.redact(uri)} does not exist: fix the URI (the "
                           f"`checkpoint` printed by `wysiwyc train explainer`)") from None


def _pip_requirements() -> list[str]:
    names = ("wysiwyc", "torch", "torchvision", "mlflow", "numpy")
    return [f"{n}=={importlib.metadata.version(n).split('+')[0]}" for n in names]


def _find_version(client, name: str, sha256: str):
    """The version of ``name`` already holding the Explainer checkpoint ``sha256``, if any."""
    try:
        found = client.search_model_versions(f"name='{name}' and tags.`wysiwyc.explainer_sha256`='{sha256}'")
    except MlflowException as exc:  # the model does not exist yet
        if _is_missing(exc):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register_checkpoint(checkpoint: str, name: str, config, extra_tags: dict[str, str] | None = None,
                        extra_metrics: dict[str, float] | None = None) -> dict:
    """Package an Explainer checkpoint as a new version of registered model ``name``, alias ``candidate``.

    Registering a checkpoint that a version of ``name`` already holds (same sha256) returns that
    version instead of adding a copy (a rerun after a failure is safe).

    Args:
        checkpoint: the Explainer checkpoint (local path or ``s3://``).
        name: registered model name (letters, digits, ``_.-``).
        config: :class:`pipeline.config.Config` (``tracking``, ``storage``; ``explanandum.checkpoint``
            overrides where the recorded Explanandum is read from — the sha256 must match).
        extra_tags: more lineage tags for the version (e.g. the sweep it came from).
        extra_metrics: more metrics for the register run (e.g. the sweep's selection metric).

    Returns:
        The summary: ``name``, ``version``, ``model_uri``, ``aliases``, ``mlflow_run_id``,
        ``checkpoint``, ``explainer_sha256``, ``explanandum``, ``explanandum_sha256``,
        ``dataset_digest``, ``git_commit``, ``tracking_uri`` and ``existing`` (already registered).

    Raises:
        WysiwycError: a bad name, a missing or non-Explainer checkpoint, an Explanandum that is not
            the recorded one, or an unreachable registry.
    """
    from mlflow.entities import Metric, Param
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.models.predictor import load_predictor
    from pipeline.train.checkpoint import parse_checkpoint

    if not _NAME.match(name):
        raise WysiwycError(f"register: model name {name!r}: use letters, digits, '_', '.', '-' (e.g. voc-vgg16)")
    opts = config.storage.options()
    uri = registry_uri(config)
    client = _client(uri)
    data = _read(checkpoint, "Explainer checkpoint", opts)
    state = parse_checkpoint(data, checkpoint)
    if state.get("kind") != "explainer":
        raise WysiwycError(f"register: {storage.redact(checkpoint)} is a {state.get('kind')} checkpoint; register "
                           f"an Explainer checkpoint (`wysiwyc train explainer` prints it)")
    sha = hashlib.sha256(data).hexdigest()
    existing = _find_version(client, name, sha)
    if existing is not None:
        version = str(existing.version)
        newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        if int(version) == newest and not _aliases_of(client, name, version):  # a rerun after a failure
            client.set_registered_model_alias(name, CANDIDATE, version)
        log.info("register: %s is already models:/%s/%s", storage.redact(checkpoint), name, version)
        return _register_summary(client, uri, name, version, existing.run_id, existing=True)

    record = state.get("explanandum") or {}
    explanandum = config.explanandum.checkpoint or record.get("uri")
    if not explanandum:
        raise WysiwycError(f"register: {storage.redact(checkpoint)} does not record its Explanandum; set "
                           f"explanandum.checkpoint to the classifier it explains")
    cfg = state.get("config") or {}
    loss = cfg.get("loss") or {}
    with tempfile.TemporaryDirectory(prefix="wysiwyc-register-") as tmp:
        root = Path(tmp)
        files = {"explainer": root / "explainer.pt", "explanandum": root / "explanandum.pt",
                 "config": root / "config.yaml", "metadata": root / "wysiwyc.json"}
        files["explainer"].write_bytes(data)
        files["explanandum"].write_bytes(_read(explanandum, "Explanandum checkpoint", opts))
        # both load, the Explanandum is the recorded one (sha256), the class lists agree
        predictor = load_predictor(str(files["explainer"]), str(files["explanandum"]))
        lambdas = {k: loss[k] for k in LAMBDAS if k in loss}
        digest = _dataset_digest((cfg.get("data") or {}).get("train"), opts)
        commit = git_commit()
        metadata = {
            "format": PACKAGE_FORMAT,
            "classes": predictor.classes,
            "image_size": predictor.image_size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "input": "float32 (B, 3, S, S), RGB scaled to [0, 1] then normalised with mean/std",
            "explainer": {"arch": state.get("arch"), "source": storage.redact(checkpoint), "sha256": sha,
                          "init": state.get("explainer_init", "unknown"), "black_box": state.get("black_box")},
            "explanandum": {"arch": record.get("arch"), "source": storage.redact(explanandum),
                            "sha256": predictor.explanandum_sha256},
            "dataset": {"train": storage.redact(str((cfg.get("data") or {}).get("train"))), "digest": digest},
            "lambdas": lambdas,
            "training": {"epoch": state.get("epoch"), "step": state.get("step"),
                         "metrics": state.get("metrics") or {}, "mlflow_run_id": state.get("mlflow_run_id") or None},
            "git_commit": commit,
        }
        files["config"].write_text(yaml.safe_dump(cfg, sort_keys=False))
        files["metadata"].write_text(json.dumps(metadata, indent=1, default=str))
        size = predictor.image_size
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]))
        # models-from-code: the package's loader is this module's ExplainerModel (no pickled object)
        (root / "explainer_model.py").write_text(
            "from mlflow.models import set_model\n\nfrom pipeline.registry import ExplainerModel\n\n"
            "set_model(ExplainerModel())\n")
        with warnings.catch_warnings():  # the signature is explicit: no input example is needed
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.save_model(str(root / MODEL_DIR), python_model=str(root / "explainer_model.py"),
                                     artifacts={k: str(v) for k, v in files.items()}, signature=signature,
                                     pip_requirements=_pip_requirements(),
                                     metadata={k: metadata[k] for k in ("format", "classes", "image_size",
                                                                        "normalization", "lambdas", "git_commit")})

        tags = {
            "wysiwyc.explainer": storage.redact(checkpoint), "wysiwyc.explainer_sha256": sha,
            "wysiwyc.explainer_arch": str(state.get("arch")),
            "wysiwyc.explainer_init": str(state.get("explainer_init", "unknown")),
            "wysiwyc.black_box": _black_box_tag(state.get("black_box")),
            "wysiwyc.explanandum": storage.redact(explanandum),
            "wysiwyc.explanandum_sha256": predictor.explanandum_sha256,
            "wysiwyc.explanandum_arch": str(record.get("arch")),
            "wysiwyc.classes": json.dumps(predictor.classes), "wysiwyc.image_size": str(size),
            "wysiwyc.dataset": metadata["dataset"]["train"], "wysiwyc.dataset_digest": digest,
            "wysiwyc.git_commit": commit, "wysiwyc.training_run_id": str(state.get("mlflow_run_id") or "unknown"),
            "wysiwyc.registered_by": _user(), "wysiwyc.registered_at": _now(),
            **{f"wysiwyc.lambda.{k}": str(v) for k, v in lambdas.items()},
            **(extra_tags or {}),
        }
        run = client.create_run(_experiment_id(config, uri), run_name=f"register-{name}", tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = {**{f"loss.{k}": v for k, v in lambdas.items()}, "explainer.arch": state.get("arch"),
                      "explainer.init": state.get("explainer_init", "unknown"),
                      "explanandum.arch": record.get("arch"), "data.image_size": size, "model_name": name}
            metrics = {**{k: v for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))},
                       **(extra_metrics or {})}
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                      if math.isfinite(float(v))])
            client.log_artifacts(run_id, str(root / MODEL_DIR), MODEL_DIR)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)

    try:
        client.create_registered_model(name, description="wysiwyc Explainer (see the wysiwyc.* tags of each version)")
    except MlflowException as exc:  # it exists already
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = str(client.create_model_version(name, source=f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
                                              tags=tags, description=f"from {storage.redact(checkpoint)}").version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    log.info("register: %s → models:/%s/%s (@%s)", storage.redact(checkpoint), name, version, CANDIDATE)
    return _register_summary(client, uri, name, version, run_id, existing=False)


def _black_box_tag(value) -> str:
    """``true`` / ``false`` / ``unknown`` (a checkpoint from before ``explainer.init`` was recorded)."""
    return "unknown" if value is None else str(bool(value)).lower()


def _aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(a for a, v in _aliases(client, name).items() if v == version)


def _register_summary(client, uri: str, name: str, version: str, run_id: str | None, existing: bool) -> dict:
    tags = client.get_model_version(name, version).tags
    return {
        "name": name, "version": version, "model_uri": f"models:/{name}/{version}",
        "aliases": _aliases_of(client, name, version), "mlflow_run_id": run_id,
        "checkpoint": tags.get("wysiwyc.explainer"), "explainer_sha256": tags.get("wysiwyc.explainer_sha256"),
        "explanandum": tags.get("wysiwyc.explanandum"), "explanandum_sha256": tags.get("wysiwyc.explanandum_sha256"),
        "dataset_digest": tags.get("wysiwyc.dataset_digest"), "git_commit": tags.get("wysiwyc.git_commit"),
        "tracking_uri": storage.redact(uri), "existing": existing,
    }


def register_from_sweep(sweep: str, name: str, config) -> dict:
    """Register the best trial of sweep ``sweep`` (its ``sweep.json``, :func:`pipeline.tune.read_sweep`)."""
    from pipeline.tune import read_sweep

    result = read_sweep(sweep, config)
    best = result.get("best") or {}
    if not best.get("checkpoint"):
        raise WysiwycError(f"register: sweep {sweep!r} has no best trial with a checkpoint (all trials failed?)")
    tags = {"wysiwyc.sweep": sweep, "wysiwyc.sweep_trial": str(best.get("trial")),
            "wysiwyc.sweep_metric": f"{result.get('metric')} ({result.get('mode')})",
            "wysiwyc.sweep_parent_run_id": str(result.get("parent_run_id"))}
    if best.get("mlflow_run_id"):
        tags["wysiwyc.training_run_id"] = str(best["mlflow_run_id"])
    metrics = {f"sweep.{k}": float(v) for k, v in (best.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = register_checkpoint(best["checkpoint"], name, config, extra_tags=tags, extra_metrics=metrics)
    return {**summary, "sweep": sweep, "trial": best.get("trial")}


# ------------------------------------------------------------------------------ promotion


def load_gate(path: str):
    """The :class:`pipeline.config.GateConfig` of a gate file, with its metric names checked."""
    from pipeline.config import GateConfig, load_config
    from pipeline.evaluate.evaluate import METRIC_KEYS

    gate = load_config(path, model=GateConfig)
    for section in ("minimum", "maximum", "champion_margin"):
        unknown = sorted(set(getattr(gate, section)) - set(METRIC_KEYS))
        if unknown:
            raise WysiwycError(f"gate {path}: {section}: unknown metric(s) {unknown}; use metrics.json names: "
                               f"{', '.join(METRIC_KEYS)}")
    if "explainer" not in gate.evaluate.methods:
        raise WysiwycError(f"gate {path}: evaluate.methods must include 'explainer' (the gate checks its metrics)")
    return gate


def _eval_tag(digest: str, max_images: int | None) -> str:
    """The version tag holding the evaluation on a split: keyed by the manifest digest (and image cap)."""
    return f"wysiwyc.eval.{digest[:16]}" + (f".n{max_images}" if max_images else "")


def ensure_evaluation(name: str, version: str, gate, split: str, config, progress: bool = True) -> dict:
    """The evaluation of ``models:/NAME/V`` on ``split`` with the gate's settings; runs it when absent.

    A new evaluation runs :func:`pipeline.evaluate.evaluate.evaluate` on the registered version,
    logs an MLflow run (``evaluate-NAME-vV``: the Explainer's metrics, the report files as artifacts)
    and stores ``{"split", "digest", "num_images", "metrics", "run_id", "metrics_uri", "at"}`` as the
    version tag ``wysiwyc.eval.<digest>``.
    """
    from mlflow.entities import Metric, Param

    from pipeline.config import DataConfig, ExplainerConfig
    from pipeline.data.shards import read_manifest
    from pipeline.evaluate.evaluate import evaluate

    uri = registry_uri(config)
    client = _client(uri)
    opts = config.storage.options()
    manifest = read_manifest(split, opts)
    tag = _eval_tag(manifest["digest"], gate.evaluate.max_images)
    stored = client.get_model_version(name, version).tags.get(tag)
    if stored:
        return json.loads(stored)
    model_uri = f"models:/{name}/{version}"
    log.info("promote: evaluating %s on %s", model_uri, storage.redact(manifest["url"]))
    with tempfile.TemporaryDirectory(prefix="wysiwyc-gate-") as tmp:
        eval_config = config.model_copy(update={
            "data": DataConfig(test=split, loader_workers=config.data.loader_workers),  # the trained image size
            "explainer": ExplainerConfig(checkpoint=model_uri),
            "evaluate": gate.evaluate,
            "tracking": config.tracking.model_copy(update={"uri": uri}),
            "output": tmp})
        summary = evaluate(eval_config, progress=progress)
        result = json.loads(Path(tmp, "metrics.json").read_text())
        metrics = result["methods"]["explainer"]
        run = client.create_run(_experiment_id(config, uri), run_name=f"evaluate-{name}-v{version}",
                                tags={"wysiwyc.model_uri": model_uri, "wysiwyc.eval_tag": tag})
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[
            Param("split", storage.redact(manifest["url"])), Param("split_digest", manifest["digest"]),
            Param("model_uri", model_uri), Param("num_images", str(summary["num_images"])),
            Param("evaluate.max_images", str(gate.evaluate.max_images))],
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None])
        client.log_artifacts(run.info.run_id, tmp, "evaluation")
        client.set_terminated(run.info.run_id)
    record = {"split": storage.redact(manifest["url"]), "digest": manifest["digest"],
              "num_images": summary["num_images"], "metrics": metrics, "run_id": run.info.run_id,
              "metrics_uri": f"{run.info.artifact_uri}/evaluation/metrics.json", "at": _now()}
    client.set_model_version_tag(name, version, tag, json.dumps(record))
    return record


def _check(metric: str, kind: str, value, bound: float, reference=None) -> dict:
    """One gate check as a record; ``kind``: ``minimum``, ``maximum`` or ``champion_margin``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return {"metric": metric, "kind": kind, "value": value, "passed": False,
                "reason": f"{metric} is undefined on this split"}
    if kind == "minimum":
        passed = value >= bound
        text = f"{metric} {value:.4f} {'≥' if passed else 'is below the'} minimum {bound:g}"
    elif kind == "maximum":
        passed = value <= bound
        text = f"{metric} {value:.4f} {'≤' if passed else 'is above the'} maximum {bound:g}"
    else:
        if reference is None:
            return {"metric": metric, "kind": kind, "value": value, "passed": True,
                    "reason": f"{metric}: the champion's value is undefined; not compared"}
        lower = metric in LOWER_IS_BETTER
        passed = value <= reference + bound if lower else value >= reference - bound
        text = (f"{metric} {value:.4f} {'within' if passed else 'is worse than'} the champion's {reference:.4f} "
                f"{'±' if passed else 'by more than'} {bound:g} ({'lower' if lower else 'higher'} is better)")
    return {"metric": metric, "kind": kind, "value": value, "bound": bound, "champion": reference,
            "passed": bool(passed), "reason": text}


def _event(client, name: str, event: dict) -> None:
    """An audit record on the registered model (tag ``wysiwyc.event.<ms>``)."""
    client.set_registered_model_tag(name, f"wysiwyc.event.{int(time.time() * 1000)}", json.dumps(event))


def _existing_version(uri: str, name: str, version: str) -> str:
    """``version`` (a number or an alias) as a version number of ``name``; WysiwycError when absent."""
    ref = f"models:/{name}/{version}" if str(version).isdigit() else f"models:/{name}@{version}"
    return resolve_model(ref, uri)[1]


def promote(name: str, version: str, config, gate_path: str | None = None, progress: bool = True) -> dict:
    """Run the gate on ``models:/NAME/V``; on success move ``champion`` to V (the old champion to
    ``previous-champion``) and record the gate on the version; on failure change nothing.

    The gate (``gate_path``, default ``registry.gate``) evaluates the version on its fixed split
    (``split``, else ``data.test``) when it has no evaluation there yet, checks ``minimum`` /
    ``maximum`` and compares with the current champion (evaluated the same way) within
    ``champion_margin``.

    Returns:
        The summary: ``name``, ``version``, ``model_uri``, ``previous_champion``, ``aliases``,
        ``gate``, ``split``, ``evaluation`` (the Explainer's metrics), ``metrics`` (URI of its
        metrics.json), ``checks``.

    Raises:
        WysiwycError: the gate failed (with every failing check), or a bad name/version/gate/split.
    """
    uri = registry_uri(config)
    client = _client(uri)
    version = _existing_version(uri, name, version)
    gate_path = gate_path or config.registry.gate
    gate = load_gate(gate_path)
    tags = client.get_model_version(name, version).tags
    if tags.get("wysiwyc.black_box") != "true" and not gate.allow_white_box:  # before any evaluation
        raise WysiwycError(
            f"promote: models:/{name}/{version} is not a black-box Explainer (explainer.init="
            f"{tags.get('wysiwyc.explainer_init', 'unknown')}, black_box={tags.get('wysiwyc.black_box', 'unknown')}): "
            f"it reads the classifier's weights, a different method from the paper's; the gate "
            f"{gate_path} refuses it (set allow_white_box: true in a gate file of its own to promote such a "
            f"variant on purpose)")
    split = gate.split or config.data.test
    if not split:
        raise WysiwycError(f"promote: gate {gate_path} has no split and data.test is not set: name the fixed "
                           f"evaluation split (with segmentation) in the gate file or as data.test=…")
    evaluation = ensure_evaluation(name, version, gate, split, config, progress)
    values = evaluation["metrics"]
    checks = [_check(m, "minimum", values.get(m), b) for m, b in gate.minimum.items()]
    checks += [_check(m, "maximum", values.get(m), b) for m, b in gate.maximum.items()]
    champion = _aliases(client, name).get(CHAMPION)
    if champion is not None and champion != version and gate.champion_margin:
        reference = ensure_evaluation(name, champion, gate, split, config, progress)["metrics"]
        checks += [_check(m, "champion_margin", values.get(m), b, reference.get(m))
                   for m, b in gate.champion_margin.items()]
    model_uri = f"models:/{name}/{version}"
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise WysiwycError(f"promote: {model_uri} did not pass the gate {gate_path} on {evaluation['split']} "
                           f"(champion stays {'v' + champion if champion else 'unset'}): "
                           + "; ".join(c["reason"] for c in failed))

    at, user = _now(), _user()
    if champion is not None and champion != version:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in {"wysiwyc.promoted_at": at, "wysiwyc.promoted_by": user, "wysiwyc.gate": gate_path,
                       "wysiwyc.gate.config": json.dumps(gate.model_dump(mode="json")),
                       "wysiwyc.gate.split": evaluation["split"], "wysiwyc.gate.split_digest": evaluation["digest"],
                       "wysiwyc.gate.result": "passed", "wysiwyc.gate.checks": json.dumps(checks),
                       "wysiwyc.gate.champion_before": champion or "none"}.items():
        client.set_model_version_tag(name, version, key, value)
    _event(client, name, {"action": "promote", "version": version, "previous_champion": champion,
                          "gate": gate_path, "at": at, "by": user})
    log.info("promote: %s is @%s (previous: %s)", model_uri, CHAMPION, champion)
    return {"name": name, "version": version, "model_uri": model_uri, "previous_champion": champion,
            "aliases": _aliases(client, name), "gate": gate_path, "split": evaluation["split"],
            "evaluation": values, "metrics": evaluation["metrics_uri"], "checks": [c["reason"] for c in checks]}


def rollback(name: str, config) -> dict:
    """Make ``previous-champion`` the ``champion`` again (the alias ``previous-champion`` is then removed).

    Raises:
        WysiwycError: no such model, or no ``previous-champion`` to return to.
    """
    uri = registry_uri(config)
    client = _client(uri)
    previous = resolve_model(f"models:/{name}@{PREVIOUS}", uri)[1]  # a clear error: nothing to roll back to
    champion = _aliases(client, name).get(CHAMPION)
    at, user = _now(), _user()
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    for key, value in {"wysiwyc.restored_at": at, "wysiwyc.restored_by": user,
                       "wysiwyc.restored_from": champion or "none"}.items():
        client.set_model_version_tag(name, previous, key, value)
    if champion is not None:
        client.set_model_version_tag(name, champion, "wysiwyc.rolled_back_at", at)
        client.set_model_version_tag(name, champion, "wysiwyc.rolled_back_by", user)
    _event(client, name, {"action": "rollback", "version": previous, "from": champion, "at": at, "by": user})
    log.info("rollback: models:/%s/%s is @%s again (was v%s)", name, previous, CHAMPION, champion)
    return {"name": name, "version": previous, "model_uri": f"models:/{name}/{previous}",
            "rolled_back_from": champion, "aliases": _aliases(client, name)}
