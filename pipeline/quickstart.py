"""The main job on the embedded defaults: everything under one work dir, no services needed."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import IngestConfig


def run_quickstart(workdir: str, image_size: int = 64) -> dict:
    """Make the synthetic data set (train / val / test with exact masks) as shards under ``workdir``.

    Returns:
        The summary: where the shards went, sample counts and timings per stage.
    """
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import SyntheticReader

    data = Path(workdir) / "data" / "synthetic"
    # shards of 100: train has 6, enough for trainer.num_workers=2 ranks × data.loader_workers up to 3
    # (configs/cpu/*.yaml); val and test have 1, which any number of ranks can evaluate
    timings, counts = {}, {}
    for split, num_images, seed in (("train", 600, 0), ("val", 100, 1), ("test", 100, 2)):
        started = time.perf_counter()
        result = ingest(SyntheticReader(num_images, seed, split, image_size=image_size), str(data), split,
                        IngestConfig(shard_size=100, overwrite=True))
        timings[f"ingest_{split}_s"] = round(time.perf_counter() - started, 1)
        counts[split] = result["num_samples"]
    return {"output": str(data), "manifest": str(data / "train.manifest.json"),
            "num_samples": counts, "timings": timings}
