"""The model of a run, resolved once (alias → version) and loaded on the driver; a resumed run keeps the
version it started with (:func:`pin_model`)."""

from __future__ import annotations

from pipeline import storage, tracking
from pipeline.attribute.inputs import absolute
from pipeline.attribute.outputs import owner
from pipeline.errors import WysiwycError
from pipeline.models.predictor import load_model


def pin_model(config, record: dict | None, opts=None):
    """Resolve ``explainer.checkpoint`` once (alias → version) and load it: ``(predictor, model record)``.

    A resumed run (``record`` from its ``_run.json``) uses the version it started with.
    """
    given = config.explainer.checkpoint
    if not given:
        raise WysiwycError(
            "attribute: give the model: --model models:/NAME@champion or a checkpoint URI (explainer.checkpoint)"
        )
    if record is not None:
        if record["model"]["model"] != given:
            raise WysiwycError(
                f"attribute: run {record['run_id']} was started by {owner(record)} with --model "
                f"{record['model']['model']}, not {given}: resume it with that model, or start a "
                f"new run with another --run-id"
            )
        pinned = record["model"]["model_uri"]
    elif given.startswith(tracking.REGISTRY_PREFIX):
        name, version = tracking.resolve_model(given, tracking.registry_uri(config))
        pinned = f"{tracking.REGISTRY_PREFIX}{name}/{version}"
    else:
        pinned = absolute(given)
    try:
        predictor = load_model(
            pinned, tracking.registry_uri(config), explanandum_uri=config.explanandum.model, opts=opts
        )
        predictor.choose_classes_with(config.attribute.class_source)
    except WysiwycError as exc:
        raise WysiwycError(f"attribute: {exc}") from None
    if record is not None and predictor.explainer_sha256 != record["model"]["explainer_sha256"]:
        raise WysiwycError(
            f"attribute: the model {storage.redact(pinned)} has changed since run "
            f"{record['run_id']} started (sha256 differs): start a new run with another --run-id"
        )
    registered = pinned.startswith(tracking.REGISTRY_PREFIX)
    model = {
        "model": given,
        "model_uri": pinned,
        "model_name": predictor.model_name if registered else storage.redact(pinned),
        "model_version": str(predictor.model_version) if registered else predictor.explainer_sha256[:12],
        "explainer_sha256": predictor.explainer_sha256,
        "explanandum_uri": storage.redact(predictor.explanandum_uri),
        "explanandum_sha256": predictor.explanandum_sha256,
        "classes": list(predictor.classes),
        "image_size": predictor.image_size,
        "class_source": predictor.class_source,
    }
    return predictor, model
