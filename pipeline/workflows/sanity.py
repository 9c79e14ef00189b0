"""``wysiwyc sanity``: does the learned Explainer explain its classifier, or does it encode the labels?

The usual model-randomisation test (Adebayo et al. 2018: re-run the explanation on a randomised
classifier) passes trivially for an Explainer, which never calls the classifier at inference. The test
that means something for a learned explainer retrains it: the same Explainer config, the same budget
(every key of ``train explainer``), against

- ``randomized``: the classifier with its top ``sanity.randomized_layers`` weight layers (conv/linear,
  counted from the output; default: the top half) and every normalisation layer above the lowest of them
  re-initialised (cascading randomisation; ``sanity.levels`` adds one retrained Explainer per layer count,
  reported in ``levels`` with its Spearman, SSIM and IoU), and
- ``permuted_labels``: a classifier trained as the real one was (its checkpoint's recorded config: the
  same arch, epochs, batch, optimiser) on the same images with labels permuted across images (Adebayo
  et al.'s data randomisation test; training and validation splits each with their own permutation,
  written as shards under the sanity folder).

Each of them, and the real Explainer (``explainer.checkpoint``), then makes masks for the images of
``data.test`` (else ``data.val``; the first ``evaluate.max_images`` when set). Reported per Explainer: the
continuous IoU of its merged present-class masks with the ground truth and its class-specificity gap
(measured with the *real* classifier: do the masks carry the class that classifier sees?); for the two
retrained ones also the Spearman rank correlation and SSIM of their per-class masks with the real
Explainer's, per (image, present class) pair, averaged. The constant-1 mask's IoU is the reference.

Verdict (``verdict``: ``passed | failed | inconclusive``; ``passed`` is ``verdict == "passed"``): for both
retrained Explainers, Spearman < ``sanity.max_spearman`` (0.5) and continuous IoU ≤ real − ``sanity.iou_drop`` ·
(real − constant-1) (0.5: at least halfway towards the constant-1 mask's). An Explainer that passes depends on what
its classifier computes. The verdict is ``inconclusive`` when the check could not have failed:

- the permuted-labels classifier did not fit its permuted training labels (``permuted_fit``: its training F1
  against ``sanity.min_fit``, by default 0.8 × the real classifier's; a classifier that learned nothing makes
  the masks collapse trivially, Adebayo's data-randomisation test needs memorisation), or
- the **positive control** passed (``sanity.positive_control``, on by default): the same Explainer config
  trained on the ground-truth masks (``loss.kind=supervised``, which never reads the classifier), once for the
  real and once for the randomized classifier, judged by the same thresholds, must be reported ``failed``
  (``positive_control``: its scores and verdict).

The three trainings run as any training does (``trainer.backend``: Ray Train by default), one after the
other, resumable: ``sanity.json`` under ``trainer.storage/RUN-sanity/`` records each finished step and a
relaunch skips them (an interrupted training resumes from its own last checkpoint). MLflow: one run
``RUN-sanity`` nested under the evaluated Explainer's run (its checkpoint's ``mlflow_run_id``) with the
numbers and the verdict; the three trainings are its children.

Spearman is Pearson's correlation of the ranks (ties get their mean rank), as ``scipy.stats.spearmanr``;
SSIM is Wang et al. (2004) with an 11×11 Gaussian window of σ 1.5, data range 1, K1 0.01, K2 0.03, as
``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``, averaged
over the pixels whose window fits inside the image (both checked against those peers in the tests).
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import storage, tracking
from pipeline.config import Config
from pipeline.data.classes import ClassMatch
from pipeline.data.sample import Sample, decode_png
from pipeline.data.shards import (
    ShardWriter,
    build_manifest,
    make_loader,
    raw_samples,
    read_manifest,
    shard_sources,
    write_manifest,
)
from pipeline.errors import WysiwycError
from pipeline.evaluate.evaluate import _jsonable, evaluation_device, load_models, merge_present, open_test_split
from pipeline.evaluate.report import specificity_gap
from pipeline.method.masks import class_masks
from pipeline.method.metrics import (
    ClassSpecificityAccumulator,
    foreground_and_valid,
    segmentation_scores,
    zero_nan_masks,
)
from pipeline.models.explanandum import build_explanandum
from pipeline.models.predictor import load_predictor
from pipeline.train.launch import train_classifier, train_explainer
from pipeline.train.trainer import run_name

log = logging.getLogger(__name__)

VARIANTS = ("randomized", "permuted_labels")
STATE_FILE = "sanity.json"


# --------------------------------------------------------------------------------- the two classifiers


def randomize_top_layers(model: nn.Module, layers: int | None = None, seed: int = 0) -> list[str]:
    """Re-initialise, in place, the top ``layers`` conv/linear layers of ``model`` (counted from the output,
    in registration order) and every normalisation layer registered after the lowest of them; None: the
    top half (rounded up). Returns the names of the re-initialised modules."""
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    weights = [i for i, (_, m) in enumerate(named) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weights:
        raise WysiwycError(f"sanity: {type(model).__name__} has no conv or linear layer to randomise")
    n = math.ceil(len(weights) / 2) if layers is None else min(layers, len(weights))
    cut = weights[-n]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _, module in named[cut:]:
            module.reset_parameters()  # batch norm: weights and running statistics
    finally:
        torch.random.set_rng_state(generator_state)
    return [name for name, _ in named[cut:]]


def write_permuted_split(spec: str, out: str, split: str, seed: int, opts=None) -> str:
    """The samples of split ``spec`` re-written under ``out`` as ``split`` with labels permuted across
    images (image i gets the labels of image π(i), π drawn from ``seed``); images and segmentation are
    kept. Two passes over the shards, no image in memory beyond one sample; each shard is published
    atomically and the manifest last. Returns the manifest URL."""

    manifest = read_manifest(spec, opts)
    labels = [json.loads(raw["json"])["labels"] for raw in raw_samples(shard_sources(manifest), opts)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    writer = ShardWriter(out, split, opts=opts)
    try:
        for i, raw in enumerate(raw_samples(shard_sources(manifest), opts)):
            meta = json.loads(raw["json"])
            ext = "png" if "png" in raw else "jpg"
            writer.write(
                Sample(
                    key=raw["__key__"],
                    image=raw[ext],
                    ext=ext,
                    labels=labels[order[i]],
                    width=meta["width"],
                    height=meta["height"],
                    source=meta.get("source", ""),
                    seg=decode_png(raw["seg.png"]) if "seg.png" in raw else None,
                )
            )
        published = writer.close()
    except BaseException:
        writer.unpublish()
        raise
    source = {"kind": "permuted_labels", "path": storage.redact(manifest["url"]), "seed": seed}
    built = build_manifest(split, published, manifest["classes"], source, [], manifest.get("has_segmentation", False))
    return write_manifest(out, split, built, opts)


# ---------------------------------------------------------------------------------------- the scores


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, 1-based, ties given their mean rank (vectorised)."""
    order = x.argsort(dim=-1)
    sorted_x = x.gather(-1, order)
    n = x.shape[-1]
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group = new_group.long().cumsum(-1) - 1  # group id per sorted position
    position = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(sorted_x)
    sums = torch.zeros_like(position).scatter_add_(-1, group, position)
    counts = torch.zeros_like(position).scatter_add_(-1, group, torch.ones_like(position))
    mean_rank = (sums / counts.clamp(min=1)).gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row pair of ``a``, ``b`` (P, N) → (P,); NaN where a row is
    constant (no ranking)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    denominator = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(-1) / denominator.clamp(min=1e-300), math.nan)


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, window: int = 11) -> torch.Tensor:
    """The mean SSIM of each map pair (P, H, W) → (P,), data range 1 (module docstring)."""
    t = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()

    def smooth(z):  # separable Gaussian, "valid" positions only
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    mx, my = smooth(x), smooth(y)
    vx = smooth(x * x) - mx * mx
    vy = smooth(y * y) - my * my
    cxy = smooth(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def score_explainers(
    real, others: dict, dataset, *, batch_size: int, max_images: int | None, device, match: ClassMatch | None = None
) -> dict:
    """Continuous IoU and class-specificity gap of the real Explainer (a Predictor), of each of ``others``
    ({name: Explainer module}) and of the constant-1 mask, and the others' Spearman / SSIM to the real
    masks, over the labelled images of ``dataset`` (in the classifier's classes through ``match``). Class
    specificity is measured with the real classifier for every Explainer."""

    C = len(real.classes)
    names = ["real", *others, "ones"]
    iou = {n: [] for n in names}
    specificity = {n: ClassSpecificityAccumulator(C) for n in ("real", *others)}
    agreement = {n: {"spearman": [], "ssim": []} for n in others}

    def probs(images):
        with torch.no_grad():
            return real.explanandum.probabilities(real.explanandum(images))

    seen = 0
    for batch in make_loader(dataset, batch_size, 0):
        if max_images is not None and seen >= max_images:
            break
        batch = match.apply(batch) if match is not None else batch
        take = batch["image"].shape[0] if max_images is None else min(batch["image"].shape[0], max_images - seen)
        seen += take
        keep = batch["labels"][:take].sum(1) > 0
        if not keep.any():
            continue
        x = batch["image"][:take][keep].to(device)
        y = batch["labels"][:take][keep].to(device)
        foreground, valid = foreground_and_valid(batch["seg"][:take][keep].to(device))
        with torch.no_grad():
            maps = {"real": class_masks(real.explainer(x)).float()}
            for name, explainer in others.items():
                maps[name] = class_masks(explainer(x)).float()
            maps = {name: zero_nan_masks(m)[0] for name, m in maps.items()}
            maps["ones"] = torch.ones_like(maps["real"])
            image_of, class_of = (y > 0.5).nonzero(as_tuple=True)
            reference = maps["real"][image_of, class_of]  # (P, H, W)
            for name, m in maps.items():
                merged = merge_present(m, y)
                iou[name].append(segmentation_scores(merged, foreground, valid)["c_iou"].cpu())
                if name in specificity:
                    specificity[name].update(probs, x, y, m)
                if name in agreement:
                    pairs = m[image_of, class_of]
                    agreement[name]["spearman"].append(spearman(pairs.flatten(1), reference.flatten(1)).cpu())
                    agreement[name]["ssim"].append(ssim(pairs, reference).cpu())
    if not iou["real"]:
        raise WysiwycError(
            f"sanity: no image of {storage.redact(dataset.manifest['url'])} has a ground-truth class: nothing to score"
        )

    def mean(parts):
        values = torch.cat(parts).double()
        values = values[values.isfinite()]
        return float(values.mean()) if values.numel() else math.nan

    out = {}
    for name in names:
        row = {"cont_iou": mean(iou[name])}
        if name in specificity:
            row["spec_gap"] = specificity_gap(specificity[name].matrix().tolist())
        if name in agreement:
            row["spearman"] = mean(agreement[name]["spearman"])
            row["ssim"] = mean(agreement[name]["ssim"])
        out[name] = row
    out["num_images"] = sum(len(t) for t in iou["real"])
    return out


def verdict(
    scores: dict, max_spearman: float, iou_drop: float, variants: tuple[str, ...] = VARIANTS
) -> tuple[bool, dict[str, dict]]:
    """``(passed, {variant: {"spearman_ok", "iou_ok", "iou_bound"}})`` by the rule of the module docstring."""
    real, ones = scores["real"]["cont_iou"], scores["ones"]["cont_iou"]
    bound = real - iou_drop * (real - ones)
    checks = {}
    for name in variants:
        row = scores[name]
        checks[name] = {
            "spearman_ok": bool(math.isfinite(row["spearman"]) and row["spearman"] < max_spearman),
            "iou_ok": bool(row["cont_iou"] <= bound),
            "iou_bound": bound,
        }
    return all(c["spearman_ok"] and c["iou_ok"] for c in checks.values()), checks


# ---------------------------------------------------------------------------------------- the stage


def _randomized_classifier(classifier_uri: str, url: str, layers: int | None, seed: int, opts) -> tuple[str, list]:
    """The classifier of ``classifier_uri`` with its top layers re-initialised, saved at ``url``."""

    state, _ = ckpt.load_checkpoint(classifier_uri, opts)
    model = build_explanandum(state["arch"], len(state["classes"]), weights=state["model"])
    names = randomize_top_layers(model, layers, seed)
    kept = {k: v for k, v in state.items() if k not in ("format", "optimizer", "scaler", "model")}
    record = {"source": storage.redact(classifier_uri), "randomized": names, "seed": seed}
    ckpt.save_checkpoint({**kept, "model": model.state_dict(), "sanity": record}, url, opts)
    return url, names


def _permuted_classifier(config, classifier_state: dict, root: str, run: str, parent_run_id, opts) -> str:
    """Train the permuted-labels classifier (the real classifier's recorded settings, this config's data
    and machine); returns its last checkpoint (random labels: validation loss selects nothing)."""

    recorded = Config.model_validate(
        {k: v for k, v in (classifier_state.get("config") or {}).items() if k not in ("storage", "tracking")}
    )
    cfg = recorded.model_copy(deep=True)
    cfg.storage, cfg.tracking = config.storage.model_copy(), config.tracking.model_copy()
    cfg.tracking.parent_run_id = parent_run_id
    for key in ("backend", "num_workers", "use_gpu", "cpus_per_worker", "storage", "cpu_amp"):
        setattr(cfg.trainer, key, getattr(config.trainer, key))
    cfg.trainer.run_name = run
    cfg.trainer.epochs = config.sanity.permuted_epochs or cfg.trainer.epochs
    data = storage.join(root, "data")
    cfg.data.train = write_permuted_split(config.data.train, data, "train", config.sanity.seed, opts)
    cfg.data.val = (
        write_permuted_split(config.data.val, data, "val", config.sanity.seed + 1, opts) if config.data.val else None
    )
    cfg.data.test = None
    cfg.data.loader_workers = config.data.loader_workers
    return train_classifier(cfg)["last_checkpoint"]


def run_sanity(config, progress: bool = True) -> dict:
    """Stage: the sanity check of the module docstring for the Explainer of ``explainer.checkpoint``.

    Returns:
        ``passed``, ``verdict`` (``passed | failed | inconclusive``), ``verdict_line`` (one line), ``real``,
        ``randomized``, ``permuted_labels`` (each ``cont_iou``, ``spec_gap``; the last two ``spearman``, ``ssim``
        and ``checkpoint``), ``ones`` (``cont_iou``), ``criteria``, ``permuted_fit`` (``train_f1``, ``required``,
        ``real_train_f1``, ``fitted``), ``positive_control`` (null when off), ``levels`` (per ``sanity.levels``:
        ``layers``, ``randomized``, ``spearman``, ``ssim``, ``cont_iou``, ``spec_gap``), ``split``, ``num_images``,
        ``randomized_layers``, ``output``, ``mlflow_run_id``, ``seconds``.

    Raises:
        WysiwycError: no ``explainer.checkpoint`` or ``data.train``, a split without segmentation, or a
            classifier that is not the recorded one.
    """

    started = time.perf_counter()
    s, opts = config.sanity, config.storage.options()
    if not config.explainer.checkpoint:
        raise WysiwycError(
            "sanity: set explainer.checkpoint to the Explainer under test (the checkpoint `wysiwyc train "
            "explainer` printed, or models:/NAME@alias), with the keys it was trained with (-c its config)"
        )
    if not config.data.train:
        raise WysiwycError("sanity: set data.train (the Explainers are retrained on it, as the real one was)")
    real = load_models(config, opts)
    if real.explanandum.form != "wysiwyc":
        raise WysiwycError(
            f"sanity: the classifier {storage.redact(real.explanandum_uri)} is a {real.explanandum.form} model; the "
            "randomisation checks re-initialise its layers and retrain it on permuted labels, which needs a "
            "classifier wysiwyc can rebuild and train (a `wysiwyc train classifier` checkpoint)"
        )
    split = "test" if config.data.test else "val"
    scoring = config.model_copy(deep=True)
    scoring.data.test = config.data.test or config.data.val
    if not scoring.data.test:
        raise WysiwycError("sanity: set data.test (or data.val) to a split with segmentation to score the masks on")
    dataset, match = open_test_split(scoring, real.classes, real.image_size, opts, norm=real.norm)

    name = f"{run_name('explainer', config)}-sanity"
    root = storage.join(config.trainer.storage, name)
    state_file = _StateFile(storage.join(root, STATE_FILE), opts)
    state = state_file.state
    tracker = _sanity_tracker(config, real, name, root, state, opts) if config.tracking.enabled else None
    status = "FAILED"
    try:
        explainers = _control_explainers(config, real, name, root, state_file, opts)
        device = evaluation_device(config.trainer.use_gpu)
        real.to(device)
        scored = [*VARIANTS, *(f"level_{n}" for n in s.levels)]
        others = {
            v: load_predictor(explainers[v], None, opts, image_size=real.image_size).explainer.to(device).eval()
            for v in scored
        }
        scores = score_explainers(
            real,
            others,
            dataset,
            batch_size=config.evaluate.batch_size,
            max_images=config.evaluate.max_images,
            device=device,
            match=match,
        )
        passed, checks = verdict(scores, s.max_spearman, s.iou_drop)
        control = (
            _positive_control(config, explainers, real, dataset, match, device, opts) if s.positive_control else None
        )
        status = "FINISHED"
    finally:
        if tracker is not None and status == "FAILED":
            tracker.end(status)

    bound = checks["randomized"]["iou_bound"]
    fit = state["permuted_fit"]
    fitted = fit["train_f1"] is not None and fit["train_f1"] >= fit["required"]
    caught = control is None or control["verdict"] == "failed"
    outcome = "inconclusive" if not (fitted and caught) else "passed" if passed else "failed"
    result = {
        "passed": outcome == "passed",
        "verdict": outcome,
        "verdict_line": _verdict_line(outcome, scores, bound, s.max_spearman, fit, control),
        "permuted_fit": {**fit, "fitted": fitted},
        "positive_control": control,
        "real": {**scores["real"], "checkpoint": storage.redact(real.explainer_uri)},
        **{v: {**scores[v], **checks[v], "checkpoint": storage.redact(explainers[v])} for v in VARIANTS},
        "ones": scores["ones"],
        "criteria": {"max_spearman": s.max_spearman, "iou_drop": s.iou_drop, "iou_bound": bound},
        "split": split,
        "num_images": scores["num_images"],
        "randomized_layers": state["randomized_layers"],
        "levels": [
            {"layers": n, "randomized": state["levels"][str(n)]["layers"], **scores[f"level_{n}"]} for n in s.levels
        ],
        "classifiers": {
            "randomized": storage.redact(state["randomized_classifier"]),
            "permuted_labels": storage.redact(state["permuted_classifier"]),
        },
        "output": storage.redact(root),
        "mlflow_run_id": state.get("mlflow_run_id"),
    }
    result = _jsonable(result)  # NaN → null
    storage.write_text(storage.join(root, "result.json"), json.dumps(result, indent=1), opts)
    if tracker is not None:
        metrics = {"passed": float(outcome == "passed")}
        for row in ("real", *VARIANTS, *(f"level_{n}" for n in s.levels), "ones"):
            metrics.update({f"{row}.{k}": float(v) for k, v in scores[row].items() if math.isfinite(v)})
        tracker.log_epoch(0, metrics)
        tracker.set_tags({"wysiwyc.sanity": outcome})
        tracker.log_bytes(json.dumps(result, indent=1).encode(), "sanity.json")
        tracker.end("FINISHED")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


class _StateFile:
    """The check's progress file (which classifiers and Explainers exist): a rerun resumes from it."""

    def __init__(self, url: str, opts):
        self.url, self.opts = url, opts
        self.state: dict = json.loads(storage.read_text(url, opts)) if storage.exists(url, opts) else {}

    def save(self) -> None:
        storage.write_text(self.url, json.dumps(self.state, indent=1), self.opts)


def _sanity_tracker(config, real, name: str, root: str, state: dict, opts) -> tracking.Tracker:
    """The check's MLflow run, nested under the evaluated Explainer's run; its id goes into ``state``."""
    nested = config.model_copy(deep=True)
    nested.tracking.parent_run_id = (real.checkpoint or {}).get("mlflow_run_id") or None
    where = tracking.resolve(nested, name)
    tracker = tracking.Tracker(where, name, state.get("mlflow_run_id"), tracking.journal_url(root), opts)
    tracker.set_tags({"wysiwyc.sanity_of": storage.redact(real.explainer_uri)})
    tracker.log_params(
        {
            "explainer.checkpoint": storage.redact(real.explainer_uri),
            "explanandum.model": storage.redact(real.explanandum_uri),
            **{f"sanity.{k}": str(v) for k, v in config.sanity.model_dump().items()},
        }
    )
    state["mlflow_run_id"] = tracker.run_id or state.get("mlflow_run_id")
    return tracker


def _control_explainers(config, real, name: str, root: str, state_file: _StateFile, opts) -> dict[str, str]:
    """The randomized and the permuted-labels classifier, and an Explainer retrained for each (what is done
    already is taken from the progress file): ``{variant: Explainer checkpoint URI}``."""
    s, state = config.sanity, state_file.state
    parent = state.get("mlflow_run_id")
    if "randomized_classifier" not in state:
        url, names = _randomized_classifier(
            real.explanandum_uri, storage.join(root, "randomized_classifier.pt"), s.randomized_layers, s.seed, opts
        )
        state.update(randomized_classifier=url, randomized_layers=names)
        state_file.save()
    if "permuted_classifier" not in state:
        classifier_state, _ = ckpt.load_checkpoint(real.explanandum_uri, opts)
        state["permuted_classifier"] = _permuted_classifier(
            config, classifier_state, root, f"{name}-permuted-classifier", parent, opts
        )
        state_file.save()
    if "permuted_fit" not in state:
        real_f1, permuted_f1 = _train_f1(real.explanandum_uri, opts), _train_f1(state["permuted_classifier"], opts)
        required = s.min_fit if s.min_fit is not None else 0.8 * real_f1 if real_f1 is not None else None
        state["permuted_fit"] = {"train_f1": permuted_f1, "required": required, "real_train_f1": real_f1}
        state_file.save()
    explainers = state.setdefault("explainers", {})
    trainings = [
        ("randomized", state["randomized_classifier"], None),
        ("permuted_labels", state["permuted_classifier"], None),
    ]
    for n in s.levels:  # the cascade: the top n layers re-initialised, one Explainer each
        level = state.setdefault("levels", {})
        if str(n) not in level:
            url, names = _randomized_classifier(
                real.explanandum_uri, storage.join(root, f"randomized_classifier_{n}.pt"), n, s.seed, opts
            )
            level[str(n)] = {"classifier": url, "layers": names}
            state_file.save()
        trainings.append((f"level_{n}", level[str(n)]["classifier"], None))
    if s.positive_control:  # an Explainer that ignores its classifier: the check must fail it
        trainings += [
            ("supervised_real", real.explanandum_uri, "supervised"),
            ("supervised_randomized", state["randomized_classifier"], "supervised"),
        ]
    for variant, classifier, loss_kind in trainings:
        if variant in explainers:
            continue
        cfg = config.model_copy(deep=True)
        cfg.explanandum.model = classifier
        cfg.explainer.checkpoint = None
        cfg.trainer.run_name = f"{name}-{variant}"
        cfg.tracking.parent_run_id = parent
        if loss_kind:
            cfg.loss.kind = loss_kind
        explainers[variant] = train_explainer(cfg)["checkpoint"]
        state_file.save()
    return explainers


def _train_f1(classifier_uri: str, opts) -> float | None:
    """The training F1 of a classifier checkpoint's epoch (on the labels it was trained with), if recorded."""
    state, _ = ckpt.load_checkpoint(classifier_uri, opts)
    value = (state.get("metrics") or {}).get("train_f1")
    return float(value) if value is not None else None


def _positive_control(config, explainers: dict, real, dataset, match, device, opts) -> dict:
    """The check run on the positive control: the supervised Explainer of the real classifier against the one
    retrained for the randomized classifier, scored and judged as any Explainer (the same thresholds)."""
    s = config.sanity
    control = load_predictor(explainers["supervised_real"], None, opts, image_size=real.image_size).to(device)
    retrained = load_predictor(explainers["supervised_randomized"], None, opts, image_size=real.image_size)
    scores = score_explainers(
        control,
        {"randomized": retrained.explainer.to(device).eval()},
        dataset,
        batch_size=config.evaluate.batch_size,
        max_images=config.evaluate.max_images,
        device=device,
        match=match,
    )
    passed, checks = verdict(scores, s.max_spearman, s.iou_drop, variants=("randomized",))
    return {
        "verdict": "passed" if passed else "failed",
        "expected": "failed",
        "real": {**scores["real"], "checkpoint": storage.redact(explainers["supervised_real"])},
        "randomized": {**scores["randomized"], **checks["randomized"]},
        "checkpoint": storage.redact(explainers["supervised_randomized"]),
    }


def _verdict_line(outcome: str, scores: dict, bound: float, max_spearman: float, fit: dict, control) -> str:
    def describe(v: str) -> str:
        row = scores[v]
        return f"{v}: Spearman {row['spearman']:.2f}, SSIM {row['ssim']:.2f}, cont. IoU {row['cont_iou']:.3f}"

    line = (
        f"{outcome.upper()}: real cont. IoU {scores['real']['cont_iou']:.3f} "
        f"(constant 1: {scores['ones']['cont_iou']:.3f}, bound {bound:.3f}); "
        + "; ".join(describe(v) for v in VARIANTS)
        + f" (needs Spearman < {max_spearman} and cont. IoU ≤ {bound:.3f})"
    )
    f1, required = fit["train_f1"], fit["required"]
    if f1 is None or required is None or f1 < required:
        line += (
            f". The permuted-labels classifier fit its labels to training F1 {f1 if f1 is None else round(f1, 3)} "
            f"(needs {required if required is None else round(required, 3)}: sanity.min_fit): it learned nothing, so "
            f"that arm tests nothing; train it longer (sanity.permuted_epochs)"
        )
    if control is not None and control["verdict"] != "failed":
        line += (
            ". The positive control (an Explainer trained on the ground-truth masks, loss.kind=supervised) PASSED: "
            "the check cannot tell an Explainer that ignores its classifier, so its verdict means nothing here"
        )
    return line
