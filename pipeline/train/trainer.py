"""The training stages: ``train_classifier(config)`` and ``train_explainer(config)``.

:func:`fit` is the loop a worker runs: data, model, optimizer, epochs of :mod:`pipeline.train.steps`,
validation, early stopping, checkpoints and resume. It runs in one process here; the distributed
trainer runs the same function in each Ray Train worker.

Run layout under ``trainer.storage``::

    RUN/last.pt     the latest epoch's checkpoint (resume point)
    RUN/best.pt     the best checkpoint by validation loss (training loss without a val split)
    RUN/history.json, RUN/config.yaml

``RUN`` is ``trainer.run_name`` or a name derived from the config, so launching the same config again
resumes the same run from ``last.pt`` (same epoch, step and optimizer state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config import Config, dump_config
from pipeline.data.shards import ShardDataset, make_loader, read_manifest
from pipeline.errors import WysiwycError
from pipeline.progress import progress as progress_bar
from pipeline.train import checkpoint as ckpt
from pipeline.train.steps import StepContext, Stats, classifier_loss_fn, evaluate_epoch, explainer_loss_fn, \
    train_one_epoch

log = logging.getLogger(__name__)


def run_name(kind: str, config: Config) -> str:
    """``trainer.run_name``, or ``KIND-ARCH-HASH`` of the config (the same config → the same run)."""
    if config.trainer.run_name:
        return config.trainer.run_name
    arch = config.explanandum.arch if kind == "classifier" else config.explainer.arch
    digest = hashlib.sha256(json.dumps(ckpt.public_config(config), sort_keys=True).encode()).hexdigest()
    return f"{kind}-{arch}-{digest[:10]}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_context(config: Config, device: torch.device) -> StepContext:
    """AMP and channels_last on GPU as configured; plain fp32 on CPU."""
    on_gpu = device.type == "cuda"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.trainer.amp) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    return StepContext(device=device, amp_dtype=amp, scaler=scaler, grad_accum=config.trainer.grad_accum,
                       channels_last=on_gpu and config.trainer.channels_last)


def _device(config: Config) -> torch.device:
    if config.trainer.use_gpu:
        if not torch.cuda.is_available():
            raise WysiwycError("trainer.use_gpu is true but no CUDA device is visible: set trainer.use_gpu=false")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _datasets(config: Config, rank: int, world: int):
    opts = config.storage.options()
    if not config.data.train:
        raise WysiwycError("data.train is not set: give the train split (OUT/train or its manifest URL)")
    common = dict(image_size=config.data.image_size, seed=config.trainer.seed, rank=rank, world_size=world,
                  opts=opts, classes=config.data.classes)
    train = ShardDataset(config.data.train, train=True, flip=config.data.flip,
                         shuffle_buffer=config.data.shuffle_buffer, **common)
    val = ShardDataset(config.data.val, train=False, **common) if config.data.val else None
    if val is not None and val.classes != train.classes:
        raise WysiwycError(f"data.val classes {val.classes} differ from data.train classes {train.classes}")
    return train, val


def _build(kind: str, config: Config, classes: list[str], device: torch.device):
    """(trained module, parameters to optimise, loss-function factory, extra checkpoint fields)."""
    from pipeline.models.explainer import build_explainer
    from pipeline.models.explanandum import build_explanandum, classifier_trainable_parameters

    if kind == "classifier":
        model = build_explanandum(config.explanandum.arch, len(classes),
                                  pretrained_backbone=config.explanandum.pretrained_backbone).to(device)
        return model, classifier_trainable_parameters(model), lambda m, ctx: classifier_loss_fn(m, ctx), {
            "arch": config.explanandum.arch}
    if not config.explanandum.checkpoint:
        raise WysiwycError("explanandum.checkpoint is not set: train a classifier first "
                           "(`wysiwyc train classifier`) and pass the checkpoint URI it printed")
    explanandum, state, sha = ckpt.load_classifier(config.explanandum.checkpoint, config.storage.options())
    if list(state["classes"]) != list(classes):
        raise WysiwycError(f"the Explanandum {storage.redact(config.explanandum.checkpoint)} was trained on classes "
                           f"{state['classes']}, the data has {classes}")
    explanandum.to(device)
    encoder = explanandum if (config.explainer.arch == "compact" and config.explainer.encoder_from_explanandum
                              and state["arch"] == "small_cnn") else None
    model = build_explainer(config.explainer.arch, len(classes), backbone_weights=config.explainer.backbone_weights,
                            encoder_from=encoder).to(device)
    extra = {"arch": config.explainer.arch,
             "explanandum": {"uri": storage.redact(config.explanandum.checkpoint), "sha256": sha,
                             "arch": state["arch"]}}
    return model, list(model.parameters()), lambda m, ctx: explainer_loss_fn(m, explanandum, config.loss, ctx), extra


class LocalRun:
    """Checkpoints, history and resume of one run under ``trainer.storage/RUN`` (single process)."""

    def __init__(self, config: Config, name: str):
        self.root = storage.join(config.trainer.storage, name)
        self.opts = config.storage.options()
        self.name = name

    def url(self, file: str) -> str:
        return storage.join(self.root, file)

    def latest(self) -> dict | None:
        if not storage.exists(self.url("last.pt"), self.opts):
            return None
        state, _ = ckpt.load_checkpoint(self.url("last.pt"), self.opts)
        return state

    def save(self, state: dict, best: bool) -> None:
        ckpt.save_checkpoint(state, self.url("last.pt"), self.opts)
        if best:
            ckpt.save_checkpoint(state, self.url("best.pt"), self.opts)

    def write(self, file: str, text: str) -> None:
        storage.write_bytes(self.url(file), text.encode(), self.opts)


def fit(kind: str, config: Config, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Train a classifier or an Explainer on ``data.train`` (validating on ``data.val``); resumable.

    Returns:
        The summary: ``checkpoint`` (best), ``run_name``, ``metrics`` (history.json URI), ``epochs``,
        the final train/val metrics and throughput.
    """
    seed_everything(config.trainer.seed + rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = _device(config)
    name = run_name(kind, config)
    run = LocalRun(config, name)
    train_ds, val_ds = _datasets(config, rank, world)
    classes = train_ds.classes
    model, params, make_loss, extra = _build(kind, config, classes, device)
    ctx = step_context(config, device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    loss_fn = make_loss(model, ctx)

    history, epoch0, step, best_loss, stale = [], 0, 0, math.inf, 0
    resumed = run.latest()
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if ctx.scaler is not None and resumed.get("scaler"):
            ctx.scaler.load_state_dict(resumed["scaler"])
        epoch0, step = resumed["epoch"] + 1, resumed["step"]
        history = json.loads(resumed["history"])
        best_loss, stale = resumed["best_loss"], resumed["stale_epochs"]
        log.info("resuming %s from epoch %d, step %d", name, epoch0, step)
    run.write("config.yaml", dump_config(config))

    workers = config.data.loader_workers
    train_loader = make_loader(train_ds, config.trainer.batch_size, min(workers, len(train_ds.urls) // world))
    val_loader = make_loader(val_ds, config.trainer.batch_size, min(workers, len(val_ds.urls) // world)) \
        if val_ds is not None else None
    total = read_manifest(config.data.train, config.storage.options())["num_samples"]
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(epoch0, config.trainer.epochs):
        if config.trainer.max_steps is not None and step >= config.trainer.max_steps:
            break
        train_ds.set_epoch(epoch)
        bar = progress_bar(math.ceil(total / world / config.trainer.batch_size),
                           f"{kind} epoch {epoch + 1}/{config.trainer.epochs}", "batch", enabled=progress and rank == 0)

        def on_step(global_step: int, metrics: dict) -> None:
            bar.update(ctx.grad_accum)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")

        stats, step, timing = train_one_epoch(loss_fn, [model], params, train_loader, optimizer, ctx,
                                              max_steps=config.trainer.max_steps, on_step=on_step, start_step=step)
        bar.close()
        record = {"epoch": epoch + 1, "step": step, **{f"train_{k}": v for k, v in stats.compute().items()},
                  "images_per_second": timing["images"] / max(timing["seconds"], 1e-9),
                  "data_wait_share": timing["data_seconds"] / max(timing["seconds"], 1e-9)}
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate_epoch(loss_fn, [model], val_loader, ctx).compute().items()})
        monitored = record.get("val_loss", record["train_loss"])
        improved = monitored < best_loss - config.trainer.min_delta
        best_loss, stale = (monitored, 0) if improved else (best_loss, stale + 1)
        history.append(record)
        log.info("%s epoch %d: %s", kind, epoch + 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        if rank == 0:
            state = {"kind": kind, "classes": classes, "image_size": config.data.image_size,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": ctx.scaler.state_dict() if ctx.scaler else {}, "epoch": epoch, "step": step,
                     "config": ckpt.public_config(config), "metrics": record, "history": json.dumps(history),
                     "best_loss": best_loss, "stale_epochs": stale, **extra}
            run.save(state, best=improved)
            run.write("history.json", json.dumps(history, indent=1))
        if config.trainer.patience is not None and stale >= config.trainer.patience:
            stopped_early = True
            log.info("early stop: no improvement of %s for %d epochs", "val_loss" if val_loader is not None else "train_loss",
                     stale)
            break

    if not history:
        raise WysiwycError(f"run {name} trained no epoch (trainer.epochs={config.trainer.epochs} already done?)")
    final = history[-1]
    return {
        "checkpoint": storage.redact(run.url("best.pt")),
        "run_name": name,
        "metrics": storage.redact(run.url("history.json")),
        "epochs": final["epoch"],
        "steps": final["step"],
        "stopped_early": stopped_early,
        "resumed_from_epoch": epoch0 if resumed is not None else None,
        "best_loss": round(best_loss, 5),
        "final": {k: round(v, 4) for k, v in final.items() if isinstance(v, float)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def train_classifier(config: Config) -> dict:
    """Stage: fine-tune / train the Explanandum with BCE on ``data.train``."""
    return fit("classifier", config)


def train_explainer(config: Config) -> dict:
    """Stage: train an Explainer for the frozen Explanandum ``explanandum.checkpoint``."""
    return fit("explainer", config)
