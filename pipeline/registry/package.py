"""A registered version as a package: what :func:`register_checkpoint` (an Explainer) and
:func:`register_classifier` put in it (the pyfunc model of :mod:`pipeline.registry.pyfunc` with this
package's code, the checkpoints, metadata, lineage tags) and how a consumer loads it (:func:`load_explainer`,
or MLflow's pyfunc where this package is not installed)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import yaml
from mlflow.exceptions import MlflowException

from pipeline import storage
from pipeline.checkpoint import parse_checkpoint
from pipeline.config import LAMBDAS
from pipeline.data.sample import encode_png
from pipeline.data.shards import read_manifest
from pipeline.errors import WysiwycError
from pipeline.method.class_rule import ClassRule
from pipeline.models.classifier import classifier_file
from pipeline.models.predictor import load_predictor
from pipeline.registry.lookup import (
    CANDIDATE,
    CLASSIFIER_FORMAT,
    MODEL_DIR,
    NAME_PATTERN,
    PACKAGE_FORMAT,
    classifier_version,
    experiment_for,
    git_commit,
    recorded_classifier,
    utc_now,
)
from pipeline.tracking import (
    CLASSIFIER_SHA,
    EXPLAINER_SHA,
    REGISTRY_PREFIX,
    alias_versions,
    current_user,
    is_missing,
    mlflow_client,
    registry_uri,
    resolve_model,
)

log = logging.getLogger(__name__)


def _dataset_digest(train: str | None, opts) -> str:
    """The digest of the training split's manifest, or ``unknown`` when it cannot be read now."""

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
    """What a registered model needs from a package index: the package's own code travels with the model
    (``code_paths``), so never ``wysiwyc`` itself (no index serves it)."""
    names = ("torch", "torchvision", "mlflow", "numpy", "pandas", "pillow")
    return [f"{n}=={importlib.metadata.version(n).split('+')[0]}" for n in names]


def _package_code(root: Path) -> str:
    """A copy of this package's source (no bytecode) for ``code_paths``: the model imports it from there."""
    source = Path(__file__).resolve().parents[1]
    target = root / "code" / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _example_png(size: int) -> bytes:
    """The input example: a (size × size) PNG of smooth colour (the signature's picture of an input)."""

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, np.full((size, size), 96.0)])
    return encode_png(pixels.transpose(1, 2, 0).round().astype(np.uint8))


def _signature(outputs: list):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("binary", "image", required=False),
                ColSpec(Array(Array(Array("float"))), "pixels", required=False),
            ]
        ),
        outputs=Schema([ColSpec(Array(kind), column) for column, kind in outputs]),
        params=ParamSchema(
            [
                ParamSpec("classes", "string", ClassRule.mode),
                ParamSpec("threshold", "double", ClassRule.threshold),
                ParamSpec("top_k", "long", ClassRule.top_k),
                ParamSpec("fixed_classes", "string", list(ClassRule.fixed), shape=(-1,)),
            ]
        ),
    )


def _save_pyfunc(root: Path, loader: str, artifacts: dict[str, Path], outputs: list, size: int, metadata: dict) -> None:
    """The pyfunc model at ``root/model``: models-from-code (``loader``, a class of
    :mod:`pipeline.registry.pyfunc`; no pickled object), the package's code, requirements an index
    serves, a signature with inputs, outputs and params, and a PNG input example."""
    import pandas as pd

    (root / "loader.py").write_text(
        "from mlflow.models import set_model\n\n"
        f"from pipeline.registry.pyfunc import {loader}\n\nset_model({loader}())\n"
    )
    mlflow.pyfunc.save_model(
        str(root / MODEL_DIR),
        python_model=str(root / "loader.py"),
        artifacts={k: str(v) for k, v in artifacts.items()},
        code_paths=[_package_code(root)],
        signature=_signature(outputs),
        input_example=pd.DataFrame({"image": [_example_png(size)]}),
        pip_requirements=_pip_requirements(),
        metadata=metadata,
    )


def _publish(client, uri: str, config, name: str, root: Path, tags: dict, params: dict, metrics: dict, what: str):
    """Log the register run (tags, params, metrics, the pyfunc model as artifacts), create the version of
    ``name`` from it and give it the ``candidate`` alias; returns ``(version, run_id)``."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_for(config, uri), run_name=f"register-{name}", tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
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
        client.create_registered_model(name, description=f"wysiwyc {what} (see the wysiwyc.* tags of each version)")
    except MlflowException as exc:  # it exists already
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = str(
        client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{MODEL_DIR}",
            run_id=run_id,
            tags=tags,
            description=f"from {tags.get('wysiwyc.checkpoint', '')}",
        ).version
    )
    client.set_registered_model_alias(name, CANDIDATE, version)
    _grant_readers(uri, config.registry.readers, name, run.info.experiment_id)
    log.info("register: %s → models:/%s/%s (@%s)", tags.get("wysiwyc.checkpoint"), name, version, CANDIDATE)
    return version, run_id


def _grant_readers(uri: str, readers: list[str], name: str, experiment_id: str) -> None:
    """READ for each of ``registry.readers`` on model ``name`` and on the experiment that holds its artifacts
    (MLflow's basic-auth app: what an alias resolves to is downloaded through the run's experiment). The
    registering identity MANAGEs both (it created them), which is what granting needs."""
    if not readers:
        return
    from mlflow.server import get_app_client

    accounts = get_app_client("basic-auth", tracking_uri=uri)
    for reader in readers:
        for kind, resource in (("registered_model", name), ("experiment", experiment_id)):
            try:
                accounts.grant_user_permission(reader, kind, resource, "READ")
            except MlflowException as exc:
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    raise WysiwycError(
                        f"registry.readers: MLflow at {storage.redact(uri)} has no user {reader!r}; create it "
                        f"(`wysiwyc stack up` makes `reader`) or remove it from registry.readers"
                    ) from None
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":  # granted before: kept as it is
                    raise
    log.info("register: READ on models:/%s and experiment %s for %s", name, experiment_id, ", ".join(readers))


def _existing(client, uri: str, name: str, sha_tag: str, sha: str, checkpoint: str) -> dict | None:
    """The summary of the version of ``name`` already holding this checkpoint (a rerun after a failure
    gets the ``candidate`` alias back when it is the newest version), else None."""
    existing = _find_version(client, name, sha_tag, sha)
    if existing is None:
        return None
    version = str(existing.version)
    newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if int(version) == newest and not _aliases_of(client, name, version):
        client.set_registered_model_alias(name, CANDIDATE, version)
    log.info("register: %s is already models:/%s/%s", storage.redact(checkpoint), name, version)
    return _register_summary(client, uri, name, version, existing.run_id, existing=True)


def _find_version(client, name: str, sha_tag: str, sha256: str):
    """The version of ``name`` already holding the checkpoint ``sha256`` (tag ``sha_tag``), if any."""
    try:
        found = client.search_model_versions(f"name='{name}' and tags.`{sha_tag}`='{sha256}'")
    except MlflowException as exc:  # the model does not exist yet
        if is_missing(exc):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def _training_tags(state: dict, checkpoint: str, sha: str, digest: str, data: str | None) -> dict:
    """The lineage tags every version has: kind, checkpoint + sha256, arch, classes, size, data, commit."""
    return {
        "wysiwyc.kind": str(state.get("kind")),
        "wysiwyc.checkpoint": storage.redact(checkpoint),
        "wysiwyc.classes": json.dumps(list(state.get("classes") or [])),
        "wysiwyc.image_size": str(state.get("image_size") or 224),
        "wysiwyc.dataset": storage.redact(str(data)),
        "wysiwyc.dataset_digest": digest,
        "wysiwyc.git_commit": git_commit(),
        "wysiwyc.training_run_id": str(state.get("mlflow_run_id") or "unknown"),
        "wysiwyc.registered_by": current_user(),
        "wysiwyc.registered_at": utc_now(),
    }


def register_classifier(checkpoint: str, name: str, config) -> dict:
    """Package a classifier checkpoint as a new version of registered model ``name`` (alias ``candidate``):
    a pyfunc of images → class probabilities (:class:`~pipeline.registry.pyfunc.ClassifierModel`), tags
    ``wysiwyc.kind=classifier`` and ``wysiwyc.classifier_sha256``. An Explainer registered for these bytes
    records this version (``wysiwyc.classifier_version``); the default gate then promotes it only while
    this version is the classifier model's ``@champion``. Registering the same bytes again returns their
    version. Returns the summary of :func:`register_checkpoint`."""
    client, uri, opts, data, state, sha, found = _checkpoint(checkpoint, name, config, "classifier")
    if found is not None:
        return found
    cfg = state.get("config") or {}
    train = (cfg.get("data") or {}).get("train")
    digest = _dataset_digest(train, opts)
    size = int(state.get("image_size") or 224)
    with tempfile.TemporaryDirectory(prefix="wysiwyc-register-") as tmp:
        root = Path(tmp)
        (root / "classifier.pt").write_bytes(data)
        metadata = {
            "format": CLASSIFIER_FORMAT,
            "classes": list(state["classes"]),
            "image_size": size,
            "arch": state.get("arch"),
            "sha256": sha,
            "dataset_digest": digest,
            "git_commit": git_commit(),
        }
        _save_pyfunc(
            root,
            "ClassifierModel",
            {"classifier": root / "classifier.pt"},
            [("classes", "string"), ("probabilities", "double"), ("all_probabilities", "double")],
            size,
            metadata,
        )
        tags = {
            **_training_tags(state, checkpoint, sha, digest, train),
            CLASSIFIER_SHA: sha,
            "wysiwyc.classifier_arch": str(state.get("arch")),
        }
        params = {"classifier.arch": state.get("arch"), "data.image_size": size, "model_name": name}
        metrics = {k: v for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))}
        version, run_id = _publish(client, uri, config, name, root, tags, params, metrics, "classifier")
    return _register_summary(client, uri, name, version, run_id, existing=False)


# per kind of checkpoint: the version tag of its sha256, and what to give instead of another kind
_KINDS = {
    "explainer": (
        EXPLAINER_SHA,
        "an Explainer checkpoint (`wysiwyc train explainer` prints it; a classifier registers with --classifier)",
    ),
    "classifier": (
        CLASSIFIER_SHA,
        "the classifier checkpoint (`wysiwyc train classifier` prints it; an Explainer registers without --classifier)",
    ),
}


def _checkpoint(checkpoint: str, name: str, config, kind: str) -> tuple:
    """What registering needs of a checkpoint of ``kind``: ``(client, registry uri, storage opts, bytes,
    parsed state, sha256, the summary of the version already holding it or None)``; a bad name, a missing
    checkpoint or one of another kind is a WysiwycError saying what to give."""

    sha_tag, expected = _KINDS[kind]
    if not NAME_PATTERN.match(name):
        raise WysiwycError(f"register: model name {name!r}: use letters, digits, '_', '.', '-' (e.g. voc-vgg16)")
    opts = config.storage.options()
    uri = registry_uri(config)
    client = mlflow_client(uri)
    data = _read(checkpoint, f"{'Explainer' if kind == 'explainer' else kind} checkpoint", opts)
    state = parse_checkpoint(data, checkpoint)
    if state.get("kind") != kind:
        raise WysiwycError(
            f"register: {storage.redact(checkpoint)} is a {state.get('kind')} checkpoint; give {expected}"
        )
    sha = hashlib.sha256(data).hexdigest()
    return client, uri, opts, data, state, sha, _existing(client, uri, name, sha_tag, sha, checkpoint)


def register_checkpoint(
    checkpoint: str,
    name: str,
    config,
    extra_tags: dict[str, str] | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> dict:
    """Package an Explainer checkpoint as a new version of registered model ``name``, alias ``candidate``.

    Registering a checkpoint that a version of ``name`` already holds (same sha256) returns that
    version instead of adding a copy (a rerun after a failure is safe). When the classifier it explains
    is registered (:func:`register_classifier`, found by its sha256), the version records that classifier
    version (tags ``wysiwyc.classifier_model`` / ``wysiwyc.classifier_version``).

    Args:
        checkpoint: the Explainer checkpoint (local path or ``s3://``).
        name: registered model name (letters, digits, ``_.-``).
        config: :class:`pipeline.config.Config` (``tracking``, ``storage``; ``explanandum.model``
            overrides where the recorded Explanandum is read from — the sha256 must match).
        extra_tags: more lineage tags for the version (e.g. the sweep it came from).
        extra_metrics: more metrics for the register run (e.g. the sweep's selection metric).

    Returns:
        The summary: ``name``, ``version``, ``model_uri``, ``aliases``, ``mlflow_run_id``,
        ``checkpoint``, ``explainer_sha256``, ``explanandum``, ``explanandum_sha256``,
        ``classifier_version``, ``dataset_digest``, ``git_commit``, ``tracking_uri`` and ``existing``
        (already registered).

    Raises:
        WysiwycError: a bad name, a missing or non-Explainer checkpoint, an Explanandum that is not
            the recorded one, or an unreachable registry.
    """

    client, uri, opts, data, state, sha, found = _checkpoint(checkpoint, name, config, "explainer")
    if found is not None:
        return found

    record = state.get("explanandum") or {}
    explanandum = config.explanandum.model or record.get("uri")
    if not explanandum:
        raise WysiwycError(
            f"register: {storage.redact(checkpoint)} does not record its Explanandum; set "
            f"explanandum.model to the classifier it explains"
        )
    cfg = state.get("config") or {}
    loss = cfg.get("loss") or {}
    train = (cfg.get("data") or {}).get("train")
    with tempfile.TemporaryDirectory(prefix="wysiwyc-register-") as tmp:
        root = Path(tmp)
        files = {
            "explainer": root / "explainer.pt",
            "explanandum": root / "explanandum.pt",
            "config": root / "config.yaml",
            "metadata": root / "wysiwyc.json",
        }
        files["explainer"].write_bytes(data)
        files["explanandum"].write_bytes(classifier_file(explanandum, opts, uri))
        # both load, the Explanandum is the recorded one (sha256), the class lists agree
        predictor = load_predictor(str(files["explainer"]), str(files["explanandum"]), registry=uri)
        classifier = (
            resolve_model(explanandum, uri)
            if explanandum.startswith(REGISTRY_PREFIX)  # F is a version of this registry
            else classifier_version(client, predictor.explanandum_sha256)
        )
        lambdas = {k: loss[k] for k in LAMBDAS if k in loss}
        digest = _dataset_digest(train, opts)
        lineage = _Lineage(checkpoint, sha, state, explanandum, predictor, classifier, digest, train, lambdas)
        tags = {**lineage.tags(), **(extra_tags or {})}
        metadata = lineage.metadata(tags)
        files["config"].write_text(yaml.safe_dump(cfg, sort_keys=False))
        files["metadata"].write_text(json.dumps(metadata, indent=1, default=str))
        _save_pyfunc(
            root,
            "ExplainerModel",
            files,
            [("classes", "string"), ("probabilities", "double"), ("masks", "string")],
            predictor.image_size,
            {k: metadata[k] for k in ("format", "classes", "image_size", "normalization", "lambdas", "git_commit")},
        )
        params = {
            **{f"loss.{k}": v for k, v in lambdas.items()},
            "explainer.arch": state.get("arch"),
            "explainer.init": state.get("explainer_init", "unknown"),
            "explanandum.arch": record.get("arch"),
            "data.image_size": predictor.image_size,
            "model_name": name,
        }
        metrics = {
            **{k: v for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))},
            **(extra_metrics or {}),
        }
        version, run_id = _publish(client, uri, config, name, root, tags, params, metrics, "Explainer")
    return _register_summary(client, uri, name, version, run_id, existing=False)


@dataclass
class _Lineage:
    """What an Explainer version records of where it came from: its tags and its ``wysiwyc.json``."""

    checkpoint: str
    sha: str
    state: dict
    explanandum: str
    predictor: object  # the loaded Predictor (its Explanandum's sha256, classes, image size)
    classifier: tuple[str, str] | None  # the registered classifier version it explains, if any
    digest: str | None
    train: str | None
    lambdas: dict

    def tags(self) -> dict[str, str]:
        state, record, classifier = self.state, self.state.get("explanandum") or {}, self.classifier
        return {
            **_training_tags(state, self.checkpoint, self.sha, self.digest, self.train),
            "wysiwyc.explainer": storage.redact(self.checkpoint),
            EXPLAINER_SHA: self.sha,
            "wysiwyc.explainer_arch": str(state.get("arch")),
            "wysiwyc.explainer_init": str(state.get("explainer_init", "unknown")),
            "wysiwyc.black_box": _black_box_tag(state.get("black_box")),
            "wysiwyc.explanandum": storage.redact(self.explanandum),
            "wysiwyc.explanandum_sha256": self.predictor.explanandum_sha256,
            "wysiwyc.explanandum_arch": str(record.get("arch")),
            "wysiwyc.explanandum_form": self.predictor.explanandum.form,
            "wysiwyc.labels": str(state.get("labels", "dataset")),  # the dataset's, or F's own predictions
            "wysiwyc.classifier_model": classifier[0] if classifier else "unregistered",
            "wysiwyc.classifier_version": classifier[1] if classifier else "unregistered",
            **{f"wysiwyc.lambda.{k}": str(v) for k, v in self.lambdas.items()},
        }

    def metadata(self, tags: dict[str, str]) -> dict:
        state, record, classifier = self.state, self.state.get("explanandum") or {}, self.classifier
        return {
            "format": PACKAGE_FORMAT,
            "classes": self.predictor.classes,
            "image_size": self.predictor.image_size,
            "normalization": {"mean": list(self.predictor.norm.mean), "std": list(self.predictor.norm.std)},
            "input": "image bytes (column image) or float32 (3, S, S) RGB in [0, 1] normalised with mean/std (pixels)",
            "explainer": {
                "arch": state.get("arch"),
                "source": storage.redact(self.checkpoint),
                "sha256": self.sha,
                "init": state.get("explainer_init", "unknown"),
                "black_box": state.get("black_box"),
            },
            "explanandum": {
                "arch": record.get("arch"),
                "source": storage.redact(self.explanandum),
                "sha256": self.predictor.explanandum_sha256,
                "model_version": f"models:/{classifier[0]}/{classifier[1]}" if classifier else None,
                "form": self.predictor.explanandum.form,
                "interface": self.predictor.explanandum.interface.record(),
            },
            "dataset": {"train": tags["wysiwyc.dataset"], "digest": self.digest},
            "lambdas": self.lambdas,
            "training": {
                "epoch": state.get("epoch"),
                "step": state.get("step"),
                "metrics": state.get("metrics") or {},
                "mlflow_run_id": state.get("mlflow_run_id") or None,
            },
            "git_commit": tags["wysiwyc.git_commit"],
        }


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
        "kind": tags.get("wysiwyc.kind", "explainer"),
        "checkpoint": tags.get("wysiwyc.checkpoint", tags.get("wysiwyc.explainer")),
        "explainer_sha256": tags.get("wysiwyc.explainer_sha256"),
        "explanandum": tags.get("wysiwyc.explanandum"),
        "explanandum_sha256": tags.get("wysiwyc.explanandum_sha256"),
        "classifier_version": f"models:/{found[0]}/{found[1]}" if (found := recorded_classifier(tags)) else None,
        "dataset_digest": tags.get("wysiwyc.dataset_digest"),
        "git_commit": tags.get("wysiwyc.git_commit"),
        "tracking_uri": storage.redact(uri),
        "existing": existing,
    }


def register_from_sweep(sweep: str, name: str, config) -> dict:
    """Register the best trial of sweep ``sweep`` (its ``sweep.json``, :func:`pipeline.tune.read_sweep`)."""
    # here, not at the top: this package travels inside every registered model, whose loader must not need
    # what the sweep module imports (Ray Tune, matplotlib)
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
