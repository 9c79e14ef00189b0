"""Loader benchmark: decoded, resized (224 px) training samples per second.

Three ways to feed the same images to a training loop, measured side by side in one run:

1. shards in SeaweedFS (S3) through the training reader (``ShardDataset``);
2. the per-file way a VOC ``Dataset`` works, against the same SeaweedFS bucket: one JPEG object and
   one XML object fetched per sample;
3. for reference, the same per-file ``Dataset`` on a local VOC folder.

The same images (VOC-sized synthetic JPEGs, 500x375 by default), the same decode and resize
(``pipeline.data.transforms.image_to_tensor``), the same batch size and DataLoader worker count on all
three; a few samples are checked to come out identical. The samples are classification samples (image +
labels from the XML), as the per-file ``Dataset`` reads no masks; the shards hold no masks either.

Run: ``make bench`` or ``.venv/bin/python tests/bench/bench_loader.py [--images N] [--image-size WxH]
[--workers W] [--batch-size B] [--repeats R]``.
Starts its own SeaweedFS on 127.0.0.1 with generated credentials and stops it at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import storage  # noqa: E402
from pipeline.config import IngestConfig  # noqa: E402
from pipeline.data import shards  # noqa: E402
from pipeline.data.classes import SYNTHETIC_CLASSES  # noqa: E402
from pipeline.data.ingest import ingest  # noqa: E402
from pipeline.data.synthetic import write_voc_folder  # noqa: E402
from pipeline.data.transforms import image_to_tensor  # noqa: E402
from pipeline.data.voc import VOCReader  # noqa: E402
from pipeline.stack import SeaweedFS  # noqa: E402

SIZE = 224


class PerFileVOC(torch.utils.data.Dataset):
    """The classic VOC ``Dataset``: per sample, read ``JPEGImages/ID.jpg`` and ``Annotations/ID.xml``."""

    def __init__(self, root: str, ids: list[str], opts=None):
        self.root, self.ids, self.opts = root, ids, opts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        key = self.ids[index]
        jpg = storage.read_bytes(storage.join(self.root, "JPEGImages", f"{key}.jpg"), self.opts)
        xml = ET.fromstring(storage.read_bytes(storage.join(self.root, "Annotations", f"{key}.xml"), self.opts))
        labels = torch.zeros(len(SYNTHETIC_CLASSES))
        for obj in xml.iter("object"):
            labels[SYNTHETIC_CLASSES.index(obj.findtext("name").strip())] = 1
        with Image.open(io.BytesIO(jpg)) as im:
            image = image_to_tensor(im, SIZE)
        return {"key": key, "image": image, "labels": labels}


def measure(loader, expected: int) -> float:
    """Samples per second over one full pass (the first batch included: start-up is part of the cost)."""
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["key"])
    seconds = time.perf_counter() - started
    assert count == expected, f"read {count} samples, expected {expected}"
    return count / seconds


def check_same_samples(shard_spec: str, per_file: PerFileVOC, opts, n: int = 8) -> int:
    """The first ``n`` shard samples (no shuffle, no flip) equal the per-object ones: same images, decode."""
    ds = shards.ShardDataset(
        shard_spec, image_size=SIZE, train=False, flip=False, opts=opts, classes=list(SYNTHETIC_CLASSES)
    )
    index = {key: i for i, key in enumerate(per_file.ids)}
    checked = 0
    for sample in ds:
        other = per_file[index[sample["key"]]]
        assert torch.equal(sample["image"], other["image"]), f"{sample['key']}: images differ"
        assert torch.equal(sample["labels"], other["labels"]), f"{sample['key']}: labels differ"
        checked += 1
        if checked == n:
            break
    return checked


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument(
        "--image-size",
        type=parse_size,
        default=(500, 375),
        metavar="WxH",
        help="size of the source JPEGs (default 500x375, as most VOC images)",
    )
    parser.add_argument("--shard-size", type=int, default=50, help="samples per shard")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved passes per path (the best counts: other load only slows a pass)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = args.image_size

    with tempfile.TemporaryDirectory(prefix="wysiwyc-bench-") as tmp, SeaweedFS(Path(tmp) / "s3") as s3:
        opts = s3.opts
        os.environ.update(s3.env)  # DataLoader workers inherit the endpoint and keys
        bucket = s3.make_bucket("bench")
        voc = Path(tmp) / "VOCdevkit" / "VOC2007"
        print(f"writing {args.images} VOC-format images ({width}x{height}) ...", file=sys.stderr)
        write_voc_folder(voc, num_images=args.images, seed=0, size=(width, height))
        ids = (voc / "ImageSets/Main/train.txt").read_text().split()
        jpeg_bytes = [(voc / "JPEGImages" / f"{key}.jpg").stat().st_size for key in ids]
        xml_bytes = [(voc / "Annotations" / f"{key}.xml").stat().st_size for key in ids]
        for sub in ("JPEGImages", "Annotations"):
            for path in sorted((voc / sub).iterdir()):
                storage.upload_file(path, f"s3://{bucket}/VOC2007/{sub}/{path.name}", opts)
        # classification samples (image + labels) on both sides: the per-file Dataset reads no masks,
        # so the shards hold none either (the reader then yields an all-void seg, which it still pays for)
        ingest(
            VOCReader(str(voc), "train", classes=SYNTHETIC_CLASSES, segmentation="off"),
            f"s3://{bucket}/shards",
            "train",
            IngestConfig(shard_size=args.shard_size),
            opts,
            progress=False,
        )
        shard_spec = f"s3://{bucket}/shards/train"
        listed = shards.read_manifest(shard_spec, opts)["shards"]
        checked = check_same_samples(shard_spec, PerFileVOC(f"s3://{bucket}/VOC2007", ids, opts), opts)

        def shard_loader():
            ds = shards.ShardDataset(shard_spec, image_size=SIZE, train=True, flip=False, shuffle_buffer=100, opts=opts)
            return shards.make_loader(ds, args.batch_size, args.workers)

        def per_file_loader(root, file_opts):
            return torch.utils.data.DataLoader(
                PerFileVOC(root, ids, file_opts), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
            )

        rates: dict[str, list[float]] = {"shards_s3": [], "per_object_s3": [], "per_file_local": []}
        load_before = os.getloadavg()
        for _ in range(args.repeats):  # interleaved, so drift hits all three alike
            rates["shards_s3"].append(measure(shard_loader(), len(ids)))
            rates["per_object_s3"].append(measure(per_file_loader(f"s3://{bucket}/VOC2007", opts), len(ids)))
            rates["per_file_local"].append(measure(per_file_loader(str(voc), None), len(ids)))
        load_after = os.getloadavg()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    best = {name: max(values) for name, values in rates.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nloader benchmark: decoded, resized ({SIZE} px) training samples per second")
    print(
        f"  machine: {cores} usable cores (os.cpu_count {os.cpu_count()}), load average "
        f"{load_before[0]:.2f} before / {load_after[0]:.2f} after the timed runs; SeaweedFS weed mini on "
        f"the same machine (127.0.0.1); torch {torch.__version__} ({torch.get_num_threads()} thread), "
        f"Pillow {PIL.__version__}, Python {sys.version.split()[0]}"
    )
    print(
        f"  data: {len(ids)} images, {width}x{height} JPEG (mean {statistics.mean(jpeg_bytes) / 1024:.1f} "
        f"KiB) + VOC XML (mean {statistics.mean(xml_bytes) / 1024:.1f} KiB); {len(listed)} shards of "
        f"≤{args.shard_size} samples (mean {statistics.mean(s['bytes'] for s in listed) / 2**20:.2f} "
        f"MiB); {2 * len(ids)} objects for the per-object reads"
    )
    print(
        f"  loader: batch {args.batch_size}, {args.workers} DataLoader workers, same decode/resize "
        f"(image_to_tensor) on all paths, {checked} samples checked equal across paths; best of "
        f"{args.repeats} interleaved passes (start-up included)"
    )
    for name, value in best.items():
        print(
            f"  {name:16s} {value:8.1f} samples/s   (median {median[name]:.1f}; runs: "
            f"{', '.join(f'{v:.1f}' for v in rates[name])})"
        )
    for other, goal in (("per_object_s3", "   (goal ≥ 2x)"), ("per_file_local", "")):
        print(
            f"  ratio shards_s3 / {other:15s} = {best['shards_s3'] / best[other]:.2f}x best, "
            f"{median['shards_s3'] / median[other]:.2f}x median{goal}"
        )


if __name__ == "__main__":
    main()
