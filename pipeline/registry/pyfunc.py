"""The MLflow pyfunc faces of registered versions: :class:`ExplainerModel` (images → explained classes,
their probabilities and masks) and :class:`ClassifierModel` (images → class probabilities).

Both take image bytes — ``pandas.DataFrame({"image": [bytes, ...]})`` (PNG/JPEG/any format PIL reads;
base64 text is decoded, which is how JSON carries bytes to ``mlflow models serve``), a cell may hold a
list of images, or a plain dict ``{"image": [...]}`` — or arrays normalised the classifier's way as
``{"pixels": [(3, S, S) float32, ...]}``. Bytes are decoded, resized and normalised as in training
(:func:`pipeline.data.images.decode_image`, the classifier's :class:`pipeline.data.transforms.Normalization`). The class
choice is the rule of ``wysiwyc attribute`` (:class:`pipeline.method.class_rule.ClassRule`), set by the
``params`` ``classes`` (threshold | topk | fixed), ``threshold``, ``top_k``, ``fixed_classes``.

A registered version carries this package's code (``code_paths``) and loads where it is not installed:
this module imports nothing beyond torch, torchvision, numpy, pandas, PIL and MLflow.
"""

from __future__ import annotations

import base64
import binascii

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from pipeline.config import MAX_IMAGE_PIXELS, ExplanandumConfig
from pipeline.data.images import decode_image
from pipeline.errors import InputError, WysiwycError
from pipeline.method.class_rule import ClassRule
from pipeline.models.classifier import load_classifier
from pipeline.models.explain import explain
from pipeline.models.predictor import load_predictor


def _column(frame, name: str, expand: bool = True) -> list | None:
    """The values of a column (None: no such column); ``expand``: a cell holding a list of values
    contributes each of them."""
    if name not in frame.columns:
        return None
    cells = [c for c in frame[name] if c is not None and not (isinstance(c, float) and np.isnan(c))]
    if not expand:
        return cells
    return [v for cell in cells for v in (cell if isinstance(cell, (list, tuple)) else [cell])]


def model_images(model_input, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The (B, 3, S, S) batch of a pyfunc input (module docstring): uint8 for image bytes, float32 for
    ``pixels``. Raises InputError naming the bad row and what to send instead."""
    if isinstance(model_input, dict):
        columns = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in model_input.items()}
        model_input = pd.DataFrame(columns)
    elif isinstance(model_input, (list, tuple)):
        model_input = pd.DataFrame({"image": list(model_input)})
    if not isinstance(model_input, pd.DataFrame):
        raise InputError(
            f"predict: expected a DataFrame with an 'image' column of image bytes (or 'pixels' of normalised "
            f"(3, {size}, {size}) arrays), got {type(model_input).__name__}"
        )
    pixels = _column(model_input, "pixels", expand=False)  # one (3, S, S) array (or nested lists) a cell
    if pixels:
        arrays = [np.asarray(a, dtype=np.float32) for a in pixels]
        bad = [i for i, a in enumerate(arrays) if a.shape != (3, size, size)]
        if bad:
            raise InputError(
                f"predict: pixels row {bad[0]} has shape {arrays[bad[0]].shape}; each must be a (3, {size}, {size}) "
                f"ImageNet-normalised array (or send the image bytes in the 'image' column)"
            )
        return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 3, size, size))
    images = _column(model_input, "image")
    if images is None and model_input.shape[1] == 1:  # a single unnamed column
        images = _column(model_input, model_input.columns[0])
    if images is None:
        raise InputError(f"predict: no 'image' column (columns: {list(model_input.columns)})")
    decoded = []
    for i, value in enumerate(images):
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"image {i}: text that is not base64; send bytes, or base64 of the file") from None
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InputError(f"image {i}: a {type(value).__name__}; send the PNG/JPEG file's bytes")

        decoded.append(decode_image(bytes(value), f"image {i}", size, max_pixels, limit="the model's max pixels")[0])
    return torch.from_numpy(np.stack(decoded)) if decoded else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(records, columns=list(records[0]) if records else ["classes", "probabilities"])


class ExplainerModel(mlflow.pyfunc.PythonModel):
    """A registered Explainer: ``predict`` → a DataFrame, one row per image, columns ``classes``,
    ``probabilities``, ``masks`` (:func:`pipeline.models.explain.explain`). Runs on CUDA when present.

    A 4-d float array (the input of versions registered before image bytes were accepted) still returns
    ``{"masks": (B, C, S, S), "probs": (B, C)}``.
    """

    batch_size = 64  # images per forward pass (bounds memory; any input batch size works)

    def load_context(self, context) -> None:

        self.predictor = load_predictor(context.artifacts["explainer"], context.artifacts["explanandum"])
        if torch.cuda.is_available():
            self.predictor.to("cuda")

    def predict(self, context, model_input: pd.DataFrame, params=None):

        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            return self._arrays(model_input)
        rule = ClassRule.from_params(params)
        images = model_images(model_input, self.predictor.image_size)
        records = explain(self.predictor, images, rule, self.batch_size)
        return _frame(records)

    def _arrays(self, model_input: np.ndarray) -> dict:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.shape[1] != 3:
            raise WysiwycError(f"predict: expected (B, 3, S, S) normalised images, got shape {tuple(x.shape)}")
        outputs = [self.predictor(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        return {
            "masks": torch.cat([o.masks for o in outputs]).cpu().numpy(),
            "probs": torch.cat([o.probs for o in outputs]).cpu().numpy(),
        }


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """A registered classifier: ``predict`` → a DataFrame, one row per image: ``classes`` and
    ``probabilities`` (the classes the rule picks, most probable first) and ``all_probabilities`` (every
    class, in the order of the model's ``classes`` metadata)."""

    batch_size = 64

    def load_context(self, context) -> None:

        self.model = load_classifier(ExplanandumConfig(model=context.artifacts["classifier"]))
        self.classes, self.image_size = self.model.classes, int(self.model.interface.image_size or 224)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None):

        rule = ClassRule.from_params(params)
        images = model_images(model_input, self.image_size)
        records = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device)
            x = self.model.interface.normalization.uint8(x) if x.dtype == torch.uint8 else x.float()
            probs = self.model.probabilities(self.model(x).float()).cpu()
            for row, chosen in zip(probs.tolist(), rule.indices(probs, self.classes)):
                records.append(
                    {
                        "classes": [self.classes[c] for c in chosen],
                        "probabilities": [row[c] for c in chosen],
                        "all_probabilities": row,
                    }
                )
        return _frame(records)
