"""The Explainer with its Explanandum, ready to use: images → per-class masks + classifier probabilities.

:func:`load_model` builds one from any Explainer URI: a ``models:/NAME@alias`` or ``models:/NAME/V``
registered version, or a checkpoint URI (local path or ``s3://``, :func:`load_predictor`). Evaluation, batch
attribution, the endpoint and consumers of a registered Explainer all go through it, so what a registered
model computes is exactly what ``wysiwyc evaluate`` measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import storage, tracking
from pipeline.data.transforms import Normalization, image_to_tensor
from pipeline.errors import WysiwycError
from pipeline.method.masks import class_masks
from pipeline.models.classifier import Classifier, recorded_classifier
from pipeline.models.explainer import build_explainer

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """``masks``: (B, C, H, W) per-class masks in [0, 1] (every class, one Explainer pass);
    ``probs``: (B, C) the Explanandum's probabilities (sigmoid, or softmax for a single-label F) on the unmasked
    images (or, with ``class_source="explainer"``, the Explainer's class head's)."""

    masks: torch.Tensor
    probs: torch.Tensor


@dataclass
class Predictor:
    """An Explainer, the frozen Explanandum it explains, and what is recorded about both.

    Inputs are (B, 3, S, S) batches normalised the Explanandum's way (:meth:`normalize` of uint8 pixels,
    :meth:`preprocess` of a PIL image); any batch size works.
    """

    explainer: nn.Module
    explanandum: Classifier
    classes: list[str]
    image_size: int
    explainer_uri: str
    explainer_sha256: str
    explanandum_uri: str
    explanandum_sha256: str
    checkpoint: dict = field(repr=False, default_factory=dict)  # the Explainer checkpoint (config, metrics, …)
    model_name: str | None = None  # registered model name and version, when loaded from the registry
    model_version: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    class_source: str = "explanandum"  # whose probabilities choose classes: F's, or the Explainer's class head

    def choose_classes_with(self, source: str) -> Predictor:
        """``explanandum`` (F's probabilities, the default) or ``explainer`` (the distilled Explainer's own class
        head, with F's output activation: no F call at all); returns self."""
        if source == "explainer" and getattr(self.explainer, "cam_channels", None) is None:
            raise WysiwycError(
                f"attribute.class_source=explainer: the Explainer {storage.redact(self.explainer_uri)} has no class "
                "head (a distilled Explainer with explainer.cam=true has one); use class_source=explanandum"
            )
        self.class_source = source
        return self

    def to(self, device: str | torch.device) -> Predictor:
        """Move both nets to ``device`` (``"cuda"``, ``"cpu"``) in channels_last memory format (on 2 CPU cores
        the classifier's forward passes ran ~1.6x the images/s with it; the usual format on GPU); returns self."""
        self.device = torch.device(device)
        self.explainer.to(self.device, memory_format=torch.channels_last)
        self.explanandum.to(self.device, memory_format=torch.channels_last)
        return self

    @property
    def norm(self) -> Normalization:
        """The Explanandum's input normalisation (the Explainer sees the same images)."""
        return self.explanandum.interface.normalization

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(…, 3, S, S) uint8 pixels → the float images the nets take (float input is taken as normalised)."""
        return self.norm.uint8(pixels) if pixels.dtype == torch.uint8 else pixels.float()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode) → the (3, S, S) normalised tensor the nets take."""

        return image_to_tensor(image, self.image_size, norm=self.norm)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, amp: bool = False) -> Prediction:
        """Per-class masks for every class and the Explanandum's probabilities, on ``self.device``.

        ``amp`` runs both nets under bf16 autocast on CUDA (ignored on the CPU); outputs are float32.
        """

        x = images.to(self.device, non_blocking=True)
        use_amp = amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            masks = class_masks(self.explainer(x).float())
            if self.class_source == "explainer":
                logits = self.explainer(x, classify=True)
            else:
                logits = self.explanandum(x)
            probs = self.explanandum.probabilities(logits.float())
        return Prediction(masks=masks.float().contiguous(), probs=probs.float())


def _expect(state: dict, kind: str, url: str) -> None:
    if state.get("kind") != kind:
        raise WysiwycError(f"{storage.redact(url)} is a {state.get('kind')} checkpoint, expected a {kind} one")


def explainer_from_checkpoint(url: str, opts=None) -> tuple[nn.Module, dict, str]:
    """The Explainer of a checkpoint (eval mode). Returns ``(model, checkpoint, sha256)``."""
    state, digest = ckpt.load_checkpoint(url, opts)
    _expect(state, "explainer", url)
    model = build_explainer(state["arch"], len(state["classes"]), weights=state["model"])
    return model.eval(), state, digest


def load_predictor(
    explainer_uri: str,
    explanandum_uri: str | None = None,
    opts=None,
    image_size: int | None = None,
    registry: str | None = None,
) -> Predictor:
    """The Explainer of a checkpoint and the Explanandum it was trained to explain.

    The Explanandum is ``explanandum_uri`` when given, else the one the Explainer checkpoint records
    (``ckpt["explanandum"]["uri"]``); its sha256 must equal the recorded one.

    Args:
        explainer_uri: Explainer checkpoint (local path or ``s3://``).
        explanandum_uri: the classifier, to override the recorded location (same bytes, same form).
        opts: :class:`pipeline.storage.S3Options`.
        image_size: the size to run at (default: the size the Explainer was trained at).
        registry: the MLflow registry of a recorded ``models:/`` classifier.

    Raises:
        WysiwycError: a missing or unloadable checkpoint, a classifier that is not the recorded one,
            or class lists that differ.
    """
    explainer, ckpt, explainer_sha = explainer_from_checkpoint(explainer_uri, opts)
    record = ckpt.get("explanandum") or {}
    explanandum_uri = explanandum_uri or record.get("uri")
    if not explanandum_uri:
        raise WysiwycError(
            f"the Explainer checkpoint {storage.redact(explainer_uri)} does not record its "
            f"Explanandum; set explanandum.model to the classifier it explains"
        )
    explanandum = recorded_classifier(record, explanandum_uri, opts, registry)
    expected = record.get("sha256")
    if expected and explanandum.sha256 != expected:
        raise WysiwycError(
            f"the Explanandum {storage.redact(explanandum_uri)} (sha256 {explanandum.sha256[:16]}…) is not "
            f"the classifier the Explainer {storage.redact(explainer_uri)} was trained to explain (recorded: "
            f"{storage.redact(str(record.get('uri')))}, sha256 {expected[:16]}…); the file was changed or "
            f"replaced: point explanandum.model at the recorded classifier, or use an Explainer "
            f"trained for this one"
        )
    if not expected:
        log.warning(
            "%s records no Explanandum sha256; cannot verify %s",
            storage.redact(explainer_uri),
            storage.redact(explanandum_uri),
        )
    classes = list(ckpt["classes"])
    if explanandum.classes != classes:
        raise WysiwycError(
            f"the Explainer {storage.redact(explainer_uri)} has classes {classes} but the "
            f"Explanandum {storage.redact(explanandum_uri)} has {explanandum.classes}"
        )
    trained_at = int(ckpt.get("image_size") or 0)
    size = int(image_size or trained_at or 224)
    if trained_at and trained_at != size:
        log.warning(
            "running at %d px, the Explainer %s was trained at %d px", size, storage.redact(explainer_uri), trained_at
        )
    return Predictor(
        explainer=explainer.eval(),
        explanandum=explanandum,
        classes=classes,
        image_size=size,
        explainer_uri=explainer_uri,
        explainer_sha256=explainer_sha,
        explanandum_uri=explanandum_uri,
        explanandum_sha256=explanandum.sha256,
        checkpoint=ckpt,
    )


def load_model(
    model_uri: str,
    tracking_uri: str | None = None,
    device=None,
    image_size: int | None = None,
    *,
    explanandum_uri: str | None = None,
    opts=None,
) -> Predictor:
    """A ready :class:`Predictor` for any Explainer URI: a registered version or a checkpoint (the one way every
    stage, consumer and the endpoint turns a URI into a Predictor).

    ``models:/NAME@alias`` is resolved once, here: the returned predictor has ``model_name`` and
    ``model_version`` set (record them), ``explainer_uri`` is ``models:/NAME/V``; the resolution is
    logged. A plain checkpoint URI (local path or ``s3://``) loads through
    :func:`load_predictor` (``opts``, else the ``AWS_*`` environment) with ``explanandum_uri`` when given.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/V`` or an Explainer checkpoint URI.
        explanandum_uri: a checkpoint only: the classifier, to override the recorded location (a registered
            version carries its own).
        opts: a checkpoint only: :class:`pipeline.storage.S3Options`.
        tracking_uri: the registry (default: ``MLFLOW_TRACKING_URI``, else the embedded sqlite file), also of a
            classifier the Explainer records as ``models:/…``.
        device: move the nets there (``"cuda"``, ``"cpu"``); default CPU.
        image_size: run at this size (default: the size the Explainer was trained at).

    Raises:
        WysiwycError: the URI does not resolve or its files do not load.
    """
    if not str(model_uri).startswith(tracking.REGISTRY_PREFIX):  # its classifier may be a version of the registry
        predictor = load_predictor(model_uri, explanandum_uri, opts, image_size=image_size, registry=tracking_uri)
    else:
        if explanandum_uri:
            log.info("%s carries its Explanandum; %s is not used", model_uri, storage.redact(explanandum_uri))
        uri = tracking_uri or tracking.registry_uri()
        with tracking.downloaded_version(model_uri, uri) as version:
            artifacts = version.folder / "artifacts"
            if not (artifacts / "explainer.pt").is_file():
                raise WysiwycError(
                    f"{model_uri} (version {version.version}) is not a wysiwyc Explainer package "
                    f"(no artifacts/explainer.pt); register it with `wysiwyc register`"
                )
            predictor = load_predictor(
                str(artifacts / "explainer.pt"), str(artifacts / "explanandum.pt"), image_size=image_size, registry=uri
            )
        name, number, tags = version.name, version.version, version.tags
        recorded = tags.get(tracking.EXPLAINER_SHA)
        if recorded and recorded != predictor.explainer_sha256:
            raise WysiwycError(
                f"{model_uri} (version {number}): the downloaded explainer.pt (sha256 "
                f"{predictor.explainer_sha256[:16]}…) is not the registered one ({tracking.EXPLAINER_SHA} "
                f"{recorded[:16]}…): the version's files were changed after registration; register the "
                f"checkpoint again or restore the artifact"
            )
        predictor.explainer_uri = f"models:/{name}/{number}"
        predictor.explanandum_uri = tags.get("wysiwyc.explanandum", predictor.explanandum_uri)
        predictor.model_name, predictor.model_version = name, number
    if device is not None:
        predictor.to(device)
    return predictor
