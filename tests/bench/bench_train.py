"""Training benchmark: what Ray Train costs over a plain PyTorch loop, and 2 CPU workers vs 1.

The same model (``small_cnn`` classifier), the same synthetic shards and the same *global* batch are
trained three ways in one run:

a. a plain single-process PyTorch loop written here: a DataLoader over
   :class:`pipeline.data.shards.ShardDataset`, Adam, and :func:`pipeline.train.steps.train_one_epoch`;
b. Ray Train (``trainer.backend=ray``) with 1 worker;
c. Ray Train with 2 workers (per-worker batch halved, so the global batch is the same).

Throughput is measured in steady state: the images/s of epochs 2..N (the per-epoch figure the
training loop logs; for (a) the same loop timing), so Ray's ``ray.init`` and worker-group start-up
(tens of seconds on these machines) are excluded; they are printed separately as the wall time around ``fit``.
No validation split and no MLflow, so an epoch is training only.

Run: ``.venv/bin/python tests/bench/bench_train.py [--images N] [--image-size PX] [--epochs E]
[--batch-size B] [--loader-workers W]``. Everything lives in a temporary directory; the bench starts
(and stops) its own local Ray session with token auth off. Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipeline.config import Config, IngestConfig, load_config  # noqa: E402
from pipeline.data.ingest import ingest  # noqa: E402
from pipeline.data.shards import ShardDataset, make_loader  # noqa: E402
from pipeline.data.synthetic import SyntheticReader  # noqa: E402


def make_shards(root: Path, images: int, size: int, shard_size: int) -> str:
    out = str(root / "data")
    ingest(
        SyntheticReader(images, seed=0, split="train", image_size=size),
        out,
        "train",
        IngestConfig(workers=1, shard_size=shard_size),
        progress=False,
    )
    return str(Path(out) / "train")


def base_config(root: Path, train: str, args, **trainer) -> Config:
    overrides = [
        f"data.train={train}",
        f"data.image_size={args.image_size}",
        f"data.loader_workers={args.loader_workers}",
        "data.shuffle_buffer=100",
        "explanandum.arch=small_cnn",
        "optim.lr=0.001",
        "tracking.enabled=false",
        f"trainer.epochs={args.epochs}",
        f"trainer.storage={root / 'checkpoints'}",
        "trainer.seed=0",
    ]
    overrides += [f"trainer.{k}={v}" for k, v in trainer.items()]
    return load_config(None, overrides)


def steady(per_epoch: list[float]) -> float:
    """Images/s of epochs 2..N (median: robust to the other engineer's load on a shared machine)."""
    tail = per_epoch[1:] or per_epoch
    return statistics.median(tail)


def plain_loop(config: Config) -> tuple[list[float], float]:
    """(a): the single-process PyTorch loop, no Ray, no checkpoints; per-epoch images/s."""
    from pipeline.models.explanandum import (
        build_explanandum,
        classifier_trainable_parameters,
    )
    from pipeline.train.steps import StepContext, classifier_loss_fn, train_one_epoch

    started = time.perf_counter()
    torch.manual_seed(config.trainer.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # as the worker loop does with one rank
    dataset = ShardDataset(
        config.data.train,
        image_size=config.data.image_size,
        train=True,
        seed=config.trainer.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        rank=0,
        world_size=1,
    )
    model = build_explanandum("small_cnn", len(dataset.classes))
    params = classifier_trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=config.optim.lr)
    ctx = StepContext(device=torch.device("cpu"), amp_dtype=None, scaler=None, grad_accum=1, channels_last=False)
    loss_fn = classifier_loss_fn(model, ctx)
    loader = make_loader(dataset, config.trainer.batch_size, min(config.data.loader_workers, len(dataset.urls)))
    rates, step = [], 0
    for epoch in range(config.trainer.epochs):
        dataset.set_epoch(epoch)
        _, step, timing = train_one_epoch(loss_fn, [model], params, loader, optimizer, ctx, start_step=step)
        rates.append(timing["images"] / max(timing["seconds"], 1e-9))
    return rates, time.perf_counter() - started


def ray_fit(config: Config) -> tuple[list[float], float]:
    """(b)/(c): ``fit_ray`` (Ray Train TorchTrainer); per-epoch images/s from the run's history."""
    from pipeline.train.distributed import fit_ray

    started = time.perf_counter()
    summary = fit_ray("classifier", config)
    wall = time.perf_counter() - started
    history = json.loads(Path(summary["metrics"]).read_text())
    return [h["images_per_second"] for h in history], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (per worker: / workers)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="wysiwyc-bench-train-") as tmp:
        root = Path(tmp)
        train = make_shards(root, args.images, args.image_size, args.shard_size)
        cores = os.cpu_count() or 1
        print(
            f"# bench_train: small_cnn classifier, {args.images} synthetic images at {args.image_size} px, "
            f"{math.ceil(args.images / args.shard_size)} shards, global batch {args.batch_size}, "
            f"{args.epochs} epochs, {args.loader_workers} DataLoader worker(s) per rank, {cores} cores, "
            f"torch {torch.__version__}, ray {ray.__version__}"
        )
        print("# steady state = median images/s of epochs 2..N (start-up excluded); wall = whole fit incl. start-up")

        rates_plain, wall_plain = plain_loop(base_config(root, train, args, batch_size=args.batch_size))

        t0 = time.perf_counter()
        ray.init(
            num_cpus=max(cores, 2),
            num_gpus=0,
            include_dashboard=False,
            _temp_dir=str(root / "ray"),
            log_to_driver=False,
        )
        init_s = time.perf_counter() - t0
        try:
            rates_1, wall_1 = ray_fit(
                base_config(
                    root, train, args, backend="ray", num_workers=1, batch_size=args.batch_size, run_name="bench-ray-1"
                )
            )
            rates_2, wall_2 = ray_fit(
                base_config(
                    root,
                    train,
                    args,
                    backend="ray",
                    num_workers=2,
                    batch_size=max(1, args.batch_size // 2),
                    run_name="bench-ray-2",
                )
            )
        finally:
            ray.shutdown()

        def row(label: str, rates: list[float], wall: float) -> str:
            per = " ".join(f"{r:.0f}" for r in rates)
            return f"{label:<34} {steady(rates):8.1f} img/s   wall {wall:6.1f} s   per epoch: {per}"

        print(row("(a) plain PyTorch loop, 1 process", rates_plain, wall_plain))
        print(row("(b) Ray Train, 1 worker", rates_1, wall_1))
        print(row("(c) Ray Train, 2 workers (gloo DDP)", rates_2, wall_2))
        print(f"ray.init: {init_s:.1f} s (not in the walls above)")
        overhead = 1 - steady(rates_1) / steady(rates_plain)
        print(
            f"Ray 1 worker / plain: {steady(rates_1) / steady(rates_plain):.3f} "
            f"(overhead {overhead:+.1%}; goal <= 10%: {'met' if overhead <= 0.10 else 'NOT met'})"
        )
        print(f"Ray 2 workers / 1 worker: {steady(rates_2) / steady(rates_1):.3f} (on {cores} cores)")


if __name__ == "__main__":
    main()
