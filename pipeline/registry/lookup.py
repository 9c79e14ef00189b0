"""The names, aliases and helpers that registering and promotion share (where the registry is and what a
``models:/`` URI names: :mod:`pipeline.tracking`)."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from pipeline import tracking
from pipeline.tracking import CLASSIFIER_SHA

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"


# every other metrics.json value: higher is better
LOWER_IS_BETTER = ("saliency", "background_coverage", "deletion_auc", "average_drop")


MODEL_DIR = "model"  # the pyfunc model under the register run's artifacts


# /2: image bytes in, records out; the package's code travels with the model (/1: normalised arrays only)
PACKAGE_FORMAT = "wysiwyc-registered-explainer/2"
CLASSIFIER_FORMAT = "wysiwyc-registered-classifier/1"


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def experiment_for(config, uri: str) -> str:
    """The experiment ``tracking.experiment`` at ``uri`` (created with its artifacts beside an sqlite file)."""
    pinned = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri, "enabled": True})})
    return tracking.resolve(pinned, "").experiment_id


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
