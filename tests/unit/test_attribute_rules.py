"""Pure parts of batch attribution: which classes an image explains, image decoding, output keys."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.attribute.outputs import output_urls, part_url, shard_url, source_key
from pipeline.data.images import decode_image
from pipeline.data.transforms import image_to_tensor, normalize_uint8
from pipeline.errors import InputError
from pipeline.models.explain import explained_classes

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


def test_grayscale_and_rgba_decode_to_the_pixels_the_model_normalises():
    gray_image = Image.new("L", (30, 20), 128)
    gray, w, h = decode_image(_encoded(gray_image), "g.png", 16, 10_000)
    assert gray.shape == (3, 16, 16) and gray.dtype == np.uint8 and (w, h) == (30, 20)
    assert (gray == 128).all()
    # normalised on the model's device: bit for bit what training and evaluation feed the nets
    expected = image_to_tensor(gray_image, 16)
    assert torch.equal(normalize_uint8(torch.from_numpy(gray[None]))[0], expected)
    assert expected[0, 0, 0] != expected[2, 0, 0]  # per-channel normalisation
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
    part = part_url("s3://o/run", "chunk-000003", ["b", "a"], 1)
    assert (
        part
        == part_url("s3://o/run", "chunk-000003", ["a", "b"], 1)
        != part_url("s3://o/run", "chunk-000003", ["a"], 0)
    )
    assert part.startswith("s3://o/run/parts/chunk-000003/part-") and part.endswith("-2r1e.parquet")
    assert shard_url("s3://o/run", ["b", "a"]) == shard_url("s3://o/run", ["a", "b"]) != shard_url("s3://o/run", ["a"])


def test_a_sixteen_bit_png_is_scaled_to_eight_bits_not_saturated():
    for value, expected in ((1000, 4), (32896, 128), (65535, 255)):  # value / 257, rounded
        image = Image.fromarray(np.full((6, 10), value, dtype=np.uint16))  # mode I;16
        pixels, w, h = decode_image(_encoded(image), "deep.png", 8, 10_000)
        assert (w, h) == (10, 6) and (pixels == expected).all(), (value, np.unique(pixels))
        with Image.open(io.BytesIO(_encoded(image))) as opened:  # what Pillow's own conversion gives
            assert opened.mode == "I;16" and np.asarray(opened.convert("RGB")).min() == 255


def test_the_exif_orientation_is_applied_as_a_viewer_shows_the_image():
    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high: left half red, right half blue
    stored[:, :16, 0] = 255
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    pixels, w, h = decode_image(buf.getvalue(), "phone.jpg", 16, 10_000)
    assert (w, h) == (16, 32)  # the size as shown: a quarter turn
    # turned clockwise, the stored left half (red) is the top half
    assert pixels[0, 2, 8] > 200 and pixels[2, 2, 8] < 50
    assert pixels[2, 13, 8] > 200 and pixels[0, 13, 8] < 50


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_result():
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((1600, 1200), Image.BILINEAR)
    data = _encoded(photo, "JPEG")
    pixels, w, h = decode_image(data, "big.jpg", 48, 10**7)
    assert (w, h) == (1600, 1200)  # the full size, for the masks
    with Image.open(io.BytesIO(data)) as full:  # decoded at full scale, then resized the same way
        reference = np.asarray(full.convert("RGB").resize((48, 48), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(pixels.astype(int) - reference.astype(int)).mean() < 2.0
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (48, 48))
        assert im.size == (200, 150)  # what the decoder did: 1/8 of the work per side
