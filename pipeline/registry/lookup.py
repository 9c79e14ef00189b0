"""Where the registry is (:func:`registry_uri`) and what a ``models:/`` URI names (:func:`resolve_model`); the
names, aliases and helpers that registering and promotion share."""

from __future__ import annotations

import getpass
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from mlflow.exceptions import MlflowException

from pipeline import storage
from pipeline.errors import WysiwycError

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"


LAMBDAS = (
    "entropy_regularizer",
    "mask_variation_regularizer",
    "mask_area_constraint_regularizer",
    "mask_total_area_regularizer",
    "ncmask_total_area_regularizer",
    "class_mask_min_area",
    "class_mask_max_area",
)


# every other metrics.json value: higher is better
LOWER_IS_BETTER = ("saliency", "background_coverage", "deletion_auc", "average_drop")


MODEL_DIR = "model"  # the pyfunc model under the register run's artifacts


# /2: image bytes in, records out; the package's code travels with the model (/1: normalised arrays only)
PACKAGE_FORMAT = "wysiwyc-registered-explainer/2"
CLASSIFIER_FORMAT = "wysiwyc-registered-classifier/1"

# the version tags holding a checkpoint's sha256 (how a rerun finds its version, an Explainer its classifier)
EXPLAINER_SHA, CLASSIFIER_SHA = "wysiwyc.explainer_sha256", "wysiwyc.classifier_sha256"


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def registry_uri(config=None) -> str:
    """The registry's tracking URI: the one training logs to (:func:`pipeline.train.tracking.default_uri`:
    ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded ``trainer.storage/mlflow.db``)."""
    from pipeline.config import Config
    from pipeline.train.tracking import default_uri

    return default_uri(config or Config())


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_for(config, uri: str) -> str:
    """The experiment ``tracking.experiment`` at ``uri`` (created with its artifacts beside an sqlite file)."""
    from pipeline.train.tracking import resolve

    pinned = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri, "enabled": True})})
    return resolve(pinned, "").experiment_id


def is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def git_commit() -> str:
    """The commit of this code (``-dirty`` when it has local changes), or ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD"], check=False, cwd=root, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def alias_versions(client, name: str) -> dict[str, str]:
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
        raise WysiwycError(
            f"{model_uri}: the registry at {storage.redact(uri)} did not answer "
            f"({str(exc).splitlines()[0][:200]}); check tracking.uri / MLFLOW_TRACKING_URI"
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


def classifier_version(client, sha256: str) -> tuple[str, str] | None:
    """``(name, version)`` of the registered classifier whose checkpoint has this sha256 (the oldest such
    version), or None when that classifier is not registered."""
    found = client.search_model_versions(f"tags.`{CLASSIFIER_SHA}`='{sha256}'")
    if not found:
        return None
    first = min(found, key=lambda v: (v.name, int(v.version)))
    return first.name, str(first.version)


def recorded_classifier(tags: dict) -> tuple[str, str] | None:
    """``(name, version)`` of the classifier an Explainer version recorded at registration, else None."""
    version = tags.get("wysiwyc.classifier_version")
    return (tags["wysiwyc.classifier_model"], version) if version and version != "unregistered" else None


def explained_classifier(client, tags: dict) -> tuple[str, str] | None:
    """The registered classifier an Explainer version explains: the recorded one, else (registered after
    the Explainer) the one whose sha256 is its Explanandum's; None when that classifier is not registered."""
    return recorded_classifier(tags) or classifier_version(client, tags.get("wysiwyc.explanandum_sha256", "-"))
