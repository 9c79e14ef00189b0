#!/usr/bin/env bash
# GPU training and attribution benchmark: one DeepLabv3-ResNet50 Explainer over a VGG-16 Explanandum at 224 px,
# batch 16 per GPU, AMP bf16, 200 optimizer steps, from synthetic shards on local disk.
# Prints images/s (steady state: median of epochs 2..N, and over the whole run), the share of step
# time spent waiting for data, peak GPU memory (torch.cuda.max_memory_allocated) and the fraction of
# the card's dense bf16 peak reached, assuming ~320 GFLOP per image per training step (the Explainer
# forward and backward plus two Explanandum forward and input-backward passes; issue 4).
#
# Self-contained: run from the repo root with the project venv; no network (the VGG-16 is randomly
# initialised and saved as a classifier checkpoint: weights do not matter for throughput).
# Trains with trainer.backend=local (the same worker loop as Ray Train, in this process, one GPU).
#
#   tests/bench/gpu_train.sh                                  # on a GPU machine
#   DEVICE=cpu STEPS=2 SIZE=64 BATCH=2 IMAGES=16 tests/bench/gpu_train.sh   # CPU dry run (checks the script)
#
# Knobs (environment): STEPS (200), SIZE (224), BATCH (16, per GPU), IMAGES (800), DEVICE (cuda|cpu),
# AMP (bf16), LOADER_WORKERS (min(8, cores - 2)), WORKDIR (a new temporary dir, removed at the end
# unless KEEP=1), PYTHON (.venv/bin/python). Not run by pytest; nothing depends on it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export STEPS=${STEPS:-200} SIZE=${SIZE:-224} BATCH=${BATCH:-16} IMAGES=${IMAGES:-800} DEVICE=${DEVICE:-cuda}
export AMP=${AMP:-bf16}
export LOADER_WORKERS=${LOADER_WORKERS:-$(( $(nproc) > 10 ? 8 : ( $(nproc) > 2 ? $(nproc) - 2 : 1 ) ))}
WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/wysiwyc-gpu-bench-XXXXXX")}
export WORKDIR
export MLFLOW_DISABLE_TELEMETRY=true
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORKDIR"' EXIT; fi

# the Python part is written to a file: multiprocessing (spawn) re-imports the main module by path
cat > "$WORKDIR/gpu_train_bench.py" <<'EOF'
import json, math, os, statistics, sys, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import torch

from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.models.explanandum import build_explanandum
from pipeline.checkpoint import save_checkpoint
from pipeline.train.trainer import fit


def main() -> None:
    steps, size, batch, images = (int(os.environ[k]) for k in ("STEPS", "SIZE", "BATCH", "IMAGES"))
    device, amp, workers, work = os.environ["DEVICE"], os.environ["AMP"], int(os.environ["LOADER_WORKERS"]), Path(os.environ["WORKDIR"])
    gpu = device == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("gpu_train.sh: no CUDA device visible (use DEVICE=cpu for a dry run)")
    GFLOP_PER_IMAGE = 320.0
    PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0))  # dense, SXM figures

    t0 = time.perf_counter()
    shard_size = max(1, min(100, images // max(1, workers)))
    reader = SyntheticReader(images, seed=0, split="train", image_size=size, image_format="jpg")
    ingest(reader, str(work / "data"), "train", IngestConfig(workers=max(1, min(8, os.cpu_count() or 1)),
                                                             shard_size=shard_size), progress=False)
    classes = reader.classes
    clf = build_explanandum("vgg16", len(classes))  # random init: throughput only
    save_checkpoint({"kind": "classifier", "arch": "vgg16", "classes": list(classes), "image_size": size,
                     "model": clf.state_dict(), "epoch": 0, "step": 0}, str(work / "vgg16.pt"))
    del clf
    print(f"setup (shards + VGG-16 checkpoint): {time.perf_counter() - t0:.1f} s; {images} images, "
          f"{math.ceil(images / shard_size)} shards, {workers} loader workers", flush=True)

    per_epoch = max(1, images // batch)
    config = load_config(None, [
        f"data.train={work / 'data' / 'train'}", f"data.image_size={size}", f"data.loader_workers={workers}",
        "data.shuffle_buffer=200", "explanandum.arch=vgg16", f"explanandum.checkpoint={work / 'vgg16.pt'}",
        "explainer.arch=deeplabv3_resnet50", "optim.lr=1e-5", "tracking.enabled=false", "trainer.backend=local",
        f"trainer.use_gpu={'true' if gpu else 'false'}", f"trainer.amp={amp}", f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}", f"trainer.epochs={math.ceil(steps / per_epoch)}",
        f"trainer.storage={work / 'ckpt'}", "trainer.run_name=gpu-bench"])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = fit("explainer", config, progress=False)
    wall = time.perf_counter() - t0
    history = json.loads((work / "ckpt" / "gpu-bench" / "history.json").read_text())
    rates = [h["images_per_second"] for h in history]
    steady = statistics.median(rates[1:] or rates)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = next((tf for key, tf in PEAK_BF16_TFLOPS if key in name.upper()), None)
    print(f"device: {name}; torch {torch.__version__}; amp {amp if gpu else 'off (cpu)'}; batch {batch}; {size} px; "
          f"{summary['steps']} steps in {len(history)} epoch(s); wall {wall:.1f} s (incl. model build, checkpoints)")
    per = " ".join(f"{r:.1f}" for r in rates)
    print(f"images/s: {steady:.1f} steady (median of epochs 2..N), per epoch: {per}")
    waits = " ".join(f"{h['data_wait_share']:.3f}" for h in history)
    print(f"data wait share per epoch: {waits}")
    if gpu:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated "
              f"(of {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    achieved = steady * GFLOP_PER_IMAGE / 1e3  # TFLOP/s
    if peak:
        print(f"bf16 utilisation: {achieved:.1f} TFLOP/s of ~{peak:.0f} dense peak = {achieved / peak:.1%} "
              f"(assuming {GFLOP_PER_IMAGE:.0f} GFLOP/image/step)")
    else:
        print(f"bf16 utilisation: {achieved:.2f} TFLOP/s achieved; card peak unknown for {name!r}")


if __name__ == "__main__":  # spawn-started workers (ingest, DataLoader) re-import this file
    main()
EOF
"$PYTHON" "$WORKDIR/gpu_train_bench.py"

# then batch attribution on the same device with the paper-size pair: the bare forward (the ceiling),
# a plain loop and `wysiwyc attribute` (2 actors sharing the GPU, bf16, format shards), images/s and
# ratios (tests/bench/bench_attribute.py); ATTRIBUTE=0 skips it, ATTRIBUTE_IMAGES sets the corpus size (default IMAGES)
if [ "${ATTRIBUTE:-1}" = 1 ]; then
  "$PYTHON" tests/bench/bench_attribute.py --device "$DEVICE" --explainer deeplabv3_resnet50 --classifier vgg16 \
    --size "$SIZE" --images "${ATTRIBUTE_IMAGES:-$IMAGES}" --batch-size 64 --shard-size 500 \
    --method-images 16 --rise-masks 100
fi
