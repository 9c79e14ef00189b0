"""What a run says about its corpus, and whether that changed since an earlier run of the schedule.

:class:`Stats` accumulates, chunk by chunk, the summary statistics that go into the manifest: images,
errors, the Explanandum's mean confidence (top-1 probability), and per class the predicted frequency
(share of the attributed images with p ≥ ``attribute.threshold``) and the mask areas of the images that
explain it (mean and a 20-bin histogram). :func:`drift` compares two runs' statistics per class:

- **predicted frequency**: the population stability index over the two outcomes (predicted or not),
  PSI = Σ (p − q)·ln(p / q), probabilities clipped at 1e-4 so that a class that vanished has a finite,
  large PSI. A class is flagged past ``attribute.drift_psi`` (0.2: the usual "significant shift").
- **mask area**: the two-sample Kolmogorov–Smirnov statistic (largest gap between the two cumulative
  histograms) of the areas of the images that explain the class, when both runs have at least
  ``attribute.drift_min_images`` of them; flagged past ``attribute.drift_ks``.

:func:`log_run` puts a run into the MLflow experiment ``attribute.experiment`` (params: model, version,
input, run id; metrics: counts, error rate, mean confidence, images/s, per class frequency, mask area
and drift). It runs after the manifest: a tracking server that does not answer costs no work, its records
wait in ``RUN/tracking_pending.json`` and a relaunch of the run sends them.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from pipeline import figures, storage
from pipeline.tracking import Tracker, Where, default_uri, journal_url

log = logging.getLogger(__name__)

AREA_BINS = 20
_EPS = 1e-4


class Stats:
    """Summary statistics of a run's index rows, accumulated chunk by chunk (memory: O(classes))."""

    def __init__(self, classes: list[str], threshold: float):
        self.classes, self.threshold = list(classes), threshold
        c = len(classes)
        self.images = self.errors = 0
        self.confidence = 0.0
        self.predicted = np.zeros(c, np.int64)
        self.explained = np.zeros(c, np.int64)
        self.area_sum = np.zeros(c)
        self.area_hist = np.zeros((c, AREA_BINS), np.int64)

    def add(self, table) -> None:
        """Add the rows of an index table (a chunk's)."""
        cols = table.select(["status", "probs", "explained_indices", "mask_areas"]).to_pydict()
        for status, probs, indices, areas in zip(
            cols["status"], cols["probs"], cols["explained_indices"], cols["mask_areas"]
        ):
            self.images += 1
            if status != "ok":
                self.errors += 1
                continue
            p = np.asarray(probs)
            self.confidence += float(p.max())
            self.predicted += p >= self.threshold
            for c, a in zip(indices, areas):
                self.explained[c] += 1
                self.area_sum[c] += a
                self.area_hist[c, min(AREA_BINS - 1, int(a * AREA_BINS))] += 1

    def as_dict(self) -> dict:
        ok = self.images - self.errors
        return {
            "images": self.images,
            "errors": self.errors,
            "error_rate": self.errors / self.images if self.images else 0.0,
            "mean_confidence": self.confidence / ok if ok else None,
            "threshold": self.threshold,
            "per_class": {
                name: {
                    "predicted": int(self.predicted[c]),
                    "predicted_frequency": float(self.predicted[c]) / ok if ok else 0.0,
                    "explained": int(self.explained[c]),
                    "mean_mask_area": float(self.area_sum[c] / self.explained[c]) if self.explained[c] else None,
                    "area_histogram": self.area_hist[c].tolist(),
                }
                for c, name in enumerate(self.classes)
            },
        }


def psi(p: float, q: float) -> float:
    """Population stability index of a binary outcome with probabilities ``p`` (now) and ``q`` (before)."""
    p, q = min(max(p, _EPS), 1 - _EPS), min(max(q, _EPS), 1 - _EPS)
    return (p - q) * math.log(p / q) + ((1 - p) - (1 - q)) * math.log((1 - p) / (1 - q))


def ks_histograms(a: list[int], b: list[int]) -> float:
    """Two-sample Kolmogorov–Smirnov statistic of two samples given as histograms on the same bins."""
    ca, cb = np.cumsum(a, dtype=float), np.cumsum(b, dtype=float)
    return float(np.abs(ca / ca[-1] - cb / cb[-1]).max())


def drift(now: dict, before: dict, psi_limit: float, ks_limit: float, min_images: int) -> dict:
    """Per-class drift between two runs' :meth:`Stats.as_dict` (classes both runs know).

    Returns:
        ``{"per_class": {class: {"psi_frequency", "ks_mask_area" (None: too few images)}}, "flagged":
        [classes past a limit], "psi_limit", "ks_limit"}``.
    """
    per_class, flagged = {}, []
    for name, c in now["per_class"].items():
        b = before["per_class"].get(name)
        if b is None:
            continue
        stat_psi = psi(c["predicted_frequency"], b["predicted_frequency"])
        enough = c["explained"] >= min_images and b["explained"] >= min_images
        stat_ks = ks_histograms(c["area_histogram"], b["area_histogram"]) if enough else None
        per_class[name] = {"psi_frequency": round(stat_psi, 6), "ks_mask_area": stat_ks and round(stat_ks, 6)}
        if stat_psi > psi_limit or (stat_ks is not None and stat_ks > ks_limit):
            flagged.append(name)
    return {"per_class": per_class, "flagged": flagged, "psi_limit": psi_limit, "ks_limit": ks_limit}


def drift_png(now: dict, before: dict, result: dict, title: str) -> bytes:
    """Per class: predicted frequency before / now and the two statistics against their limits."""
    names = list(result["per_class"])
    x = np.arange(len(names))
    fig = figures.new_figure(max(6, 0.5 * len(names) + 2), 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x - 0.2, [before["per_class"][n]["predicted_frequency"] for n in names], 0.4, label="before")
    top.bar(x + 0.2, [now["per_class"][n]["predicted_frequency"] for n in names], 0.4, label="this run")
    top.set_ylabel("predicted frequency")
    top.legend()
    top.set_title(title)
    stats = result["per_class"]
    bottom.bar(x - 0.2, [stats[n]["psi_frequency"] for n in names], 0.4, label="PSI of the frequency")
    bottom.bar(x + 0.2, [stats[n]["ks_mask_area"] or 0 for n in names], 0.4, label="KS of the mask area")
    bottom.axhline(result["psi_limit"], color="C0", ls="--", lw=1)
    bottom.axhline(result["ks_limit"], color="C1", ls=":", lw=1)
    for i, n in enumerate(names):
        if n in result["flagged"]:
            bottom.annotate("drift", (i, max(stats[n]["psi_frequency"], stats[n]["ks_mask_area"] or 0)), color="red")
    bottom.set_xticks(x, names, rotation=60, ha="right")
    bottom.legend()
    fig.tight_layout()
    return figures.png(fig)


def previous_run(output: str, run_id: str, opts) -> str | None:
    """The last complete run (latest ``timings.finished``) under ``output`` other than ``run_id``."""
    best, when = None, ""
    for run in storage.list_dirs(output, opts):
        if run == run_id:
            continue
        try:
            manifest = json.loads(storage.read_bytes(storage.join(output, run, "_manifest.json"), opts))
        except storage.NotFound:
            continue
        finished = manifest.get("timings", {}).get("finished", "")
        if finished > when:
            best, when = run, finished
    return best


def log_run(config, manifest: dict, root: str, drift_png_bytes: bytes | None, opts) -> None:
    """The run in the MLflow experiment ``attribute.experiment`` (bounded; see the module docstring)."""
    if not config.tracking.enabled:
        return

    stats, model = manifest["stats"], manifest["model"]
    metrics = {
        "images": stats["images"],
        "errors": stats["errors"],
        "error_rate": stats["error_rate"],
        "images_per_second": manifest["timings"]["images_per_second"] or 0.0,
    }
    if stats["mean_confidence"] is not None:
        metrics["mean_confidence"] = stats["mean_confidence"]
    for name, c in stats["per_class"].items():
        metrics[f"frequency.{name}"] = c["predicted_frequency"]
        if c["mean_mask_area"] is not None:
            metrics[f"mask_area.{name}"] = c["mean_mask_area"]
    for name, d in (manifest["drift"] or {}).get("per_class", {}).items():
        metrics[f"drift_psi.{name}"] = d["psi_frequency"]
        if d["ks_mask_area"] is not None:
            metrics[f"drift_ks.{name}"] = d["ks_mask_area"]
    where = Where(default_uri(config), config.attribute.experiment)
    tracker = Tracker(where, manifest["run_id"], journal=journal_url(root), opts=opts)
    tracker.log_params(
        {
            "run_id": manifest["run_id"],
            "model_name": str(model["model_name"]),
            "model_version": str(model["model_version"]),
            "model_uri": model["model_uri"],
            "input": manifest["input"]["url"],
            "output": manifest["output"],
            "output_format": manifest["output_format"],
            "compare_to": str((manifest["drift"] or {}).get("compared_to")),
        }
    )
    tracker.set_tags({"wysiwyc.attribution_output": manifest["output"], "wysiwyc.model_uri": model["model_uri"]})
    tracker.log_epoch(0, metrics)
    tracker.log_bytes(json.dumps(manifest, indent=1).encode(), "_manifest.json")
    if drift_png_bytes:
        tracker.log_bytes(drift_png_bytes, "drift.png")
    tracker.end()
