"""PASCAL VOC folders (VOC2007, VOC2012 or any folder in the same layout) as samples.

Layout read (inside the year folder, e.g. ``VOCdevkit/VOC2007``)::

    JPEGImages/{id}.jpg            the image; its bytes are kept as they are
    Annotations/{id}.xml           objects → labels (one label per class present)
    SegmentationClass/{id}.png     optional class-index mask (palette PNG: 0 background, k+1, 255 void)
    ImageSets/Main/{split}.txt     the ids of a split (first column; class-specific lists also work)
    ImageSets/Segmentation/{split}.txt
    classes.txt                    optional: one class name a line, for a non-VOC data set in VOC layout
                                   (written by :func:`pipeline.data.synthetic.write_voc_folder`)

Choices, so that results match the paper's VOC setting and stay predictable:

* **Split list.** ``image_set="auto"`` reads ``ImageSets/Main/{split}.txt`` and falls back to
  ``ImageSets/Segmentation/{split}.txt`` only when the Main list does not exist. ``"segmentation"``
  reads the Segmentation list (the images that have masks, for evaluation); ``"main"`` only Main.
* **Labels** come from the XML objects, ``difficult`` ones included by default (as the paper);
  ``use_difficult=False`` drops them, and a class whose only objects are difficult is then not a label
  and its mask pixels become void (255) so that evaluation neither rewards nor penalises them.
* **Unknown object names** (not in the class list, after stripping whitespace) are an InputError for
  that image by default; ``unknown_class="ignore"`` drops those objects (their mask pixels become
  background). Names match exactly, else case-insensitively.
* **Size.** Width and height are those of the decoded JPEG; the XML ``<size>`` is not needed (some
  XMLs lack it or are wrong).
* **Masks** (``segmentation="auto"``): ``SegmentationClass/{id}.png`` when it exists. Its values index
  the folder's class list (``classes.txt``, else the 20 VOC classes) and are mapped to ``classes`` when
  that list differs. ``"require"`` makes a missing mask an InputError; ``"off"`` ignores masks.
* **Keys.** The sample key is the id without dots (``safe_key``); ids that sanitise alike (``img.1``,
  ``img_1``) each get a short hash of the id appended (:func:`~pipeline.data.sample.unique_keys`),
  listed in ``renamed`` and the manifest. An id that leads outside ``JPEGImages`` (``../x``, ``/x``) is
  an InputError: a split list must not make ingest read files outside the data set.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.classes import VOC_CLASSES, resolve_classes
from pipeline.data.images import inspect_image
from pipeline.data.sample import Reader, Sample, inside, safe_key, unique_keys
from pipeline.errors import InputError, WysiwycError

IMAGE_SETS = ("auto", "main", "segmentation")
SEGMENTATION_MODES = ("auto", "require", "off")
UNKNOWN_CLASS_MODES = ("error", "ignore")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard VOC palette: ``(n, 3)`` uint8, colour of index i (bit-interleaved, as the devkit)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def paper_seg_luminance(classes: list[str] | None = None, voc: bool = True) -> np.ndarray:
    """The grey value each value of our class-index maps had in the paper's ground-truth images once
    opened with PIL's ``convert("L")`` (a (256,) uint8 look-up table).

    VOC (``voc``): the class's colour in the SegmentationClass palette, by its VOC name (a subset or
    another order of the VOC classes keeps each class's own colour; a name VOC does not have, and
    ``classes=None`` means the 20 VOC classes in order), void (255) its palette colour (224, 224, 192)
    → 220: grey, not black, so void is object in :func:`pipeline.method.metrics.paper_foreground`.
    Otherwise the paper's COCO ground truth (``src/evaluation/generate_coco_segmentations.py``): every
    object white (255) on black, crowd regions (our void) included.
    """
    lut = np.zeros(256, dtype=np.uint8)
    if not voc:
        lut[1:] = 255
        return lut
    rgb = voc_colormap().astype(np.int64)
    grey = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16  # PIL's L = .299R + .587G + .114B
    names = VOC_CLASSES if classes is None else list(classes)
    for k, name in enumerate(names[:254]):
        lut[k + 1] = grey[VOC_CLASSES.index(name) + 1] if name in VOC_CLASSES else 255
    lut[255] = grey[255]  # void
    return lut


def find_voc_root(root: str | Path) -> Path:
    """The year folder (the one holding ``JPEGImages``) for ``root``.

    ``root`` may be the year folder itself (``VOCdevkit/VOC2007``), ``VOCdevkit``, or the folder that
    holds ``VOCdevkit``.

    Raises:
        WysiwycError: no VOC folder there, or several (say which one to use).
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise WysiwycError(f"voc: {root} is not a folder; pass the VOCdevkit/VOC2007 folder (or its parent)")
    if (root / "JPEGImages").is_dir():
        return root
    candidates: list[Path] = []
    for base in (root, root / "VOCdevkit"):
        if base.is_dir():
            candidates += sorted(p for p in base.iterdir() if p.is_dir() and (p / "JPEGImages").is_dir())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WysiwycError(
            f"voc: no JPEGImages folder in {root}, {root}/*, or {root}/VOCdevkit/*; "
            "pass the VOC year folder (e.g. VOCdevkit/VOC2007)"
        )
    names = ", ".join(str(c) for c in candidates)
    raise WysiwycError(f"voc: {root} holds several VOC folders ({names}); pass the one to use")


def _read_class_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    try:
        return resolve_classes(names, [])
    except WysiwycError as exc:
        raise WysiwycError(f"voc: {path}: {exc}") from exc


class VOCReader(Reader):
    """Samples of one split of a VOC folder (see the module docstring for every choice made).

    Args:
        root: ``VOCdevkit/VOC2007`` (or VOC2012, or any folder in VOC layout), ``VOCdevkit``, or the
            folder holding ``VOCdevkit``.
        split: the split name: ``ImageSets/{Main,Segmentation}/{split}.txt``.
        classes: the label space (default: the folder's ``classes.txt``, else the 20 VOC classes).
        use_difficult: count objects marked ``difficult`` (default True, as the paper).
        segmentation: ``"auto"`` (masks where present), ``"require"`` or ``"off"``.
        image_set: ``"auto"`` (Main, else Segmentation), ``"main"`` or ``"segmentation"``.
        unknown_class: ``"error"`` (InputError) or ``"ignore"`` for an object name not in ``classes``.

    Raises:
        WysiwycError: no VOC folder at ``root``, a bad class list, or a bad option.
    """

    name = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Sequence[str] | None = None,
        use_difficult: bool = True,
        segmentation: str = "auto",
        image_set: str = "auto",
        unknown_class: str = "error",
    ):
        for option, value, allowed in (
            ("segmentation", segmentation, SEGMENTATION_MODES),
            ("image_set", image_set, IMAGE_SETS),
            ("unknown_class", unknown_class, UNKNOWN_CLASS_MODES),
        ):
            if value not in allowed:
                raise WysiwycError(f"voc: {option}={value!r} is not one of {', '.join(allowed)}")
        self.root = str(find_voc_root(root))
        self.split = str(split)
        class_file = Path(self.root) / "classes.txt"
        # the classes the folder's masks index (value k+1 = folder_classes[k])
        self.folder_classes = _read_class_file(class_file) if class_file.is_file() else list(VOC_CLASSES)
        self.classes = resolve_classes(classes, self.folder_classes)
        self.use_difficult = bool(use_difficult)
        self.segmentation = segmentation
        self.image_set = image_set
        self.unknown_class = unknown_class
        self.source = self.root
        self._keys: dict[str, str] | None = None  # image id → sample key, set by items()
        # mask value remapping folder index → our index (+1), only when the lists differ
        self._seg_lut: list[int] | None = None
        if self.classes != self.folder_classes:
            ours = {name: i for i, name in enumerate(self.classes)}
            lut = list(range(256))
            for k, name in enumerate(self.folder_classes):
                lut[k + 1] = ours[name] + 1 if name in ours else 0
            self._seg_lut = lut
        self._lookup = {name: i for i, name in enumerate(self.classes)}
        folded: dict[str, int | None] = {}
        for name, i in self._lookup.items():
            folded[name.casefold()] = None if name.casefold() in folded else i
        self._lookup_folded = {k: v for k, v in folded.items() if v is not None}

    # --- split -----------------------------------------------------------------------------------

    def split_file(self) -> Path:
        """The split list this reader uses (it may not exist)."""
        sets = Path(self.root) / "ImageSets"
        main = sets / "Main" / f"{self.split}.txt"
        seg = sets / "Segmentation" / f"{self.split}.txt"
        if self.image_set == "main":
            return main
        if self.image_set == "segmentation":
            return seg
        return main if main.is_file() or not seg.is_file() else seg

    def available_splits(self) -> list[str]:
        """Split names found under ``ImageSets/{Main,Segmentation}`` (class-specific lists left out)."""
        names: set[str] = set()
        lower = {c.casefold() for c in self.folder_classes} | {c.casefold() for c in self.classes}
        for sub in ("Main", "Segmentation"):
            folder = Path(self.root) / "ImageSets" / sub
            if folder.is_dir():
                for path in folder.glob("*.txt"):
                    head = path.stem.split("_", 1)[0].casefold()
                    if "_" in path.stem and head in lower:
                        continue  # aeroplane_train.txt and the like
                    names.add(path.stem)
        return sorted(names)

    def items(self) -> list[str]:
        """Image ids of the split, in file order, duplicates removed.

        Raises:
            WysiwycError: the split list is missing or empty (the message lists the splits that exist).
        """
        path = self.split_file()
        ids: list[str] = []
        if path.is_file():
            seen: set[str] = set()
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split()
                if parts and parts[0] not in seen:
                    seen.add(parts[0])
                    ids.append(parts[0])
        if not ids:
            what = "is empty" if path.is_file() else "does not exist"
            splits = self.available_splits()
            have = f"splits found: {', '.join(splits)}" if splits else "no split lists found in ImageSets/"
            raise WysiwycError(f"voc: split list {path} {what}; {have}; pass one of them as --split")
        keys, self.renamed = unique_keys([safe_key(i) for i in ids], ids)
        self._keys = dict(zip(ids, keys))
        return ids

    def key(self, image_id: str) -> str:
        """The sample key of ``image_id``: the id without dots, made unique among the split's ids."""
        if self._keys is None:
            self.items()
        return self._keys[image_id] if image_id in self._keys else safe_key(image_id)

    # --- one image -------------------------------------------------------------------------------

    def _paths(self, image_id: str) -> tuple[Path, Path, Path]:
        root = Path(self.root)
        return (
            root / "JPEGImages" / f"{image_id}.jpg",
            root / "Annotations" / f"{image_id}.xml",
            root / "SegmentationClass" / f"{image_id}.png",
        )

    def describe(self, item) -> tuple[str, str]:
        return self.key(item), str(self._paths(item)[0])

    def labels_of(self, xml_path: Path) -> tuple[list[int], set[int]]:
        """``(labels, void_classes)`` from an annotation XML.

        ``void_classes`` are the classes seen only in dropped difficult objects (their mask pixels are
        made void).

        Raises:
            InputError: the XML is missing or malformed, an object has no name, or a name is not a class
                (with ``unknown_class="error"``).
        """
        if not xml_path.is_file():
            raise InputError(f"{xml_path}: annotation XML missing; every listed image needs one")
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as exc:
            raise InputError(f"{xml_path}: malformed XML ({exc}); fix or remove the file") from exc
        except OSError as exc:
            raise InputError(f"{xml_path}: cannot read ({exc})") from exc
        root = tree.getroot()
        if root.tag.strip() != "annotation":
            raise InputError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
        present: set[int] = set()
        difficult_only: set[int] = set()
        # only direct <object> children: VOC person layouts nest <part><name>head</name></part>
        for n, obj in enumerate(root.findall("object")):
            raw = obj.findtext("name")
            name = (raw or "").strip()
            if not name:
                raise InputError(f"{xml_path}: object {n + 1} has no <name>")
            index = self._lookup.get(name)
            if index is None:
                index = self._lookup_folded.get(name.casefold())
            if index is None:
                if self.unknown_class == "ignore":
                    continue
                raise InputError(
                    f"{xml_path}: object name {name!r} is not a known class; accepted classes: "
                    f"{', '.join(self.classes)} (give data.classes, or unknown_class=ignore to drop it)"
                )
            if _is_difficult(obj.findtext("difficult")) and not self.use_difficult:
                difficult_only.add(index)
                continue
            present.add(index)
        return sorted(present), difficult_only - present

    def load(self, item) -> Sample:
        image_id = item
        if not inside(Path(self.root) / "JPEGImages", f"{image_id}.jpg"):
            raise InputError(
                f"voc: image id {image_id!r} in {self.split_file()} leads outside {self.root}/JPEGImages; "
                "ids must name images inside the data set (no '..', no absolute path)"
            )
        jpg, xml, png = self._paths(image_id)
        labels, void_classes = self.labels_of(xml)
        if not jpg.is_file():
            raise InputError(f"{jpg}: image file missing (listed in {self.split_file()})")
        info = inspect_image(jpg.read_bytes(), str(jpg), self.max_pixels)
        seg = None
        if self.segmentation != "off":
            if png.is_file():
                seg = self._read_mask(png, info.width, info.height, void_classes)
            elif self.segmentation == "require":
                raise InputError(f"{png}: segmentation mask missing (segmentation=require)")
        return Sample(
            key=self.key(image_id),
            image=info.data,
            ext=info.ext,
            labels=labels,
            width=info.width,
            height=info.height,
            source=str(jpg),
            seg=seg,
        )

    def _read_mask(self, png: Path, width: int, height: int, void_classes: set[int]) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(png.read_bytes())) as im:
                im.load()
                mode, size = im.mode, im.size
                if mode == "P":
                    seg = np.array(im)  # palette indices, not colours
                elif mode == "L":
                    seg = np.array(im)
                elif mode in ("RGB", "RGBA"):
                    seg = _colours_to_indices(np.array(im.convert("RGB")), png)
                else:
                    raise InputError(f"{png}: mask mode {mode} unsupported; expected a palette (P) PNG")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{png}: unreadable mask ({exc})") from exc
        if size != (width, height):
            raise InputError(f"{png}: mask is {size[0]}x{size[1]} but the image is {width}x{height}; they must match")
        seg = seg.astype(np.uint8, copy=False)
        bad = np.setdiff1d(np.unique(seg), [*range(len(self.folder_classes) + 1), 255])
        if bad.size:
            raise InputError(
                f"{png}: mask values {bad.tolist()} are not class indices (0..{len(self.folder_classes)} or 255 void)"
            )
        if self._seg_lut is not None:
            seg = np.asarray(self._seg_lut, dtype=np.uint8)[seg]
        if void_classes:
            seg = seg.copy()
            seg[np.isin(seg, [c + 1 for c in void_classes])] = 255
        return seg


def _is_difficult(text: str | None) -> bool:
    value = (text or "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    try:
        return float(value) >= 1
    except ValueError:
        return False


def _colours_to_indices(rgb: np.ndarray, png: Path) -> np.ndarray:
    """Indices of an RGB mask drawn with the VOC palette (some tools save masks as RGB)."""
    cmap = voc_colormap()
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(cmap)}
    out = np.zeros(code.shape, dtype=np.uint8)
    for value in np.unique(code):
        index = table.get(int(value))
        if index is None:
            raise InputError(f"{png}: RGB mask colour #{int(value):06x} is not a VOC palette colour")
        out[code == value] = index
    return out
