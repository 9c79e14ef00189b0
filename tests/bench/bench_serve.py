"""Online serving benchmark: ``wysiwyc serve`` (Ray Serve, HTTP, dynamic batching) against a direct Predictor
loop on the same images, side by side in one run.

For 1, 4 and 16 concurrent clients (threads, one keep-alive HTTP connection each) sending ``--requests``
PNGs to ``POST /explain``: requests/s, p50 and p99 latency. The direct loop does per request what the
endpoint does without HTTP and batching: decode + resize (``decode_image``), the forward pass, the class
rule and the PNG masks (:func:`pipeline.models.explain.explain`), one image at a time. Ratios are
endpoint / direct.

The model: an untrained ``--explainer`` / ``--classifier`` pair at ``--size`` px registered in a temporary
sqlite registry (speed does not depend on the weights); ``--device cuda`` serves it with one GPU per replica.

With ``--abuse``, each level runs twice: as above, then with one more client that sends, back to back, what
issue 29 measured stalling the endpoint: a 7000 × 7000 PNG (a few hundred kB that decode to 147 MB) and a request
for ``fixed_classes`` naming one class 1,000 times. The p99 of the normal requests is reported for both, and
what the abusive requests got. The endpoint runs from the code beside this file (``python -m pipeline.cli`` with
this repository first on the path), so a checkout of an older commit measures that commit's endpoint.

Run: ``.venv/bin/python tests/bench/bench_serve.py [--requests N] [--size S] [--replicas R] [--device cpu|cuda]
[--abuse] [--explainer deeplabv3_resnet50 --classifier vgg16 --size 224]``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.images import decode_image  # noqa: E402
from pipeline.models.explain import ClassRule, explain  # noqa: E402
from pipeline.models.explainer import build_explainer  # noqa: E402
from pipeline.models.explanandum import build_explanandum  # noqa: E402
from pipeline.models.predictor import load_predictor  # noqa: E402
from pipeline.registry import register_checkpoint  # noqa: E402

CLASSES = [f"class{i}" for i in range(20)]


def _model(root: Path, args) -> tuple[str, str]:
    """An Explainer + classifier checkpoint pair registered as ``bench``; ``(checkpoint, registry uri)``."""
    torch.manual_seed(0)
    classifier = build_explanandum(args.classifier, len(CLASSES))
    sha = save_checkpoint(
        {"kind": "classifier", "arch": args.classifier, "classes": CLASSES, "image_size": args.size,
         "model": classifier.state_dict(), "epoch": 0, "step": 0, "config": {}, "metrics": {}},
        str(root / "clf.pt"),
    )  # fmt: skip
    explainer = build_explainer(args.explainer, len(CLASSES))
    save_checkpoint(
        {"kind": "explainer", "arch": args.explainer, "classes": CLASSES, "image_size": args.size,
         "model": explainer.state_dict(), "epoch": 0, "step": 0, "metrics": {}, "config": {},
         "explanandum": {"uri": str(root / "clf.pt"), "sha256": sha, "arch": args.classifier},
         "explainer_init": "scratch", "black_box": True},
        str(root / "expl.pt"),
    )  # fmt: skip
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_checkpoint(str(root / "expl.pt"), "bench", load_config(None, [f"tracking.uri={uri}"]))
    return str(root / "expl.pt"), uri


def _images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size + 17, size + 9, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _stats(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def _direct(checkpoint: str, images: list[bytes], device: str) -> dict:
    predictor = load_predictor(checkpoint).to(device)
    rule = ClassRule()
    explain(predictor, torch.from_numpy(decode_image(images[0], "warm-up", predictor.image_size, 10**9)[0])[None], rule)
    latencies, start = [], time.perf_counter()
    for body in images:
        t = time.perf_counter()
        pixels = decode_image(body, "image", predictor.image_size, 10**9)[0]
        explain(predictor, torch.from_numpy(pixels)[None], rule)
        latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - start)


def _abusive() -> list[tuple[str, bytes]]:
    """The abusive requests: (path, body)."""
    big = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 140, 30)).save(big, format="PNG")
    small = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 140, 30)).save(small, format="PNG")
    repeated = ",".join([CLASSES[0]] * 1000)
    return [("/explain", big.getvalue()), (f"/explain?classes=fixed&fixed_classes={repeated}", small.getvalue())]


def _abuse(port: int, stop) -> dict:
    """Send the abusive requests until ``stop`` is set; what they got: status → count, and the seconds spent."""
    got: dict = {}
    requests = _abusive()
    i = 0
    while not stop.is_set():
        path, body = requests[i % len(requests)]
        label = "fixed×1000" if "?" in path else "7000² PNG"
        i += 1
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        t = time.perf_counter()
        try:
            connection.request("POST", path, body, {"Content-Type": "image/png"})
            reply = connection.getresponse()
            payload = reply.read()
            key = f"{label} {reply.status}"
            if reply.status == 200 and "?" in path:
                key += f" ({len(json.loads(payload)['masks'])} masks, {len(payload) / 1e6:.1f} MB)"
        except (OSError, http.client.HTTPException) as exc:
            key = f"{label} {type(exc).__name__}"
        finally:
            connection.close()
        entry = got.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - t
    return got


def _load(port: int, images: list[bytes], clients: int) -> tuple[dict, float]:
    """``clients`` threads with a keep-alive connection each share ``images``; stats and mean batch size."""

    def client(part: list[bytes]) -> list[tuple[float, int]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        out = []
        for body in part:
            t = time.perf_counter()
            connection.request("POST", "/explain", body, {"Content-Type": "image/png"})
            reply = connection.getresponse()
            answer = json.loads(reply.read())
            assert reply.status == 200, answer
            out.append((time.perf_counter() - t, answer["batch"]))
        connection.close()
        return out

    parts = [images[i::clients] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client, parts) for r in part]
    wall = time.perf_counter() - start
    return _stats([r[0] for r in results], wall), float(np.mean([r[1] for r in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=320, help="requests per concurrency level")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--explainer", default="compact")
    parser.add_argument("--classifier", default="small_cnn")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--abuse", action="store_true", help="each level again with an abusive client beside it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        checkpoint, uri = _model(root, args)
        images = _images(args.requests, args.size)
        direct = _direct(checkpoint, images, args.device)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        gpus = "1" if args.device == "cuda" else "0"
        repo = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "WYSIWYC_RAY_TMP": str(root / "r"),
            "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model", "models:/bench@candidate",
             "--port", str(port), "--replicas", str(args.replicas), f"serve.gpus_per_replica={gpus}", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo,
        )  # fmt: skip
        try:
            ready = json.loads(server.stdout.readline())
            print(f"wysiwyc serve ready in {time.perf_counter() - started:.1f} s at {ready['url']}")
            _load(port, images[:16], 4)  # warm-up
            print(f"\n{args.explainer} + {args.classifier} at {args.size} px on {args.device}, "
                  f"{args.requests} requests per level, {args.replicas} replica(s)")  # fmt: skip
            print(f"{'':24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'× direct req/s':>15}")
            print(f"{'direct Predictor loop':24} {direct['rps']:8.1f} {direct['p50']:8.2f} {direct['p99']:8.2f} "
                  f"{1:11.1f} {1:15.2f}")  # fmt: skip
            for clients in (1, 4, 16):
                stats, batch = _load(port, images, clients)
                print(f"{f'endpoint, {clients} client(s)':24} {stats['rps']:8.1f} {stats['p50']:8.2f} "
                      f"{stats['p99']:8.2f} {batch:11.1f} {stats['rps'] / direct['rps']:15.2f}")  # fmt: skip
                if args.abuse:
                    stop = threading.Event()
                    with ThreadPoolExecutor(1) as pool:
                        abuser = pool.submit(_abuse, port, stop)
                        stats, batch = _load(port, images, clients)
                        stop.set()
                        got = abuser.result()
                    print(f"{'  + 1 abusive client':24} {stats['rps']:8.1f} {stats['p50']:8.2f} "
                          f"{stats['p99']:8.2f} {batch:11.1f} {stats['rps'] / direct['rps']:15.2f}   abusive: "
                          + ", ".join(f"{k}: {n}× {t / n:.2f} s" for k, (n, t) in sorted(got.items())))  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
