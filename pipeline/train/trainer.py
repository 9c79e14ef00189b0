"""The training stages: ``train_classifier(config)`` and ``train_explainer(config)``.

:func:`worker_loop` is the one training loop: data split by rank, model (DDP when there are several
ranks), optimizer, epochs of :mod:`pipeline.train.steps`, metrics all-reduced across ranks,
validation, early stopping, checkpoints, resume and MLflow tracking on rank 0. *Where* checkpoints go
and where a resume comes from is the job of a run object passed in:

* ``trainer.backend=ray`` (default): :mod:`pipeline.train.distributed` runs the loop in every Ray Train
  worker of a ``TorchTrainer``; checkpoints go through ``ray.train.report`` into
  ``trainer.storage/RUN/checkpoint_*`` (best k by validation loss, the latest always kept), resume
  comes from ``ray.train.get_checkpoint()``, a failed worker group restarts (``FailureConfig``).
* ``trainer.backend=local``: :func:`fit` runs the same loop in this process, with :class:`LocalRun`
  keeping ``RUN/last.pt`` (resume point) and ``RUN/best.pt`` — no Ray start-up (~20 s), for tests
  and laptops.

An Explainer with ``explainer.init=distilled`` first runs ``explainer.distill_epochs`` epochs of
distillation (:func:`pipeline.train.steps.distillation_loss_fn`: its encoder and class-activation branch
learn the Explanandum's output probabilities), then ``trainer.epochs`` of the paper's loss, in the same
loop (resumable across the switch; metrics of the first phase are prefixed ``distill_``, and only epochs of
the paper's loss can become ``best``). The Explanandum reaches every loss only as a
:class:`~pipeline.models.explanandum.BlackBox` (callable, nothing else).

Both write ``RUN/history.json`` and ``RUN/config.yaml``. ``RUN`` is ``trainer.run_name`` or a name
derived from the config, so launching the same config again resumes the same run (same epoch, step,
optimizer state and MLflow run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import storage, tracking
from pipeline.config import Config, DataConfig, TrainerConfig, dump_config, public_config
from pipeline.data.classes import ClassMatch
from pipeline.data.shards import ShardDataset, make_loader
from pipeline.data.transforms import IMAGENET, Normalization
from pipeline.errors import WysiwycError
from pipeline.figures import overlays_png
from pipeline.method.masks import class_masks
from pipeline.models.classifier import Classifier, load_classifier
from pipeline.models.explainer import build_explainer
from pipeline.models.explanandum import BlackBox, build_explanandum, classifier_trainable_parameters
from pipeline.progress import progress as progress_bar
from pipeline.train.schedule import build_scheduler, total_optimizer_steps
from pipeline.train.steps import (
    Stats,
    StepContext,
    classifier_loss_fn,
    distillation_loss_fn,
    evaluate_epoch,
    explainer_loss_fn,
    train_one_epoch,
)

log = logging.getLogger(__name__)


DISTILLATION_SCORE = 1e30  # the monitored loss of a distillation epoch: worse than any loss of the paper's


def run_name(kind: str, config: Config) -> str:
    """``trainer.run_name``, or ``KIND-ARCH-HASH`` of the config (the same config → the same run)."""
    if config.trainer.run_name:
        return config.trainer.run_name
    arch = config.explanandum.arch if kind == "classifier" else config.explainer.arch
    digest = hashlib.sha256(json.dumps(public_config(config), sort_keys=True).encode()).hexdigest()
    return f"{kind}-{arch}-{digest[:10]}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (the Linux CPU flags ``avx512_bf16`` or ``amx_bf16``);
    False where the flags cannot be read (other systems)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_context(trainer: TrainerConfig, device: torch.device) -> StepContext:
    """AMP as configured: ``trainer.amp`` on GPU, ``trainer.cpu_amp`` on CPU; channels_last on both."""
    on_gpu = device.type == "cuda"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    cpu_amp = trainer.cpu_amp
    if cpu_amp == "auto":
        cpu_amp = "bf16" if cpu_has_native_bf16() else "off"
    amp = dtypes.get(trainer.amp if on_gpu else cpu_amp)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    return StepContext(
        device=device,
        amp_dtype=amp,
        scaler=scaler,
        grad_accum=trainer.grad_accum,
        channels_last=trainer.channels_last,
    )


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise WysiwycError("trainer.use_gpu is true but no CUDA device is visible: set trainer.use_gpu=false")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _datasets(data: DataConfig, seed: int, rank: int, world: int, opts, norm: Normalization = IMAGENET):
    """The training split of this rank and the validation split (or None), normalised ``norm``'s way."""
    if not data.train:
        raise WysiwycError("data.train is not set: give the train split (OUT/train or its manifest URL)")
    common = dict(
        image_size=data.image_size,
        seed=seed,
        rank=rank,
        world_size=world,
        opts=opts,
        classes=data.classes,
        norm=norm,
        max_pixels=data.max_image_pixels,
    )
    train = ShardDataset(data.train, train=True, flip=data.flip, shuffle_buffer=data.shuffle_buffer, **common)
    # validation only evaluates (no gradient all-reduce), so it may have fewer shards than ranks:
    # ranks past the last shard evaluate nothing and add zero counts to the all-reduced Stats
    val = ShardDataset(data.val, train=False, allow_idle_ranks=True, **common) if data.val else None
    # the same labels on both splits, unless both get F's own (data.labels=explanandum: unlabelled training images
    # beside a labelled validation split, whose segmentation still scores the masks)
    if val is not None and val.classes != train.classes and data.labels == "dataset":
        raise WysiwycError(f"data.val classes {val.classes} differ from data.train classes {train.classes}")
    return train, val


def _build(kind: str, config: Config, classes: list[str], device: torch.device, f: Classifier | None):
    """(trained module, parameters to optimise, loss-function factory ``(module, ctx, ground_truth)``,
    extra checkpoint fields, distillation loss factory ``(module, ctx)`` or None).

    The Explainer's loss and distillation see the Explanandum ``f`` only as a function (a ``BlackBox``);
    only the white-box ``explainer.init=explanandum_copy`` hands its weights to ``build_explainer``.
    """
    if kind == "classifier":
        model = build_explanandum(
            config.explanandum.arch, len(classes), pretrained_backbone=config.explanandum.pretrained_backbone
        ).to(device)
        return (
            model,
            classifier_trainable_parameters(model),
            lambda m, ctx, gt=False: classifier_loss_fn(m, ctx),
            {"arch": config.explanandum.arch},
            None,
        )
    f.to(device, memory_format=torch.channels_last if config.trainer.channels_last else None)
    e = config.explainer
    if e.init == "explanandum_copy" and f.arch != "small_cnn":
        raise WysiwycError(
            f"explainer.init=explanandum_copy copies a small_cnn Explanandum's conv blocks; this one is "
            f"{f.arch or f.form}: use explainer.init=scratch or distilled"
        )
    model = build_explainer(
        e.arch,
        len(classes),
        backbone_weights=e.backbone_weights,
        encoder_from=f.module if e.init == "explanandum_copy" else None,
        levels=e.levels,
        cam=e.cam,
    ).to(device)
    black_box = BlackBox(f)
    extra = {
        "arch": e.arch,
        "explainer_init": e.init,
        "black_box": e.black_box and config.loss.kind != "supervised",  # supervised: learns from the labels
        "loss_kind": config.loss.kind,
        "labels": config.data.labels,
        "explanandum": f.record(),
    }
    single = f.single_label
    distill = (lambda m, ctx: distillation_loss_fn(m, black_box, ctx, single)) if e.init == "distilled" else None
    return (
        model,
        list(model.parameters()),
        lambda m, ctx, gt=False: explainer_loss_fn(
            m, black_box, config.loss, ctx, ground_truth=gt, single_label=single
        ),
        extra,
        distill,
    )


def explanandum_labels(f: Classifier, data: DataConfig, data_classes: list[str], threshold: float, ctx: StepContext):
    """What a batch's ``labels`` become for the Explainer: F's own prediction on the clean image
    (``data.labels=explanandum``), or the data set's labels of F's classes, matched by name."""
    if data.labels == "explanandum":
        black_box = BlackBox(f)

        @torch.no_grad()
        def from_f(batch: dict) -> dict:
            with ctx.autocast():
                logits = black_box(batch["image"]).float()
            return {**batch, "labels": f.labels(logits, threshold)}

        return from_f
    if not data_classes:
        raise WysiwycError(
            f"{data.train} has no labels (unlabelled images): set data.labels=explanandum to explain F's own "
            "predictions on them"
        )
    match = ClassMatch(f.classes, data_classes, f"data.train {data.train}")
    if match.unmatched_model:
        raise WysiwycError(
            f"data.labels=dataset: F's classes {match.unmatched_model} are not classes of {data.train} "
            f"({data_classes}); set data.labels=explanandum (F's own predictions), or train on a split that labels them"
        )
    if match.unmatched_split:
        log.info("the data set's classes that F does not have are not explained: %s", match.unmatched_split)
    return None if match.identity else match.apply


def _relabelled(make_loss, relabel):
    """A loss factory whose losses see ``relabel(batch)`` (F's classes, or F's own labels); as is without one."""
    if make_loss is None or relabel is None:
        return make_loss
    return lambda *args: (lambda compute: lambda batch: compute(relabel(batch)))(make_loss(*args))


class LocalRun:
    """Checkpoints, history and resume of one run under ``trainer.storage/RUN`` (one process)."""

    def __init__(self, config: Config, name: str, rank: int = 0, world: int = 1):
        self.root = storage.join(config.trainer.storage, name)
        self.opts = config.storage.options()
        self.name, self.rank, self.world = name, rank, world

    def url(self, file: str) -> str:
        return storage.join(self.root, file)

    def latest(self) -> dict | None:
        """The checkpoint to resume from, or None for a fresh run."""
        if not storage.exists(self.url("last.pt"), self.opts):
            return None
        state, _ = ckpt.load_checkpoint(self.url("last.pt"), self.opts)
        return state

    def commit(self, state: dict | None, metrics: dict, best: bool) -> None:
        """End of an epoch: ``state`` is the checkpoint (rank 0) or None (other ranks)."""
        if state is not None:
            ckpt.save_checkpoint(state, self.url("last.pt"), self.opts)
            if best:
                ckpt.save_checkpoint(state, self.url("best.pt"), self.opts)

    def write(self, file: str, text: str) -> None:
        storage.write_bytes(self.url(file), text.encode(), self.opts)


# ---------------------------------------------------------------- collectives (no-ops on one rank)


def _distributed(world: int) -> bool:
    import torch.distributed as dist

    return world > 1 and dist.is_available() and dist.is_initialized()


def _all_reduce_stats(stats: Stats, world: int) -> Stats:
    """Sums and counts of every rank (so epoch metrics cover all ranks' samples).

    A rank that saw no batch (validation split with fewer shards than ranks) has no keys: the key
    set is the union over ranks, and missing keys count as zero sums and counts.
    """
    if not _distributed(world):
        return stats
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, sorted(stats.sums))
    keys = sorted(set().union(*gathered))
    values = stats.tensor(keys)
    dist.all_reduce(values)
    stats.load_tensor(keys, values)
    return stats


def _all_reduce_timing(timing: dict, world: int) -> dict:
    """Images summed over ranks; wall and data-wait seconds of the slowest / average rank."""
    if not _distributed(world):
        return timing
    import torch.distributed as dist

    total = torch.tensor([float(timing["images"]), timing["data_seconds"]], dtype=torch.float64)
    slowest = torch.tensor([timing["seconds"]], dtype=torch.float64)
    dist.all_reduce(total)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"images": int(total[0]), "data_seconds": float(total[1]) / world, "seconds": float(slowest[0])}


def _even_batches(loader, world: int):
    """Batches while *every* rank still has one (ranks can hold different sample counts: DDP needs
    the same number of steps on each rank, or the gradient all-reduce waits forever)."""
    if not _distributed(world):
        yield from loader
        return
    import torch.distributed as dist

    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag):
            return
        yield batch


# ---------------------------------------------------------------- the loop


def _fixed_images(config: Config, n: int, norm: Normalization) -> dict | None:
    """The first ``n`` validation (else training) images, unshuffled: the per-epoch overlay's rows."""
    if n <= 0:
        return None
    spec = config.data.val or config.data.train
    dataset = ShardDataset(
        spec,
        image_size=config.data.image_size,
        train=False,
        rank=0,
        world_size=1,
        opts=config.storage.options(),
        norm=norm,
        max_pixels=config.data.max_image_pixels,
    )
    samples = []
    for sample in dataset:
        samples.append(sample)
        if len(samples) >= n:
            break
    return torch.utils.data.default_collate(samples) if samples else None


@torch.no_grad()
def _overlay_png(model: nn.Module, batch: dict, loop: _Training) -> bytes:
    """Mask overlay grid of the Explainer on ``batch`` (image, ground truth, per-class masks, merged)."""
    model.eval()
    ctx = loop.ctx
    batch = ctx.to_device(batch)
    batch = loop.relabel(batch) if loop.relabel is not None else batch
    with ctx.autocast():
        maps = class_masks(model(batch["image"]).float())
    rows = []
    for i in range(len(batch["labels"])):
        labels = batch["labels"][i].nonzero().flatten().tolist()
        merged = maps[i, labels].amax(dim=0) if labels else torch.zeros_like(maps[i, 0])
        rows.append(
            {
                "key": batch["key"][i],
                "image": loop.norm.inverse(batch["image"][i].float().cpu()).permute(1, 2, 0).numpy(),
                "seg": batch["seg"][i].cpu().numpy(),
                "labels": labels,
                "class_masks": {k: maps[i, k].cpu().numpy() for k in labels},
                "merged": {"explainer": merged.cpu().numpy()},
            }
        )
    return overlays_png(rows, loop.classes)


def worker_loop(
    kind: str, config: Config, run, where: tracking.Where | None = None, progress: bool = True, on_epoch_start=None
) -> dict:
    """Train a classifier or an Explainer on ``data.train`` (validating on ``data.val``) as one rank.

    Args:
        kind: ``"classifier"`` or ``"explainer"``.
        config: the resolved config (paths absolute when several processes share it).
        run: :class:`LocalRun` or :class:`pipeline.train.distributed.RayRun`: ``name``, ``rank``,
            ``world``, ``latest()`` (checkpoint to resume or None), ``commit(state, metrics, best)``
            (called by every rank each epoch; ``state`` only on rank 0), ``write(file, text)``.
        where: MLflow URI and experiment (:func:`pipeline.tracking.resolve`); None: no tracking.
        progress: show a progress bar (rank 0).
        on_epoch_start: optional callable ``(epoch, rank)`` run by every rank before each epoch
            (0-based epoch): an instrumentation / fault-injection hook (the FailureConfig test raises
            from it once to check that the worker group restarts from the latest checkpoint).

    Returns:
        The summary: ``run_name``, ``mlflow_run_id``, ``epochs``, ``steps``, ``stopped_early``,
        ``resumed_from_epoch``, ``best_loss``, ``final`` (last epoch's metrics), ``seconds``.
    """
    loop = _Training(kind, config, run, progress)
    state = loop.resume()
    resumed_from = state.epoch if state.resumed else None
    tracker = loop.open_tracker(where, state.mlflow_run_id) if run.rank == 0 else None
    fixed = None
    if tracker is not None and kind == "explainer":
        fixed = _fixed_images(config, config.tracking.overlay_images, loop.norm)
    started, stopped_early, status = time.perf_counter(), False, "FAILED"
    try:
        for epoch in range(state.epoch, loop.total_epochs):
            if config.trainer.max_steps is not None and state.step >= config.trainer.max_steps:
                break
            if on_epoch_start is not None:
                on_epoch_start(epoch, run.rank)
            record = loop.train_epoch(epoch, state, tracker)
            monitored, improved = state.score(record, loop.distilling(epoch), config.trainer.min_delta)
            state.history.append(record)
            log.info("%s epoch %d: %s", kind, epoch + 1, _metrics_text(record))
            checkpoint = None
            if run.rank == 0:
                if tracker is not None:  # a run created while the server was away has its id now
                    state.mlflow_run_id = tracker.run_id or state.mlflow_run_id
                checkpoint = loop.checkpoint(epoch, record, state)
                run.write("history.json", json.dumps(state.history, indent=1))
            if tracker is not None:  # before the report: a trial that Tune stops at it still has this epoch in
                # MLflow; while the server is away the record waits in the queue (one probe, it never raises)
                tracker.log_epoch(state.step, record)
            run.commit(checkpoint, {**record, "monitored_loss": monitored}, improved)
            if tracker is not None:  # after the checkpoint: a tracking outage never costs the epoch
                if fixed is not None and not loop.distilling(epoch):
                    overlay = _overlay_png(loop.model, fixed, loop)
                    tracker.log_bytes(overlay, f"overlays/epoch_{epoch + 1:03d}.png")
                tracker.save()
            if config.trainer.patience is not None and state.stale >= config.trainer.patience:
                stopped_early = True
                what = "val_loss" if loop.val_loader is not None else "train_loss"
                log.info("early stop: no improvement of %s for %d epochs", what, state.stale)
                break
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end(status)
            state.mlflow_run_id = tracker.run_id or state.mlflow_run_id

    if not state.history:
        raise WysiwycError(f"run {run.name} trained no epoch (trainer.epochs={config.trainer.epochs} already done?)")
    final = state.history[-1]
    return {
        "run_name": run.name,
        "mlflow_run_id": state.mlflow_run_id,
        "epochs": final["epoch"],
        "steps": final["step"],
        "stopped_early": stopped_early,
        "resumed_from_epoch": resumed_from,
        "best_loss": round(state.best_loss, 5),
        "final": {k: round(v, 4) for k, v in final.items() if isinstance(v, float)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _metrics_text(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))


@dataclass
class _RunState:
    """Where a run stands: the next epoch (0-based), the step, the history and the early-stopping count;
    from the checkpoint it resumes, or the start."""

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best_loss: float = math.inf
    stale: int = 0
    mlflow_run_id: str | None = None
    resumed: bool = False

    def score(self, record: dict, distilling: bool, min_delta: float) -> tuple[float, bool]:
        """``(monitored loss, improved)`` of an epoch's record; updates the best loss and the stale count."""
        if distilling:  # no checkpoint of this phase is "best" (L_E has not started); finite, because
            # Ray's run snapshot stores inf as null and a resumed run cannot rank a null score
            return DISTILLATION_SCORE, False
        monitored = record.get("val_loss", record["train_loss"])
        improved = monitored < self.best_loss - min_delta
        self.best_loss, self.stale = (monitored, 0) if improved else (self.best_loss, self.stale + 1)
        return monitored, improved


class _Training:
    """One rank's model, optimizer, schedule, data and losses, set up from the config (:func:`worker_loop`)."""

    def __init__(self, kind: str, config: Config, run, progress: bool):
        self.kind, self.config, self.run, self.progress = kind, config, run, progress
        rank, world = run.rank, run.world
        seed_everything(config.trainer.seed + rank)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = _device(config.trainer.use_gpu)
        opts = config.storage.options()
        f = None
        if kind == "explainer":  # F first: the images are normalised its way
            registry = tracking.registry_uri(config)
            f = load_classifier(config.explanandum, opts, probe_size=config.data.image_size, registry=registry)
        self.norm = f.interface.normalization if f is not None else IMAGENET
        self.train_ds, val_ds = _datasets(config.data, config.trainer.seed, rank, world, opts, self.norm)
        self.classes = self.train_ds.classes if f is None else f.classes
        model, self.params, make_loss, self.extra, make_distill = _build(kind, config, self.classes, device, f)
        self.ctx = step_context(config.trainer, device)
        self.relabel = None
        if f is not None:
            self.relabel = explanandum_labels(
                f, config.data, self.train_ds.classes, config.explanandum.threshold, self.ctx
            )
            make_loss, make_distill = _relabelled(make_loss, self.relabel), _relabelled(make_distill, self.relabel)
        self.model = model.to(memory_format=torch.channels_last) if self.ctx.channels_last else model
        t = config.trainer
        self.optimizer = torch.optim.Adam(self.params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        # explainer.init=distilled: the first epochs distil the Explanandum's outputs, then trainer.epochs of L_E
        self.distill_epochs = config.explainer.distill_epochs if make_distill is not None else 0
        self.total_epochs = self.distill_epochs + t.epochs
        self.num_samples = self.train_ds.manifest["num_samples"]
        steps = total_optimizer_steps(
            self.total_epochs, self.num_samples, world, t.batch_size, t.grad_accum, t.max_steps
        )
        self.scheduler = build_scheduler(self.optimizer, config.optim.schedule, config.optim.warmup_steps, steps)
        # DDP averages gradients across ranks (gloo on CPU, NCCL on GPU: the process group is Ray's)
        self.trained = self.model
        if _distributed(world):
            # distillation leaves the decoder without gradients: DDP must look for unused parameters then
            self.trained = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.distill_epochs > 0,
            )
        self.loss_fn = make_loss(self.trained, self.ctx)
        self.distill_fn = make_distill(self.trained, self.ctx) if make_distill is not None else None
        self.val_distill_fn = make_distill(self.model, self.ctx) if make_distill is not None else None
        # validation through the plain module: a DDP forward may broadcast buffers, a collective that
        # ranks with fewer (or no) validation batches would never join; with segmentation on the validation
        # split the Explainer's masks are also scored against it (val_c_iou, val_d_f1, val_c_f1)
        segmented = bool(val_ds is not None and val_ds.manifest.get("has_segmentation"))
        self.val_loss_fn = make_loss(self.model, self.ctx, segmented)
        workers = config.data.loader_workers
        self.train_loader = make_loader(self.train_ds, t.batch_size, min(workers, len(self.train_ds.urls) // world))
        self.val_loader = (
            make_loader(val_ds, t.batch_size, min(workers, len(val_ds.urls) // world)) if val_ds is not None else None
        )
        self.val_ds = val_ds

    def distilling(self, epoch: int) -> bool:
        return epoch < self.distill_epochs

    def resume(self) -> _RunState:
        """The latest checkpoint's weights, optimizer, schedule and progress, or a fresh start."""
        resumed = self.run.latest()
        if resumed is None:
            return _RunState()
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        if self.scheduler is not None and resumed.get("scheduler"):
            self.scheduler.load_state_dict(resumed["scheduler"])
        if self.ctx.scaler is not None and resumed.get("scaler"):
            self.ctx.scaler.load_state_dict(resumed["scaler"])
        state = _RunState(
            epoch=resumed["epoch"] + 1,
            step=resumed["step"],
            history=json.loads(resumed["history"]),
            best_loss=resumed["best_loss"],
            stale=resumed["stale_epochs"],
            mlflow_run_id=resumed.get("mlflow_run_id") or None,
            resumed=True,
        )
        log.info("rank %d: resuming %s from epoch %d, step %d", self.run.rank, self.run.name, state.epoch, state.step)
        return state

    def open_tracker(self, where: tracking.Where | None, mlflow_run_id: str | None) -> tracking.Tracker | None:
        """Rank 0: the run's config.yaml, and its MLflow run (params, inputs, config) when tracking is on."""
        config, run = self.config, self.run
        run.write("config.yaml", dump_config(config))
        if where is None:
            return None
        tracker = tracking.Tracker(where, run.name, mlflow_run_id, tracking.journal_url(run.root), run.opts)
        params = tracking.flatten(public_config(config))
        tracker.log_params({**params, "run.kind": self.kind, "run.world_size": str(run.world)})
        tracker.log_input(self.train_ds.manifest, "training")
        if self.val_ds is not None:
            tracker.log_input(self.val_ds.manifest, "validation")
        tracker.log_bytes(dump_config(config).encode(), "config.yaml")
        return tracker

    def train_epoch(self, epoch: int, state: _RunState, tracker: tracking.Tracker | None) -> dict:
        """One epoch of training (distillation or the run's loss) and validation: the epoch's record."""
        world, t = self.run.world, self.config.trainer
        self.train_ds.set_epoch(epoch)
        distilling = self.distilling(epoch)
        prefix = "distill_" if distilling else ""  # distillation's metrics keep names of their own
        title = (
            f"distil epoch {epoch + 1}/{self.distill_epochs}"
            if distilling
            else f"{self.kind} epoch {epoch + 1 - self.distill_epochs}/{t.epochs}"
        )
        batches = math.ceil(self.num_samples / world / t.batch_size)
        bar = progress_bar(batches, title, "batch", enabled=self.progress and self.run.rank == 0)

        def on_step(global_step: int, metrics: dict) -> None:
            bar.update(self.ctx.grad_accum)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if tracker is not None:  # rank 0's own batch: every loss term, per step
                tracker.log_step(global_step, {prefix + k: v for k, v in metrics.items()})

        stats, state.step, timing = train_one_epoch(
            self.distill_fn if distilling else self.loss_fn,
            [self.trained],
            self.params,
            _even_batches(self.train_loader, world),
            self.optimizer,
            self.ctx,
            max_steps=t.max_steps,
            on_step=on_step,
            start_step=state.step,
            scheduler=self.scheduler,
        )
        bar.close()
        stats, timing = _all_reduce_stats(stats, world), _all_reduce_timing(timing, world)
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            **{f"{prefix}train_{k}": v for k, v in stats.compute().items()},
            "images_per_second": timing["images"] / max(timing["seconds"], 1e-9),
            "data_wait_share": timing["data_seconds"] / max(timing["seconds"], 1e-9),
        }
        if self.val_loader is not None:
            val_fn = self.val_distill_fn if distilling else self.val_loss_fn
            val = _all_reduce_stats(evaluate_epoch(val_fn, [self.model], self.val_loader, self.ctx), world)
            record.update({f"{prefix}val_{k}": v for k, v in val.compute().items()})
        return record

    def checkpoint(self, epoch: int, record: dict, state: _RunState) -> dict:
        """Rank 0's checkpoint after an epoch: weights, optimizer, schedule, progress, config, metrics."""
        return {
            "kind": self.kind,
            "classes": self.classes,
            "image_size": self.config.data.image_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler else {},
            "epoch": epoch,
            "step": state.step,
            "config": public_config(self.config),
            "metrics": record,
            "history": json.dumps(state.history),
            "best_loss": state.best_loss,
            "stale_epochs": state.stale,
            "mlflow_run_id": state.mlflow_run_id or "",
            **self.extra,
        }


def fit(kind: str, config: Config, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """The worker loop in this process (``trainer.backend=local``); resumable from ``RUN/last.pt``.

    Returns:
        The summary of :func:`worker_loop` plus ``checkpoint`` (best), ``last_checkpoint`` (the last
        epoch's) and ``metrics`` (history.json URI).
    """
    name = run_name(kind, config)
    run = LocalRun(config, name, rank, world)
    where = tracking.resolve(config, name) if rank == 0 else None
    summary = worker_loop(kind, config, run, where, progress)
    best = storage.redact(run.url("best.pt"))
    tracking.finish(where, summary["mlflow_run_id"], best, run.root, run.opts)
    return {
        "checkpoint": best,
        "last_checkpoint": storage.redact(run.url("last.pt")),
        "metrics": storage.redact(run.url("history.json")),
        **summary,
    }
