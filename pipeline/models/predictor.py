"""The Explainer with its Explanandum, ready to use: images → per-class masks + classifier probabilities.

:func:`load_predictor` builds one from an Explainer checkpoint URI (local path or ``s3://``); the
registry (:mod:`pipeline.registry`) builds one from a ``models:/NAME@alias`` URI. Evaluation, batch
attribution and consumers of a registered Explainer all go through :class:`Predictor`, so what a
registered model computes is exactly what ``wysiwyc evaluate`` measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from pipeline import storage
from pipeline.errors import WysiwycError

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """``masks``: (B, C, H, W) per-class masks in [0, 1] (every class, one Explainer pass);
    ``probs``: (B, C) the Explanandum's sigmoid probabilities on the unmasked images."""

    masks: torch.Tensor
    probs: torch.Tensor


@dataclass
class Predictor:
    """An Explainer, the frozen Explanandum it explains, and what is recorded about both.

    Inputs are ImageNet-normalised (B, 3, S, S) batches (:meth:`preprocess` makes one image's tensor
    from a PIL image); any batch size works.
    """

    explainer: nn.Module
    explanandum: nn.Module
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

    def to(self, device: str | torch.device) -> Predictor:
        """Move both nets to ``device`` (``"cuda"``, ``"cpu"``) in channels_last memory format (on 2 CPU cores
        the classifier's forward passes ran ~1.6x the images/s with it; the usual format on GPU); returns self."""
        self.device = torch.device(device)
        self.explainer.to(self.device, memory_format=torch.channels_last)
        self.explanandum.to(self.device, memory_format=torch.channels_last)
        return self

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode) → the (3, S, S) normalised tensor the nets take."""
        from pipeline.data.transforms import image_to_tensor

        return image_to_tensor(image, self.image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, amp: bool = False) -> Prediction:
        """Per-class masks for every class and the Explanandum's probabilities, on ``self.device``.

        ``amp`` runs both nets under bf16 autocast on CUDA (ignored on the CPU); outputs are float32.
        """
        from pipeline.method.masks import class_masks

        x = images.to(self.device, non_blocking=True)
        use_amp = amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            masks = class_masks(self.explainer(x).float())
            probs = torch.sigmoid(self.explanandum(x).float())
        return Prediction(masks=masks.float().contiguous(), probs=probs.float())


def load_predictor(
    explainer_uri: str, explanandum_uri: str | None = None, opts=None, image_size: int | None = None
) -> Predictor:
    """The Explainer of a checkpoint and the Explanandum it was trained to explain.

    The Explanandum is ``explanandum_uri`` when given, else the one the Explainer checkpoint records
    (``ckpt["explanandum"]["uri"]``); its sha256 must equal the recorded one.

    Args:
        explainer_uri: Explainer checkpoint (local path or ``s3://``).
        explanandum_uri: the classifier checkpoint, to override the recorded location (same bytes).
        opts: :class:`pipeline.storage.S3Options`.
        image_size: the size to run at (default: the size the Explainer was trained at).

    Raises:
        WysiwycError: a missing or unloadable checkpoint, a classifier that is not the recorded one,
            or class lists that differ.
    """
    from pipeline.train.checkpoint import classifier_from_checkpoint, explainer_from_checkpoint

    explainer, ckpt, explainer_sha = explainer_from_checkpoint(explainer_uri, opts)
    record = ckpt.get("explanandum") or {}
    explanandum_uri = explanandum_uri or record.get("uri")
    if not explanandum_uri:
        raise WysiwycError(
            f"the Explainer checkpoint {storage.redact(explainer_uri)} does not record its "
            f"Explanandum; set explanandum.checkpoint to the classifier it explains"
        )
    explanandum, cls_ckpt, explanandum_sha = classifier_from_checkpoint(explanandum_uri, opts)
    expected = record.get("sha256")
    if expected and explanandum_sha != expected:
        raise WysiwycError(
            f"the Explanandum {storage.redact(explanandum_uri)} (sha256 {explanandum_sha[:16]}…) is not "
            f"the classifier the Explainer {storage.redact(explainer_uri)} was trained to explain (recorded: "
            f"{storage.redact(str(record.get('uri')))}, sha256 {expected[:16]}…); the file was changed or "
            f"replaced: point explanandum.checkpoint at the recorded classifier, or use an Explainer "
            f"trained for this one"
        )
    if not expected:
        log.warning(
            "%s records no Explanandum sha256; cannot verify %s",
            storage.redact(explainer_uri),
            storage.redact(explanandum_uri),
        )
    classes = list(ckpt["classes"])
    if list(cls_ckpt["classes"]) != classes:
        raise WysiwycError(
            f"the Explainer {storage.redact(explainer_uri)} has classes {classes} but the "
            f"Explanandum {storage.redact(explanandum_uri)} has {list(cls_ckpt['classes'])}"
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
        explanandum_sha256=explanandum_sha,
        checkpoint=ckpt,
    )
