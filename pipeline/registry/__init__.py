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

Consumers load a version with :func:`load_explainer` (:func:`pipeline.models.predictor.load_model`, a
:class:`~pipeline.models.predictor.Predictor`),
with ``mlflow.pyfunc.load_model(uri)`` where this package is not installed (the version carries its code:
``predict(pandas.DataFrame({"image": [bytes, ...]}))`` → one row per image with ``classes``,
``probabilities``, ``masks``; :mod:`~pipeline.registry.pyfunc`), or over HTTP (``wysiwyc serve``,
:mod:`pipeline.serve`). Classifiers are registered too (:func:`register_classifier`): an Explainer version
records the classifier version it explains, the default gate promotes it only while that classifier is
its model's ``@champion``, and :func:`lineage` follows data → classifier → Explainer → attribution runs.

The registry lives at the tracking URI: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the
embedded sqlite file beside ``trainer.storage`` (the registry needs a database store).

Modules: :mod:`~pipeline.registry.lookup` (names, tags and helpers; where the registry is and what a
``models:/`` URI names: :mod:`pipeline.tracking`), :mod:`~pipeline.registry.package` (registering a
version), :mod:`~pipeline.registry.pyfunc` (the pyfunc models) and :mod:`~pipeline.registry.lineage`;
promotion and rollback, which evaluate a candidate, are a workflow (:mod:`pipeline.workflows.promotion`).
The names below are the public API; versions registered before the pyfunc moved load it through
``pipeline.registry.ExplainerModel``.
"""

from pipeline.models.predictor import load_model as load_explainer  # the documented consumer API name
from pipeline.registry.lineage import lineage
from pipeline.registry.package import register_checkpoint, register_classifier, register_from_sweep
from pipeline.registry.pyfunc import ClassifierModel, ExplainerModel
from pipeline.tracking import registry_uri, resolve_model

__all__ = [
    "ClassifierModel",
    "ExplainerModel",
    "lineage",
    "load_explainer",
    "register_checkpoint",
    "register_classifier",
    "register_from_sweep",
    "registry_uri",
    "resolve_model",
]
