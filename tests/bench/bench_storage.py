"""Storage benchmark: streaming reads of shard-sized S3 objects, ``pipeline.storage.open_read`` (boto3, a
resumable stream) against ``pyarrow.fs.S3FileSystem.open_input_stream`` (what Ray uses for S3), measured
side by side in one run, in this process and in forked workers (as DataLoader workers read shards).

It is the measurement behind keeping storage's reads on boto3: pyarrow's stream, at its default buffer
and at a large one, against ours on the same objects. (Writes stay on boto3 for another reason: a
pyarrow S3 output stream cannot be aborted, so a failed write would publish a partial object.)

Run: ``.venv/bin/python tests/bench/bench_storage.py [--objects N] [--mb M] [--repeats R]``.
Starts its own SeaweedFS on 127.0.0.1 with generated credentials and stops it at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import storage  # noqa: E402
from pipeline.stack import SeaweedFS  # noqa: E402

CHUNK = 1 << 20  # what a tar reader asks for at a time (webdataset reads smaller pieces; buffered alike)


def read_boto3(url: str, opts: storage.S3Options, buffer: int) -> int:
    n = 0
    with storage.open_read(url, opts) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


def read_arrow(url: str, opts: storage.S3Options, buffer: int) -> int:
    n = 0
    with storage.arrow_filesystem(opts).open_input_stream(url.removeprefix("s3://"), buffer_size=buffer) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


WAYS = {
    "boto3 stream (ours)": (read_boto3, 0),
    "pyarrow, 1 MB buffer": (read_arrow, 1 << 20),
    "pyarrow, 16 MB buffer": (read_arrow, 16 << 20),
}


def _read_one(args: tuple) -> int:
    name, url, opts = args
    fn, buffer = WAYS[name]
    return fn(url, opts, buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--mb", type=int, default=24, help="object size in MB (a shard of ~100 VOC images)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per way (the best counts)")
    parser.add_argument("--workers", type=int, default=2, help="forked reader processes")
    args = parser.parse_args()
    fork = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="wysiwyc-bench-") as tmp, SeaweedFS(Path(tmp) / "s3") as s3:
        bucket = s3.make_bucket("bench")
        urls = [f"s3://{bucket}/shard-{i:03d}.tar" for i in range(args.objects)]
        data = os.urandom(args.mb << 20)
        for url in urls:
            storage.write_bytes(url, data, s3.opts)
        total_mb = args.objects * args.mb
        rates: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every way alike
            for name, (fn, buffer) in WAYS.items():
                started = time.perf_counter()
                assert sum(fn(u, s3.opts, buffer) for u in urls) == total_mb << 20
                here = total_mb / (time.perf_counter() - started)
                started = time.perf_counter()
                with fork.Pool(args.workers) as pool:
                    assert sum(pool.map(_read_one, [(name, u, s3.opts) for u in urls])) == total_mb << 20
                forked = total_mb / (time.perf_counter() - started)
                rates[name, "here"] = max(rates.get((name, "here"), 0.0), here)
                rates[name, "forked"] = max(rates.get((name, "forked"), 0.0), forked)
    ours = "boto3 stream (ours)"
    print(f"\nstorage benchmark: {args.objects} objects of {args.mb} MB from SeaweedFS, MB/s (best of {args.repeats})")
    print(f"{'way':24s} {'this process':>14s} {'ratio':>7s} {f'{args.workers} forked':>12s} {'ratio':>7s}")
    for name in WAYS:
        here, forked = rates[name, "here"], rates[name, "forked"]
        print(
            f"{name:24s} {here:14.0f} {here / rates[ours, 'here']:7.2f} {forked:12.0f} "
            f"{forked / rates[ours, 'forked']:7.2f}"
        )


if __name__ == "__main__":
    main()
