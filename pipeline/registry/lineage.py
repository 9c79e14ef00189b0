"""Where a registered Explainer comes from and where it went (:func:`lineage`): the training data's shard
manifest digests → the classifier version it explains → the Explainer version → the attribution runs
that used it (their MLflow runs: ``wysiwyc attribute`` logs ``model_name`` / ``model_version`` params)."""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.registry.lookup import (
    CHAMPION,
    explained_classifier,
)
from pipeline.tracking import alias_versions, mlflow_client, registry_uri, resolve_model


def _attribution_runs(client, name: str, version: str) -> list[dict]:
    """The MLflow runs of ``wysiwyc attribute`` over ``models:/NAME/V``, newest first, in any experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        filter_string=f"params.model_name = '{name}' and params.model_version = '{version}'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    return [
        {
            "run_id": run.data.params.get("run_id"),
            "mlflow_run_id": run.info.run_id,
            "status": run.info.status,
            "input": run.data.params.get("input"),
            "output": run.data.params.get("output"),
            "images": int(run.data.metrics["images"]) if "images" in run.data.metrics else None,
            "error_rate": run.data.metrics.get("error_rate"),
            "started_ms": run.info.start_time,
        }
        for run in runs
    ]


def lineage(model_uri: str, config) -> dict:
    """The chain of a registered Explainer (or classifier) version, for ``wysiwyc lineage URI [--json]``.

    Returns:
        ``model_uri``, ``explainer_version`` (``models:/NAME/V``), ``classifier_version`` (the registered
        classifier version it explains, ``models:/C/V``, or None when that classifier is not registered),
        ``classifier_champion`` (that classifier model's ``@champion`` now, and ``classifier_is_champion``),
        ``dataset_digests`` (``explainer`` / ``classifier``: the digest of each one's training split
        manifest, ``unknown`` when unrecorded), ``datasets`` (their URIs), ``attribution_runs`` (newest
        first: ``run_id``, ``mlflow_run_id``, ``status``, ``input``, ``output``, ``images``, ``error_rate``).

    Raises:
        WysiwycError: the URI does not resolve.
    """
    uri = registry_uri(config)
    client = mlflow_client(uri)
    name, version = resolve_model(model_uri, uri)
    tags = client.get_model_version(name, version).tags
    if tags.get("wysiwyc.kind") == "classifier":
        classifier, explainer = (name, version), None
        explainer_tags: dict = {}
        classifier_tags = tags
    else:
        explainer, explainer_tags = (name, version), tags
        classifier = explained_classifier(client, tags)
        classifier_tags = client.get_model_version(*classifier).tags if classifier else {}
    try:
        champion = alias_versions(client, classifier[0]).get(CHAMPION) if classifier else None
        runs = _attribution_runs(client, *explainer) if explainer else []
    except MlflowException as exc:
        raise WysiwycError(
            f"lineage: the registry at {storage.redact(uri)} did not answer ({str(exc).splitlines()[0][:200]})"
        ) from None
    return {
        "model_uri": model_uri,
        "explainer_version": f"models:/{explainer[0]}/{explainer[1]}" if explainer else None,
        "classifier_version": f"models:/{classifier[0]}/{classifier[1]}" if classifier else None,
        "classifier_champion": f"models:/{classifier[0]}/{champion}" if classifier and champion else None,
        "classifier_is_champion": bool(classifier and champion == classifier[1]),
        "explanandum_sha256": explainer_tags.get("wysiwyc.explanandum_sha256")
        or classifier_tags.get("wysiwyc.classifier_sha256"),
        "dataset_digests": {
            "classifier": classifier_tags.get("wysiwyc.dataset_digest", "unknown") if classifier else "unknown",
            "explainer": explainer_tags.get("wysiwyc.dataset_digest", "unknown") if explainer else None,
        },
        "datasets": {
            "classifier": classifier_tags.get("wysiwyc.dataset") if classifier else None,
            "explainer": explainer_tags.get("wysiwyc.dataset") if explainer else None,
        },
        "classes": json.loads(tags.get("wysiwyc.classes", "[]")),
        "attribution_runs": runs,
    }


def lineage_text(chain: dict) -> str:
    """The chain as lines for a person."""
    digests, datasets = chain["dataset_digests"], chain["datasets"]
    lines = [f"lineage of {chain['model_uri']}"]
    if chain["classifier_version"]:
        state = "the @champion" if chain["classifier_is_champion"] else f"@champion is {chain['classifier_champion']}"
        lines.append(
            f"  data        {datasets['classifier'] or '?'} (manifest digest {digests['classifier'][:16]})\n"
            f"  classifier  {chain['classifier_version']} ({state})"
        )
    else:
        lines.append(f"  classifier  not registered (sha256 {str(chain['explanandum_sha256'])[:16]}…)")
    if chain["explainer_version"]:
        lines.append(
            f"  data        {datasets['explainer'] or '?'} (manifest digest {str(digests['explainer'])[:16]})\n"
            f"  explainer   {chain['explainer_version']}"
        )
        runs = chain["attribution_runs"]
        lines.append(f"  attribution runs: {len(runs)}")
        lines += [
            f"    {r['run_id']}  {r['status']:<9} {r['images'] if r['images'] is not None else '?':>9} images  "
            f"{r['input']} → {r['output']}"
            for r in runs
        ]
    return "\n".join(lines)
