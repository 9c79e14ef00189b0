"""MS-COCO instances annotations (``instances_*.json`` + an image folder) as samples.

Classes are the JSON's categories in increasing category-id order, numbered 0, 1, … (COCO's ids
have gaps: 1..90 for 80 classes); ``classes`` holds their names. Labels are the classes with at least
one annotation in the image.

The class map ``seg`` (0 background, k+1 class k, 255 void) is rasterised from every annotation with
``COCO.annToMask`` (polygons, compressed and uncompressed RLE):

* **Overlaps.** Non-crowd annotations are painted in decreasing pixel-area order (ties by annotation
  id), so a smaller object in front of a larger one keeps its pixels: a cup on a table stays a cup.
* **Crowds.** An ``iscrowd=1`` region mixes objects and background, so its pixels become void (255)
  wherever no non-crowd annotation claims them; evaluation ignores them. A crowd still counts as a
  label: the class is visibly present in the image.
* An annotation without a usable ``segmentation`` (a box-only data set) leaves the image without
  ``seg`` (None) rather than with a wrong one; its class still counts as a label.

Images without annotations are kept with empty labels (useful negatives), unless ``drop_empty``. A
missing or unreadable image file is an InputError naming it, so ingest skips and records it; so is a
``file_name`` that leads outside the image folder (``../x.jpg``, ``/x.jpg``).

The sample key is the file name without its extension (``a/b.jpg`` → ``a_b``); file names that
sanitise alike get a short hash of their image id appended
(:func:`~pipeline.data.sample.unique_keys`), listed in ``renamed`` and the manifest.

Readers are pickled to worker processes, so each item carries its own annotations and the parsed JSON
stays in the process that built the item list.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.data.classes import resolve_classes
from pipeline.data.images import inspect_image
from pipeline.data.sample import Reader, Sample, inside, safe_key, unique_keys
from pipeline.errors import InputError, WysiwycError


def _load_coco(path: Path):
    """``pycocotools.coco.COCO`` for ``path`` without its prints; WysiwycError naming the file on failure."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise WysiwycError(f"coco: annotation file {path} does not exist; check --annotations")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except Exception as exc:  # json.JSONDecodeError, AssertionError (not a dict), KeyError (no "images")
        reason = str(exc) or type(exc).__name__
        raise WysiwycError(
            f"coco: {path} is not a COCO instances JSON ({type(exc).__name__}: {reason}); pass an instances_*.json file"
        ) from exc
    for key in ("images", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise WysiwycError(f"coco: {path} has no {key!r} list; pass a COCO instances_*.json file")
    return coco


def _key(file_name: str, image_id) -> str:
    """``safe_key`` of the file name without its extension (``a/b.jpg`` → ``a_b``), else of the id."""
    stem = file_name.rsplit(".", 1)[0] if "." in PurePosixPath(file_name).name else file_name
    try:
        return safe_key(stem)
    except ValueError:
        return safe_key(f"image_{image_id}")


class COCOReader(Reader):
    """Samples of one COCO split (see the module docstring for overlaps, crowds and empty images).

    Args:
        annotations: the instances JSON (e.g. ``annotations/instances_val2017.json``).
        images: the folder holding the images named by ``file_name`` (e.g. ``val2017``).
        split: the split name the samples are written under (``train``, ``val`` …).
        drop_empty: leave out images with no (kept) annotation.
        classes: keep only these category names, in this label order (default: every category).
        segmentation: rasterise ``seg`` (default True; training splits may switch it off).

    Raises:
        WysiwycError: the JSON is missing or malformed, has no images, or ``classes`` names an unknown
            category.
    """

    name = "coco"

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        split: str,
        drop_empty: bool = False,
        classes: Sequence[str] | None = None,
        segmentation: bool = True,
    ):
        self.annotations = str(Path(annotations).expanduser().absolute())
        self.images = str(Path(images).expanduser().absolute())
        self.split = str(split)
        self.drop_empty = bool(drop_empty)
        self.segmentation = bool(segmentation)
        self.source = self.annotations
        if not Path(self.images).is_dir():
            raise WysiwycError(f"coco: image folder {self.images} does not exist; check --images")
        coco = _load_coco(Path(self.annotations))
        cats = sorted(coco.dataset["categories"], key=lambda c: int(c["id"]))
        names = [str(c.get("name", c["id"])) for c in cats]
        try:
            self.category_names = resolve_classes(names, [])
        except WysiwycError as exc:
            raise WysiwycError(f"coco: {self.annotations}: categories: {exc}") from exc
        self.classes = resolve_classes(classes, self.category_names)
        unknown = [c for c in self.classes if c not in self.category_names]
        if unknown:
            raise WysiwycError(
                f"coco: classes {unknown} are not categories of {self.annotations}; "
                f"its categories: {', '.join(self.category_names)}"
            )
        wanted = {name: i for i, name in enumerate(self.classes)}
        # category id → label index (categories left out of ``classes`` map to None: ignored)
        self.category_to_label = {int(c["id"]): wanted.get(name) for c, name in zip(cats, names)}
        self._items = self._build_items(coco)
        if not self._items:
            what = "images with annotations" if self.drop_empty else "images"
            raise WysiwycError(f"coco: {self.annotations} lists no {what}; check --annotations")

    def __getstate__(self):
        # one item (with its annotations) goes with each task; do not ship them all every time
        state = dict(self.__dict__)
        state["_items"] = None
        return state

    def _build_items(self, coco) -> list[dict]:
        items = []
        for image_id in sorted(coco.imgs):
            img = coco.imgs[image_id]
            anns, problem = [], None
            for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a.get("id", 0)):
                cat = ann.get("category_id")
                if cat not in self.category_to_label:
                    problem = f"annotation {ann.get('id')} has unknown category_id {cat!r}"
                    continue
                label = self.category_to_label[cat]
                if label is None:
                    continue
                anns.append(
                    {
                        "id": ann.get("id"),
                        "image_id": image_id,
                        "label": label,
                        "iscrowd": int(ann.get("iscrowd", 0) or 0),
                        "segmentation": ann.get("segmentation"),
                    }
                )
            if self.drop_empty and not anns and problem is None:
                continue
            file_name = str(img.get("file_name", ""))
            items.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": img.get("width"),
                    "height": img.get("height"),
                    "key": _key(file_name, image_id),
                    "anns": anns,
                    "problem": problem,
                }
            )
        # keys must be unique in a split: disambiguate file names that sanitise alike by the image id
        keys, self.renamed = unique_keys([item["key"] for item in items], [str(item["id"]) for item in items])
        for item, key in zip(items, keys):
            item["key"] = key
        return items

    def items(self) -> list[dict]:
        """One dict per image (sorted by image id) holding everything :meth:`load` needs."""
        if self._items is None:  # an unpickled copy: rebuild (only happens if a worker asks)
            self._items = self._build_items(_load_coco(Path(self.annotations)))
        return list(self._items)

    def describe(self, item) -> tuple[str, str]:
        return item["key"], str(Path(self.images) / item["file_name"])

    def load(self, item) -> Sample:
        key, source = self.describe(item)
        if item["problem"]:
            raise InputError(f"{self.annotations}: image {item['id']}: {item['problem']}")
        path = Path(source)
        if item["file_name"] and not inside(self.images, item["file_name"]):
            raise InputError(
                f"{self.annotations}: image {item['id']}: file_name {item['file_name']!r} leads outside "
                f"the image folder {self.images}; file names must be paths inside --images "
                "(no '..', no absolute path)"
            )
        if not item["file_name"] or not path.is_file():
            raise InputError(f"{path}: image file missing (named by {self.annotations}, image {item['id']})")
        info = inspect_image(path.read_bytes(), str(path), self.max_pixels)
        width, height = item["width"], item["height"]
        if (width, height) != (info.width, info.height):
            if width is not None and height is not None:
                raise InputError(
                    f"{path}: image is {info.width}x{info.height} but {self.annotations} says "
                    f"{width}x{height}; the annotations would not line up"
                )
            width, height = info.width, info.height
        seg = self._rasterise(item, width, height) if self.segmentation else None
        labels = sorted({a["label"] for a in item["anns"]})
        return Sample(
            key=key,
            image=info.data,
            ext=info.ext,
            labels=labels,
            width=info.width,
            height=info.height,
            source=str(path),
            seg=seg,
        )

    def _rasterise(self, item: dict, width: int, height: int) -> np.ndarray | None:
        """The class map of one image (see the module docstring), or None if an annotation has no mask."""
        from pycocotools.coco import COCO

        coco = COCO()  # no file: just the annToMask helper, which needs the image size
        coco.imgs = {item["id"]: {"id": item["id"], "width": width, "height": height}}
        things, crowds = [], []
        for ann in item["anns"]:
            segm = ann["segmentation"]
            if not segm:  # missing or an empty polygon list: no per-pixel truth for this object
                return None
            try:
                with warnings.catch_warnings():
                    # pycocotools on numpy 2 warns about __array__(copy=...) on every decode
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = coco.annToMask(ann).astype(bool)
            except Exception as exc:
                raise InputError(
                    f"{self.annotations}: image {item['id']}: annotation {ann['id']} cannot be "
                    f"rasterised ({type(exc).__name__}: {exc})"
                ) from exc
            if mask.shape != (height, width):
                raise InputError(
                    f"{self.annotations}: image {item['id']}: annotation {ann['id']} mask is "
                    f"{mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"
                )
            (crowds if ann["iscrowd"] else things).append((ann, mask))
        seg = np.zeros((height, width), dtype=np.uint8)
        # larger first, so smaller objects (usually in front) are painted last and stay visible
        things.sort(key=lambda pair: (-int(pair[1].sum()), pair[0]["id"] or 0))
        for ann, mask in things:
            seg[mask] = ann["label"] + 1
        for _ann, mask in crowds:
            seg[mask & (seg == 0)] = 255  # crowd: object and background mixed → void
        return seg
