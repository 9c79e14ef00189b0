"""ImageFolderReader and inspect_image: listing, keys, verification of every image."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.images import ImageFolderReader, inspect_image
from pipeline.data.sample import Skipped
from pipeline.errors import InputError, WysiwycError

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"


def encoded(fmt: str, size=(20, 10), colour=(10, 200, 60), **options) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(encoded("JPEG", (20, 10)))
    (root / "sub" / "B.PNG").write_bytes(encoded("PNG", (7, 9)))
    (root / "c.jpeg").write_bytes(encoded("JPEG", (5, 5)))
    (root / "notes.txt").write_text("not an image")
    (root / "d.gif").write_bytes(encoded("GIF"))
    return root


def test_lists_images_by_suffix_case_insensitively_sorted_with_keys_from_relative_paths(folder: Path):
    reader = ImageFolderReader(str(folder))
    items = reader.items()
    assert [key for key, _ in items] == ["a_jpg", "c_jpeg", "sub_B_PNG"]
    assert [Path(url).relative_to(folder).as_posix() for _, url in items] == ["a.jpg", "c.jpeg", "sub/B.PNG"]


def test_samples_are_unlabelled_with_source_bytes_and_true_size(folder: Path):
    reader = ImageFolderReader(str(folder))
    samples = [reader.load(item) for item in reader.items()]
    assert reader.classes == []
    assert [(s.ext, s.width, s.height, s.labels) for s in samples] == [
        ("jpg", 20, 10, []),
        ("jpg", 5, 5, []),
        ("png", 7, 9, []),
    ]
    assert samples[0].image == (folder / "a.jpg").read_bytes()
    assert samples[2].image == (folder / "sub" / "B.PNG").read_bytes()
    assert samples[2].source == str(folder / "sub" / "B.PNG")


def test_file_url_prefix_gives_the_same_keys_and_file_url_sources(folder: Path):
    reader = ImageFolderReader(folder.as_uri())
    items = reader.items()
    assert [key for key, _ in items] == ["a_jpg", "c_jpeg", "sub_B_PNG"]
    sample = reader.load(items[0])
    assert sample.source == (folder / "a.jpg").as_uri() and sample.width == 20


def test_paths_that_sanitise_alike_get_distinct_hashed_keys(tmp_path: Path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y.jpg").write_bytes(encoded("JPEG"))
    (tmp_path / "x_y.jpg").write_bytes(encoded("JPEG"))
    (tmp_path / "z.jpg").write_bytes(encoded("JPEG"))
    keys = [key for key, _ in ImageFolderReader(str(tmp_path)).items()]
    assert len(set(keys)) == 3 and "z_jpg" in keys
    collided = [k for k in keys if k != "z_jpg"]
    assert all(k.startswith("x_y_jpg_") and len(k) == len("x_y_jpg_") + 8 for k in collided)
    assert all("." not in k for k in keys)


def test_given_suffixes_and_classes_are_used(folder: Path):
    reader = ImageFolderReader(str(folder), suffixes=("png",), classes=["cat", "dog"])
    assert [key for key, _ in reader.items()] == ["sub_B_PNG"]
    assert reader.classes == ["cat", "dog"]


def test_zero_byte_truncated_and_non_image_files_are_input_errors_naming_the_uri(folder: Path):
    (folder / "empty.jpg").write_bytes(b"")
    big = encoded("JPEG", (64, 64))
    (folder / "half.jpg").write_bytes(big[: len(big) // 2])
    (folder / "text.png").write_text("hello")
    reader = ImageFolderReader(str(folder))
    by_key = dict(reader.items())
    expected = {"empty_jpg": "empty file", "half_jpg": "truncated", "text_png": "not an image"}
    for key, reason in expected.items():
        with pytest.raises(InputError, match=reason) as info:
            reader.load((key, by_key[key]))
        assert by_key[key] in str(info.value)
    skipped = reader.load_or_skip(("empty_jpg", by_key["empty_jpg"]))
    assert isinstance(skipped, Skipped) and skipped.source == by_key["empty_jpg"]


def test_content_decides_the_extension_webp_becomes_png_and_other_formats_are_refused(folder: Path):
    (folder / "really_jpeg.png").write_bytes(encoded("JPEG", (6, 4)))
    (folder / "really_webp.jpg").write_bytes(encoded("WEBP", (6, 4), lossless=True))
    reader = ImageFolderReader(str(folder))
    by_key = dict(reader.items())
    assert reader.load(("k", by_key["really_jpeg_png"])).ext == "jpg"
    converted = reader.load(("k", by_key["really_webp_jpg"]))
    assert converted.ext == "png" and converted.image.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(converted.image)) as im:
        assert im.size == (6, 4) and im.getpixel((0, 0)) == (10, 200, 60)
    # formats are told by their bytes: a BMP, TIFF or ICO named .png/.jpg is never handed to its decoder
    for fmt in ("BMP", "TIFF", "ICO", "GIF"):
        (folder / f"really_{fmt.lower()}.png").write_bytes(encoded(fmt, (6, 4)))
        with pytest.raises(InputError, match=r"really_\w+.png: not an image that is decoded here \(PNG, JPEG or WebP"):
            reader.load(("k", str(folder / f"really_{fmt.lower()}.png")))


def test_file_removed_after_listing_is_an_input_error(folder: Path):
    reader = ImageFolderReader(str(folder))
    item = reader.items()[0]
    (folder / "a.jpg").unlink()
    with pytest.raises(InputError, match="a.jpg"):
        reader.load(item)


def test_prefix_without_images_is_an_error_naming_it(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(WysiwycError, match=r"holds 1 other file\(s\) but no image") as info:
        ImageFolderReader(str(tmp_path)).items()
    assert str(tmp_path) in str(info.value)
    with pytest.raises(WysiwycError, match="holds nothing"):
        ImageFolderReader(str(tmp_path / "absent")).items()


def test_pickled_reader_does_not_carry_the_listing(folder: Path):
    reader = ImageFolderReader(str(folder))
    items = reader.items()
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._items is None
    assert copy.load(items[0]).width == 20


def test_s3_prefix_keys_are_relative_and_sibling_prefixes_are_left_out(monkeypatch):
    objects = {
        "s3://bucket/photos/2024/a.jpg": encoded("JPEG", (3, 2)),
        "s3://bucket/photos/b.png": encoded("PNG", (4, 4)),
        "s3://bucket/photos2/c.jpg": encoded("JPEG"),  # a sibling, not under photos/
    }
    seen_opts = []

    def list_prefix(url, opts=None):
        seen_opts.append(opts)
        return iter(sorted(objects))

    def read_bytes(url, opts=None):
        if url not in objects:
            raise storage.NotFound(f"{url} does not exist")
        return objects[url]

    monkeypatch.setattr(storage, "list_prefix", list_prefix)
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    opts = storage.S3Options(endpoint_url="http://localhost:8333")
    reader = ImageFolderReader("s3://bucket/photos", opts=opts)
    items = reader.items()
    assert items == [("2024_a_jpg", "s3://bucket/photos/2024/a.jpg"), ("b_png", "s3://bucket/photos/b.png")]
    assert seen_opts == [opts]
    sample = reader.load(items[0])
    assert (sample.source, sample.width, sample.height) == ("s3://bucket/photos/2024/a.jpg", 3, 2)
    with pytest.raises(InputError, match="gone since the listing"):
        reader.load(("x", "s3://bucket/photos/deleted.jpg"))


@pytest.mark.realdata
def test_inspect_image_reads_real_voc_and_coco_jpegs():
    paths = [
        REALDATA / "voc2007" / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg",  # progressive JPEG
        REALDATA / "coco2014" / "val2014" / "COCO_val2014_000000000785.jpg",
    ]
    if not all(p.exists() for p in paths):
        pytest.skip(f"real samples not found under {REALDATA} (../shared/realdata beside the repo)")
    infos = [inspect_image(p.read_bytes(), str(p)) for p in paths]
    sizes = [(info.ext, info.width, info.height) for info in infos]
    assert sizes == [("jpg", 353, 500), ("jpg", 640, 425)]
    reader = ImageFolderReader(str(REALDATA / "coco2017" / "icevision_coco" / "images"))
    assert len(reader.items()) == 6
    assert all(not isinstance(reader.load_or_skip(item), Skipped) for item in reader.items())


def test_data_max_image_pixels_skips_a_huge_image_at_ingest_and_refuses_it_in_training(tmp_path: Path):
    """One pixel limit from ingest to training (``data.max_image_pixels``), read from the header: the 4,000 ×
    3,000 PNG below costs ~50 kB on disk and 48 MB decoded, in every loader worker that meets it."""
    import json

    from pipeline.config import MAX_IMAGE_PIXELS, IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.data.transforms import decode_sample

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "small.png").write_bytes(encoded("PNG", (40, 30)))
    (corpus / "huge.png").write_bytes(encoded("PNG", (4000, 3000)))
    summary = ingest(
        ImageFolderReader(str(corpus)),
        str(tmp_path / "out"),
        "c",
        IngestConfig(workers=1),
        progress=False,
        max_pixels=10**6,
    )
    assert summary["num_samples"] == 1 and summary["skipped"] == 1
    reason = summary["first_skipped"]["reason"]
    assert "huge.png: 4000x3000 image has more than data.max_image_pixels=1000000 pixels" in reason
    # the default limit passes it; a shard written with it is refused by a training that sets a lower one
    assert ImageFolderReader(str(corpus)).load(("k", str(corpus / "huge.png"))).width == 4000 < MAX_IMAGE_PIXELS
    raw = {"__key__": "k", "png": encoded("PNG", (4000, 3000)), "json": json.dumps({"labels": []}).encode()}
    assert decode_sample(raw, image_size=8, num_classes=2)["image"].shape == (3, 8, 8)
    with pytest.raises(InputError, match=r"k: 4000x3000 image has more than data.max_image_pixels=1000000"):
        decode_sample(raw, image_size=8, num_classes=2, max_pixels=10**6)
