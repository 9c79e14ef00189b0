"""Figures as PNG bytes: matplotlib's object API on the Agg canvas (no pyplot, no global state), so they
draw on headless machines and in worker processes; and the mask overlays that training previews, evaluation
reports and sweeps share."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MASK_CMAP = "jet"
MASK_ALPHA = 0.5


def new_figure(width: float, height: float):
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def segmentation_rgb(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """Colour a class-index map (0 background, k+1 class k, 255 void): black background, white void,
    one tab20 colour per class. Returns (H, W, 3) float in [0, 1]."""
    palette = colormaps["tab20"](np.arange(max(num_classes, 1)) % 20)[:, :3]
    out = np.zeros((*seg.shape, 3), dtype=np.float64)
    for k in range(num_classes):
        out[seg == k + 1] = palette[k]
    out[seg == 255] = 1.0
    return out


def class_colour(k: int) -> tuple[float, float, float]:
    """The colour of class ``k`` in :func:`segmentation_rgb`."""
    return tuple(colormaps["tab20"](k % 20)[:3])


def overlays_png(
    rows: Sequence[Mapping],
    classes: Sequence[str],
    max_class_columns: int = 4,
    title: Callable[[str], str] = str,
) -> bytes:
    """Grid of masks over test images.

    Columns: the image, its ground truth, the Explainer's per-class masks of the image's classes
    (as many columns as the row with most classes needs, at most ``max_class_columns``), then one
    merged mask per method in ``row["merged"]`` (e.g. Explainer, Grad-CAM, RISE).

    Args:
        rows: per image ``{"key", "image" (H,W,3) in [0,1], "seg" (H,W) int, "labels" [class idx],
            "class_masks" {class idx: (H,W)} (the Explainer's; may be empty), "merged" {method: (H,W)}}``.
        classes: class names.
        title: how a method of ``merged`` is named in its column's title.
    """
    if not rows:
        fig = new_figure(4, 1)
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
        return png(fig)
    n_cls = min(max((len(r.get("class_masks", {})) for r in rows), default=0), max_class_columns)
    merged_methods = list(rows[0].get("merged", {}).keys())
    ncols = 2 + n_cls + len(merged_methods)
    cell = 1.9
    fig = new_figure(cell * ncols + 0.8, cell * len(rows) + 0.3)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    mappable = None
    for i, row in enumerate(rows):
        image = np.asarray(row["image"], dtype=np.float64)
        names = ", ".join(classes[k] for k in row["labels"])
        cells = axes[i]
        for ax in cells:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        cells[0].imshow(image)
        cells[0].set_title(str(row.get("key", "")), fontsize=7)
        cells[1].imshow(segmentation_rgb(np.asarray(row["seg"]), len(classes)), interpolation="nearest")
        cells[1].set_title("ground truth: " + names if len(names) < 28 else names, fontsize=7)
        for j, (k, mask) in enumerate(list(row.get("class_masks", {}).items())[:n_cls]):
            ax = cells[2 + j]
            ax.imshow(image)
            mappable = ax.imshow(np.asarray(mask), cmap=MASK_CMAP, alpha=MASK_ALPHA, vmin=0, vmax=1)
            ax.set_title(f"Explainer: {classes[k]}", fontsize=7)
            for spine in ax.spines.values():  # frame in the class colour, as in the ground truth
                spine.set_visible(True)
                spine.set_color(class_colour(k))
                spine.set_linewidth(2)
        for j, method in enumerate(merged_methods):
            ax = cells[2 + n_cls + j]
            ax.imshow(image)
            mappable = ax.imshow(np.asarray(row["merged"][method]), cmap=MASK_CMAP, alpha=MASK_ALPHA, vmin=0, vmax=1)
            ax.set_title(f"{title(method)} (merged)", fontsize=7)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, label="mask value")
    return png(fig)
