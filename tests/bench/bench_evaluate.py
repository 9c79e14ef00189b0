"""Evaluate benchmark: the ``grad-cam`` package as users call it, our batched Grad-CAM, and an Explainer.

All-class masks per second on the same images and the same ``small_cnn`` classifier (frozen, eval
mode), measured side by side in one run:

a. ``pytorch_grad_cam.GradCAM`` as its users call it: one call per class per batch
   (``targets=[ClassifierOutputTarget(c)] * B``; each call is a forward, a backward, numpy and cv2);
b. our :func:`pipeline.evaluate.baselines.gradcam`: one forward per batch, one ``autograd.grad`` per
   class on it, upsampling and normalisation batched in torch;
c. a ``compact`` Explainer (:func:`pipeline.models.explainer.build_explainer`) in eval mode: one
   forward (+ sigmoid) gives the masks of every class.

A "mask" is one class map of one image, so an image with C classes counts C masks. Untrained nets
(speed does not depend on the weights) on synthetic images. Each method gets one warm-up batch, then
the best of ``--repeats`` passes over all images is kept (the machine may be shared).

Run: ``.venv/bin/python tests/bench/bench_evaluate.py [--images N] [--size S] [--classes C]
[--batch-size B] [--threads T] [--repeats R]``. Not run by pytest.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.synthetic import SyntheticReader  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.evaluate import baselines  # noqa: E402
from pipeline.models.explainer import build_explainer  # noqa: E402
from pipeline.models.explanandum import build_explanandum, freeze_explanandum  # noqa: E402


def images(n: int, size: int) -> torch.Tensor:
    """``n`` synthetic images (B, 3, size, size), ImageNet-normalised."""
    reader = SyntheticReader(n, seed=0, split="bench", image_size=size)
    x = torch.stack([torch.from_numpy(reader.render(i).image).permute(2, 0, 1) for i in range(n)])
    return normalize(x.float() / 255)


def masks_per_second(fn, x: torch.Tensor, batch_size: int, num_classes: int, repeats: int) -> float:
    """All-class masks per second of ``fn(batch) -> (B, C, H, W)``: best of ``repeats`` passes."""
    out = fn(x[:batch_size])  # warm-up
    assert tuple(out.shape) == (min(batch_size, x.shape[0]), num_classes, *x.shape[-2:]), out.shape
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, x.shape[0], batch_size):
            fn(x[i : i + batch_size])
        best = min(best, time.perf_counter() - started)
    return x.shape[0] * num_classes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    classifier = freeze_explanandum(build_explanandum("small_cnn", args.classes))
    e = load_config("cpu/explainer").explainer  # the CPU preset's net
    explainer = build_explainer(e.arch, args.classes, levels=e.levels, cam=e.cam).eval()
    x = images(args.images, args.size)
    all_classes = list(range(args.classes))
    layer = baselines.gradcam_target_layer(classifier)
    cam = GradCAM(model=classifier, target_layers=[layer])

    def package(batch: torch.Tensor) -> torch.Tensor:
        # a frozen classifier has no parameter that requires grad: the input must carry the graph
        maps = [
            cam(input_tensor=batch.clone().requires_grad_(True), targets=[ClassifierOutputTarget(c)] * batch.shape[0])
            for c in all_classes
        ]
        return torch.from_numpy(np.stack(maps, axis=1))

    def ours(batch: torch.Tensor) -> torch.Tensor:
        return baselines.gradcam(classifier, batch, all_classes)

    def explain(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(explainer(batch))

    try:
        rates = {
            "(a) pytorch-grad-cam, a call per class": masks_per_second(
                package, x, args.batch_size, args.classes, args.repeats
            ),
            "(b) baselines.gradcam, batched": masks_per_second(ours, x, args.batch_size, args.classes, args.repeats),
            "(c) compact Explainer, one forward": masks_per_second(
                explain, x, args.batch_size, args.classes, args.repeats
            ),
        }
    finally:
        cam.activations_and_grads.release()

    print(
        f"{args.images} synthetic {args.size}px images, batch {args.batch_size}, {args.classes} classes, "
        f"small_cnn classifier + compact Explainer (untrained), {args.threads} torch thread(s), "
        f"torch {torch.__version__}, grad-cam {version('grad-cam')}; best of {args.repeats}"
    )
    base = rates["(a) pytorch-grad-cam, a call per class"]
    ours_rate = rates["(b) baselines.gradcam, batched"]
    for name, rate in rates.items():
        print(
            f"  {name:40s} {rate:9.0f} masks/s  {rate / args.classes:8.1f} img/s (all classes)  "
            f"x{rate / base:.2f} of (a)  x{rate / ours_rate:.2f} of (b)"
        )


if __name__ == "__main__":
    main()
