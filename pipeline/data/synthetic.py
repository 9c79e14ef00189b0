"""A seedable generator of multi-label images with exact per-pixel ground truth.

Each image shows 1–3 objects (circle, square, triangle, star, cross, ring; see
:data:`~pipeline.data.classes.SYNTHETIC_CLASSES`) with random size, position, rotation and colour on a
cluttered background (a smooth random colour field, pixel noise, and thin distractor strokes that are
not any class). Only the **shape** identifies the class: an object's colour is drawn independently of
its class (it is only re-drawn when too close to what lies beneath it, which does not depend on the
class either).

Ground truth is exact: every object is rasterised once as a binary mask (no antialiasing) and that one
mask both paints the object's flat colour into the image and writes ``class + 1`` into ``seg``. Objects
drawn later lie on top, so ``seg`` holds what is visible; the hole of a ring shows what is beneath it.
An object is only placed where it leaves every earlier object at least ``min_visible`` of its area, so
every label is visible and ``labels == set(seg) - {0}`` (minus one).

Sample ``i`` depends only on ``(seed, split, i)``, so items load in any order and in any process.

``difficulty="hard"`` (the harder set that evaluations beside the quickstart's use) draws smaller objects
(circumradius 7–20% of the side instead of 14–30%), twice the distractor strokes and filled distractor
ellipses of aspect ratio 2.5–4 (elongated: never a circle or a ring, so not any class), with 1–3 objects as
before.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from pipeline.data.classes import SYNTHETIC_CLASSES, resolve_classes
from pipeline.data.sample import Reader, Sample, encode_png, safe_key
from pipeline.data.voc import voc_colormap
from pipeline.errors import WysiwycError

# colours closer than this (Euclidean, RGB) to what lies beneath an object are re-drawn
_MIN_CONTRAST = 90.0
_PLACEMENT_TRIES = 20
_COLOUR_TRIES = 30
# per difficulty: object circumradius (share of the side), distractor strokes, filled distractor ellipses
DIFFICULTIES = {"standard": ((0.14, 0.30), (2, 7), (0, 0)), "hard": ((0.07, 0.20), (4, 13), (1, 4))}


@dataclass
class SyntheticObject:
    """One drawn object: its class index (into the reader's classes), shape, colour and geometry."""

    label: int
    shape: str
    colour: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    angle: float
    area: int  # pixels of its full mask
    visible: int = 0  # pixels still visible in the final image


@dataclass
class Rendered:
    """An image with its ground truth: ``instances`` is 0 where no object is visible, else j + 1."""

    image: np.ndarray  # (H, W, 3) uint8
    seg: np.ndarray  # (H, W) uint8: 0 background, k + 1 class k
    instances: np.ndarray  # (H, W) uint8
    objects: list[SyntheticObject] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        return sorted({o.label for o in self.objects})


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        width = height = int(image_size)
    else:
        width, height = (int(v) for v in image_size)
    if min(width, height) < 24 or max(width, height) > 4096:
        raise WysiwycError(f"synthetic: image_size {width}x{height} must be between 24 and 4096 pixels")
    return width, height


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` rotated by ``angle`` (radians)."""
    if shape == "square":
        pts = [(r, a) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r, a) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.42 * r, math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        w = 0.34 * r  # half arm width
        xy = [(w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w),
              (r, -w), (r, w)]  # fmt: skip
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(shape)
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for d, a in pts]


def _shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float, angle: float):
    """Binary (H, W) mask of one object, rasterised without antialiasing."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "ring":
        inner = 0.55 * r
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(im, dtype=bool)


class SyntheticReader(Reader):
    """``num_images`` generated samples of one split (see the module docstring).

    Args:
        num_images: how many images the split has.
        seed: the generator seed (a non-negative integer); with ``split`` and the index it fixes a sample.
        split: the split name (``train``, ``val``, ``test`` …); different splits give different images.
        image_size: side in pixels, or ``(width, height)``; default 64.
        classes: a subset of :data:`SYNTHETIC_CLASSES` to draw (default: all), in label order.
        max_objects: objects per image are drawn uniformly from ``1..max_objects`` (default 3).
        min_visible: an earlier object keeps at least this share of its pixels visible (default 0.6).
        image_format: ``"png"`` (lossless, default) or ``"jpg"``.
        jpeg_quality: quality when ``image_format="jpg"``.
        segmentation: attach ``seg`` to every sample (default True).
        difficulty: ``standard`` (the quickstart's) or ``hard`` (smaller objects, more clutter; module docstring).
    """

    name = "synthetic"

    def __init__(
        self,
        num_images: int,
        seed: int,
        split: str,
        image_size: int | tuple[int, int] = 64,
        classes: Sequence[str] | None = None,
        max_objects: int = 3,
        min_visible: float = 0.6,
        image_format: str = "png",
        jpeg_quality: int = 95,
        segmentation: bool = True,
        difficulty: str = "standard",
    ):
        if difficulty not in DIFFICULTIES:
            raise WysiwycError(f"synthetic: difficulty={difficulty!r}; use {' or '.join(DIFFICULTIES)}")
        if int(num_images) < 1:
            raise WysiwycError(f"synthetic: num_images={num_images}; give at least 1")
        if int(seed) < 0:
            raise WysiwycError(f"synthetic: seed={seed}; give a non-negative integer")
        fmt = {"jpeg": "jpg"}.get(str(image_format).lower(), str(image_format).lower())
        if fmt not in ("png", "jpg"):
            raise WysiwycError(f"synthetic: image_format={image_format!r}; use png or jpg")
        self.classes = resolve_classes(classes, SYNTHETIC_CLASSES)
        unknown = [c for c in self.classes if c not in SYNTHETIC_CLASSES]
        if unknown:
            raise WysiwycError(
                f"synthetic: classes {unknown} are not drawable; choose from {', '.join(SYNTHETIC_CLASSES)}"
            )
        if not 1 <= int(max_objects) <= 8:
            raise WysiwycError(f"synthetic: max_objects={max_objects}; use 1..8")
        if not 0.0 < float(min_visible) <= 1.0:
            raise WysiwycError(f"synthetic: min_visible={min_visible}; use a share in (0, 1]")
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.split = str(split)
        self.width, self.height = _size(image_size)
        self.max_objects = int(max_objects)
        self.min_visible = float(min_visible)
        self.image_format = fmt
        self.jpeg_quality = int(jpeg_quality)
        self.segmentation = bool(segmentation)
        self.difficulty = difficulty
        self.source = f"synthetic://{self.split}?seed={self.seed}&size={self.width}x{self.height}" + (
            f"&difficulty={difficulty}" if difficulty != "standard" else ""
        )
        self._split_code = zlib.crc32(self.split.encode())  # stable across processes, unlike hash()

    def items(self) -> list[int]:
        return list(range(self.num_images))

    def describe(self, item) -> tuple[str, str]:
        return self.key(item), f"{self.source}&index={int(item)}"

    def key(self, index: int) -> str:
        return safe_key(f"syn_{self.split}_{int(index):06d}")

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index``: a function of (seed, split, index) only."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self._split_code, int(index)]))

    # --- drawing ---------------------------------------------------------------------------------

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image, ImageDraw

        w, h = self.width, self.height
        # smooth colour field: a coarse random colour grid, bilinearly upsampled
        cells = int(rng.integers(2, 5))
        grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        im = Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR)
        # distractors: thin lines, polylines and arcs in random colours (not any class)
        draw = ImageDraw.Draw(im)
        scale = max(1, round(min(w, h) / 64))
        _, strokes, blobs = DIFFICULTIES[self.difficulty]
        for _ in range(int(rng.integers(*blobs)) if blobs[1] > blobs[0] else 0):  # elongated: never a class
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            long_side = rng.uniform(0.08, 0.16) * min(w, h)
            short_side = long_side / rng.uniform(2.5, 4.0)
            cx, cy = rng.uniform(0, 1, size=2) * (w, h)
            turn = float(rng.uniform(0, math.pi))
            pts = [
                (cx + long_side * math.cos(t) * math.cos(turn) - short_side * math.sin(t) * math.sin(turn),
                 cy + long_side * math.cos(t) * math.sin(turn) + short_side * math.sin(t) * math.cos(turn))
                for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)
            ]  # fmt: skip
            draw.polygon(pts, fill=colour)
        for _ in range(int(rng.integers(*strokes))):
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            kind = int(rng.integers(0, 3))
            width = int(rng.integers(1, 3)) * scale
            if kind == 0:
                pts = rng.uniform(0, 1, size=(2, 2)) * (w, h)
                draw.line([tuple(p) for p in pts], fill=colour, width=width)
            elif kind == 1:
                pts = rng.uniform(0, 1, size=(3, 2)) * (w, h)  # an open V: never a closed outline
                draw.line([tuple(p) for p in pts], fill=colour, width=width)
            else:
                cx, cy = rng.uniform(0, 1, size=2) * (w, h)
                rad = rng.uniform(0.1, 0.4) * min(w, h)
                start = float(rng.uniform(0, 360))
                draw.arc(
                    [cx - rad, cy - rad, cx + rad, cy + rad],
                    start,
                    start + float(rng.uniform(60, 200)),
                    fill=colour,
                    width=width,
                )
        image = np.asarray(im, dtype=np.int16)
        noise = rng.normal(0.0, rng.uniform(3.0, 14.0), size=image.shape)
        return np.clip(image + noise, 0, 255).astype(np.uint8)

    def render(self, index: int) -> Rendered:
        """Draw sample ``index``: the image, its class map, its instance map and the objects."""
        if not 0 <= int(index) < self.num_images:
            raise IndexError(f"synthetic: index {index} outside 0..{self.num_images - 1}")
        rng = self.rng(index)
        w, h = self.width, self.height
        image = self._background(rng)
        seg = np.zeros((h, w), dtype=np.uint8)
        instances = np.zeros((h, w), dtype=np.uint8)
        objects: list[SyntheticObject] = []
        side = min(w, h)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            label = int(rng.integers(0, len(self.classes)))
            shape = self.classes[label]
            low, high = DIFFICULTIES[self.difficulty][0]
            for _try in range(_PLACEMENT_TRIES):
                r = float(rng.uniform(low, high)) * side
                cx = float(rng.uniform(r * 0.8, w - r * 0.8))
                cy = float(rng.uniform(r * 0.8, h - r * 0.8))
                angle = float(rng.uniform(0, 2 * math.pi))
                mask = _shape_mask(shape, w, h, cx, cy, r, angle)
                area = int(mask.sum())
                if area < 12:
                    continue
                # every earlier object must stay mostly visible
                covered = instances[mask]
                ok = all(
                    int(np.count_nonzero(instances == j + 1)) - int(np.count_nonzero(covered == j + 1))
                    >= self.min_visible * o.area
                    for j, o in enumerate(objects)
                )
                if ok:
                    break
            else:
                continue  # no room for this object: draw fewer
            # the colour is drawn independently of the class; re-drawn only if it would not stand out
            beneath = image[mask].reshape(-1, 3).astype(np.float64)
            avoid = [beneath.mean(axis=0)] + [np.array(o.colour, dtype=np.float64) for o in objects]
            for _c in range(_COLOUR_TRIES):
                colour = rng.integers(0, 256, size=3)
                if all(np.linalg.norm(colour - a) >= _MIN_CONTRAST for a in avoid):
                    break
            image[mask] = colour.astype(np.uint8)
            seg[mask] = label + 1
            instances[mask] = len(objects) + 1
            objects.append(
                SyntheticObject(
                    label=label,
                    shape=shape,
                    colour=tuple(int(c) for c in colour),
                    center=(cx, cy),
                    radius=r,
                    angle=angle,
                    area=area,
                )
            )
        for j, o in enumerate(objects):
            o.visible = int(np.count_nonzero(instances == j + 1))
        return Rendered(image=image, seg=seg, instances=instances, objects=objects)

    def load(self, item) -> Sample:
        rendered = self.render(int(item))
        if self.image_format == "png":
            data = encode_png(rendered.image)
        else:
            data = _encode_jpeg(rendered.image, self.jpeg_quality)
        key, source = self.describe(item)
        return Sample(
            key=key,
            image=data,
            ext=self.image_format,
            labels=rendered.labels,
            width=self.width,
            height=self.height,
            source=source,
            seg=rendered.seg if self.segmentation else None,
        )


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_voc_folder(
    root: str | Path,
    num_images: int,
    seed: int,
    size: int | tuple[int, int] = 64,
    split: str = "train",
    jpeg_quality: int = 95,
) -> Path:
    """Write generated images as a VOC-layout folder that :class:`~pipeline.data.voc.VOCReader` reads.

    Writes ``JPEGImages/{id}.jpg``, ``Annotations/{id}.xml`` (object names and the bounding box of each
    object's visible pixels, VOC 1-based), ``SegmentationClass/{id}.png`` (palette PNG, VOC colours),
    ``ImageSets/{Main,Segmentation}/{split}.txt`` and ``classes.txt`` (the synthetic class names, in
    label order). Ids are ``{split}_{index:06d}``, so several splits can share one folder.

    Args:
        root: the folder to write (created if missing); it plays the role of ``VOCdevkit/VOC2007``.
        num_images: images to write.
        seed: generator seed.
        size: image side, or ``(width, height)``.
        split: split name.
        jpeg_quality: JPEG quality of the images.

    Returns:
        ``root`` as a Path.
    """
    from PIL import Image

    root = Path(root)
    reader = SyntheticReader(num_images, seed, split, image_size=size)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in reader.classes))
    palette = voc_colormap().reshape(-1).tolist()
    ids = []
    for index in reader.items():
        image_id = f"{safe_key(split)}_{index:06d}"
        ids.append(image_id)
        rendered = reader.render(index)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(_encode_jpeg(rendered.image, jpeg_quality))
        mask = Image.fromarray(rendered.seg, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, reader, rendered))
    listing = "".join(f"{i}\n" for i in ids)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(listing)
    return root


def _voc_xml(image_id: str, reader: SyntheticReader, rendered: Rendered) -> str:
    w, h = reader.width, reader.height
    parts = [
        "<annotation>",
        "\t<folder>synthetic</folder>",
        f"\t<filename>{escape(image_id)}.jpg</filename>",
        f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
        "\t<segmented>1</segmented>",
    ]
    for j, obj in enumerate(rendered.objects):
        ys, xs = np.nonzero(rendered.instances == j + 1)
        xmin, xmax, ymin, ymax = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        truncated = int(xmin == 0 or ymin == 0 or xmax == w - 1 or ymax == h - 1)
        parts += [
            "\t<object>",
            f"\t\t<name>{escape(reader.classes[obj.label])}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{truncated}</truncated>",
            "\t\t<difficult>0</difficult>",
            f"\t\t<bndbox><xmin>{xmin + 1}</xmin><ymin>{ymin + 1}</ymin>"
            f"<xmax>{xmax + 1}</xmax><ymax>{ymax + 1}</ymax></bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"
