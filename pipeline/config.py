"""Validated configuration: pydantic models loaded from YAML, with dotted ``key.sub=value`` overrides.

One :class:`Config` holds every section; a command uses the sections it needs. Every model forbids
unknown keys, so a typo is an error that names the key, the file it came from and the accepted keys,
instead of a silently ignored setting. Secrets (storage keys) are ``SecretStr``: they never appear in
a dumped config, an error message or an MLflow param.

The presets ship inside the package (``pipeline/presets/``; the checkout's ``configs/`` is a link to it), so
``-c cpu/explainer`` finds one by its short name wherever the package is installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from pipeline.errors import WysiwycError
from pipeline.method.class_rule import ClassRule, Mode
from pipeline.storage import S3Options, redact

PRESETS = Path(__file__).resolve().parent / "presets"


# the ImageNet backbone of each torchvision segmentation Explainer (its file: explainer.backbone_weights)
# a name that becomes a folder under a storage root (trainer.run_name, sweep.name): no separator, no leading dot
# the one default pixel limit (data.max_image_pixels, attribute.max_image_pixels, serve.max_image_pixels, the
# registered pyfunc): a 24-megapixel photo passes; checked from the header, before decoding
MAX_IMAGE_PIXELS = 25_000_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
BACKBONE_OF = {"deeplabv3_resnet50": "resnet50", "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large"}


def backbone_howto(net: str, key: str = "explanandum.pretrained_backbone") -> str:
    """How to give the config ``key`` a torchvision ``net`` ImageNet state dict (the end of every message
    about one, for the Explanandum's and the Explainer's backbones alike)."""
    return (
        f"set {key} to a local path or s3:// URL of a torchvision {net} state dict; "
        "download it once on a machine with network, e.g. "
        f"`python -c \"import torch, torchvision; torch.save(torchvision.models.{net}(weights='DEFAULT')"
        f".state_dict(), '{net}_imagenet.pth')\"`, then copy the file here (or upload it to object storage). "
        "Weights are never downloaded at run time."
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _backbone_file_rule(section: str, init: str, key: str, given: str | None, net) -> None:
    """``init=backbone_file`` comes with its ImageNet file (never a silent random backbone), and the file
    only with it; ``net()`` names the torchvision net whose file the message says how to get."""
    if init == "backbone_file" and not given:
        raise ValueError(
            f"{section}.init=backbone_file needs {section}.{key} (never a silent random backbone): "
            f"{backbone_howto(net(), f'{section}.{key}')}"
        )
    if given and init != "backbone_file":
        raise ValueError(f"{section}.{key} is only read with {section}.init=backbone_file (init is {init})")


class StorageConfig(_Section):
    """Object storage; every field left empty falls back to the standard ``AWS_*`` environment."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (AWS_ENDPOINT_URL), e.g. http://127.0.0.1:8333")
    region: str | None = Field(None, description="S3 region (AWS_REGION)")
    access_key_id: SecretStr | None = Field(None, description="S3 key id (AWS_ACCESS_KEY_ID); never logged")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret (AWS_SECRET_ACCESS_KEY); never logged")

    def options(self):
        """The :class:`pipeline.storage.S3Options` these settings describe."""

        def reveal(secret: SecretStr | None) -> str | None:
            return secret.get_secret_value() if secret is not None else None

        return S3Options(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=reveal(self.access_key_id),
            secret_access_key=reveal(self.secret_access_key),
        )


class DataConfig(_Section):
    """Where the shards are and how training reads them."""

    train: str | None = Field(None, description="split prefix (…/train) or manifest URL")
    val: str | None = Field(None, description="validation split (…/val) or manifest URL (training, promotion gates)")
    test: str | None = Field(None, description="test split with segmentation (evaluate: the final numbers)")
    classes: list[str] | None = Field(None, description="class names to use (default: the manifest's)")
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS,
        ge=1,
        description="ingest skips larger images (a listed input error) and training and evaluation refuse them, "
        "read from the header before decoding (the default of serve.* and attribute.* too)",
    )
    image_size: int = Field(224, gt=0, description="square side in pixels the nets see")
    loader_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="samples in the training shuffle buffer")
    flip: bool = Field(True, description="random horizontal flip of image and segmentation")
    labels: Literal["dataset", "explanandum"] = Field(
        "dataset",
        description="train explainer: the classes to explain per image: dataset (the shards' labels) or "
        "explanandum (F's own prediction on the clean image: unlabelled shards work; explanandum.threshold)",
    )

    @model_validator(mode="after")
    def _no_selection_on_test(self):
        if self.val and self.test and self.val.rstrip("/") == self.test.rstrip("/"):
            raise ValueError(
                f"data.val and data.test are the same split ({self.val}): training selects its "
                f"checkpoint and stops early on data.val, so the test split would no longer be held "
                f"apart; give a validation split of its own (VOC2007: val; COCO: a part of train2014)"
            )
        return self


class IngestConfig(_Section):
    """How ``wysiwyc ingest`` writes shards."""

    shard_size: int = Field(1000, gt=0, description="samples per shard at most")
    shard_max_bytes: int = Field(256 * 2**20, gt=0, description="bytes per shard at most")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="skip: list bad inputs in the manifest; fail: stop, publish nothing"
    )
    overwrite: bool = Field(False, description="replace a split the output already holds")
    workers: int | None = Field(
        None, ge=1, description="encoding processes (default: all cores, one per 256 images at most)"
    )


class ExplanandumConfig(_Section):
    """The frozen classifier being explained (F), and the one ``train classifier`` trains."""

    arch: str = Field(
        "small_cnn",
        description="the classifier: vgg16, resnet50, resnet18 or small_cnn (wysiwyc's; paper heads for vgg16 / "
        "resnet50), or torchvision:NAME (any torchvision classification model; its state dict in weights)",
    )
    model: str | None = Field(
        None,
        description="the classifier to explain (URI, local or s3://): a wysiwyc classifier checkpoint, a TorchScript "
        "file, a torch.export program (.pt2), or models:/NAME@alias | models:/NAME/V (a wysiwyc-registered "
        "classifier or an MLflow pytorch-flavour model)",
    )
    checkpoint: str | None = Field(None, description="alias of model (the name before BYO classifiers)")
    weights: str | None = Field(None, description="arch=torchvision:NAME: URI of the classifier's whole state dict")
    classes: list[str] | str | None = Field(
        None,
        description="F's class names in output order (a list, or the URI of a text file, one name a line); "
        "default: what the model carries",
    )
    output: Literal["sigmoid", "softmax"] | None = Field(
        None, description="sigmoid (multi-label) or softmax (single-label); default: what the model carries"
    )
    image_size: int | None = Field(
        None, gt=0, description="the side F takes (masked images are resized to it); default: data.image_size"
    )
    mean: list[float] | None = Field(None, description="F's input normalisation: mean of RGB pixels in [0, 1]")
    std: list[float] | None = Field(None, description="F's input normalisation: std of RGB pixels in [0, 1]")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="data.labels=explanandum: a sigmoid F's labels are its probabilities ≥ this"
    )
    allow_pickle: bool = Field(
        False, description="load an MLflow pytorch model saved as a pickle (runs code from the file: trusted only)"
    )
    init: Literal["scratch", "backbone_file"] = Field(
        "scratch",
        description="train classifier: how the classifier starts: scratch (random; small_cnn), or "
        "backbone_file (vgg16 / resnet*: the ImageNet backbone of pretrained_backbone, the "
        "paper's; required then)",
    )
    pretrained_backbone: str | None = Field(
        None, description="init=backbone_file: a torchvision ImageNet state dict of the arch (local path or s3:// URL)"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch in ("vgg16", "resnet50", "resnet18", "small_cnn") or (
            arch.startswith("torchvision:") and len(arch) > len("torchvision:")
        ):
            return arch
        raise ValueError(f"unknown arch {arch!r}: vgg16, resnet50, resnet18, small_cnn or torchvision:NAME")

    @model_validator(mode="after")
    def _backbone_file_given(self):
        _backbone_file_rule(
            "explanandum", self.init, "pretrained_backbone", self.pretrained_backbone, lambda: self.arch
        )
        return self

    @model_validator(mode="after")
    def _model_alias(self):
        if self.model and self.checkpoint and self.model != self.checkpoint:
            raise ValueError(
                f"explanandum.model={redact(self.model)} and its alias explanandum.checkpoint="
                f"{redact(self.checkpoint)} differ: set one of them"
            )
        if self.checkpoint and not self.model:  # the one name dumped configs and MLflow params use
            object.__setattr__(self, "model", self.checkpoint)
        if self.checkpoint:
            object.__setattr__(self, "checkpoint", None)
        return self


class ExplainerConfig(_Section):
    """The segmentation network that produces the masks, and how its weights start."""

    arch: Literal[
        "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "compact", "resunet", "resunet_os4", "mobileunet"
    ] = Field(
        "resunet",
        description="segmentation net: deeplabv3_resnet50 (the paper's), deeplabv3_mobilenet_v3_large, resunet (the "
        "CPU default, a U-Net of its own), resunet_os4, mobileunet, compact (the earlier default: small_cnn's "
        "blocks)",
    )
    checkpoint: str | None = Field(None, description="checkpoint URI or models:/NAME@alias")
    init: Literal["scratch", "distilled", "backbone_file", "explanandum_copy"] = Field(
        "scratch",
        description="how the weights start. Black-box (the Explanandum is used only as a function): "
        "scratch (random); distilled (resunet/…/compact + cam: first distill_epochs epochs train the "
        "encoder and class-activation branch to reproduce the Explanandum's output "
        "probabilities, then the paper's loss); backbone_file (DeepLab archs: the ImageNet "
        "backbone of backbone_weights, the paper's). White-box variant, refused by the default "
        "promotion gate: explanandum_copy (compact: encoder and branch copied from a small_cnn "
        "Explanandum's weights, i.e. its own class-activation map)",
    )
    distill_epochs: int = Field(
        3, ge=1, description="init=distilled: epochs of distillation before the trainer.epochs of the paper's loss"
    )
    backbone_weights: str | None = Field(
        None,
        description="init=backbone_file: a torchvision resnet50 / mobilenet_v3_large ImageNet state dict "
        "(local path or s3:// URL)",
    )
    levels: int | None = Field(
        None,
        ge=2,
        le=4,
        description="compact arch: encoder levels the U-Net uses, 2..4 (default all 4); fewer = smaller receptive "
        "field and a cheaper net",
    )
    cam: bool = Field(
        False,
        description="resunet, resunet_os4, mobileunet, compact: add the Explainer's own class-activation branch "
        "(one more encoder block and a linear layer, applied per position) to the mask logits: random, or with "
        "init=distilled trained on the Explanandum's outputs only; init=explanandum_copy (white-box, compact) alone "
        "copies the Explanandum's weights into it",
    )

    @model_validator(mode="after")
    def _init_fits_arch(self):
        own = self.arch in ("compact", "resunet", "resunet_os4", "mobileunet")  # wysiwyc's small Explainers

        def net() -> str:
            return BACKBONE_OF.get(self.arch, "resnet50")

        _backbone_file_rule("explainer", self.init, "backbone_weights", self.backbone_weights, net)
        if self.init == "backbone_file" and own:
            raise ValueError(
                f"explainer.init=backbone_file: the {self.arch} Explainer has no ImageNet backbone; "
                "use init=scratch or distilled"
            )
        if self.init == "distilled" and not own:
            raise ValueError(f"explainer.init=distilled is for wysiwyc's own Explainers (resunet, …), not {self.arch}")
        if self.init == "explanandum_copy" and self.arch != "compact":
            raise ValueError(
                f"explainer.init=explanandum_copy copies small_cnn's blocks into the compact Explainer, not {self.arch}"
            )
        if self.init == "distilled" and not self.cam:
            raise ValueError(
                "explainer.init=distilled trains the class-activation branch as the distilled "
                "classifier's head: set explainer.cam=true"
            )
        if self.cam and not own:
            raise ValueError(f"explainer.cam is only for wysiwyc's own Explainers (resunet, …), not {self.arch}")
        if self.levels is not None and self.arch != "compact":
            raise ValueError(f"explainer.levels is only for the compact Explainer, not {self.arch}: set it to null")
        return self

    @property
    def black_box(self) -> bool:
        """Whether the Explainer uses the Explanandum only as a function (every init but explanandum_copy)."""
        return self.init != "explanandum_copy"


class LossConfig(_Section):
    """λ weights and area bounds, named as in the paper's code (defaults: VOC, VGG-16)."""

    entropy_regularizer: float = Field(
        1.0, ge=0, description="λ_e: entropy of the classifier on the inverted-mask image"
    )
    mask_variation_regularizer: float = Field(1.0, ge=0, description="λ_tv: total variation of the masks")
    mask_area_constraint_regularizer: float = Field(1.0, ge=0, description="λ_a: per-class min/max area terms")
    mask_total_area_regularizer: float = Field(0.1, ge=0, description="λ_m: mean of the target mask m")
    ncmask_total_area_regularizer: float = Field(0.3, ge=0, description="λ_n: mean of the non-target mask n")
    class_mask_min_area: float = Field(0.05, ge=0, le=1, description="smallest area fraction of a present class's mask")
    class_mask_max_area: float = Field(0.3, ge=0, le=1, description="largest area fraction of a present class's mask")
    kind: Literal["paper", "rt_saliency", "supervised"] = Field(
        "paper",
        description="paper: the four-term loss of Stalder et al. (the λ above); rt_saliency: Dabkowski & Gal's "
        "(2017) real-time saliency loss with the same Explainer net (the rt_* weights below), a named variant "
        "for the evaluate table's rt_saliency row; supervised: the masks learn the ground-truth segmentation and "
        "never read the classifier (the sanity check's positive control; recorded as not black-box)",
    )
    rt_variation_regularizer: float = Field(
        10.0, ge=0, description="rt_saliency: λ of the merged mask's squared total variation (10 at 224 px)"
    )
    rt_area_regularizer: float = Field(1.0, ge=0, description="rt_saliency: λ of the masks' mean (area)")
    rt_destroyer_regularizer: float = Field(
        5.0, ge=0, description="rt_saliency: λ of the destroyer term (mean p_c(Φ(x, 1 − m)))^power"
    )
    rt_destroyer_power: float = Field(0.3, gt=0, description="rt_saliency: the destroyer term's power")
    rt_alternative: Literal["blur", "noise", "both"] = Field(
        "both",
        description="rt_saliency: what replaces the pixels a mask removes: a Gaussian blur (σ 10 px at 224 px), "
        "coloured noise, or either, drawn per batch (the paper's)",
    )


# the paper's loss weights and area bounds (every LossConfig key but the loss kind and the rt_saliency
# variant's): the hyperparameters a registered Explainer carries as wysiwyc.lambda.* tags
LAMBDAS = tuple(name for name in LossConfig.model_fields if name != "kind" and not name.startswith("rt_"))


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (paper: 1e-5 with pretrained backbones)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="lr schedule per optimizer step: constant, or cosine decay to 0 over the run"
    )
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up over the first N optimizer steps")


class TrainerConfig(_Section):
    backend: Literal["ray", "local"] = Field(
        "ray",
        description="ray: Ray Train TorchTrainer (DDP, checkpoints via ray.train.report, FailureConfig); "
        "local: the same worker loop in this process (no Ray start-up; tests, laptops)",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, AMP (trainer.amp), channels_last")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray: logical CPUs each worker reserves")
    max_failures: int = Field(
        2, ge=-1, description="Ray: worker-group restarts from the latest checkpoint (-1: unlimited)"
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Ray: best k checkpoints kept (by validation loss); the latest is always kept too"
    )
    epochs: int = Field(1, ge=1, description="passes over data.train")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(16, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    amp: Literal["off", "bf16", "fp16"] = Field("bf16", description="mixed precision on GPU (off on CPU)")
    cpu_amp: Literal["off", "bf16", "auto"] = Field(
        "off",
        description="bf16 autocast on the CPU too (training steps ran ~1.5x faster on this project's "
        "AVX-512 BF16 CPUs; slower on CPUs without native bf16); auto: bf16 where the CPU "
        "has native bf16 (Linux flags avx512_bf16 / amx_bf16), else off",
    )
    channels_last: bool = Field(
        True,
        description="channels_last memory format for the nets and batches (GPU; on CPU, Explainer training "
        "ran ~15% more images/s with it)",
    )
    patience: int | None = Field(None, ge=1, description="early stopping: epochs without val improvement")
    min_delta: float = Field(0.0, ge=0, description="early stopping: smallest val-loss improvement")
    storage: str = Field("runs/checkpoints", description="checkpoint root (local dir or s3://)")
    run_name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="checkpoint folder and MLflow run name; the same name resumes (default: a hash of the config)",
    )
    seed: int = Field(0, description="torch / numpy / python seeds")

    @field_validator("amp", "cpu_amp", mode="before")
    @classmethod
    def _off_is_not_false(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``off`` (in a file or an override) as False: it means "off" here."""
        return "off" if value is False else value


# how to train the Explainer of evaluate's rt_saliency row (the CPU preset, only the loss changed)
RT_SALIENCY_HOWTO = "`wysiwyc train explainer -c cpu/explainer loss.kind=rt_saliency trainer.run_name=cpu-rt-saliency`"
EVALUATE_METHODS = (
    "explainer",
    "grad_cam",
    "rise",
    "extremal_perturbation",
    "igos_pp",
    "rt_saliency",
    "zeros",
    "half",
    "ones",
    "ideal",
)


# evaluate.search: each baseline's main knob (issue 28), by the name a search gives it → the evaluate key it sets
BASELINE_KNOBS = {
    "grad_cam": {"layer": "gradcam_layer"},
    "rise": {"grid": "rise_grid", "p": "rise_p"},
    "extremal_perturbation": {"areas": "extremal_areas"},
}


class EvaluateConfig(_Section):
    """``wysiwyc evaluate``: the paper's metrics for an Explainer against the baselines."""

    gradcam_layer: str | None = Field(
        None,
        description="the module path Grad-CAM looks at (e.g. layer4.1); default: the paper's layer for wysiwyc's "
        "archs, encoder.layers[-1].ln_1 of a torchvision ViT, else the classifier's last Conv2d",
    )
    methods: list[str] = Field(
        default_factory=lambda: [m for m in EVALUATE_METHODS if m != "rt_saliency"],
        description=f"methods to evaluate, from: {', '.join(EVALUATE_METHODS)} (default: all; rt_saliency "
        f"when rt_saliency_checkpoint is set)",
    )
    max_images: int | None = Field(None, ge=1, description="evaluate the first N test images (default: all)")
    batch_size: int = Field(16, ge=1, description="test images per batch")
    rise_masks: int = Field(8000, ge=1, description="RISE: random masks N (paper: 8000)")
    rise_grid: int = Field(7, ge=2, description="RISE: grid cells per side (paper: 7)")
    rise_p: float = Field(0.5, gt=0, le=1, description="RISE: probability a cell is kept (paper: 0.5)")
    rise_batch_size: int = Field(64, ge=1, description="RISE: masked images per forward pass")
    overlay_images: int = Field(8, ge=0, description="rows of overlays.png (first N test images)")
    faithfulness_images: int | None = Field(
        None,
        ge=0,
        description="faithfulness metrics (deletion/insertion AUC, pointing game, relevance mass, average "
        "drop/increase) on the first N evaluated images (default: all; 0: none); each (image, class) pair "
        "costs 2·(faithfulness_steps+1)+2 classifier passes per method",
    )
    faithfulness_steps: int = Field(20, ge=2, description="deletion/insertion: pixel steps (curves of steps+1 points)")
    pointing_tolerance: float | None = Field(
        None, ge=0, description="pointing game: tolerance in pixels (default: 15 px at 224 px, scaled to the image)"
    )
    insertion_blur_sigma: float | None = Field(
        None, ge=0, description="insertion: σ in pixels of the blurred start (default: 5 px at 224 px, scaled)"
    )
    extremal_steps: int = Field(
        800, ge=1, description="Extremal Perturbations: optimisation steps (paper: 800; fewer compress its schedule)"
    )
    extremal_areas: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.3],
        min_length=1,
        description="Extremal Perturbations: the areas (shares of the mask with its margin, TorchRay's) the paper's "
        "rule picks from",
    )
    igos_iterations: int = Field(
        20, ge=1, description="iGOS++: optimisation steps, each with a line search (NN-Explainer's run: 20)"
    )
    igos_ig_steps: int = Field(
        15, ge=1, description="iGOS++: points of each integrated-gradient path (NN-Explainer's run: 15)"
    )
    rt_saliency_checkpoint: str | None = Field(
        None,
        description="the rt_saliency row: an Explainer trained with loss.kind=rt_saliency for the same classifier "
        f"(the checkpoint {RT_SALIENCY_HOWTO} printed)",
    )
    seed: int = Field(0, ge=0, description="RISE masks")
    paper_table: bool = Field(
        False,
        description="also run the paper's protocol on the same images (a second pass, every method, no faithfulness) "
        "and put its table beside ours (metrics.json paper_protocol, metrics.md): how much the protocol moves each "
        "number",
    )
    protocol: Literal["project", "paper"] = Field(
        "project",
        description="project: void pixels ignored, ground truth resized by nearest neighbour, sigmoid "
        "probabilities (saliency: mean over the image's classes; class specificity: soft "
        "masks of the present classes). paper: the paper's evaluation code, to read beside "
        "its tables: void and bilinear-resized object edges count as object, softmax "
        "(saliency: summed over the image's classes; class specificity: masks of every "
        "class binarised at 0.1…0.9, 9·C classifier passes per image and method)",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value):
        unknown = [m for m in value if m not in EVALUATE_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(EVALUATE_METHODS)}")
        if not value:
            raise ValueError(f"give at least one method from {', '.join(EVALUATE_METHODS)}")
        return [m for m in EVALUATE_METHODS if m in value]  # canonical order, no duplicates

    search: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="a search of each baseline's main knob on the validation split (data.val) before the test pass, "
        "the best candidate by search_metric then run on test: method → knob → candidates, every combination "
        "tried; knobs: "
        + "; ".join(f"{m}: {', '.join(k)}" for m, k in BASELINE_KNOBS.items())
        + " (e.g. {rise: {grid: [5, 7, 9], p: [0.3, 0.5]}}); metrics.json search records every candidate",
    )
    search_metric: Literal["cont_iou", "mean_f1", "gap"] = Field(
        "cont_iou", description="what the search maximises on val: cont. IoU, mean F1 or the class-specificity gap"
    )

    @field_validator("search")
    @classmethod
    def _known_knobs(cls, value):
        for method, knobs in value.items():
            if method not in BASELINE_KNOBS:
                raise ValueError(f"search: {method!r} has no knob to search; choose from {', '.join(BASELINE_KNOBS)}")
            unknown = [k for k in knobs if k not in BASELINE_KNOBS[method]]
            if unknown or not knobs:
                raise ValueError(
                    f"search.{method}: knobs {unknown or '{}'}; choose from {', '.join(BASELINE_KNOBS[method])}"
                )
            empty = [k for k, candidates in knobs.items() if not candidates]
            if empty:
                raise ValueError(f"search.{method}.{empty[0]}: give at least one candidate")
        return value

    @field_validator("extremal_areas")
    @classmethod
    def _areas(cls, value):
        if any(not 0 < a < 1 for a in value):
            raise ValueError(f"extremal_areas must lie strictly between 0 and 1, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _rt_saliency_needs_checkpoint(self):
        if "rt_saliency" in self.methods and not self.rt_saliency_checkpoint:
            raise ValueError(
                "evaluate.methods has rt_saliency but evaluate.rt_saliency_checkpoint is not set: train an "
                f"Explainer with loss.kind=rt_saliency ({RT_SALIENCY_HOWTO}) and pass its checkpoint, or leave "
                "rt_saliency out"
            )
        return self

    def chosen_methods(self) -> list[str]:
        """``methods``, with rt_saliency added when its checkpoint is set and the methods were left default."""
        if self.rt_saliency_checkpoint and "methods" not in self.model_fields_set:
            return [m for m in EVALUATE_METHODS if m in (*self.methods, "rt_saliency")]
        return list(self.methods)


class AttributeConfig(_Section):
    """``wysiwyc attribute``: Ray Data batch attribution of an image corpus with ``explainer.checkpoint``
    (a checkpoint URI or ``models:/NAME@alias``), written under ``output/RUN_ID/``."""

    class_source: Literal["explanandum", "explainer"] = Field(
        "explanandum",
        description="whose probabilities choose the classes to explain: explanandum (F's, as evaluated) or "
        "explainer (the distilled Explainer's own class head: one forward pass, no call of F)",
    )
    input: str | None = Field(
        None,
        description="image prefix (local or s3://), shard split (OUT/split or its "
        "manifest URL) or a file listing image URIs (text or JSON list)",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="outputs go to output/RUN_ID/; the same id resumes (default: UTC time)",
    )
    classes: Mode = Field(
        ClassRule.mode,
        description="which classes each image explains: predicted ≥ threshold (at least the top-1), "
        "the top_k, or fixed_classes",
    )
    threshold: float = Field(
        ClassRule.threshold, ge=0, le=1, description="probability at which a class counts as predicted"
    )
    top_k: int = Field(ClassRule.top_k, ge=1, description="classes=topk: how many")
    fixed_classes: list[str] = Field(
        default_factory=lambda: list(ClassRule.fixed), description="classes=fixed: class names"
    )
    batch_size: int = Field(32, ge=1, description="images per model call (and per output batch of format objects)")
    output_format: Literal["shards", "objects"] = Field(
        "shards",
        description="shards: the masks of shard_size images in one tar (WebDataset) per batch, for large "
        "runs and object storage; objects: two files per image (masks/KK/KEY.png, class_masks/KK/KEY.npz)",
    )
    shard_size: int = Field(
        1000, ge=1, description="images per output shard (format shards) and per chunk of the run's plan (resume unit)"
    )
    num_actors: int = Field(2, ge=1, description="predictor actors (ActorPoolStrategy size)")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="logical CPUs per actor; < 1 on small machines so read and write tasks keep a CPU"
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU)")
    read_cpus: float = Field(0.25, gt=0, description="logical CPUs per read/decode task")
    amp: bool = Field(False, description="bf16 autocast on GPU")
    max_error_fraction: float = Field(0.1, ge=0, le=1, description="abort when more images than this share fail")
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, description="larger images are error rows, not decoded (read from the header)"
    )
    preview_images: int = Field(16, ge=0, description="masked-image previews + index.html for the first N images")
    compare_to: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="drift against an earlier run under the same output: its run id, or 'previous' for the "
        "last complete one",
    )
    fail_on_drift: bool = Field(False, description="exit 3 (after the run completes) when a class drifted")
    drift_psi: float = Field(0.2, gt=0, description="flag a class whose predicted frequency has a PSI above this")
    drift_ks: float = Field(0.2, gt=0, le=1, description="flag a class whose mask areas have a KS statistic above this")
    drift_min_images: int = Field(
        20, ge=1, description="compare a class's mask areas only when both runs explain it on this many images"
    )
    experiment: str = Field("attribution", description="MLflow experiment of the attribution runs")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="log the run to MLflow (rank 0)")
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite file in the run dir)")
    experiment: str = Field("wysiwyc", description="MLflow experiment name")
    overlay_images: int = Field(
        6, ge=0, description="Explainer: fixed validation images in the per-epoch mask overlay artifact"
    )
    parent_run_id: str | None = Field(
        None, description="nest the run under this MLflow run (set by `wysiwyc sweep` for its trials)"
    )


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")


class SweepConfig(_Section):
    """``wysiwyc sweep``: a search space over the keys of a base training config, run on Ray Tune.

    A trial's config is the ``base`` file, then the sweep file's other sections, then the command-line
    overrides, then the sampled values of ``space``.
    """

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="the sweep's name: results in storage/NAME; the same name resumes",
    )
    base: str | None = Field(
        None, description="base training config; a relative path is relative to the sweep file's folder"
    )
    kind: Literal["explainer", "classifier"] = Field("explainer", description="what each trial trains")
    space: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="dotted config key → {grid: [v…]} | {choice: [v…]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}",
    )
    num_samples: int = Field(1, ge=1, description="samples of the space (with grids: repeats of the whole grid)")
    metric: str = Field("val_selection", description="per-epoch metric that selects the best trial")
    mode: Literal["max", "min"] = Field("max", description="whether a larger metric is better")
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once (resources permitting)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop poor trials early, per epoch")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: epochs at most (default: trainer.epochs)")
    cpus_per_trial: float = Field(
        0.25,
        gt=0,
        description="logical CPUs of a trial's own process (it waits on its TorchTrainer; the workers reserve theirs)",
    )
    retry_failed: bool = Field(True, description="a relaunch with the same name reruns the failed trials")
    storage: str = Field("runs/sweeps", description="sweep root (local dir or s3://): storage/NAME/")

    @field_validator("space")
    @classmethod
    def _valid_space(cls, value):
        for key, dim in value.items():
            if len(dim) != 1 or next(iter(dim)) not in SEARCH_KINDS:
                raise ValueError(
                    f"space key {key!r}: give exactly one of {', '.join(SEARCH_KINDS)} (got {sorted(dim)})"
                )
            kind, values = next(iter(dim.items()))
            if not values:
                raise ValueError(f"space key {key!r}: {kind} needs at least one value")
            if kind in ("uniform", "loguniform"):
                if (
                    len(values) != 2
                    or not all(isinstance(v, (int, float)) for v in values)
                    or not values[0] < values[1]
                ):
                    raise ValueError(
                        f"space key {key!r}: {kind} needs [low, high] numbers with low < high (got {values})"
                    )
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space key {key!r}: loguniform needs low > 0 (got {values[0]})")
        return value


class SanityConfig(_Section):
    """``wysiwyc sanity``: retrain the Explainer against a randomised and a permuted-labels classifier."""

    randomized_layers: int | None = Field(
        None, ge=1, description="conv/linear layers re-initialised from the output down (default: the top half)"
    )
    levels: list[int] = Field(
        default_factory=list,
        description="cascading randomisation: also retrain against the classifier with its top 1, 2, … of these "
        "layer counts re-initialised, each scored (levels in the output); empty: only randomized_layers",
    )
    seed: int = Field(0, ge=0, description="the re-initialisation and the label permutation")
    max_spearman: float = Field(
        0.5, ge=-1, le=1, description="verdict: the retrained Explainers' masks correlate below this with the real ones"
    )
    iou_drop: float = Field(
        0.5,
        ge=0,
        le=1,
        description="verdict: their cont. IoU falls at least this share of the way from the real one's "
        "towards the constant-1 mask's",
    )
    min_fit: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the permuted-labels classifier must reach this training F1 on its permuted labels, else the "
        "verdict is inconclusive (it learned nothing, so that arm tests nothing); default: 0.8 × the real one's",
    )
    permuted_epochs: int | None = Field(
        None,
        ge=1,
        description="epochs of the permuted-labels classifier (default: the real classifier's recorded ones)",
    )
    positive_control: bool = Field(
        True,
        description="also run the check on an Explainer that ignores its classifier (loss.kind=supervised, trained "
        "against the real and the randomized classifier): the check must report it failed, else the verdict is "
        "inconclusive",
    )


class RegistryConfig(_Section):
    """``wysiwyc register`` / ``promote``: the MLflow model registry (at ``tracking.uri``)."""

    gate: str = Field(
        "configs/gates/default.yaml",
        description="promotion gate: a GateConfig YAML file or a preset name (gates/default)",
    )
    lease: str | None = Field(
        None,
        description="folder or s3:// prefix where promote and rollback take their lease on a model's aliases (one "
        "at a time; shared by everyone who promotes); default: trainer.storage/leases",
    )
    readers: list[str] = Field(
        default_factory=list,
        description="MLflow identities (basic-auth user names: serve, attribute) granted READ on each model this "
        "registers and on its run's experiment (the artifacts): they resolve aliases and load, never move them",
    )


class ServeConfig(_Section):
    """``wysiwyc serve``: a registered Explainer behind HTTP on Ray Serve (``POST /explain``, ``GET /health``)."""

    model: str | None = Field(None, description="models:/NAME@alias (re-resolved every refresh_s) or models:/NAME/V")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a cluster)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    replicas: int = Field(1, ge=1, description="replicas of the model (each loads it)")
    refresh_s: float = Field(
        30.0, ge=0, description="re-resolve the alias this often; a new version is loaded and swapped in (0: never)"
    )
    max_batch_size: int = Field(16, ge=1, description="concurrent requests that share one forward pass")
    batch_wait_s: float = Field(0.01, ge=0, description="how long a request waits for others to join its batch")
    max_image_bytes: int = Field(20_000_000, ge=1, description="larger bodies get 413")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="larger images get 413 (read from the header)")
    max_queued_requests: int = Field(
        64, ge=1, description="requests that may wait for a replica at each caller (proxy); more are answered 503"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="a request not answered within this is answered 503 (the decode and batch it waits for)"
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="logical CPUs per replica (and its image decoders)")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU)")


class GateConfig(_Section):
    """A promotion gate (``configs/gates/*.yaml``): how a version is evaluated and what it must reach.

    Metric names are those of ``metrics.json`` for the Explainer (``cont_iou``, ``mean_f1``, …).
    """

    split: str | None = Field(
        None,
        description="the fixed evaluation split with segmentation: train | val | test name that data.* key, anything "
        "else is a URL (default: data.val; a gate chooses a model, so it never reads the test split that reports "
        "the final numbers)",
    )
    allow_test_split: bool = Field(
        False,
        description="gate on a split the version's published numbers came from (`wysiwyc evaluate` of the registered "
        "version records its digest) or on data.test; refused by default: a number that chose is a validation number",
    )
    evaluate: EvaluateConfig = Field(
        default_factory=lambda: EvaluateConfig(methods=["explainer"]),
        description="evaluation settings, the same for every version compared",
    )
    minimum: dict[str, float] = Field(default_factory=dict, description="metric → lowest value that passes")
    maximum: dict[str, float] = Field(default_factory=dict, description="metric → highest value that passes")
    champion_margin: dict[str, float] = Field(
        default_factory=dict, description="metric → how much worse than the current @champion the version may be"
    )
    allow_white_box: bool = Field(
        False,
        description="promote white-box Explainers too (explainer.init=explanandum_copy, or unrecorded); "
        "the default refuses them: the product's Explainer is the paper's black-box method",
    )
    allow_stale_classifier: bool = Field(
        False,
        description="promote an Explainer whose registered classifier version is not that classifier model's "
        "@champion; the default refuses it (it would explain a classifier that no longer serves)",
    )


class Config(_Section):
    """Every section; commands read the ones they need."""

    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig = IngestConfig()
    explanandum: ExplanandumConfig = ExplanandumConfig()
    explainer: ExplainerConfig = ExplainerConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    attribute: AttributeConfig = AttributeConfig()
    serve: ServeConfig = ServeConfig()
    sweep: SweepConfig = SweepConfig()
    sanity: SanityConfig = SanityConfig()
    output: str = Field("runs/output", description="where a command writes its files (evaluate, attribute)")


_SECRET_FIELDS = ("access_key_id", "secret_access_key")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1e-3"`` → ``(["a", "b"], 0.001)``; the value is read as YAML (lists, numbers, bools)."""
    if "=" not in text:
        raise WysiwycError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise WysiwycError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-5" as a string; keep numbers numeric
    if isinstance(value, str):
        try:
            value = float(value) if any(ch in value for ch in ".eE") else int(value)
        except ValueError:
            pass
    return path, value


def _set_path(tree: dict, path: list[str], value: Any, sources: dict, source: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value
    sources[".".join(path)] = source


def section_of(field: FieldInfo) -> type[BaseModel] | None:
    """The section (pydantic model) that a config field holds, or None for a value."""
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_field(key: str | Sequence, model: type[BaseModel] = Config) -> FieldInfo:
    """The field of ``model`` that a dotted ``key`` (or its parts) names, through the sections
    (``loss.entropy_regularizer``); use :func:`section_of` on it to tell a section from a value.

    Raises:
        WysiwycError: a part that is no key there (the message lists the keys accepted at that level), or
            a part below a value ("… has no sub-keys").
    """
    parts = key.split(".") if isinstance(key, str) else [str(p) for p in key]
    field: FieldInfo | None = None
    for i, part in enumerate(parts):
        if field is not None:
            model = section_of(field)
            if model is None:
                raise WysiwycError(f"{'.'.join(parts[:i])} has no sub-keys")
        field = model.model_fields.get(part)
        if field is None:
            raise WysiwycError(
                f"unknown key {part!r}; accepted under {'.'.join(parts[:i]) or 'the top level'}: "
                f"{', '.join(model.model_fields)}"
            )
    return field


def _explain(err: dict, sources: dict, default_source: str, model: type[BaseModel]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    source = next(
        (sources[k] for k in (dotted, *(".".join(loc[:i]) for i in range(len(loc), 0, -1))) if k in sources),
        default_source,
    )
    if err["type"] == "extra_forbidden":
        try:
            parent = section_of(config_field(loc[:-1], model)) if len(loc) > 1 else model
        except WysiwycError:
            parent = None
        accepted = ", ".join(parent.model_fields) if parent else "?"
        where = ".".join(loc[:-1]) or "the top level"
        return f"{source}: unknown key '{dotted}'; accepted keys under {where}: {accepted}"
    if err["type"] == "missing":
        return f"{source}: key '{dotted}' is required but missing"
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a rule across a section's keys
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    shown = "" if loc[-1] in _SECRET_FIELDS else f" (got {err.get('input')!r})"
    return f"{source}: key '{dotted}': {err['msg']}{shown}"


def preset_names() -> list[str]:
    """The short names of the presets shipped with the package (``cpu/explainer``, ``gates/default``, ...)."""
    return sorted(str(p.relative_to(PRESETS).with_suffix("")) for p in PRESETS.rglob("*.yaml"))


def config_file(path: str | os.PathLike) -> Path:
    """The YAML file that ``-c PATH`` means: ``PATH`` when that file exists, else the shipped preset of that
    short name (``cpu/explainer``, ``cpu/explainer.yaml`` and ``configs/cpu/explainer.yaml`` all name one).

    Raises:
        WysiwycError: neither a file nor a preset, with the presets listed.
    """
    p = Path(path)
    if p.is_file():
        return p
    name = str(path).removeprefix("configs/")
    preset = PRESETS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not p.is_absolute() and preset.is_file():
        return preset
    raise WysiwycError(
        f"config file {path} does not exist and is no preset name; give a YAML file or one of "
        f"the presets (`wysiwyc presets` shows them): {', '.join(preset_names())}"
    )


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, model: type[BaseModel] = Config
) -> BaseModel:
    """Load a YAML config file (optional) and apply dotted overrides, validating everything.

    Args:
        path: YAML file or preset name (:func:`config_file`); ``None`` starts from the defaults.
        overrides: ``key.sub=value`` strings, applied in order after the file.
        model: the pydantic model to validate against.

    Raises:
        WysiwycError: naming the key, where it came from (file or command line) and what is accepted.
    """
    tree: dict = {}
    sources: dict[str, str] = {}
    source = str(path) if path is not None else "defaults"
    if path is not None:
        p = config_file(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise WysiwycError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise WysiwycError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded
    for text in overrides or []:
        key_path, value = parse_override(text)
        if tuple(key_path) == ("explanandum", "checkpoint"):  # the alias on the command line replaces the file's model
            key_path = ["explanandum", "model"]
        _set_path(tree, key_path, value, sources, f"command-line override {text.split('=', 1)[0]}=…")
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = [_explain(e, sources, source, model) for e in exc.errors()]
        raise WysiwycError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def public_config(config: BaseModel) -> dict:
    """The resolved config as plain data to record (checkpoints, MLflow, manifests, config.yaml): secret
    fields appear as ``'**********'`` and every value passes :func:`pipeline.storage.redact` (the password of a
    ``scheme://user:password@host`` URI, a signed URL's signature)."""

    def masked(value):
        if isinstance(value, dict):
            return {k: masked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [masked(v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return masked(config.model_dump(mode="json"))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, as :func:`public_config` records it (no secret)."""
    return yaml.safe_dump(public_config(config), sort_keys=False)


def reference_markdown() -> str:
    """The configuration reference (``docs/configuration.md``): every key with its type, default and
    description, generated from the models so that it cannot drift from the code."""

    def typename(annotation) -> str:
        return (
            str(annotation)
            .replace("typing.", "")
            .replace("pydantic.types.", "")
            .replace("<class '", "")
            .replace("'>", "")
            .replace("|", "\\|")
        )

    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += rows(field.annotation, f"{key}.")
                continue
            default = field.get_default(call_default_factory=True)
            shown = "**********" if isinstance(default, SecretStr) else default
            text = (field.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | {typename(field.annotation)} | `{shown!r}` | {text} |")
        return out

    sections = []
    for title, model, prefix in (
        ("Config (every command's `-c FILE` and `key=value`)", Config, ""),
        ("Gate files (`configs/gates/*.yaml`, `wysiwyc promote --gate`)", GateConfig, ""),
    ):
        sections += [
            f"## {title}",
            "",
            "| key | type | default | description |",
            "|---|---|---|---|",
            *rows(model, prefix),
            "",
        ]
    head = [
        "# Configuration reference",
        "",
        (
            "Generated by `pipeline.config.reference_markdown()` (a test keeps this file equal to it). Unknown keys "
            "are errors; `key=value` overrides are read as YAML."
        ),
        "",
    ]
    return "\n".join(head + sections)
