"""A registered version as a package: what :func:`register_checkpoint` puts in it (the pyfunc model, the
checkpoints, metadata, lineage tags) and how a consumer loads it (:func:`load_explainer`, or MLflow's pyfunc)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import tempfile
import time
import warnings
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
from pipeline.registry.lookup import (
    CANDIDATE,
    LAMBDAS,
    MODEL_DIR,
    NAME_PATTERN,
    PACKAGE_FORMAT,
    alias_versions,
    current_user,
    experiment_for,
    git_commit,
    is_missing,
    mlflow_client,
    registry_uri,
    resolve_model,
    utc_now,
)

log = logging.getLogger(__name__)


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
            raise WysiwycError(
                f"predict: expected a (B, 3, S, S) float32 array of normalised images, got shape "
                f"{tuple(x.shape)} (use Predictor.preprocess or pipeline.data.transforms)"
            )
        outputs = [self.predictor(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        return {
            "masks": torch.cat([o.masks for o in outputs]).cpu().numpy(),
            "probs": torch.cat([o.probs for o in outputs]).cpu().numpy(),
        }


def load_explainer(
    model_uri: str, tracking_uri: str | None = None, device=None, image_size: int | None = None
) -> Predictor:
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
        client = mlflow_client(uri)
        with tempfile.TemporaryDirectory(prefix="wysiwyc-model-") as tmp:
            try:
                source = client.get_model_version_download_uri(name, version)
                folder = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=f"{source}/artifacts", dst_path=tmp, tracking_uri=uri
                    )
                )
            except MlflowException as exc:
                raise WysiwycError(
                    f"{model_uri} (version {version}): its files could not be downloaded from the "
                    f"registry at {storage.redact(uri)}: {str(exc).splitlines()[0][:300]}"
                ) from None
            if not (folder / "explainer.pt").is_file():
                raise WysiwycError(
                    f"{model_uri} (version {version}) is not a wysiwyc Explainer package "
                    f"(no artifacts/explainer.pt); register it with `wysiwyc register`"
                )
            predictor = load_predictor(
                str(folder / "explainer.pt"), str(folder / "explanandum.pt"), image_size=image_size
            )
        tags = client.get_model_version(name, version).tags
        predictor.explainer_uri = f"models:/{name}/{version}"
        predictor.explanandum_uri = tags.get("wysiwyc.explanandum", predictor.explanandum_uri)
        predictor.model_name, predictor.model_version = name, version
        log.info("%s resolved to models:/%s/%s", model_uri, name, version)
    if device is not None:
        predictor.to(device)
    return predictor


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
        raise WysiwycError(
            f"register: the {what} {storage.redact(uri)} does not exist: fix the URI (the "
            f"`checkpoint` printed by `wysiwyc train explainer`)"
        ) from None


def _pip_requirements() -> list[str]:
    names = ("wysiwyc", "torch", "torchvision", "mlflow", "numpy")
    return [f"{n}=={importlib.metadata.version(n).split('+')[0]}" for n in names]


def _find_version(client, name: str, sha256: str):
    """The version of ``name`` already holding the Explainer checkpoint ``sha256``, if any."""
    try:
        found = client.search_model_versions(f"name='{name}' and tags.`wysiwyc.explainer_sha256`='{sha256}'")
    except MlflowException as exc:  # the model does not exist yet
        if is_missing(exc):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register_checkpoint(
    checkpoint: str,
    name: str,
    config,
    extra_tags: dict[str, str] | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> dict:
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

    if not NAME_PATTERN.match(name):
        raise WysiwycError(f"register: model name {name!r}: use letters, digits, '_', '.', '-' (e.g. voc-vgg16)")
    opts = config.storage.options()
    uri = registry_uri(config)
    client = mlflow_client(uri)
    data = _read(checkpoint, "Explainer checkpoint", opts)
    state = parse_checkpoint(data, checkpoint)
    if state.get("kind") != "explainer":
        raise WysiwycError(
            f"register: {storage.redact(checkpoint)} is a {state.get('kind')} checkpoint; register "
            f"an Explainer checkpoint (`wysiwyc train explainer` prints it)"
        )
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
        raise WysiwycError(
            f"register: {storage.redact(checkpoint)} does not record its Explanandum; set "
            f"explanandum.checkpoint to the classifier it explains"
        )
    cfg = state.get("config") or {}
    loss = cfg.get("loss") or {}
    with tempfile.TemporaryDirectory(prefix="wysiwyc-register-") as tmp:
        root = Path(tmp)
        files = {
            "explainer": root / "explainer.pt",
            "explanandum": root / "explanandum.pt",
            "config": root / "config.yaml",
            "metadata": root / "wysiwyc.json",
        }
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
            "explainer": {
                "arch": state.get("arch"),
                "source": storage.redact(checkpoint),
                "sha256": sha,
                "init": state.get("explainer_init", "unknown"),
                "black_box": state.get("black_box"),
            },
            "explanandum": {
                "arch": record.get("arch"),
                "source": storage.redact(explanandum),
                "sha256": predictor.explanandum_sha256,
            },
            "dataset": {"train": storage.redact(str((cfg.get("data") or {}).get("train"))), "digest": digest},
            "lambdas": lambdas,
            "training": {
                "epoch": state.get("epoch"),
                "step": state.get("step"),
                "metrics": state.get("metrics") or {},
                "mlflow_run_id": state.get("mlflow_run_id") or None,
            },
            "git_commit": commit,
        }
        files["config"].write_text(yaml.safe_dump(cfg, sort_keys=False))
        files["metadata"].write_text(json.dumps(metadata, indent=1, default=str))
        size = predictor.image_size
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]))
        # models-from-code: the package's loader is this module's ExplainerModel (no pickled object)
        (root / "explainer_model.py").write_text(
            "from mlflow.models import set_model\n\nfrom pipeline.registry import ExplainerModel\n\n"
            "set_model(ExplainerModel())\n"
        )
        with warnings.catch_warnings():  # the signature is explicit: no input example is needed
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.save_model(
                str(root / MODEL_DIR),
                python_model=str(root / "explainer_model.py"),
                artifacts={k: str(v) for k, v in files.items()},
                signature=signature,
                pip_requirements=_pip_requirements(),
                metadata={
                    k: metadata[k]
                    for k in ("format", "classes", "image_size", "normalization", "lambdas", "git_commit")
                },
            )

        tags = {
            "wysiwyc.explainer": storage.redact(checkpoint),
            "wysiwyc.explainer_sha256": sha,
            "wysiwyc.explainer_arch": str(state.get("arch")),
            "wysiwyc.explainer_init": str(state.get("explainer_init", "unknown")),
            "wysiwyc.black_box": _black_box_tag(state.get("black_box")),
            "wysiwyc.explanandum": storage.redact(explanandum),
            "wysiwyc.explanandum_sha256": predictor.explanandum_sha256,
            "wysiwyc.explanandum_arch": str(record.get("arch")),
            "wysiwyc.classes": json.dumps(predictor.classes),
            "wysiwyc.image_size": str(size),
            "wysiwyc.dataset": metadata["dataset"]["train"],
            "wysiwyc.dataset_digest": digest,
            "wysiwyc.git_commit": commit,
            "wysiwyc.training_run_id": str(state.get("mlflow_run_id") or "unknown"),
            "wysiwyc.registered_by": current_user(),
            "wysiwyc.registered_at": utc_now(),
            **{f"wysiwyc.lambda.{k}": str(v) for k, v in lambdas.items()},
            **(extra_tags or {}),
        }
        run = client.create_run(experiment_for(config, uri), run_name=f"register-{name}", tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = {
                **{f"loss.{k}": v for k, v in lambdas.items()},
                "explainer.arch": state.get("arch"),
                "explainer.init": state.get("explainer_init", "unknown"),
                "explanandum.arch": record.get("arch"),
                "data.image_size": size,
                "model_name": name,
            }
            metrics = {
                **{k: v for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))},
                **(extra_metrics or {}),
            }
            client.log_batch(
                run_id,
                params=[Param(k, str(v)) for k, v in params.items()],
                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))],
            )
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
    version = str(
        client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{MODEL_DIR}",
            run_id=run_id,
            tags=tags,
            description=f"from {storage.redact(checkpoint)}",
        ).version
    )
    client.set_registered_model_alias(name, CANDIDATE, version)
    log.info("register: %s → models:/%s/%s (@%s)", storage.redact(checkpoint), name, version, CANDIDATE)
    return _register_summary(client, uri, name, version, run_id, existing=False)


def _black_box_tag(value) -> str:
    """``true`` / ``false`` / ``unknown`` (a checkpoint from before ``explainer.init`` was recorded)."""
    return "unknown" if value is None else str(bool(value)).lower()


def _aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(a for a, v in alias_versions(client, name).items() if v == version)


def _register_summary(client, uri: str, name: str, version: str, run_id: str | None, existing: bool) -> dict:
    tags = client.get_model_version(name, version).tags
    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases": _aliases_of(client, name, version),
        "mlflow_run_id": run_id,
        "checkpoint": tags.get("wysiwyc.explainer"),
        "explainer_sha256": tags.get("wysiwyc.explainer_sha256"),
        "explanandum": tags.get("wysiwyc.explanandum"),
        "explanandum_sha256": tags.get("wysiwyc.explanandum_sha256"),
        "dataset_digest": tags.get("wysiwyc.dataset_digest"),
        "git_commit": tags.get("wysiwyc.git_commit"),
        "tracking_uri": storage.redact(uri),
        "existing": existing,
    }


def register_from_sweep(sweep: str, name: str, config) -> dict:
    """Register the best trial of sweep ``sweep`` (its ``sweep.json``, :func:`pipeline.tune.read_sweep`)."""
    from pipeline.tune import read_sweep

    result = read_sweep(sweep, config)
    best = result.get("best") or {}
    if not best.get("checkpoint"):
        raise WysiwycError(f"register: sweep {sweep!r} has no best trial with a checkpoint (all trials failed?)")
    tags = {
        "wysiwyc.sweep": sweep,
        "wysiwyc.sweep_trial": str(best.get("trial")),
        "wysiwyc.sweep_metric": f"{result.get('metric')} ({result.get('mode')})",
        "wysiwyc.sweep_parent_run_id": str(result.get("parent_run_id")),
    }
    if best.get("mlflow_run_id"):
        tags["wysiwyc.training_run_id"] = str(best["mlflow_run_id"])
    metrics = {
        f"sweep.{k}": float(v)
        for k, v in (best.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    summary = register_checkpoint(best["checkpoint"], name, config, extra_tags=tags, extra_metrics=metrics)
    return {**summary, "sweep": sweep, "trial": best.get("trial")}
