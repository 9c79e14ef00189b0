"""The ``evaluate`` stage: the paper's metrics for an Explainer against the baselines, with a report.

Inputs: an Explainer checkpoint (``explainer.checkpoint``), the Explanandum it explains (the one its
checkpoint records, or ``explanandum.model``; its sha256 must match the record) and a split with
segmentation (``data.test``). For every method (``explainer``, ``grad_cam``, ``rise``,
``extremal_perturbation``, ``igos_pp``, ``rt_saliency``, ``zeros``, ``half``, ``ones``, ``ideal``) and every image with
at least one ground-truth class:

- per-class masks for **all** classes are produced and timed (the Explainer and RT-Saliency, an Explainer
  trained with Dabkowski & Gal's loss given as ``evaluate.rt_saliency_checkpoint``: one forward pass;
  Grad-CAM: one backward pass per class; RISE: one set of masked forward passes for all classes;
  Extremal Perturbations, :mod:`pipeline.evaluate.extremal`, and iGOS++, :mod:`pipeline.evaluate.igos`: an
  optimisation per present class, so only the present classes' masks, the others 0), which gives
  ``masks_per_second`` measured in the same run
  for every method (scoring excluded, the first batch left out as warm-up when there are more);
- the masks of the image's ground-truth classes are merged by pixel-wise max and scored against the
  ground-truth foreground (:func:`~pipeline.method.metrics.segmentation_scores`, void ignored) and
  with the saliency metric (the Explanandum's sigmoid probabilities on m ⊙ x);
- for methods with per-class masks (Explainer, Grad-CAM, RISE) the class-specificity matrix
  M[r][c] = mean p_r(x ⊙ M_c) over images holding both r and c.

A mask holding a NaN (a merged mask, or a per-class mask the class-specificity matrix uses) is set
to 0 as a whole before anything scores or draws it, as the paper's evaluation does; metrics.json
counts them per method (``nan_masks``).

``evaluate.protocol`` picks the definitions. ``project`` (the default) is the above. ``paper``
reproduces the paper's evaluation code (stevenstalder/NN-Explainer) so the numbers read beside its
tables: its ground truth (:func:`~pipeline.method.metrics.paper_foreground`: void and
bilinear-resized edges are object, from the source-resolution segmentation), its saliency (softmax,
summed over the image's classes), its notebook's class-specificity matrix (masks of every class
binarised at 0.1…0.9, softmax; :func:`~pipeline.method.metrics.paper_class_specificity_sums`) and
the ideal mask scored as that ground truth itself (the paper's ``perfect``). metrics.json, metrics.md
say which protocol they show.

Images without any ground-truth class have no mask to evaluate and are left out (counted in the
summary's ``skipped_unlabelled``).

Outputs under ``output`` (a local directory or ``s3://`` prefix): ``metrics.json``, ``metrics.md``,
``f1_vs_threshold.png``, ``class_specificity_<method>.png``, ``overlays.png`` and the resolved
``config.yaml``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import storage, tracking
from pipeline.config import BASELINE_KNOBS, EVALUATE_METHODS, RT_SALIENCY_HOWTO, EvaluateConfig, dump_config
from pipeline.data.classes import ClassMatch
from pipeline.data.sample import decode_png
from pipeline.data.shards import ShardDataset, make_loader, raw_samples, read_manifest, shard_sources
from pipeline.data.transforms import IMAGENET, Normalization, decode_sample
from pipeline.data.voc import paper_seg_luminance
from pipeline.errors import WysiwycError
from pipeline.evaluate import baselines, igos, report
from pipeline.evaluate.extremal import SMOOTH, extremal_pairs
from pipeline.method.faithfulness import BLUR_SIGMA_AT_224, POINTING_TOLERANCE_AT_224, FaithfulnessAccumulator, scaled
from pipeline.method.faithfulness import METRICS as FAITHFULNESS_METRICS
from pipeline.method.masks import class_masks
from pipeline.method.metrics import (
    ClassSpecificityAccumulator,
    MetricAccumulator,
    foreground_and_valid,
    paired_difference,
    paper_foreground,
    paper_saliency,
    paper_segmentation_scores,
    saliency,
    segmentation_scores,
    zero_nan_masks,
)
from pipeline.models.predictor import Predictor, explainer_from_checkpoint, load_model
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)

METHODS = EVALUATE_METHODS
# class-specificity matrices; ideal: the ground-truth masks, i.e. how class-specific the Explanandum itself is
# (the reference for the others)
PER_CLASS_METHODS = ("explainer", "grad_cam", "rise", "extremal_perturbation", "igos_pp", "rt_saliency", "ideal")
# overlays.png columns
OVERLAY_METHODS = ("explainer", "grad_cam", "rise", "extremal_perturbation", "igos_pp", "rt_saliency")
# per-image optimisation: masks of the image's present classes only (others are 0); masks/s counts those
PRESENT_CLASS_METHODS = ("extremal_perturbation", "igos_pp")
CONSTANT_METHODS = ("zeros", "half", "ones")  # maps that rank no pixel above another
F1_CURVE_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 … 0.95

# metrics.py key → metrics.json key
METRIC_NAMES = {
    "d_f1": "mean_f1",
    "c_f1": "cont_f1",
    "acc": "accuracy",
    "d_iou": "discrete_iou",
    "c_iou": "cont_iou",
    "auc": "auc",
    "saliency": "saliency",
    "background_coverage": "background_coverage",
    "object_coverage": "object_coverage",
}
METRIC_KEYS = (*METRIC_NAMES.values(), "masks_per_second", *FAITHFULNESS_METRICS)
SCORE_KEYS = {out: key for key, out in METRIC_NAMES.items()}  # metrics.json name → the accumulator's


# --------------------------------------------------------------------------------------- loading


def load_models(config, opts=None) -> Predictor:
    """The Explainer of ``explainer.checkpoint`` and the Explanandum it was trained to explain.

    ``explainer.checkpoint`` is a checkpoint URI or a registered version (``models:/NAME/V``,
    ``models:/NAME@alias``, loaded by :func:`pipeline.models.predictor.load_model` with the Explanandum
    it was registered with). For a checkpoint, the Explanandum is ``explanandum.model`` when
    set, else the one the Explainer checkpoint records; its sha256 must equal the recorded one
    (:func:`pipeline.models.predictor.load_predictor`). The size is ``data.image_size`` when given
    explicitly, else the one the Explainer was trained at.

    Raises:
        WysiwycError: no checkpoint given, a registry URI that does not resolve, a classifier that is
            not the recorded one, or class lists that differ.
    """
    uri = config.explainer.checkpoint
    if not uri:
        raise WysiwycError(
            "evaluate: set explainer.checkpoint to the Explainer to evaluate: a checkpoint (a local "
            "path or s3://…, e.g. the `checkpoint` printed by `wysiwyc train explainer`) or a "
            "registered version (models:/NAME@champion)"
        )
    size = config.data.image_size if "image_size" in config.data.model_fields_set else None
    try:
        return load_model(
            uri,
            tracking.registry_uri(config),
            image_size=size,
            explanandum_uri=config.explanandum.model,
            opts=opts,
        )
    except WysiwycError as exc:
        raise WysiwycError(f"evaluate: {exc}") from None


class PaperTruthShards(ShardDataset):
    """The test split's samples with the paper's ground truth beside ours: ``paper_fg`` (S, S) bool,
    :func:`~pipeline.method.metrics.paper_foreground` of the segmentation at its source resolution
    (the decoded ``seg`` is already resized by nearest neighbour). In file order, never flipped."""

    def __init__(self, spec: str, *, image_size: int, luminance: np.ndarray, **kwargs):
        super().__init__(spec, image_size=image_size, train=False, **kwargs)
        self.luminance = luminance

    def __iter__(self):

        shards = self.local_shards()
        if not shards:
            return
        for raw in raw_samples(shard_sources(self.manifest, shards), self.opts):
            sample = decode_sample(
                raw,
                image_size=self.image_size,
                num_classes=len(self.classes),
                norm=self.norm,
                max_pixels=self.max_pixels,
            )
            if "seg.png" in raw:
                fg = paper_foreground(decode_png(raw["seg.png"]), self.image_size, self.luminance)
            else:  # no segmentation: nothing is object (open_test_split refuses splits without any)
                fg = np.zeros((self.image_size, self.image_size), dtype=bool)
            sample["paper_fg"] = torch.from_numpy(fg)
            yield sample


def open_test_split(
    config, classes: list[str], image_size: int, opts=None, protocol: str = "project", norm: Normalization = IMAGENET
):
    """The test split (``data.test``) as a :class:`ShardDataset` (a :class:`PaperTruthShards` for
    ``protocol="paper"``; it must have segmentation) and its :class:`~pipeline.data.classes.ClassMatch` to the
    classifier's ``classes`` (by name; no shared name raises)."""

    spec = config.data.test
    if not spec:
        raise WysiwycError(
            "evaluate: set data.test to a split with segmentation (OUT/split or its manifest URL), "
            "e.g. one written by `wysiwyc ingest synthetic --split test`"
        )
    manifest = read_manifest(spec, opts)
    if not manifest.get("has_segmentation"):
        raise WysiwycError(
            f"evaluate: {storage.redact(manifest['url'])} has no segmentation (has_segmentation: "
            f"false); evaluation compares masks with ground-truth segmentation: use a split "
            f"ingested with segmentation (VOC SegmentationClass, COCO, synthetic)"
        )
    match = ClassMatch(classes, manifest["classes"], f"evaluate: {storage.redact(manifest['url'])}")
    if match.unmatched_model or match.unmatched_split:
        log.info("evaluate: classes matched by name: %s", match.summary())
    if protocol == "paper":
        voc = (manifest.get("source") or {}).get("kind") == "voc"
        return PaperTruthShards(
            spec,
            image_size=image_size,
            luminance=paper_seg_luminance(manifest["classes"], voc=voc),
            opts=opts,
            classes=config.data.classes,
            norm=norm,
            max_pixels=config.data.max_image_pixels,
        ), match
    return ShardDataset(
        spec,
        image_size=image_size,
        train=False,
        opts=opts,
        classes=config.data.classes,
        norm=norm,
        max_pixels=config.data.max_image_pixels,
    ), match


# ------------------------------------------------------------------------------------ the math


def merge_present(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the masks of its ground-truth classes merged by pixel-wise max: (B, C, H, W) → (B, H, W).

    Absent classes count as 0 (masks are in [0, 1]; a NaN in an absent class's mask does not reach the
    merged one); an image without a class gets an all-zero mask.
    """
    present = labels > 0.5 if labels.dtype != torch.bool else labels
    return torch.where(present[:, :, None, None], maps, torch.zeros_like(maps)).amax(dim=1)


def f1_at_thresholds(
    mask: torch.Tensor, foreground: torch.Tensor, valid: torch.Tensor, thresholds=F1_CURVE_THRESHOLDS
) -> torch.Tensor:
    """Discrete F1 per image and threshold (B, T), exactly as ``d_f1_*`` of ``segmentation_scores``
    (mask > t over valid pixels; ε = 1e-10); NaN for an image without a valid pixel."""
    t = torch.as_tensor(thresholds, dtype=mask.dtype, device=mask.device)
    v = valid.float()
    g = (foreground & valid).float()
    b = (mask.float().unsqueeze(0) > t[:, None, None, None]).float() * v  # (T, B, H, W)
    tp = (b * g).sum((2, 3))
    fp = b.sum((2, 3)) - tp
    fn = g.sum((1, 2)) - tp
    precision = tp / (tp + fp + 1e-10)
    recall = tp / (tp + fn + 1e-10)
    f1 = 2 * precision * recall / (precision + recall + 1e-10)
    f1 = torch.where(v.sum((1, 2)) > 0, f1, torch.full_like(f1, math.nan))
    return f1.T  # (B, T)


@dataclass
class _MethodResult:
    """What one method accumulates over the run."""

    scores: object  # MetricAccumulator
    specificity: object | None  # ClassSpecificityAccumulator
    faithfulness: object | None  # FaithfulnessAccumulator
    nan_masks: int = 0  # masks (merged, and per-class ones used for class specificity) that held a NaN
    f1_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(F1_CURVE_THRESHOLDS), dtype=torch.float64))
    f1_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(len(F1_CURVE_THRESHOLDS), dtype=torch.float64))
    timings: list[tuple[float, int]] = field(default_factory=list)  # (seconds, masks) per batch

    def add_f1(self, f1: torch.Tensor) -> None:
        f1 = f1.detach().double().cpu()
        ok = torch.isfinite(f1)
        self.f1_sums += torch.where(ok, f1, torch.zeros_like(f1)).sum(0)
        self.f1_counts += ok.sum(0)

    def masks_per_second(self) -> float:
        """Masks per second over the run; the first batch (warm-up: allocations, kernel selection)
        is left out when there are more."""
        timed = self.timings[1:] if len(self.timings) > 1 else self.timings
        seconds = sum(t for t, _ in timed)
        return sum(n for _, n in timed) / seconds if seconds > 0 else math.inf

    def f1_curve(self) -> list[float]:
        return [float(s / n) if n else math.nan for s, n in zip(self.f1_sums.tolist(), self.f1_counts.tolist())]


def load_rt_saliency(uri: str, models: Predictor, opts=None) -> torch.nn.Module:
    """The Explainer of the ``rt_saliency`` row: trained with ``loss.kind=rt_saliency`` for the Explanandum
    being evaluated (its recorded sha256 must be this one's), in eval mode.

    Raises:
        WysiwycError: another loss, another classifier, or other classes.
    """

    model, state, _ = explainer_from_checkpoint(uri, opts)
    where = f"evaluate.rt_saliency_checkpoint={storage.redact(uri)}"
    if state.get("loss_kind") != "rt_saliency":
        raise WysiwycError(
            f"{where} was trained with loss.kind={state.get('loss_kind', 'paper')}; the rt_saliency row needs an "
            f"Explainer trained with loss.kind=rt_saliency ({RT_SALIENCY_HOWTO})"
        )
    recorded = (state.get("explanandum") or {}).get("sha256")
    if recorded != models.explanandum_sha256:
        raise WysiwycError(
            f"{where} explains the classifier with sha256 {recorded}, not the evaluated one "
            f"({models.explanandum_sha256}): train it with "
            f"explanandum.model={storage.redact(models.explanandum_uri)}"
        )
    if list(state["classes"]) != list(models.classes):
        raise WysiwycError(f"{where} has classes {state['classes']}, the evaluated Explainer {models.classes}")
    return model.eval()


def _mask_maker(
    name: str, models: Predictor, options: EvaluateConfig, opts=None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``make(x, seg, y) -> (B, C, H, W)`` per-class masks for method ``name``: of every class, or of the
    present classes (y) for the :data:`PRESENT_CLASS_METHODS`."""

    all_classes = list(range(len(models.classes)))
    if name == "explainer":

        def make(x, seg, y):
            with torch.no_grad():
                return class_masks(models.explainer(x))  # one forward pass, every class
    elif name == "rt_saliency":
        rt = load_rt_saliency(options.rt_saliency_checkpoint, models, opts)

        def make(x, seg, y):
            with torch.no_grad():
                return class_masks(rt.to(x.device)(x))  # one forward pass, every class
    elif name == "extremal_perturbation":
        make = _present_pairs(
            lambda x, image_of, class_of: extremal_pairs(
                models.explanandum, x, image_of, class_of, areas=options.extremal_areas, steps=options.extremal_steps
            )
        )
    elif name == "igos_pp":
        make = _present_pairs(
            lambda x, image_of, class_of: igos.igos_pp_pairs(
                models.explanandum,
                x,
                image_of,
                class_of,
                iterations=options.igos_iterations,
                ig_steps=options.igos_ig_steps,
            )
        )
    elif name == "grad_cam":
        f = models.explanandum
        layer = baselines.gradcam_target_layer(f.module, options.gradcam_layer)

        def make(x, seg, y):  # needs gradients (w.r.t. the activations): no no_grad here
            return baselines.gradcam(f.module, x, all_classes, layer, forward=f)
    elif name == "rise":

        def make(x, seg, y):
            return baselines.rise(
                models.explanandum,
                x,
                all_classes,
                num_masks=options.rise_masks,
                grid_size=options.rise_grid,
                p=options.rise_p,
                seed=options.seed,
                batch_size=options.rise_batch_size,
            )
    elif name in ("zeros", "half", "ones"):
        method = baselines.constant({"zeros": 0.0, "half": 0.5, "ones": 1.0}[name])

        def make(x, seg, y):
            return method(models.explanandum, x, all_classes)
    elif name == "ideal":

        def make(x, seg, y):
            return baselines.ideal(models.explanandum, x, all_classes, seg=seg)
    else:  # EvaluateConfig validates the names
        raise WysiwycError(f"evaluate: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return make


def _present_pairs(optimise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """``make(x, seg, y)`` of a :data:`PRESENT_CLASS_METHODS` method: ``optimise(x, image_of, class_of)`` → (P, H, W)
    masks of the (image, present class) pairs, the other classes' masks 0."""

    def make(x, seg, y):
        image_of, class_of = (y > 0.5).nonzero(as_tuple=True)
        maps = torch.zeros(*y.shape, *x.shape[-2:], device=x.device)
        maps[image_of, class_of] = optimise(x, image_of, class_of)
        return maps

    return make


def method_settings(name: str, models: Predictor, options: EvaluateConfig) -> dict:
    """What a method ran with, for metrics.json (``settings``) and the tables: a baseline's own knobs, beside the
    paper's values where ours differ."""
    if name == "rise":
        return {"masks": options.rise_masks, "paper_masks": 8000, "grid": options.rise_grid, "p": options.rise_p}
    if name == "grad_cam":
        layer = baselines.gradcam_target_layer(models.explanandum.module, options.gradcam_layer)
        named = {module: path for path, module in models.explanandum.module.named_modules()}
        return {"layer": named.get(layer, type(layer).__name__)}
    if name == "extremal_perturbation":
        return {
            "steps": options.extremal_steps,
            "paper_steps": 800,
            "areas": list(options.extremal_areas),
            "reward": "contrastive",
            "smooth": SMOOTH,
        }
    if name == "igos_pp":
        return {
            "iterations": options.igos_iterations,
            "paper_iterations": igos.ITERATIONS,
            "ig_steps": options.igos_ig_steps,
            "paper_ig_steps": igos.IG_STEPS,
            "mask_side_at_224": igos.SIZE_AT_224,
            "score": "softmax",
            "baseline": "blur",
        }
    if name == "rt_saliency":
        return {"checkpoint": storage.redact(options.rt_saliency_checkpoint), "loss": "NN-Explainer's RT-Saliency"}
    if name == "explainer":
        state = models.checkpoint or {}
        return {"arch": state.get("arch"), "loss": state.get("loss_kind", "paper")}
    return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jsonable(value):
    """NaN/inf → None (JSON null), recursively; tensors and numpy numbers → Python numbers."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


# ----------------------------------------------------------------------------------- the stage


def evaluate(config, progress: bool = True) -> dict:
    """Evaluate an Explainer against the baselines on a test split; write metrics, report and plots.

    Args:
        config: the resolved :class:`pipeline.config.Config` (``explainer.checkpoint``, ``data.test``,
            ``output``, the ``evaluate`` section, ``trainer.use_gpu``, ``storage``).
        progress: show a progress bar on stderr.

    Returns:
        The summary: ``metrics`` (URI of metrics.json), ``report`` (URI of metrics.md), ``output``,
        ``num_images``, ``skipped_unlabelled``, ``figures``, ``explainer``, ``explanandum``,
        ``explanandum_sha256``, ``test``, ``test_digest`` (its manifest's dataset digest), ``classes`` (the
        classifier's matched by name to the split's:
        ``matched``, ``unmatched_classifier``, ``unmatched_split``), ``device``, ``seconds``, ``protocol`` and ``table``
        (``{method: {"cont_iou", "mean_f1"}}``).

    Raises:
        WysiwycError: a missing checkpoint or unresolved registry URI, an Explanandum that is not the
            recorded one, a test split without segmentation or with other classes, or no labelled test image.
    """

    started = time.perf_counter()
    options = config.evaluate
    opts = config.storage.options()
    models = load_models(config, opts)
    device = evaluation_device(config.trainer.use_gpu)
    models.to(device)
    options, search = search_on_val(config, options, models, device, opts, progress)
    run, dataset, match = _evaluation_pass(config, options, models, device, opts, progress)
    metrics = {**run.metrics(), "classes": match.summary(), **({"search": search} if search else {})}
    if options.paper_table and options.protocol == "project":  # the paper's protocol on the same images, beside
        paper = options.model_copy(update={"protocol": "paper", "faithfulness_images": 0, "overlay_images": 0})
        paper_run, _, _ = _evaluation_pass(config, paper, models, device, opts, progress, label="evaluate (paper)")
        metrics["paper_protocol"] = paper_run.protocol_table()
    written = _write_outputs(config, metrics, models, run.overlay_rows, opts)
    return {
        "metrics": storage.redact(written["metrics.json"]),
        "report": storage.redact(written["metrics.md"]),
        "output": storage.redact(config.output),
        "num_images": run.num_images,
        "skipped_unlabelled": run.skipped,
        "figures": [storage.redact(u) for n, u in written.items() if n.endswith(".png")],
        "explainer": storage.redact(models.explainer_uri),
        "explanandum": storage.redact(models.explanandum_uri),
        "explanandum_sha256": models.explanandum_sha256,
        "test": storage.redact(dataset.manifest["url"]),
        "test_digest": dataset.manifest["digest"],
        "classes": match.summary(),
        "device": device.type,
        "seconds": round(time.perf_counter() - started, 3),
        "protocol": options.protocol,
        "table": {
            name: {"skipped": row["skipped"]}
            if "skipped" in row
            else {"cont_iou": row["cont_iou"], "mean_f1": row["mean_f1"]}
            for name, row in metrics["methods"].items()
        },
    }


def search_on_val(config, options, models, device, opts, progress: bool) -> tuple[EvaluateConfig, dict]:
    """``evaluate.search``: each listed baseline alone on the validation split, once per combination of its
    candidates (no faithfulness, no pictures), the one with the highest ``search_metric`` kept. Returns the options
    with the chosen values and metrics.json's ``search`` (method → ``split``, ``digest``, ``metric``, ``candidates``
    [{``settings``, ``value``}], ``chosen``); ``(options, {})`` without a search. The test split is not read."""
    if not options.search:
        return options, {}
    if not config.data.val:
        raise WysiwycError("evaluate.search runs on the validation split: set data.val (a split with segmentation)")
    on_val = config.model_copy(update={"data": config.data.model_copy(update={"test": config.data.val})})
    chosen, record = {}, {}
    for method, knobs in options.search.items():
        fields = BASELINE_KNOBS[method]
        candidates = []
        for values in itertools.product(*knobs.values()):
            settings = dict(zip(knobs, values))
            trial = options.model_copy(
                update={
                    "methods": [method],
                    "faithfulness_images": 0,
                    "overlay_images": 0,
                    "paper_table": False,
                    **{fields[k]: v for k, v in settings.items()},
                }
            )
            trial = EvaluateConfig.model_validate(trial.model_dump())  # the candidates validated as the config is
            run, dataset, _ = _evaluation_pass(on_val, trial, models, device, opts, progress, f"search {method}")
            result = run.metrics()
            value = (
                result["class_specificity"][method]["gap"]
                if options.search_metric == "gap"
                else result["methods"][method][options.search_metric]
            )
            candidates.append({"settings": settings, "value": value})
        best = max(candidates, key=lambda c: -math.inf if c["value"] is None else c["value"])
        chosen.update({fields[k]: v for k, v in best["settings"].items()})
        record[method] = {
            "split": storage.redact(config.data.val),
            "digest": dataset.manifest["digest"],
            "metric": options.search_metric,
            "candidates": candidates,
            "chosen": best["settings"],
        }
    return EvaluateConfig.model_validate({**options.model_dump(), **chosen}), record


def _evaluation_pass(config, options, models, device, opts, progress: bool, label: str = "evaluate"):
    """One pass of ``options`` over the test split: ``(run, dataset, match)``."""
    dataset, match = open_test_split(
        config, models.classes, models.image_size, opts, protocol=options.protocol, norm=models.norm
    )
    loader = make_loader(dataset, options.batch_size, min(config.data.loader_workers, len(dataset.urls)))
    run = _Run(models, options, opts, device)
    total = dataset.manifest["num_samples"]
    if options.max_images is not None:
        total = min(total, options.max_images)
    seen = 0
    bar = progress_bar(total, label, unit="img", enabled=progress)
    try:
        for batch in loader:
            if seen >= total:
                break
            take = min(batch["image"].shape[0], total - seen)
            seen += take
            bar.update(take)
            run.add_batch(match.apply(batch), take)
            if "explainer" in run.results:
                running = run.results["explainer"].scores.compute()
                bar.set_postfix(
                    cont_iou=f"{running.get('c_iou', math.nan):.3f}", mean_f1=f"{running.get('d_f1', math.nan):.3f}"
                )
    finally:
        bar.close()
    if run.num_images == 0:
        raise WysiwycError(
            f"evaluate: no test image of {storage.redact(dataset.manifest['url'])} has a "
            f"ground-truth class ({run.skipped} without one): nothing to evaluate"
        )
    return run, dataset, match


def skipped_methods(methods: list[str], f) -> dict[str, str]:
    """``{method: why}`` of the chosen methods this classifier cannot have: Grad-CAM reads a layer's activations
    through a hook, which a TorchScript file or an exported program does not run."""
    if "grad_cam" in methods and f.form in ("torchscript", "export"):
        what = "TorchScript file" if f.form == "torchscript" else "torch.export program"
        return {
            "grad_cam": f"the classifier is a {what}, whose layers take no hooks; give it as "
            "explanandum.arch=torchvision:NAME + explanandum.weights (or a wysiwyc checkpoint) for Grad-CAM"
        }
    return {}


def evaluation_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present; the CPU otherwise (with a warning when it was asked for)."""
    if use_gpu and not torch.cuda.is_available():
        log.warning("evaluate: trainer.use_gpu is set but CUDA is not available; running on the CPU")
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class _Run:
    """The evaluation's accumulators over the test batches: every method's masks, scores and overlay rows."""

    def __init__(self, models: Predictor, options: EvaluateConfig, opts, device: torch.device):
        self.models, self.options, self.device = models, options, device
        self.paper = options.protocol == "paper"
        self.not_run = skipped_methods(options.chosen_methods(), models.explanandum)
        self.methods = [m for m in options.chosen_methods() if m not in self.not_run]
        self.makers = {name: _mask_maker(name, models, options, opts) for name in self.methods}
        self.settings = {name: method_settings(name, models, options) for name in self.methods}
        size = models.image_size
        self.faithful = {
            "steps": options.faithfulness_steps,
            "tolerance": scaled(POINTING_TOLERANCE_AT_224, size)
            if options.pointing_tolerance is None
            else options.pointing_tolerance,
            "blur_sigma": scaled(BLUR_SIGMA_AT_224, size)
            if options.insertion_blur_sigma is None
            else options.insertion_blur_sigma,
        }
        self.results = {name: self._accumulators(name, len(models.classes)) for name in self.methods}
        limit = options.faithfulness_images
        self.faithfulness_limit = math.inf if limit is None else limit
        self.overlay_rows: list[dict] = []
        self.num_images = self.skipped = self.faithfulness_images = 0

    def _accumulators(self, name: str, num_classes: int) -> _MethodResult:
        options = self.options
        per_class = name in PER_CLASS_METHODS and not (
            self.paper and name in PRESENT_CLASS_METHODS
        )  # paper: every class
        return _MethodResult(
            MetricAccumulator(),
            ClassSpecificityAccumulator(num_classes, rule=options.protocol) if per_class else None,
            FaithfulnessAccumulator(**self.faithful, ranking=name not in CONSTANT_METHODS)
            if options.faithfulness_images != 0
            else None,
        )

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """The Explanandum's probabilities (sigmoid; softmax for a single-label one)."""
        with torch.no_grad():
            return self.models.explanandum.probabilities(self.models.explanandum(images))

    def softmax_probs(self, images: torch.Tensor) -> torch.Tensor:
        """The paper's: softmax over the classes."""
        with torch.no_grad():
            return self.models.explanandum(images).float().softmax(dim=1)

    def add_batch(self, batch: dict, take: int) -> None:
        """The first ``take`` images of a test batch: those with a class, through every method."""
        labels = batch["labels"][:take]
        keep = labels.sum(1) > 0  # an image without a class has no mask to evaluate
        self.skipped += int((~keep).sum())
        if not keep.any():
            return
        device = self.device
        x = batch["image"][:take][keep].to(device)
        y = labels[keep].to(device)
        seg = batch["seg"][:take][keep].to(device)
        keys = [k for k, kept in zip(batch["key"][:take], keep.tolist()) if kept]
        if self.paper:  # the paper's ground truth: void and resized edges are object, every pixel counts
            foreground = batch["paper_fg"][:take][keep].to(device)
            valid = torch.ones_like(foreground)
        else:
            foreground, valid = foreground_and_valid(seg)
        B = x.shape[0]
        self.num_images += B
        n_faithful = int(min(B, self.faithfulness_limit - self.faithfulness_images))
        self.faithfulness_images += n_faithful
        want_rows = max(0, self.options.overlay_images - len(self.overlay_rows))
        new_rows = [
            {
                "key": keys[i],
                "image": self.models.norm.inverse(x[i].float().cpu()).permute(1, 2, 0).numpy(),
                "seg": seg[i].cpu().numpy(),
                "labels": y[i].nonzero().flatten().tolist(),
                "class_masks": {},
                "merged": {},
            }
            for i in range(min(B, want_rows))
        ]
        for name in self.methods:
            self._add_method(name, x, y, seg, foreground, valid, n_faithful, new_rows)
        self.overlay_rows.extend(new_rows)

    def _add_method(self, name, x, y, seg, foreground, valid, n_faithful: int, rows: list[dict]) -> None:
        """One method's per-class masks of a batch (of every class; of the present ones for
        PRESENT_CLASS_METHODS), timed (scoring is not), then scored; its columns of the overlay rows."""
        result, paper, device = self.results[name], self.paper, self.device
        _sync(device)
        tic = time.perf_counter()
        maps = self.makers[name](x, seg, y)
        _sync(device)
        made = int((y > 0.5).sum()) if name in PRESENT_CLASS_METHODS else x.shape[0] * len(self.models.classes)
        result.timings.append((time.perf_counter() - tic, made))

        with torch.no_grad():
            maps = maps.float()
            # NaN rule, the one place masks enter scoring: a mask holding a NaN is 0 everywhere
            merged, merged_nan = zero_nan_masks(merge_present(maps, y))  # (B, H, W)
            maps, maps_nan = zero_nan_masks(maps)  # (B, C, H, W)
            result.nan_masks += int(merged_nan.sum())
            if result.specificity is not None:  # the per-class masks the matrix uses
                result.nan_masks += int((maps_nan if paper else maps_nan & (y > 0.5)).sum())
            if paper:
                if name == "ideal":  # the paper's "perfect" mask: its ground truth itself
                    merged = foreground.float()
                scores = paper_segmentation_scores(merged, foreground)
                logits = self.models.explanandum(merged.unsqueeze(1) * x)  # f(m ⊙ x)
                scores["saliency"] = paper_saliency(merged, logits, y)
            else:
                scores = segmentation_scores(merged, foreground, valid)
                scores["saliency"] = saliency(merged, self.probs(merged.unsqueeze(1) * x), y)  # m ⊙ x
            result.scores.update(scores)
            result.add_f1(f1_at_thresholds(merged, foreground, valid))
            if result.specificity is not None:
                result.specificity.update(
                    self.softmax_probs if paper else self.probs,
                    x,
                    y,
                    maps,
                    chunk_size=max(32, self.options.batch_size),
                )
            if result.faithfulness is not None and n_faithful > 0:  # sigmoid in either protocol
                result.faithfulness.update(
                    self.probs, x[:n_faithful], y[:n_faithful], seg[:n_faithful], maps[:n_faithful]
                )
        for i, row in enumerate(rows):
            if name == "explainer":
                row["class_masks"] = {k: maps[i, k].cpu().numpy() for k in row["labels"]}
            if name in OVERLAY_METHODS:
                row["merged"][name] = merged[i].cpu().numpy()

    def metrics(self) -> dict:
        """metrics.json: every method's means, F1 curve, class specificity and faithfulness, JSON-safe."""
        methods_out: dict[str, dict] = {}
        specificity_out: dict[str, dict] = {}
        curves: dict[str, dict] = {}
        faithfulness_curves: dict[str, dict] = {}
        for name, result in self.results.items():
            means, intervals = result.scores.compute(), result.scores.intervals()
            row = {out: means.get(key, math.nan) for key, out in METRIC_NAMES.items()}
            row["masks_per_second"] = result.masks_per_second()
            row["nan_masks"] = result.nan_masks
            row["ci95"] = {out: intervals.get(key, [math.nan, math.nan]) for key, out in METRIC_NAMES.items()}
            row["settings"] = self.settings[name]
            if result.faithfulness is not None and self.faithfulness_images:
                row.update(result.faithfulness.means())
                row["faithfulness_ci95"] = result.faithfulness.intervals()
                row["ci95"].update(row["faithfulness_ci95"])
                if result.faithfulness.ranking:
                    faithfulness_curves[name] = result.faithfulness.mean_curves()
            if result.specificity is not None:
                row["ci95"]["gap"] = list(result.specificity.gap_interval())
            methods_out[name] = row
            curves[name] = {"thresholds": list(F1_CURVE_THRESHOLDS), "f1": result.f1_curve()}
            if result.specificity is not None:
                matrix = result.specificity.matrix()
                specificity_out[name] = {
                    "classes": list(self.models.classes),
                    "matrix": matrix.tolist(),
                    "gap": report.specificity_gap(matrix.tolist()),
                    "gap_ci95": list(result.specificity.gap_interval()),
                }
        methods_out.update({name: {"skipped": why} for name, why in self.not_run.items()})
        state = self.models.checkpoint or {}
        return _jsonable(
            {
                "protocol": self.options.protocol,
                "explainer_init": state.get("explainer_init", "unknown"),
                "black_box": state.get("black_box"),
                "methods": methods_out,
                "class_specificity": specificity_out,
                "num_images": self.num_images,
                "f1_curve": curves,
                "faithfulness": {
                    "images": self.faithfulness_images,
                    "steps": self.faithful["steps"],
                    "deletion_baseline": "0 in normalised space (the mean colour)",
                    "insertion_start": f"Gaussian blur, sigma {self.faithful['blur_sigma']:.2f} px",
                    "pointing_tolerance_px": self.faithful["tolerance"],
                    "probability": self.models.explanandum.interface.output,
                },
                "faithfulness_curves": faithfulness_curves,
                "paired": self.paired(),
            }
        )

    def protocol_table(self) -> dict[str, dict]:
        """``{method: {cont_iou, mean_f1, saliency, gap}}``: the headline numbers of this pass (metrics.json's
        ``paper_protocol`` when it is the paper's protocol run beside ours)."""
        out = {}
        for name, result in self.results.items():
            means = result.scores.compute()
            row = {out_key: means.get(key, math.nan) for key, out_key in METRIC_NAMES.items()}
            row = {k: row[k] for k in ("cont_iou", "mean_f1", "saliency")}
            if result.specificity is not None:
                row["gap"] = report.specificity_gap(result.specificity.matrix().tolist())
            out[name] = row
        return _jsonable(out)

    def paired(self) -> dict[str, dict[str, dict]]:
        """``{baseline: {metric: {"delta", "ci95", "images"}}}``: the Explainer's per-image value minus the
        baseline's on the same images, for the headline metrics each has (a paired bootstrap over images)."""
        if "explainer" not in self.results:
            return {}
        ours = self.results["explainer"]
        out: dict[str, dict[str, dict]] = {}
        for name, other in self.results.items():
            if name == "explainer" or name in report.REFERENCE_METHODS:
                continue
            deltas = {}
            for key, _, _ in report.PAIRED:  # the headline metrics, as metrics.md's paired table shows them
                if key == "gap":
                    if ours.specificity is not None and other.specificity is not None:
                        deltas[key] = ours.specificity.paired_gap(other.specificity)
                elif key in SCORE_KEYS:
                    deltas[key] = paired_difference(
                        ours.scores.per_image(SCORE_KEYS[key]), other.scores.per_image(SCORE_KEYS[key])
                    )
                elif ours.faithfulness is not None and other.faithfulness is not None and other.faithfulness.ranking:
                    deltas[key] = paired_difference(ours.faithfulness.per_image(key), other.faithfulness.per_image(key))
            out[name] = deltas
        return out


def _write_outputs(config, metrics: dict, models: Predictor, overlay_rows: list[dict], opts) -> dict[str, str]:
    """metrics.json, metrics.md, the figures and config.yaml under ``output``: ``{file name: URI}``."""
    written: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        url = storage.join(config.output, name)
        storage.write_bytes(url, data, opts)
        written[name] = url

    put("metrics.json", json.dumps(metrics, indent=1, allow_nan=False).encode())
    title = f"Evaluation of {storage.redact(models.explainer_uri)}"
    put(
        "metrics.md",
        report.metrics_markdown(
            metrics["methods"],
            metrics["class_specificity"],
            metrics["num_images"],
            title=title,
            protocol=metrics["protocol"],
            black_box=metrics["black_box"],
            paired=metrics.get("paired"),
            paper_protocol=metrics.get("paper_protocol"),
            search=metrics.get("search"),
        ).encode(),
    )
    put("f1_vs_threshold.png", report.f1_curve_png(metrics["f1_curve"]))
    if metrics["faithfulness_curves"]:
        put("faithfulness_curves.png", report.faithfulness_curves_png(metrics["faithfulness_curves"]))
    for name, spec in metrics["class_specificity"].items():
        put(f"class_specificity_{name}.png", report.class_specificity_png(spec["matrix"], spec["classes"], name))
    put("overlays.png", report.overlays_png(overlay_rows, models.classes))
    put("config.yaml", dump_config(config).encode())
    return written
