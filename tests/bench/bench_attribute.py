"""Batch attribution benchmark: ``wysiwyc attribute`` against the model's own speed, and the Explainer
versus Grad-CAM and RISE per image.

1. Throughput (images/s) over the same SeaweedFS image prefix with the same predictor, side by side in
   one run, each as a ratio to the ceiling:
   (c) the ceiling: the bare Predictor forward on pre-decoded tensors, ``--batch-size`` at a time;
   (p) a plain single-process loop doing the whole job (list, read, decode, batch, forward, encode the
       mask PNG + per-class NPZ, write one tar per ``--shard-size`` images), with the time of each step;
   (a) ``pipeline.attribute.attribute`` with 2 predictor actors × 0.5 CPU (``configs/cpu/attribute.yaml``'s
       pool), format ``shards`` and format ``objects``: end to end (the call's wall time: plan, model
       load, actor start-up, index, manifest) and in steady state (after the first output batch);
       start-up on its own line. ``ray.init`` is done before and not counted.
2. Per image, on the same corpus: the Explainer (masks of every class in one forward pass), Grad-CAM
   (one backward pass per class) and RISE (``--rise-masks`` masked forward passes for all classes), all
   on the Explanandum the predictor carries.

Untrained nets (default ``small_cnn`` + ``compact`` at ``--size`` px; ``--explainer deeplabv3_resnet50
--classifier vgg16 --size 224 --device cuda`` is the paper-size GPU run of ``tests/bench/gpu_train.sh``):
speed does not depend on the weights.

Run: ``.venv/bin/python tests/bench/bench_attribute.py [--images N] [--size S] [--batch-size B]
[--shard-size K] [--rise-masks M] [--device cpu|cuda]``. Starts its own SeaweedFS and local Ray and stops
them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import storage
from pipeline.attribute import attribute
from pipeline.attribute.outputs import class_masks_npz, source_key, tar_bytes
from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config
from pipeline.data.classes import SYNTHETIC_CLASSES
from pipeline.data.images import decode_image
from pipeline.data.sample import encode_png
from pipeline.data.synthetic import SyntheticReader
from pipeline.data.transforms import normalize_uint8
from pipeline.evaluate import baselines
from pipeline.models.explain import explained_classes
from pipeline.models.explainer import build_explainer
from pipeline.models.explanandum import build_explanandum
from pipeline.models.predictor import load_predictor
from pipeline.stack import SeaweedFS


def make_models(bucket: str, size: int, opts, explainer: str, classifier: str) -> str:
    classes = list(SYNTHETIC_CLASSES)
    common = {"classes": classes, "image_size": size, "epoch": 0, "step": 0, "config": {}, "metrics": {}}
    clf_uri, exp_uri = f"s3://{bucket}/models/classifier.pt", f"s3://{bucket}/models/explainer.pt"
    torch.manual_seed(0)
    sha = save_checkpoint(
        {
            "kind": "classifier",
            "arch": classifier,
            "model": build_explanandum(classifier, len(classes)).state_dict(),
            **common,
        },
        clf_uri,
        opts,
    )
    save_checkpoint(
        {
            "kind": "explainer",
            "arch": explainer,
            "model": build_explainer(explainer, len(classes)).state_dict(),
            **common,
            "explanandum": {"uri": clf_uri, "sha256": sha, "arch": classifier},
        },
        exp_uri,
        opts,
    )
    return exp_uri


def ceiling(predictor, x: torch.Tensor, batch_size: int, amp: bool) -> float:
    """Images/s of the bare forward (masks and probabilities) on pre-decoded tensors."""
    predictor(x[:batch_size], amp=amp)  # warm-up
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        predictor(x[i : i + batch_size], amp=amp).masks.float().cpu()
    sync()
    return x.shape[0] / (time.perf_counter() - started)


def plain_loop(predictor, prefix: str, out: str, batch_size: int, shard_size: int, amp: bool, opts):
    """The whole job in one process, one step after the other; returns (images, seconds, seconds per step)."""
    steps = dict.fromkeys(("list", "read", "decode", "forward", "encode", "write"), 0.0)
    clock = [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        steps[step] += now - clock[0]
        clock[0] = now

    started = clock[0]
    sources = sorted(u for u in storage.list_prefix(prefix, opts) if u.endswith(".png"))
    lap("list")
    classes, members = predictor.classes, []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        data = [storage.read_small(s, opts) for s in chunk]
        lap("read")
        decoded = [decode_image(d, s, predictor.image_size, 50_000_000)[0] for d, s in zip(data, chunk)]
        lap("decode")
        prediction = predictor(normalize_uint8(torch.from_numpy(np.stack(decoded)).to(predictor.device)), amp=amp)
        masks8 = (prediction.masks.float() * 255).round().to(torch.uint8).cpu().numpy()
        probs = prediction.probs.float().cpu()
        lap("forward")
        for i, idx in enumerate(explained_classes(probs, "threshold")):
            key = source_key(chunk[i])
            members += [
                (f"{key}.mask.png", encode_png(masks8[i, idx].max(axis=0))),
                (f"{key}.class_masks.npz", class_masks_npz(masks8[i, idx], idx, [classes[c] for c in idx])),
            ]
        lap("encode")
        if len(members) >= 2 * shard_size or start + batch_size >= len(sources):
            storage.write_bytes(f"{out}/shard-{start:06d}.tar", tar_bytes(members), opts)
            members = []
            lap("write")
    return len(sources), time.perf_counter() - started, steps


def per_image_ms(fn, x: torch.Tensor, chunk: int) -> float:
    fn(x[:2])  # warm-up
    started = time.perf_counter()
    for i in range(0, x.shape[0], chunk):
        fn(x[i : i + chunk])
    return 1000 * (time.perf_counter() - started) / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--method-images", type=int, default=64, help="images for the per-image comparison")
    parser.add_argument("--explainer", default="compact")
    parser.add_argument("--classifier", default="small_cnn")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    gpu = args.device == "cuda"
    torch.set_num_threads(os.cpu_count() if gpu else 2)

    with tempfile.TemporaryDirectory(prefix="bench-attribute-") as tmp, SeaweedFS(Path(tmp) / "weed") as server:
        opts = server.opts
        bucket = server.make_bucket("bench")
        env = {**os.environ, **server.env}
        os.environ.update(env)
        exp_uri = make_models(bucket, args.size, opts, args.explainer, args.classifier)
        reader = SyntheticReader(args.images, seed=0, split="bench", image_size=args.size)
        prefix = f"s3://{bucket}/corpus/"
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: storage.write_bytes(f"{prefix}img_{i:05d}.png", reader.load(i).image, opts),
                    range(args.images),
                )
            )
        predictor = load_predictor(exp_uri, opts=opts).to(args.device)
        sources = sorted(storage.list_prefix(prefix, opts))
        x = normalize_uint8(
            torch.from_numpy(
                np.stack([decode_image(storage.read_bytes(s, opts), s, args.size, 50_000_000)[0] for s in sources])
            ).to(args.device)
        )

        # (c) the ceiling, (p) the plain loop
        top = ceiling(predictor, x, args.batch_size, gpu)
        n, plain_s, steps = plain_loop(
            predictor, prefix, f"s3://{bucket}/plain", args.batch_size, args.shard_size, gpu, opts
        )
        plain = n / plain_s

        # (a) the Ray Data stage (local Ray started first, not timed), both output formats
        import ray

        ray.init(
            num_cpus=os.cpu_count() if gpu else 2,
            num_gpus=torch.cuda.device_count() if gpu else 0,
            include_dashboard=False,
            _temp_dir=str(Path(tmp) / "ray"),
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        runs = {}
        for fmt in ("shards", "objects"):
            config = load_config(
                None,
                [
                    f"explainer.checkpoint={exp_uri}",
                    f"attribute.input={prefix}",
                    f"output=s3://{bucket}/out",
                    f"attribute.run_id=bench-{fmt}",
                    f"attribute.batch_size={args.batch_size}",
                    f"attribute.shard_size={args.shard_size}",
                    f"attribute.output_format={fmt}",
                    "attribute.num_actors=2",
                    f"attribute.cpus_per_actor={1 if gpu else 0.5}",
                    f"attribute.gpus_per_actor={0.5 if gpu else 0}",
                    f"attribute.amp={str(gpu).lower()}",
                    "attribute.preview_images=0",
                    "tracking.enabled=false",
                ],
            )
            started = time.perf_counter()
            summary = attribute(config, progress=False)
            wall = time.perf_counter() - started
            assert summary["num_ok"] == args.images, summary
            timings = json.loads(storage.read_bytes(summary["manifest"], opts))["timings"]
            runs[fmt] = (args.images / wall, timings, summary["output_objects"])
        ray.shutdown()

        print(
            f"corpus: {args.images} synthetic {args.size}px PNGs in SeaweedFS, batch {args.batch_size}, "
            f"shards of {args.shard_size}, {args.classifier} + {args.explainer} (untrained) on {args.device}, "
            f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} cores"
        )
        print(f"(c) ceiling: bare forward on pre-decoded tensors  {top:9.1f} img/s   1.00")
        print(f"(p) plain loop, decode + encode + write           {plain:9.1f} img/s   {plain / top:.2f}")
        total = sum(steps.values())
        print("    where the plain loop's time goes: " + ", ".join(f"{k} {v / total:.0%}" for k, v in steps.items()))
        for fmt, (end_to_end, timings, objects) in runs.items():
            steady = timings["steady_images_per_second"]
            print(
                f"(a) attribute, format {fmt:7s} end to end       {end_to_end:9.1f} img/s   {end_to_end / top:.2f}"
                f"   ({objects} objects written)"
            )
            print(f"                         steady state           {steady:9.1f} img/s   {steady / top:.2f}")
            print(
                f"    start-up (actors, model, first batch) {timings['startup_seconds']:.1f} s; whole call "
                f"{args.images / end_to_end:.1f} s"
            )

        # 2. per image: Explainer vs Grad-CAM vs RISE, all classes
        x = x[: args.method_images]
        all_classes = list(range(len(predictor.classes)))
        explainer_ms = per_image_ms(lambda b: predictor(b), x, args.batch_size)
        gradcam_ms = per_image_ms(
            lambda b: baselines.gradcam(predictor.explanandum, b, all_classes), x, args.batch_size
        )
        rise_x = x[: max(4, args.method_images // 8)]
        rise_ms = per_image_ms(
            lambda b: baselines.rise(predictor.explanandum, b, all_classes, num_masks=args.rise_masks, batch_size=100),
            rise_x,
            2,
        )
        print(f"per image, all {len(all_classes)} classes ({x.shape[0]} images; RISE on {rise_x.shape[0]}):")
        for name, ms in (
            ("Explainer (one pass + probs)", explainer_ms),
            ("Grad-CAM", gradcam_ms),
            (f"RISE ({args.rise_masks} masks)", rise_ms),
        ):
            print(f"  {name:30s} {ms:9.2f} ms/img  {1000 / ms:9.1f} img/s  x{ms / explainer_ms:.1f} of the Explainer")


if __name__ == "__main__":
    main()
