"""One home for the training math: per-batch losses and the epoch loops, for classifier and Explainer.

The single-process trainer and the Ray Train workers call the same functions; the only things that
differ between them (DDP wrapping, device, where checkpoints go) are passed in.

Selection score of an Explainer without ground-truth masks (``val_selection``, what ``wysiwyc sweep``
selects by default): ``selection = F1(F(m ⊙ x), y) − mean(m)``, the micro-F1 of the frozen Explanandum
on the masked images against the labels minus the mean target-mask area (the share of the image the
mask keeps). Both lie in [0, 1]; the trivial masks score about 0 (all ones: the classifier's own F1 − 1;
all zeros: 0 − 0), so a positive score means the masks keep the evidence with less than the whole
image. With ground truth on the validation split (``has_segmentation``), validation also reports the
evaluation's ``c_iou``, ``d_f1`` and ``c_f1`` of the target mask (:mod:`pipeline.method.metrics`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import WysiwycError
from pipeline.method.losses import (
    classifier_loss,
    distillation_loss,
    explainer_loss,
    rt_saliency_loss,
    supervised_mask_loss,
)
from pipeline.method.metrics import foreground_and_valid, segmentation_scores

# a batch → (loss to backpropagate, {name: (sum over the batch, count)} for logging)
LossFn = Callable[[dict], tuple[torch.Tensor, dict[str, tuple[float, float]]]]


@dataclass
class StepContext:
    """Where and how steps run: device, mixed precision, gradient accumulation."""

    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # bf16 / fp16 on GPU; None = full precision
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    grad_accum: int = 1
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key == "image" and self.channels_last:
                    value = value.contiguous(memory_format=torch.channels_last)
            out[key] = value
        return out


class Stats:
    """Running sums for epoch metrics: means of per-sample values, and micro-F1 from tp/fp/fn counts."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, values: dict[str, tuple[float, float]]) -> None:
        for key, (total, count) in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(total)
            self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def tensor(self, keys: list[str]) -> torch.Tensor:
        """Sums and counts as one tensor, for an all-reduce across ranks."""
        return torch.tensor(
            [self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0.0) for k in keys], dtype=torch.float64
        )

    def load_tensor(self, keys: list[str], values: torch.Tensor) -> None:
        n = len(keys)
        self.sums = {k: float(values[i]) for i, k in enumerate(keys)}
        self.counts = {k: float(values[n + i]) for i, k in enumerate(keys)}

    def compute(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] and not k.startswith("_")}
        if "_tp" in self.sums:  # micro-F1 of multi-label predictions
            tp, fp, fn = self.sums["_tp"], self.sums["_fp"], self.sums["_fn"]
            out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1e-12)
        if "f1" in out and "mask_area" in out:  # Explainer: the selection score (module docstring)
            out["selection"] = out["f1"] - out["mask_area"]
        return out


def _f1_counts(logits: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> dict:
    predicted = torch.sigmoid(logits.float()) >= threshold
    truth = y > 0.5
    return {
        "_tp": (float((predicted & truth).sum()), 1.0),
        "_fp": (float((predicted & ~truth).sum()), 1.0),
        "_fn": (float((~predicted & truth).sum()), 1.0),
        "accuracy": (float((predicted == truth).all(dim=1).sum()), float(len(y))),
    }


def classifier_loss_fn(model: nn.Module, ctx: StepContext) -> LossFn:
    """BCE of the classifier on the batch; logs loss, exact-match accuracy and micro-F1."""

    def compute(batch: dict):
        with ctx.autocast():
            logits = model(batch["image"])
        loss = classifier_loss(logits.float(), batch["labels"])
        n = float(len(batch["labels"]))
        return loss, {"loss": (float(loss.detach()) * n, n), **_f1_counts(logits.detach(), batch["labels"])}

    return compute


def explainer_loss_fn(
    explainer: nn.Module,
    explanandum: nn.Module,
    weights,
    ctx: StepContext,
    ground_truth: bool = False,
    single_label: bool = False,
) -> LossFn:
    """L_E of the Explainer on the batch (or, with ``loss.kind=rt_saliency``, Dabkowski & Gal's loss); logs
    every term, masked-image accuracy/F1 and mask areas.

    With ``ground_truth`` (a validation split with segmentation) also the target mask's ``c_iou``,
    ``d_f1`` and ``c_f1`` against the ground-truth foreground, over labelled images, void ignored.
    ``single_label`` (a softmax F): L_c is the cross-entropy of the explained class, probabilities softmax.
    """

    kind = getattr(weights, "kind", "paper")
    rt = kind == "rt_saliency"
    paper_terms = ("classification", "entropy", "area_constraint", "ncmask_area")
    terms = ("preserver", "destroyer", "area") if rt else paper_terms
    if kind == "supervised":
        terms = (*paper_terms, "supervised")

    def compute(batch: dict):
        x, y = batch["image"], batch["labels"]
        with ctx.autocast():
            S = explainer(x)
            if rt:
                out = rt_saliency_loss(explanandum, x, y, S.float(), weights)
            else:
                out = explainer_loss(explanandum, x, y, S.float(), weights, single_label=single_label)
            if kind == "supervised":  # the positive control: the paper's terms only logged, never learned from
                if "seg" not in batch:
                    raise WysiwycError("loss.kind=supervised needs a training split with segmentation (data.train)")
                out["supervised"] = supervised_mask_loss(S.float(), batch["seg"])
                out["total"] = out["supervised"]
        n = float(len(y))
        logged = {name: (float(out[name].detach()) * n, n) for name in ("total", *terms, "tv", "mask_area")}
        logged["loss"] = logged.pop("total")
        # the masked image should keep the classes, the inverted one should lose them
        inverted = out["logits_inverted"].detach().float()
        p_inv = inverted.softmax(dim=1) if single_label else torch.sigmoid(inverted)
        present = y > 0.5
        logged["inverted_true_class_prob"] = (float((p_inv * present).sum()), float(present.sum()))
        logged.update(_f1_counts(out["logits_masked"].detach(), y))
        if ground_truth:
            foreground, valid = foreground_and_valid(batch["seg"])
            valid = valid & present.any(dim=1)[:, None, None]  # an image without a class has no mask
            scores = segmentation_scores(out["m"].detach().float(), foreground, valid)
            for name in ("c_iou", "d_f1", "c_f1"):
                finite = scores[name].isfinite()  # NaN: no valid pixel
                logged[name] = (float(scores[name][finite].sum()), float(finite.sum()))
        return out["total"], logged

    return compute


def distillation_loss_fn(student: nn.Module, explanandum, ctx: StepContext, single_label: bool = False) -> LossFn:
    """Distillation from outputs (``explainer.init=distilled``): the Explainer's encoder and
    class-activation branch read as a classifier (``student(x, classify=True)``) learn the Explanandum's
    sigmoid probabilities on the same batch. ``explanandum`` is only called (a
    :class:`~pipeline.models.explanandum.BlackBox`). Logs the loss, ``prob_error`` (mean |p_student − p_F|)
    and the student's accuracy / micro-F1 against F's own predictions (p_F ≥ 0.5), i.e. agreement.
    ``single_label`` (a softmax F): the student's softmax learns F's softmax (cross-entropy, soft targets)."""
    probabilities = functools.partial(torch.softmax, dim=1) if single_label else torch.sigmoid

    def compute(batch: dict):
        x = batch["image"]
        with torch.no_grad(), ctx.autocast():
            target = probabilities(explanandum(x).float())
        with ctx.autocast():
            logits = student(x, classify=True).float()
        loss = distillation_loss(logits, target, single_label)
        n = float(len(x))
        error = (probabilities(logits.detach()) - target).abs().mean(dim=1)
        return loss, {
            "loss": (float(loss.detach()) * n, n),
            "prob_error": (float(error.sum()), n),
            **_f1_counts(logits.detach(), (target >= 0.5).float()),
        }

    return compute


def train_one_epoch(
    loss_fn: LossFn,
    modules: Iterable[nn.Module],
    params: list[nn.Parameter],
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    ctx: StepContext,
    *,
    max_steps: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    start_step: int = 0,
    scheduler=None,
) -> tuple[Stats, int, dict]:
    """One pass over ``loader``: forward, backward, an optimizer step every ``ctx.grad_accum`` batches.

    Args:
        loss_fn: from :func:`classifier_loss_fn` / :func:`explainer_loss_fn`.
        modules: the trained modules, put in train mode (a frozen Explanandum stays in eval mode).
        params: the parameters the optimizer updates (gradient clipping, zeroing).
        loader: batches of ``{"image", "labels", "seg", "key"}``.
        optimizer: the optimizer over ``params``.
        ctx: device, AMP, accumulation.
        max_steps: stop when the global step count reaches this.
        on_step: called as ``on_step(global_step, step_metrics)`` after each optimizer step.
        start_step: global step at the start (for resumed runs).
        scheduler: an lr scheduler stepped after every optimizer step (or None).

    Returns:
        ``(stats, global_step, timing)``; ``timing`` has ``images``, ``seconds``, ``data_seconds``.
    """
    for module in modules:
        module.train()
    stats, step, micro = Stats(), start_step, 0
    images, data_seconds = 0, 0.0
    started = tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch in loader:
        data_seconds += time.perf_counter() - tick
        batch = ctx.to_device(batch)
        loss, logged = loss_fn(batch)
        loss = loss / ctx.grad_accum
        (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
        stats.add(logged)
        images += len(batch["labels"])
        micro += 1
        if micro % ctx.grad_accum == 0:
            if ctx.scaler:
                ctx.scaler.step(optimizer)
                ctx.scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(step, {k: v[0] / v[1] for k, v in logged.items() if v[1] and not k.startswith("_")})
            if max_steps is not None and step >= max_steps:
                break
        tick = time.perf_counter()
    seconds = time.perf_counter() - started
    return stats, step, {"images": images, "seconds": seconds, "data_seconds": data_seconds}


@torch.no_grad()
def evaluate_epoch(loss_fn: LossFn, modules: Iterable[nn.Module], loader: Iterable[dict], ctx: StepContext) -> Stats:
    """The same losses and metrics over ``loader`` in eval mode, without gradients."""
    for module in modules:
        module.eval()
    stats = Stats()
    for batch in loader:
        _, logged = loss_fn(ctx.to_device(batch))
        stats.add(logged)
    return stats
