"""Class lists of the data sets and the validation of a user-given class list.

A class list fixes the meaning of every label index and of every value in a segmentation map
(``k`` in ``Sample.labels`` is ``classes[k]``; ``k + 1`` in ``Sample.seg``). Its order matters: a
classifier trained with one order cannot be evaluated with another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.errors import WysiwycError

# PASCAL VOC, in the official order (the order of the VOC devkit and of the SegmentationClass values 1..20)
VOC_CLASSES: list[str] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# The object kinds of the synthetic generator (pipeline/data/synthetic.py); only the shape tells them apart
SYNTHETIC_CLASSES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
]


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """Map each class name to its index in ``classes``.

    Args:
        classes: class names, in label order.

    Returns:
        ``{name: index}``.
    """
    return {name: i for i, name in enumerate(classes)}


def resolve_classes(given: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """The class list to use: ``given`` when set, else ``default``; validated.

    Names are stripped of surrounding whitespace. The list must be non-empty, have no empty names and no
    duplicates, and hold at most 254 classes (segmentation maps store ``k + 1`` in a byte, 255 is void).

    Args:
        given: a user-given class list (``data.classes``), or None.
        default: the data set's own class list.

    Returns:
        The validated class list (a new list).

    Raises:
        WysiwycError: the list is empty, has an empty name, a duplicate, or too many classes.
    """
    source = "data.classes" if given is not None else "the default class list"
    if isinstance(given, str):
        raise WysiwycError(
            f"{source} must be a list of class names, not the string {given!r}; write it as a list, e.g. [cat, dog]"
        )
    classes = [str(name).strip() for name in (default if given is None else given)]
    if not classes:
        raise WysiwycError(f"{source} is empty; give at least one class name")
    empty = [i for i, name in enumerate(classes) if not name]
    if empty:
        raise WysiwycError(f"{source} has an empty class name at position {empty[0]}; remove it")
    seen: set[str] = set()
    dups = []
    for name in classes:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        raise WysiwycError(
            f"{source} names {', '.join(repr(d) for d in dups)} more than once; each class must appear once"
        )
    if len(classes) > 254:
        raise WysiwycError(f"{source} has {len(classes)} classes; at most 254 fit in a segmentation map (255 is void)")
    return classes


class ClassMatch:
    """The classifier's classes matched **by name** to a labelled split's (never by index): labels and
    segmentation maps of the split re-indexed to the classifier's order. A split class the classifier does not
    have becomes void in the maps (neither object nor background) and no label; a classifier class the split
    does not label is never present.

    Args:
        model_classes: the classifier's outputs, in order.
        split_classes: the split's class list (its manifest's), in label order.
        split: the split's name or URL, for messages.

    Raises:
        WysiwycError: the two lists share no name.
    """

    def __init__(self, model_classes: Sequence[str], split_classes: Sequence[str], split: str):
        self.model_classes, self.split_classes = list(model_classes), list(split_classes)
        index = class_index(self.split_classes)
        self.matched = [c for c in self.model_classes if c in index]
        self.unmatched_model = [c for c in self.model_classes if c not in index]
        self.unmatched_split = [c for c in self.split_classes if c not in set(self.model_classes)]
        if not self.matched:
            raise WysiwycError(
                f"{split} has classes {self.split_classes}, none of the classifier's {self.model_classes}: classes are "
                "matched by name; use a split that labels some of them"
            )
        self.identity = self.model_classes == self.split_classes
        own = class_index(self.model_classes)
        # seg values: 0 background, k + 1 split class k, 255 void → the classifier's k' + 1, or void
        self._seg = [0] + [own[c] + 1 if c in own else 255 for c in self.split_classes]
        self._labels = [index.get(c, -1) for c in self.model_classes]

    def summary(self) -> dict:
        return {
            "matched": self.matched,
            "unmatched_classifier": self.unmatched_model,
            "unmatched_split": self.unmatched_split,
        }

    def apply(self, batch: dict) -> dict:
        """A batch (``labels`` (B, K), ``seg`` (B, H, W)) of the split in the classifier's classes."""
        if self.identity:
            return batch
        labels = batch["labels"]
        out = torch.zeros(labels.shape[0], len(self.model_classes), dtype=labels.dtype, device=labels.device)
        for j, k in enumerate(self._labels):
            if k >= 0:
                out[:, j] = labels[:, k]
        lut = torch.full((256,), 255, dtype=batch["seg"].dtype, device=batch["seg"].device)
        lut[: len(self._seg)] = torch.tensor(self._seg, dtype=lut.dtype)
        return {**batch, "labels": out, "seg": lut[batch["seg"]]}
