"""COCOReader: class numbering, overlap and crowd painting, empty images, and bad inputs."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.coco import COCOReader
from pipeline.data.sample import Skipped
from pipeline.errors import InputError, WysiwycError

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"

W, H = 40, 30
CAT, DOG, ZEBRA = 0, 1, 2  # category ids 1, 3, 7 → contiguous indices in id order


def needs_realdata(*parts: str) -> Path:
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real COCO samples not found at {path} (../shared/realdata beside the repo)")
    return path


def box_polygon(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def save_jpeg(path: Path, width: int = W, height: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, format="JPEG")


def rect(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


CROWD = rect(0, H, 25, W)
SMALL_CAT = rect(20, 26, 30, 36)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny instances JSON + image folder: overlaps, a crowd, an empty image, RLE, a missing file."""
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        save_jpeg(images / name)
    data = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 11, "file_name": "b.jpg", "width": W, "height": H},
            {"id": 12, "file_name": "sub/c.jpg", "width": W, "height": H},
            {"id": 13, "file_name": "missing.jpg", "width": W, "height": H},
        ],
        "categories": [
            {"id": 7, "name": "zebra"},
            {"id": 1, "name": "cat"},
            {"id": 3, "name": "dog"},
        ],
        "annotations": [
            # a large dog, a small cat in front of it (listed first, so order in the file is not what wins)
            {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 0, "area": 49,
             "segmentation": box_polygon(5, 5, 12, 12), "bbox": [5, 5, 7, 7]},
            {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 600,
             "segmentation": box_polygon(0, 0, 30, 20), "bbox": [0, 0, 30, 20]},
            # a crowd of zebras overlapping the dog's right edge
            {"id": 3, "image_id": 10, "category_id": 7, "iscrowd": 1, "area": 450,
             "segmentation": uncompressed_rle(CROWD), "bbox": [25, 0, 15, 30]},
            # image 12: a cat as compressed RLE
            {"id": 4, "image_id": 12, "category_id": 1, "iscrowd": 0, "area": 36,
             "segmentation": compressed_rle(SMALL_CAT), "bbox": [30, 20, 6, 6]},
            {"id": 5, "image_id": 13, "category_id": 3, "iscrowd": 0, "area": 100,
             "segmentation": box_polygon(0, 0, 10, 10), "bbox": [0, 0, 10, 10]},
        ],
    }  # fmt: skip
    path = tmp_path / "instances_test.json"
    path.write_text(json.dumps(data))
    return path, images


def reference_mask(polygon) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygon, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools on numpy 2
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_categories_are_numbered_in_category_id_order_with_names_kept(coco):
    reader = COCOReader(*coco, "val")
    assert reader.classes == ["cat", "dog", "zebra"]
    assert reader.category_to_label == {1: CAT, 3: DOG, 7: ZEBRA}


def test_items_are_sorted_by_image_id_with_keys_from_file_names(coco):
    reader = COCOReader(*coco, "val")
    assert [reader.describe(i)[0] for i in reader.items()] == ["a", "b", "sub_c", "missing"]


def test_smaller_object_in_front_of_a_larger_one_keeps_its_pixels(coco):
    seg = COCOReader(*coco, "val").load(COCOReader(*coco, "val").items()[0]).seg
    cat = reference_mask(box_polygon(5, 5, 12, 12))
    dog = reference_mask(box_polygon(0, 0, 30, 20))
    assert cat.sum() > 0 and (seg[cat] == CAT + 1).all()
    assert (seg[dog & ~cat] == DOG + 1).all()


def test_crowd_region_is_void_only_where_no_object_claims_it(coco):
    reader = COCOReader(*coco, "val")
    sample = reader.load(reader.items()[0])
    dog = reference_mask(box_polygon(0, 0, 30, 20))
    assert (sample.seg[CROWD & ~dog] == 255).all()
    assert (sample.seg[CROWD & dog] == DOG + 1).all()  # the dog keeps its pixels inside the crowd box
    assert (sample.seg[~CROWD & ~dog] == 0).all()
    assert not (sample.seg == ZEBRA + 1).any()


def test_crowd_category_counts_as_a_label(coco):
    reader = COCOReader(*coco, "val")
    assert reader.load(reader.items()[0]).labels == [CAT, DOG, ZEBRA]


def test_compressed_rle_is_rasterised(coco):
    reader = COCOReader(*coco, "val")
    sample = reader.load(reader.items()[2])
    assert sample.labels == [CAT]
    assert np.array_equal(sample.seg == CAT + 1, SMALL_CAT)
    assert sample.source.endswith("images/sub/c.jpg")


def test_image_without_annotations_is_kept_with_empty_labels_unless_drop_empty(coco):
    reader = COCOReader(*coco, "val")
    empty = reader.load(reader.items()[1])
    assert empty.labels == [] and empty.key == "b"
    assert empty.seg is not None and not empty.seg.any()
    dropped = COCOReader(*coco, "val", drop_empty=True)
    assert [dropped.describe(i)[0] for i in dropped.items()] == ["a", "sub_c", "missing"]


def test_missing_image_file_is_an_input_error_naming_it(coco):
    reader = COCOReader(*coco, "val")
    item = reader.items()[3]
    with pytest.raises(InputError, match=r"missing\.jpg: image file missing"):
        reader.load(item)
    skipped = reader.load_or_skip(item)
    assert isinstance(skipped, Skipped) and skipped.key == "missing"


def test_image_bytes_are_kept_and_size_checked_against_the_json(coco):
    path, images = coco
    reader = COCOReader(path, images, "val")
    sample = reader.load(reader.items()[0])
    assert sample.image == (images / "a.jpg").read_bytes() and sample.ext == "jpg"
    assert (sample.width, sample.height) == (W, H)
    save_jpeg(images / "a.jpg", 20, 20)
    with pytest.raises(InputError, match="image is 20x20 but .* says 40x30"):
        reader.load(reader.items()[0])


def test_truncated_image_is_an_input_error(coco):
    path, images = coco
    data = (images / "b.jpg").read_bytes()
    (images / "b.jpg").write_bytes(data[: len(data) // 2])
    reader = COCOReader(path, images, "val")
    with pytest.raises(InputError, match=r"b\.jpg: truncated"):
        reader.load(reader.items()[1])


def test_annotation_with_unknown_category_is_an_input_error(coco):
    path, images = coco
    data = json.loads(path.read_text())
    data["annotations"][3]["category_id"] = 99
    path.write_text(json.dumps(data))
    reader = COCOReader(path, images, "val")
    with pytest.raises(InputError, match="unknown category_id 99"):
        reader.load(reader.items()[2])


def test_missing_or_malformed_json_is_an_error_naming_it(coco, tmp_path: Path):
    _, images = coco
    with pytest.raises(WysiwycError, match="nope.json does not exist"):
        COCOReader(tmp_path / "nope.json", images, "val")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(WysiwycError, match="bad.json is not a COCO instances JSON"):
        COCOReader(bad, images, "val")
    bad.write_text("[1, 2]")
    with pytest.raises(WysiwycError, match="bad.json"):
        COCOReader(bad, images, "val")


def test_missing_image_folder_is_an_error(coco, tmp_path: Path):
    with pytest.raises(WysiwycError, match="image folder .* does not exist"):
        COCOReader(coco[0], tmp_path / "nowhere", "val")


def test_class_subset_ignores_other_categories(coco):
    reader = COCOReader(*coco, "val", classes=["dog", "cat"])
    sample = reader.load(reader.items()[0])
    assert sample.labels == [0, 1]  # dog, cat in the given order; zebra ignored
    assert set(np.unique(sample.seg).tolist()) == {0, 1, 2}
    with pytest.raises(WysiwycError, match="not categories"):
        COCOReader(*coco, "val", classes=["unicorn"])


def test_annotation_without_segmentation_leaves_seg_unset_but_counts_as_label(coco):
    path, images = coco
    data = json.loads(path.read_text())
    del data["annotations"][3]["segmentation"]
    path.write_text(json.dumps(data))
    reader = COCOReader(path, images, "val")
    sample = reader.load(reader.items()[2])
    assert sample.labels == [CAT] and sample.seg is None


def test_pickled_reader_does_not_carry_the_item_list(coco):
    reader = COCOReader(*coco, "val")
    items = reader.items()
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._items is None
    assert copy.load(items[0]).labels == [CAT, DOG, ZEBRA]


def test_file_names_leading_outside_the_image_folder_are_refused(coco, tmp_path: Path):
    path, images = coco
    save_jpeg(tmp_path / "x.jpg")  # readable where ../x.jpg points: only the check stops it
    save_jpeg(tmp_path / "abs" / "y.jpg")
    data = json.loads(path.read_text())
    data["images"] += [
        {"id": 20, "file_name": "../x.jpg", "width": W, "height": H},
        {"id": 21, "file_name": str(tmp_path / "abs" / "y.jpg"), "width": W, "height": H},
    ]
    path.write_text(json.dumps(data))
    reader = COCOReader(path, images, "val")
    escaping = {item["id"]: item for item in reader.items() if item["id"] in (20, 21)}
    with pytest.raises(InputError, match=r"image 20: file_name '\.\./x\.jpg' leads outside the image folder"):
        reader.load(escaping[20])
    with pytest.raises(InputError, match=r"image 21: file_name '/.*/abs/y\.jpg' leads outside"):
        reader.load(escaping[21])
    skipped = reader.load_or_skip(escaping[20])
    assert isinstance(skipped, Skipped) and "'../x.jpg' leads outside" in skipped.reason


def test_file_names_that_sanitise_alike_get_keys_hashed_from_their_image_ids(coco):
    path, images = coco
    save_jpeg(images / "a.png")
    data = json.loads(path.read_text())
    data["images"].append({"id": 30, "file_name": "a.png", "width": W, "height": H})
    path.write_text(json.dumps(data))
    reader = COCOReader(path, images, "val")
    keys = {item["id"]: item["key"] for item in reader.items()}
    assert (keys[10], keys[30], keys[11]) == ("a_b1d57811", "a_22d200f8", "b")  # a_ + sha1("10")[:8], sha1("30")
    assert reader.renamed == {"10": "a_b1d57811", "30": "a_22d200f8"}


# --- real COCO samples ----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_coco2014_missing_images_are_skipped_and_the_present_one_loads():
    root = needs_realdata("coco2014")
    reader = COCOReader(root / "annotations" / "instances_val2014_100.json", root / "val2014", "val")
    assert len(reader.classes) == 80 and reader.classes[0] == "person"
    results = [reader.load_or_skip(item) for item in reader.items()]
    skipped = [r for r in results if isinstance(r, Skipped)]
    loaded = [r for r in results if not isinstance(r, Skipped)]
    assert len(skipped) == 99 and all("image file missing" in s.reason for s in skipped)
    [sample] = loaded
    assert sample.key == "COCO_val2014_000000000785"
    assert [reader.classes[c] for c in sample.labels] == ["person", "skis"]
    assert (sample.width, sample.height) == (640, 425)
    assert set(np.unique(sample.seg).tolist()) == {0, 1, reader.classes.index("skis") + 1}


@pytest.mark.realdata
def test_real_coco2017_empty_image_and_crowd_rle():
    root = needs_realdata("coco2017", "icevision_coco")
    reader = COCOReader(root / "annotations.json", root / "images", "val")
    samples = {s.key: s for s in reader}
    assert len(samples) == 6 and not any(isinstance(s, Skipped) for s in samples.values())
    assert samples["000000000089"].labels == []
    crowd = samples["000000464689"]
    assert [reader.classes[c] for c in crowd.labels] == ["bottle"]
    assert (crowd.seg == 255).sum() > 0
    assert set(np.unique(crowd.seg).tolist()) == {0, reader.classes.index("bottle") + 1, 255}
    assert [reader.classes[c] for c in samples["000000128372"].labels] == ["person", "car", "bus", "handbag"]
