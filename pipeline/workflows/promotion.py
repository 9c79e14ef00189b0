"""Promotion policy: a gate file's thresholds checked on an evaluation of the version (stored on it, per
split), the ``champion`` / ``previous-champion`` aliases moved, every decision recorded (:func:`promote`,
:func:`rollback`)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

from pipeline import storage
from pipeline.config import DataConfig, ExplainerConfig, GateConfig, load_config
from pipeline.data.shards import read_manifest
from pipeline.errors import WysiwycError
from pipeline.evaluate.evaluate import METRIC_KEYS, evaluate
from pipeline.lease import Lease
from pipeline.registry.lookup import (
    CHAMPION,
    LOWER_IS_BETTER,
    PREVIOUS,
    experiment_for,
    explained_classifier,
    utc_now,
)
from pipeline.tracking import alias_versions, current_user, mlflow_client, registry_uri, resolve_model

log = logging.getLogger(__name__)


def load_gate(path: str):
    """The :class:`pipeline.config.GateConfig` of a gate file, with its metric names checked."""

    gate = load_config(path, model=GateConfig)
    for section in ("minimum", "maximum", "champion_margin"):
        unknown = sorted(set(getattr(gate, section)) - set(METRIC_KEYS))
        if unknown:
            raise WysiwycError(
                f"gate {path}: {section}: unknown metric(s) {unknown}; use metrics.json names: {', '.join(METRIC_KEYS)}"
            )
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

    uri = registry_uri(config)
    client = mlflow_client(uri)
    opts = config.storage.options()
    manifest = read_manifest(split, opts)
    tag = _eval_tag(manifest["digest"], gate.evaluate.max_images)
    stored = client.get_model_version(name, version).tags.get(tag)
    if stored:
        return json.loads(stored)
    model_uri = f"models:/{name}/{version}"
    log.info("promote: evaluating %s on %s", model_uri, storage.redact(manifest["url"]))
    with tempfile.TemporaryDirectory(prefix="wysiwyc-gate-") as tmp:
        eval_config = config.model_copy(
            update={
                "data": DataConfig(test=split, loader_workers=config.data.loader_workers),  # the trained image size
                "explainer": ExplainerConfig(checkpoint=model_uri),
                "evaluate": gate.evaluate,
                "tracking": config.tracking.model_copy(update={"uri": uri}),
                "output": tmp,
            }
        )
        summary = evaluate(eval_config, progress=progress)
        result = json.loads(Path(tmp, "metrics.json").read_text())
        metrics = result["methods"]["explainer"]
        run = client.create_run(
            experiment_for(config, uri),
            run_name=f"evaluate-{name}-v{version}",
            tags={"wysiwyc.model_uri": model_uri, "wysiwyc.eval_tag": tag},
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            params=[
                Param("split", storage.redact(manifest["url"])),
                Param("split_digest", manifest["digest"]),
                Param("model_uri", model_uri),
                Param("num_images", str(summary["num_images"])),
                Param("evaluate.max_images", str(gate.evaluate.max_images)),
            ],
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))],
        )
        client.log_artifacts(run.info.run_id, tmp, "evaluation")
        client.set_terminated(run.info.run_id)
    record = {
        "split": storage.redact(manifest["url"]),
        "digest": manifest["digest"],
        "num_images": summary["num_images"],
        "metrics": metrics,
        "run_id": run.info.run_id,
        "metrics_uri": f"{run.info.artifact_uri}/evaluation/metrics.json",
        "at": utc_now(),
    }
    client.set_model_version_tag(name, version, tag, json.dumps(record))
    return record


#: the version tag `wysiwyc evaluate` of a registered version keeps: the digests of the splits it was evaluated on
PUBLISHED_TAG = "wysiwyc.published_split_digests"


def gate_split(gate, gate_path: str, config, tags: dict) -> str:
    """The split ``gate`` evaluates on: its ``split`` (``train`` / ``val`` / ``test`` name that ``data.*`` key,
    anything else is a URL), else ``data.val``. Refused, unless the gate sets ``allow_test_split``, when it is a
    split the version's published numbers came from (its digest in :data:`PUBLISHED_TAG`) or ``data.test``."""
    named = gate.split if gate.split in ("train", "val", "test") else None
    split = getattr(config.data, named) if named else gate.split or config.data.val
    if not split:
        raise WysiwycError(
            f"promote: gate {gate_path} has no split and data.val is not set: name the fixed validation "
            f"split (with segmentation) in the gate file or as data.val=… (a gate chooses the champion, so it "
            f"never evaluates on data.test, the split of the final numbers)"
            if not named
            else f"promote: gate {gate_path} evaluates on data.{named}, which is not set: set data.{named}=…"
        )
    if gate.allow_test_split:
        return split
    opts = config.storage.options()
    digest = read_manifest(split, opts)["digest"]
    published = json.loads(tags.get(PUBLISHED_TAG) or "[]")
    is_test = named == "test" or (config.data.test and read_manifest(config.data.test, opts)["digest"] == digest)
    if digest in published or is_test:
        why = (
            "the split this version's published numbers came from (wysiwyc evaluate)"
            if digest in published
            else ("data.test, the split of the final numbers")
        )
        raise WysiwycError(
            f"promote: gate {gate_path} would choose on {storage.redact(split)}, {why}: a number that chooses a model "
            f"is a validation number. Gate on data.val (the default), or set allow_test_split: true in a gate file "
            f"of its own to do it on purpose"
        )
    return split


def record_published_split(model_uri: str, digest: str, tracking_uri: str) -> None:
    """Add ``digest`` to the :data:`PUBLISHED_TAG` of the registered version ``model_uri`` (``models:/NAME/V``)."""
    name, version = resolve_model(model_uri, tracking_uri)
    client = mlflow_client(tracking_uri)
    published = json.loads(client.get_model_version(name, version).tags.get(PUBLISHED_TAG) or "[]")
    if digest not in published:
        client.set_model_version_tag(name, version, PUBLISHED_TAG, json.dumps([*published, digest]))


def _check(metric: str, kind: str, value, bound: float, reference=None) -> dict:
    """One gate check as a record; ``kind``: ``minimum``, ``maximum`` or ``champion_margin``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return {
            "metric": metric,
            "kind": kind,
            "value": value,
            "passed": False,
            "reason": f"{metric} is undefined on this split",
        }
    if kind == "minimum":
        passed = value >= bound
        text = f"{metric} {value:.4f} {'≥' if passed else 'is below the'} minimum {bound:g}"
    elif kind == "maximum":
        passed = value <= bound
        text = f"{metric} {value:.4f} {'≤' if passed else 'is above the'} maximum {bound:g}"
    else:
        if reference is None:
            return {
                "metric": metric,
                "kind": kind,
                "value": value,
                "passed": True,
                "reason": f"{metric}: the champion's value is undefined; not compared",
            }
        lower = metric in LOWER_IS_BETTER
        passed = value <= reference + bound if lower else value >= reference - bound
        text = (
            f"{metric} {value:.4f} {'within' if passed else 'is worse than'} the champion's {reference:.4f} "
            f"{'±' if passed else 'by more than'} {bound:g} ({'lower' if lower else 'higher'} is better)"
        )
    return {
        "metric": metric,
        "kind": kind,
        "value": value,
        "bound": bound,
        "champion": reference,
        "passed": bool(passed),
        "reason": text,
    }


def _event(client, name: str, event: dict) -> None:
    """An audit record on the registered model (tag ``wysiwyc.event.<ms>``)."""
    client.set_registered_model_tag(name, f"wysiwyc.event.{int(time.time() * 1000)}", json.dumps(event))


PROMOTION_LEASE_S = 2 * 3600  # a promotion evaluates for minutes; a crashed one frees the aliases after this


def _aliases_lease(name: str, config) -> Lease:
    """The lease on ``name``'s aliases (``registry.lease``, else ``trainer.storage/leases``): one promotion or
    rollback at a time. MLflow's alias API has no compare-and-set; this is the lock, and the champion is read
    again before it moves."""
    prefix = config.registry.lease or storage.join(config.trainer.storage, "leases")
    return Lease.take(
        storage.join(prefix, f"{name}.aliases.lease"),
        f"the aliases of the registered model {name} (a promote or rollback)",
        PROMOTION_LEASE_S,
        config.storage.options(),
    )


def _unchanged(client, name: str, champion: str | None, lease: Lease) -> None:
    """Refuse to move the aliases when ``champion`` is no longer what it was when the decision was made."""
    now = alias_versions(client, name).get(CHAMPION)
    if now != champion or not lease.still_held():
        moved = f"moved from {'v' + champion if champion else 'unset'} to {'v' + now if now else 'unset'}"
        raise WysiwycError(
            f"promote: models:/{name}@{CHAMPION} {moved if now != champion else 'is no longer under this lease'} "
            "while the gate ran (outside a wysiwyc promote: the MLflow UI or API?); nothing was changed: run it again"
        )


def _existing_version(uri: str, name: str, version: str) -> str:
    """``version`` (a number or an alias) as a version number of ``name``; WysiwycError when absent."""
    ref = f"models:/{name}/{version}" if str(version).isdigit() else f"models:/{name}@{version}"
    return resolve_model(ref, uri)[1]


def promote(name: str, version: str, config, gate_path: str | None = None, progress: bool = True) -> dict:
    """Run the gate on ``models:/NAME/V``; on success move ``champion`` to V (the old champion to
    ``previous-champion``) and record the gate on the version; on failure change nothing.

    An Explainer whose classifier is registered must explain that classifier model's ``@champion``
    (unless the gate sets ``allow_stale_classifier``); a classifier version is promoted without the
    Explainer gate.

    The gate (``gate_path``, default ``registry.gate``) evaluates the version on its fixed split
    (``split``, else ``data.val``: a gate chooses, so never the test split) when it has no evaluation
    there yet, checks ``minimum`` / ``maximum`` and compares with the current champion (evaluated the same way) within
    ``champion_margin``.

    Returns:
        The summary: ``name``, ``version``, ``model_uri``, ``previous_champion``, ``aliases``,
        ``gate``, ``split``, ``evaluation`` (the Explainer's metrics), ``metrics`` (URI of its
        metrics.json), ``checks``.

    Raises:
        WysiwycError: the gate failed (with every failing check), or a bad name/version/gate/split.
    """
    uri = registry_uri(config)
    client = mlflow_client(uri)
    version = _existing_version(uri, name, version)
    with _aliases_lease(name, config) as lease:
        return _promote(client, name, version, config, gate_path, progress, lease)


def _promote(client, name: str, version: str, config, gate_path: str | None, progress: bool, lease: Lease) -> dict:
    tags = client.get_model_version(name, version).tags
    if tags.get("wysiwyc.kind") == "classifier":
        return _promote_classifier(client, name, version, lease)
    gate_path = gate_path or config.registry.gate
    gate = load_gate(gate_path)
    if tags.get("wysiwyc.black_box") != "true" and not gate.allow_white_box:  # before any evaluation
        raise WysiwycError(
            f"promote: models:/{name}/{version} is not a black-box Explainer (explainer.init="
            f"{tags.get('wysiwyc.explainer_init', 'unknown')}, black_box={tags.get('wysiwyc.black_box', 'unknown')}): "
            f"it reads the classifier's weights, a different method from the paper's; the gate "
            f"{gate_path} refuses it (set allow_white_box: true in a gate file of its own to promote such a "
            f"variant on purpose)"
        )
    classifier_check = _classifier_check(client, name, version, tags, gate, gate_path)
    split = gate_split(gate, gate_path, config, tags)
    evaluation = ensure_evaluation(name, version, gate, split, config, progress)
    values = evaluation["metrics"]
    checks = [_check(m, "minimum", values.get(m), b) for m, b in gate.minimum.items()]
    checks += [_check(m, "maximum", values.get(m), b) for m, b in gate.maximum.items()]
    champion = alias_versions(client, name).get(CHAMPION)
    if champion is not None and champion != version and gate.champion_margin:
        reference = ensure_evaluation(name, champion, gate, split, config, progress)["metrics"]
        checks += [
            _check(m, "champion_margin", values.get(m), b, reference.get(m)) for m, b in gate.champion_margin.items()
        ]
    checks.append(classifier_check)
    model_uri = f"models:/{name}/{version}"
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise WysiwycError(
            f"promote: {model_uri} did not pass the gate {gate_path} on {evaluation['split']} "
            f"(champion stays {'v' + champion if champion else 'unset'}): " + "; ".join(c["reason"] for c in failed)
        )

    _unchanged(client, name, champion, lease)
    _move_champion(
        client,
        name,
        version,
        champion,
        gate_path,
        {
            "wysiwyc.gate": gate_path,
            "wysiwyc.gate.config": json.dumps(gate.model_dump(mode="json")),
            "wysiwyc.gate.split": evaluation["split"],
            "wysiwyc.gate.split_digest": evaluation["digest"],
            "wysiwyc.gate.result": "passed",
            "wysiwyc.gate.checks": json.dumps(checks),
            "wysiwyc.gate.champion_before": champion or "none",
        },
    )
    return {
        "name": name,
        "version": version,
        "model_uri": model_uri,
        "previous_champion": champion,
        "aliases": alias_versions(client, name),
        "gate": gate_path,
        "split": evaluation["split"],
        "evaluation": values,
        "metrics": evaluation["metrics_uri"],
        "checks": [c["reason"] for c in checks],
    }


def _move_champion(client, name: str, version: str, champion: str | None, gate: str, tags: dict) -> None:
    """``champion`` → ``version`` (the old champion → ``previous-champion``), the decision's tags on the
    version and an event on the model."""
    at, user = utc_now(), current_user()
    if champion is not None and champion != version:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in {"wysiwyc.promoted_at": at, "wysiwyc.promoted_by": user, **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    event = {"action": "promote", "version": version, "previous_champion": champion, "gate": gate, "at": at, "by": user}
    _event(client, name, event)
    log.info("promote: models:/%s/%s is @%s (previous: %s)", name, version, CHAMPION, champion)


def _promote_classifier(client, name: str, version: str, lease: Lease) -> dict:
    """A classifier version becomes ``champion``: no Explainer gate applies (its owners evaluate it); the
    Explainers registered for the previous champion now fail the stale-classifier check until one is
    trained for this version."""
    champion = alias_versions(client, name).get(CHAMPION)
    reason = "a classifier: the Explainer gate does not apply"
    _unchanged(client, name, champion, lease)
    _move_champion(client, name, version, champion, "none", {"wysiwyc.gate.result": reason})
    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "previous_champion": champion,
        "aliases": alias_versions(client, name),
        "gate": None,
        "split": None,
        "evaluation": {},
        "metrics": None,
        "checks": [reason],
    }


def _classifier_check(client, name: str, version: str, tags: dict, gate, gate_path: str) -> dict:
    """The stale-classifier check of an Explainer version as a gate record; raises WysiwycError (before any
    evaluation) when the registered classifier it explains is not that model's ``@champion`` and the gate
    does not allow it."""
    found = explained_classifier(client, tags)
    record = {"metric": "classifier", "kind": "classifier_champion", "passed": True}
    if found is None:
        return {**record, "reason": "its classifier is not registered (`wysiwyc register --classifier`): not checked"}
    classifier, explained = found
    champion = alias_versions(client, classifier).get(CHAMPION)
    if champion == explained:
        return {**record, "reason": f"explains models:/{classifier}/{explained}, the classifier's @{CHAMPION}"}
    now = f"v{champion}" if champion else "unset"
    if gate.allow_stale_classifier:
        return {
            **record,
            "reason": f"explains models:/{classifier}/{explained}, not the classifier's @{CHAMPION} ({now}): "
            f"allowed by allow_stale_classifier",
        }
    raise WysiwycError(
        f"promote: models:/{name}/{version} explains the classifier models:/{classifier}/{explained}, but "
        f"models:/{classifier}@{CHAMPION} is {now}: it would explain a classifier that does not serve. Train "
        f"and register an Explainer for the champion classifier (or promote that classifier version first); to "
        f"promote it anyway set allow_stale_classifier: true in a gate file of its own (gate: {gate_path})"
    )


def rollback(name: str, config) -> dict:
    """Make ``previous-champion`` the ``champion`` again (the alias ``previous-champion`` is then removed).

    Raises:
        WysiwycError: no such model, or no ``previous-champion`` to return to.
    """
    uri = registry_uri(config)
    client = mlflow_client(uri)
    with _aliases_lease(name, config):
        return _rollback(client, uri, name)


def _rollback(client, uri: str, name: str) -> dict:
    previous = resolve_model(f"models:/{name}@{PREVIOUS}", uri)[1]  # a clear error: nothing to roll back to
    champion = alias_versions(client, name).get(CHAMPION)
    at, user = utc_now(), current_user()
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    for key, value in {
        "wysiwyc.restored_at": at,
        "wysiwyc.restored_by": user,
        "wysiwyc.restored_from": champion or "none",
    }.items():
        client.set_model_version_tag(name, previous, key, value)
    if champion is not None:
        client.set_model_version_tag(name, champion, "wysiwyc.rolled_back_at", at)
        client.set_model_version_tag(name, champion, "wysiwyc.rolled_back_by", user)
    _event(client, name, {"action": "rollback", "version": previous, "from": champion, "at": at, "by": user})
    log.info("rollback: models:/%s/%s is @%s again (was v%s)", name, previous, CHAMPION, champion)
    return {
        "name": name,
        "version": previous,
        "model_uri": f"models:/{name}/{previous}",
        "rolled_back_from": champion,
        "aliases": alias_versions(client, name),
    }
