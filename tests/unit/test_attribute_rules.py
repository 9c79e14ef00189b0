"""Pure parts of batch attribution: which classes an image explains, image decoding, output keys."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.attribute.inputs import decode_image
from pipeline.attribute.job import explained_classes
from pipeline.attribute.outputs import output_urls, part_url, source_key
from pipeline.errors import InputError

PROBS = torch.tensor(
    [
        [0.9, 0.2, 0.6, 0.1],  # two above 0.5
        [0.3, 0.4, 0.1, 0.2],
    ]
)  # none above 0.5: the top-1 is the floor


def test_threshold_mode_explains_predicted_classes_with_the_top1_as_floor():
    assert explained_classes(PROBS, "threshold", threshold=0.5) == [[0, 2], [1]]
    assert explained_classes(PROBS, "threshold", threshold=0.05) == [[0, 2, 1, 3], [1, 0, 3, 2]]


def test_topk_and_fixed_modes():
    assert explained_classes(PROBS, "topk", top_k=2) == [[0, 2], [1, 0]]
    assert explained_classes(PROBS, "topk", top_k=9) == [[0, 2, 1, 3], [1, 0, 3, 2]]
    assert explained_classes(PROBS, "fixed", fixed=(3, 1)) == [[3, 1], [3, 1]]


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_grayscale_and_rgba_decode_to_three_normalised_channels():
    gray, w, h = decode_image(_encoded(Image.new("L", (30, 20), 128)), "g.png", 16, 10_000)
    assert gray.shape == (3, 16, 16) and (w, h) == (30, 20)
    assert np.allclose(gray[0], gray[0, 0, 0]) and gray[0, 0, 0] != gray[2, 0, 0]  # per-channel normalisation
    rgba, _, _ = decode_image(_encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 10))), "a.png", 8, 10_000)
    red, _, _ = decode_image(_encoded(Image.new("RGB", (8, 8), (255, 0, 0))), "r.png", 8, 10_000)
    assert np.array_equal(rgba, red)  # alpha dropped


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"plain text", "not an image"),
        (_encoded(Image.new("RGB", (64, 64)), "JPEG")[:120], "truncated"),
        (_encoded(Image.new("RGB", (200, 100))), "more than attribute.max_image_pixels=10000"),
    ],
)
def test_unusable_images_raise_input_errors_naming_the_source(data, reason):
    with pytest.raises(InputError, match=reason) as err:
        decode_image(data, "s3://b/x.jpg", 16, 10_000)
    assert str(err.value).startswith("s3://b/x.jpg: ")


def test_output_names_are_deterministic_and_batch_order_free():
    key = source_key("s3://b/corpus/a.jpg")
    assert key == source_key("s3://b/corpus/a.jpg") != source_key("s3://b/corpus/b.jpg")
    assert output_urls("s3://o/run", key) == (
        f"s3://o/run/masks/{key[:2]}/{key}.png",
        f"s3://o/run/class_masks/{key[:2]}/{key}.npz",
    )
    assert part_url("s3://o/run", ["b", "a"]) == part_url("s3://o/run", ["a", "b"]) != part_url("s3://o/run", ["a"])
