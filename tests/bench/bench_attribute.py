"""Batch attribution benchmark: ``wysiwyc attribute`` on Ray Data versus a plain Python loop, and the
Explainer versus Grad-CAM and RISE per image.

1. Throughput (images/s) over the same SeaweedFS image prefix with the same predictor, measured in one
   run: (a) a plain single-process loop (list, read, decode, batch, one predictor call, write the same
   mask PNG + per-class NPZ per image, sequentially) and (b) ``pipeline.attribute.attribute`` with 2
   predictor actors × 0.5 CPU (``configs/cpu/attribute.yaml``'s pool). For (b) the stage's own
   figure (images / execution time, actor start-up included) and the wall time of the call (listing,
   model load and index compaction included) are printed; ``ray.init`` is done before and not counted.
2. Per image, on the same corpus: the Explainer (masks of every class in one forward pass), Grad-CAM
   (one backward pass per class) and RISE (``--rise-masks`` masked forward passes for all classes), all
   on the Explanandum the predictor carries.

Untrained ``small_cnn`` + ``compact`` nets at ``--size`` px: speed does not depend on the weights.

Run: ``.venv/bin/python tests/bench/bench_attribute.py [--images N] [--size S] [--batch-size B]
[--rise-masks M]``. Starts its own SeaweedFS and local Ray (2 CPUs) and stops them at the end.
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
from pipeline.attribute.inputs import decode_image
from pipeline.attribute.job import explained_classes
from pipeline.attribute.outputs import class_masks_npz, output_urls
from pipeline.config import load_config
from pipeline.data.classes import SYNTHETIC_CLASSES
from pipeline.data.sample import encode_png
from pipeline.data.synthetic import SyntheticReader
from pipeline.evaluate import baselines
from pipeline.models.explainer import build_explainer
from pipeline.models.explanandum import build_explanandum
from pipeline.models.predictor import load_predictor
from pipeline.stack import SeaweedFS
from pipeline.train.checkpoint import save_checkpoint


def make_models(bucket: str, size: int, opts) -> str:
    classes = list(SYNTHETIC_CLASSES)
    common = {"classes": classes, "image_size": size, "epoch": 0, "step": 0, "config": {}, "metrics": {}}
    clf_uri, exp_uri = f"s3://{bucket}/models/classifier.pt", f"s3://{bucket}/models/explainer.pt"
    torch.manual_seed(0)
    sha = save_checkpoint(
        {
            "kind": "classifier",
            "arch": "small_cnn",
            "model": build_explanandum("small_cnn", len(classes)).state_dict(),
            **common,
        },
        clf_uri,
        opts,
    )
    save_checkpoint(
        {
            "kind": "explainer",
            "arch": "compact",
            "model": build_explainer("compact", len(classes)).state_dict(),
            **common,
            "explanandum": {"uri": clf_uri, "sha256": sha, "arch": "small_cnn"},
        },
        exp_uri,
        opts,
    )
    return exp_uri


def plain_loop(predictor, prefix: str, out: str, batch_size: int, opts) -> tuple[int, float]:
    """The same work as one attribute run, in one process, one image after the other."""
    started = time.perf_counter()
    sources = sorted(u for u in storage.list_prefix(prefix, opts) if u.endswith(".png"))
    classes = predictor.classes
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        decoded = [decode_image(storage.read_bytes(s, opts), s, predictor.image_size, 50_000_000) for s in chunk]
        prediction = predictor(torch.from_numpy(np.stack([d[0] for d in decoded])))
        masks8 = (prediction.masks * 255).round().to(torch.uint8).numpy()
        for i, (source, idx) in enumerate(zip(chunk, explained_classes(prediction.probs, "threshold"))):
            mask_url, npz_url = output_urls(out, source[-12:])
            storage.write_bytes(mask_url, encode_png(masks8[i, idx].max(axis=0)), opts)
            storage.write_bytes(npz_url, class_masks_npz(masks8[i, idx], idx, [classes[c] for c in idx]), opts)
    return len(sources), time.perf_counter() - started


def per_image_ms(fn, x: torch.Tensor, chunk: int) -> float:
    fn(x[:2])  # warm-up
    started = time.perf_counter()
    for i in range(0, x.shape[0], chunk):
        fn(x[i : i + chunk])
    return 1000 * (time.perf_counter() - started) / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--method-images", type=int, default=64, help="images for the per-image comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory(prefix="bench-attribute-") as tmp, SeaweedFS(Path(tmp) / "weed") as server:
        opts = server.opts
        bucket = server.make_bucket("bench")
        env = {**server.env, "RAY_AUTH_MODE": "disabled"}
        os.environ.update(env)
        exp_uri = make_models(bucket, args.size, opts)
        reader = SyntheticReader(args.images, seed=0, split="bench", image_size=args.size)
        prefix = f"s3://{bucket}/corpus/"
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: storage.write_bytes(f"{prefix}img_{i:05d}.png", reader.load(i).image, opts),
                    range(args.images),
                )
            )
        predictor = load_predictor(exp_uri, opts=opts)

        # 1a. the plain loop
        n, plain_s = plain_loop(predictor, prefix, f"s3://{bucket}/plain", args.batch_size, opts)
        plain = n / plain_s

        # 1b. the Ray Data stage (local Ray started first, not timed)
        import ray

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=str(Path(tmp) / "ray"),
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        config = load_config(
            None,
            [
                f"explainer.checkpoint={exp_uri}",
                f"attribute.input={prefix}",
                f"output=s3://{bucket}/out",
                "attribute.run_id=bench",
                f"attribute.batch_size={args.batch_size}",
                "attribute.num_actors=2",
                "attribute.cpus_per_actor=0.5",
                "attribute.preview_images=0",
            ],
        )
        started = time.perf_counter()
        summary = attribute(config, progress=False)
        wall = time.perf_counter() - started
        ray.shutdown()
        assert summary["num_ok"] == args.images, summary

        print(
            f"corpus: {args.images} synthetic {args.size}px PNGs in SeaweedFS, batch {args.batch_size}, "
            f"small_cnn + compact (untrained), torch {torch.__version__}, ray {ray.__version__}"
        )
        print(f"(a) plain Python loop           {plain:8.1f} img/s   ({plain_s:.1f} s)")
        print(
            f"(b) attribute, 2 actors x 0.5   {summary['images_per_second']:8.1f} img/s   "
            f"(execution incl. actor start-up; wall {wall:.1f} s = {args.images / wall:.1f} img/s end to end)"
        )
        timings = json.loads(storage.read_bytes(summary["manifest"], opts))["timings"]
        steady = timings["steady_images_per_second"]
        print(
            f"    steady state after the first batch ({timings['startup_seconds']:.1f} s actor start-up) "
            f"{steady:.1f} img/s"
        )
        print(
            f"ratio (b)/(a)                   {summary['images_per_second'] / plain:8.2f}   "
            f"(end to end {args.images / wall / plain:.2f}, steady state {steady / plain:.2f})"
        )

        # 2. per image: Explainer vs Grad-CAM vs RISE, all classes
        sources = sorted(storage.list_prefix(prefix, opts))[: args.method_images]
        x = torch.from_numpy(
            np.stack([decode_image(storage.read_bytes(s, opts), s, args.size, 50_000_000)[0] for s in sources])
        )
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
