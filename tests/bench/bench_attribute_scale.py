"""Scale benchmark of ``wysiwyc attribute``: the driver's and the actors' peak memory at 10,000 and at
100,000 inputs (it must not grow with the corpus), and a 100,000-image run killed at about half way and
relaunched, which must end with every image exactly once.

The corpus: ``--images`` small PNGs (``--size`` px, 1,000 distinct random images repeated under distinct
names) in a local folder, the small corpus hard links to its first ``--small`` files; the models: an
untrained ``small_cnn`` + ``compact`` pair (speed and memory do not depend on the weights). Each run is
the real command line (``wysiwyc attribute … --json``, its own local Ray, format ``shards``), sampled
every 0.5 s with psutil: the driver process's RSS and the largest RSS of any predictor actor
(``MapWorker(MapBatches(_Attributor))``).

Run: ``.venv/bin/python tests/bench/bench_attribute_scale.py [--images 100000] [--small 10000]
[--size 16] [--kill-at 0.5]``. Prints a table and the ratios; writes nothing outside a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.attribute.outputs import done_counts  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.data.classes import SYNTHETIC_CLASSES  # noqa: E402
from pipeline.models.explainer import build_explainer  # noqa: E402
from pipeline.models.explanandum import build_explanandum  # noqa: E402

BIN = Path(sys.executable).parent


def make_corpus(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(1000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    for i in range(n):
        sub = folder / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True)
        (sub / f"img_{i:07d}.png").write_bytes(blobs[i % 1000])


def make_models(folder: Path, size: int) -> str:
    classes = list(SYNTHETIC_CLASSES)
    common = {"classes": classes, "image_size": size, "epoch": 0, "step": 0, "config": {}, "metrics": {}}
    torch.manual_seed(0)
    clf, exp = str(folder / "classifier.pt"), str(folder / "explainer.pt")
    sha = save_checkpoint(
        {"kind": "classifier", "arch": "small_cnn", "model": build_explanandum("small_cnn", 6).state_dict(), **common},
        clf,
    )
    save_checkpoint(
        {
            "kind": "explainer",
            "arch": "compact",
            "model": build_explainer("compact", 6).state_dict(),
            **common,
            "explanandum": {"uri": clf, "sha256": sha, "arch": "small_cnn"},
        },
        exp,
    )
    return exp


class Peaks:
    """Peak RSS (MiB) of the driver process and of the largest predictor actor, sampled every 0.5 s."""

    def __init__(self, pid: int):
        self.driver = self.actor = 0.0
        self.pid, self._stop = pid, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                try:
                    rss = proc.info["memory_info"].rss / 2**20
                    if proc.info["pid"] == self.pid:
                        self.driver = max(self.driver, rss)
                    elif "MapBatches(_Attributor)" in " ".join(proc.info["cmdline"] or []):
                        self.actor = max(self.actor, rss)
                except (psutil.Error, TypeError, AttributeError):
                    pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def launch(model: str, corpus: Path, output: Path, run_id: str, tmp: Path, kill_after: int | None = None):
    """One ``wysiwyc attribute`` launch; with ``kill_after`` it is killed (SIGKILL, its whole process group:
    driver, local Ray, actors) once the run's parts hold that many images."""
    args = [
        str(BIN / "wysiwyc"),
        "attribute",
        "--model",
        model,
        "--input",
        str(corpus),
        "--output",
        str(output),
        "--run-id",
        run_id,
        "-c",
        "cpu/attribute",
        "attribute.batch_size=256",
        "attribute.shard_size=1000",
        "attribute.output_format=shards",
        "attribute.preview_images=0",
        "tracking.enabled=false",
        "--json",
    ]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    peaks = Peaks(proc.pid)
    summary = None
    try:
        if kill_after is None:
            out, _ = proc.communicate()
            assert proc.returncode == 0, out[-2000:]
            summary = json.loads(out)
        else:
            while sum(rows for rows, _ in done_counts(str(output / run_id), None).values()) < kill_after:
                assert proc.poll() is None, "finished before the kill"
                time.sleep(1)
            family = psutil.Process(proc.pid).children(recursive=True)  # its local Ray: GCS, raylet, workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for left in family:  # what left the process group (Ray starts some in sessions of their own)
                try:
                    left.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(family, timeout=10)
    finally:
        peaks.stop()
    return summary, peaks, time.perf_counter() - started


def exactly_once(run: Path, n: int) -> None:
    """Every image of the corpus has exactly one index row, and every output shard it names exists."""
    sources, shards = [], set()
    for part in (run / "parts").rglob("*.parquet"):
        table = pq.read_table(part, columns=["source", "output_shard"])
        sources += table["source"].to_pylist()
        shards.update(table["output_shard"].to_pylist())
    assert len(sources) == len(set(sources)) == n, (len(sources), len(set(sources)), n)
    assert all(Path(s).is_file() for s in shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--kill-at", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as name:
        tmp = Path(name)
        started = time.perf_counter()
        make_corpus(tmp / "large", args.images, args.size)
        (tmp / "small").mkdir()
        for path in sorted((tmp / "large").rglob("*.png"))[: args.small]:
            os.link(path, tmp / "small" / path.name)
        model = make_models(tmp, args.size)
        print(f"corpus: {args.images} {args.size}px PNGs written in {time.perf_counter() - started:.0f} s")

        rows = []
        small, peaks, wall = launch(model, tmp / "small", tmp / "out", "small", tmp)
        exactly_once(tmp / "out" / "small", args.small)
        rows.append((f"{args.small:,}", "one launch", peaks, wall, small))
        _, killed, wall_killed = launch(
            model, tmp / "large", tmp / "out", "large", tmp, kill_after=int(args.kill_at * args.images)
        )
        done = sum(r for r, _ in done_counts(str(tmp / "out" / "large"), None).values())
        rows.append((f"{args.images:,}", f"killed at {done:,}", killed, wall_killed, None))
        large, resumed, wall_resumed = launch(model, tmp / "large", tmp / "out", "large", tmp)
        exactly_once(tmp / "out" / "large", args.images)
        assert large["resumed"] == done and large["processed"] == args.images - done, large
        rows.append((f"{args.images:,}", "relaunched", resumed, wall_resumed, large))

        print(
            f"{'inputs':>8s}  {'launch':18s}  {'driver peak RSS':>15s}  {'actor peak RSS':>14s}  "
            f"{'wall':>7s}  {'img/s (steady)':>14s}  objects"
        )
        for inputs, what, p, seconds, summary in rows:
            rate = ""
            if summary:
                manifest = json.loads(Path(summary["manifest"]).read_text())
                rate = f"{manifest['timings']['steady_images_per_second'] or 0:.0f}"
            objects = summary["output_objects"] if summary else ""
            print(
                f"{inputs:>8s}  {what:18s}  {p.driver:12.0f} MiB  {p.actor:11.0f} MiB  {seconds:6.0f}s  "
                f"{rate:>14s}  {objects}"
            )
        driver_ratio = max(killed.driver, resumed.driver) / peaks.driver
        actor_ratio = max(killed.actor, resumed.actor) / peaks.actor
        print(
            f"peak RSS {args.images:,} / {args.small:,} inputs: driver {driver_ratio:.2f}x, actors {actor_ratio:.2f}x; "
            f"the driver's own figure (--json peak_rss_mb): {small['peak_rss_mb']:.0f} → {large['peak_rss_mb']:.0f} MiB"
        )
        print(f"exactly once after the kill: {args.images:,} index rows, {args.images:,} distinct sources")


if __name__ == "__main__":
    main()
