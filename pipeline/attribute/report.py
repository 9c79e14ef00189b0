"""What a person looks at after a run: the previews (mask overlay + masked image), ``index.html`` and the
summary that the CLI prints."""

from __future__ import annotations

import html
import io
import posixpath

import numpy as np

from pipeline import pages, storage
from pipeline.attribute.inputs import shard_images
from pipeline.attribute.outputs import output_bytes
from pipeline.data.sample import encode_png
from pipeline.data.transforms import IMAGENET_MEAN


def _preview_png(
    image: bytes, mask: bytes, max_side: int = 256, fill: tuple[float, float, float] = IMAGENET_MEAN
) -> bytes:
    """Two panels: the aggregated mask over the image (jet) and the masked image (hidden → ``fill``, the
    classifier's mean colour, what F saw there), the longer side scaled to ``max_side`` (small images are
    enlarged so that they can be seen)."""
    from matplotlib import colormaps
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im, Image.open(io.BytesIO(mask)) as mk:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        x = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255
        m = np.asarray(mk.convert("L").resize(size, Image.BILINEAR), dtype=np.float32)[..., None] / 255
    overlay = 0.5 * x + 0.5 * colormaps["jet"](m[..., 0])[..., :3]
    masked = m * x + (1 - m) * np.asarray(fill, dtype=np.float32)
    gap = np.ones((size[1], 4, 3), dtype=np.float32)
    return encode_png((np.concatenate([overlay, gap, masked], axis=1) * 255).round().astype(np.uint8))


def write_previews(
    root: str, rows: list[dict], opts, fill: tuple[float, float, float] = IMAGENET_MEAN
) -> list[tuple[dict, str]]:
    """``(row, preview URL)`` of the given index rows (PNG files written; hidden pixels in ``fill``)."""

    shard_cache: dict[str, dict[str, bytes]] = {}

    def image_bytes(row) -> bytes:
        if not row["shard"]:
            return storage.read_bytes(row["source"], opts)
        if row["shard"] not in shard_cache:
            wanted = {r["member"] for r in rows if r["shard"] == row["shard"]}
            shard_cache[row["shard"]] = {k: d for k, d in shard_images(row["shard"], opts) if k in wanted}
        return shard_cache[row["shard"]][row["member"]]

    out = []
    for row, mask, _ in output_bytes(rows, opts):
        url = storage.join(root, "previews", row["key"] + ".png")
        storage.write_bytes(url, _preview_png(image_bytes(row), mask, fill=fill), opts)
        out.append((row, url))
    order = {r["source"]: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda item: order[item[0]["source"]])


def _drift_html(drift: dict | None) -> str:
    if not drift:
        return ""
    if drift["compared_to"] is None:
        return "<h2>Drift</h2><p>No earlier complete run under this output to compare with.</p>"
    flagged = ", ".join(html.escape(c) for c in drift["flagged"]) or "none"
    return (
        f"<h2>Drift against run {html.escape(drift['compared_to'])}</h2>"
        f"<p>Classes past a limit (PSI of the predicted frequency &gt; {drift['psi_limit']}, KS of the mask "
        f"area &gt; {drift['ks_limit']}): <b>{flagged}</b></p>"
        '<img src="drift.png" alt="drift per class" style="max-width:100%">'
    )


def index_html(run_id: str, model: dict, previews: list[tuple[dict, str]], drift: dict | None) -> str:
    cards = []
    classes = model["classes"]
    for r, url in previews:
        label = ", ".join(f"{c} {r['probs'][classes.index(c)]:.2f}" for c in r["explained_classes"])
        area = max(r["mask_areas"]) if r["mask_areas"] else 0.0
        cards.append(
            f'<figure><img src="previews/{posixpath.basename(url)}" alt="">'
            f"<figcaption><b>{html.escape(posixpath.basename(r['source']))}</b><br>{html.escape(label)}"
            f" · largest mask area {area:.2f}</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;margin:1em} .grid{display:grid;"
        "grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:14px} figure{margin:0}"
        " .grid img{width:100%;image-rendering:pixelated} figcaption{font-size:12px}"
    )
    body = (
        f"<h1>Attribution run {html.escape(run_id)}</h1>"
        f"<p>model {html.escape(str(model['model_name']))} version {html.escape(str(model['model_version']))}: "
        f"the first {len(cards)} images; left: the mask of the explained classes (pixel-wise max) over the "
        "image, right: the image as the classifier sees it through that mask. Classes with the Explanandum's "
        'probability.</p>\n<div class="grid">\n' + "\n".join(cards) + "\n</div>" + _drift_html(drift)
    )
    return pages.page(f"wysiwyc attribution {run_id}", body, style)


def summary(manifest: dict, status: str) -> dict:
    counts = manifest["counts"]
    return {
        "status": status,
        "output": manifest["output"],
        "manifest": manifest["manifest"],
        "index": manifest["index"],
        "preview": manifest["preview"],
        "run_id": manifest["run_id"],
        "model_uri": manifest["model"]["model_uri"],
        "model_name": manifest["model"]["model_name"],
        "version": manifest["model"]["model_version"],
        "input": manifest["input"]["url"],
        "num_samples": counts["images"],
        "num_ok": counts["ok"],
        "num_errors": counts["errors"],
        "skipped": counts["errors"],
        "processed": counts["processed"] if status == "complete" else 0,
        "resumed": counts["resumed"] if status == "complete" else counts["images"],
        "images_per_second": manifest["timings"]["images_per_second"] if status == "complete" else None,
        "seconds": manifest["timings"]["seconds"] if status == "complete" else 0.0,
        "errors": manifest["errors"][:5],
        "output_objects": manifest.get("output_objects"),  # .get: runs of format 1 have none
        "peak_rss_mb": manifest.get("peak_rss_mb"),
        "drift": manifest.get("drift"),
    }
