"""VOCReader: folder detection, labels from XML, masks, and every kind of bad input."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.classes import VOC_CLASSES
from pipeline.data.ingest import ingest
from pipeline.data.sample import Skipped, safe_key
from pipeline.data.shards import ShardDataset
from pipeline.data.voc import VOCReader, find_voc_root, voc_colormap
from pipeline.errors import InputError, WysiwycError

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"

CHAIR, DOG, PERSON, CAT = (VOC_CLASSES.index(c) for c in ("chair", "dog", "person", "cat"))


def needs_realdata(*parts: str) -> Path:
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real VOC samples not found at {path} (../shared/realdata beside the repo)")
    return path


def jpeg_bytes(width: int = 32, height: int = 24, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def xml_text(objects: list[tuple[str, int]], size: tuple[int, int] | None = (32, 24)) -> str:
    """An annotation XML with ``(name, difficult)`` objects."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for name, difficult in objects
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{size_xml}{body}</annotation>"


def palette_png(values: np.ndarray) -> bytes:
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    im.putpalette(voc_colormap().reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def add_image(
    year: Path,
    image_id: str,
    objects,
    jpeg: bytes | None = None,
    xml: str | None = None,
    mask: np.ndarray | None = None,
) -> None:
    (year / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (year / "Annotations").mkdir(parents=True, exist_ok=True)
    (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg_bytes() if jpeg is None else jpeg)
    (year / "Annotations" / f"{image_id}.xml").write_text(xml_text(objects) if xml is None else xml)
    if mask is not None:
        (year / "SegmentationClass").mkdir(exist_ok=True)
        (year / "SegmentationClass" / f"{image_id}.png").write_bytes(palette_png(mask))


def write_split(year: Path, split: str, ids: list[str], image_set: str = "Main") -> None:
    folder = year / "ImageSets" / image_set
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """``tmp/VOCdevkit/VOC2007`` with a dog+person (person difficult) image with a mask, and a cat."""
    year = tmp_path / "VOCdevkit" / "VOC2007"
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[2:10, 2:12] = DOG + 1
    mask[12:20, 14:30] = PERSON + 1
    mask[10, :] = 255
    add_image(year, "000001", [("dog", 0), ("person", 1)], mask=mask)
    add_image(year, "000002", [("cat", 0)])
    write_split(year, "train", ["000001", "000002"])
    return year


def test_root_is_found_from_the_year_folder_its_devkit_or_the_folder_above(voc: Path):
    assert find_voc_root(voc) == voc
    assert find_voc_root(voc.parent) == voc
    assert find_voc_root(voc.parent.parent) == voc


def test_several_year_folders_are_an_error_naming_them(voc: Path):
    add_image(voc.parent / "VOC2012", "x", [("cat", 0)])
    with pytest.raises(WysiwycError, match="several VOC folders") as info:
        VOCReader(voc.parent, "train")
    assert "VOC2007" in str(info.value) and "VOC2012" in str(info.value)


def test_folder_without_voc_layout_is_an_error(tmp_path: Path):
    with pytest.raises(WysiwycError, match="no JPEGImages"):
        VOCReader(tmp_path, "train")


def test_labels_are_sorted_class_indices_with_difficult_counted_by_default(voc: Path):
    reader = VOCReader(voc, "train")
    assert reader.items() == ["000001", "000002"]
    first, second = (reader.load(i) for i in reader.items())
    assert first.labels == [DOG, PERSON]
    assert second.labels == [CAT]
    assert (first.key, first.ext, first.width, first.height) == ("000001", "jpg", 32, 24)
    assert first.source == str(voc / "JPEGImages" / "000001.jpg")


def test_image_bytes_are_the_source_jpeg_bytes(voc: Path):
    sample = VOCReader(voc, "train").load("000001")
    assert sample.image == (voc / "JPEGImages" / "000001.jpg").read_bytes()


def test_mask_gives_palette_indices_with_void_kept(voc: Path):
    seg = VOCReader(voc, "train").load("000001").seg
    assert seg.dtype == np.uint8 and seg.shape == (24, 32)
    assert set(np.unique(seg).tolist()) == {0, DOG + 1, PERSON + 1, 255}
    assert int((seg == DOG + 1).sum()) == 8 * 10
    assert int((seg == 255).sum()) == 32


def test_image_without_mask_has_no_seg_and_segmentation_off_drops_masks(voc: Path):
    assert VOCReader(voc, "train").load("000002").seg is None
    assert VOCReader(voc, "train", segmentation="off").load("000001").seg is None


def test_required_segmentation_makes_a_missing_mask_an_input_error(voc: Path):
    with pytest.raises(InputError, match="000002.png"):
        VOCReader(voc, "train", segmentation="require").load("000002")


def test_dropping_difficult_objects_drops_their_label_and_voids_their_pixels(voc: Path):
    sample = VOCReader(voc, "train", use_difficult=False).load("000001")
    assert sample.labels == [DOG]
    assert not (sample.seg == PERSON + 1).any()
    assert int((sample.seg == 255).sum()) == 32 + 8 * 16


def test_object_name_not_in_class_list_is_an_input_error_naming_file_name_and_classes(voc: Path):
    add_image(voc, "000003", [("dog", 0), ("unicorn", 0)])
    with pytest.raises(InputError) as info:
        VOCReader(voc, "train").load("000003")
    message = str(info.value)
    assert "000003.xml" in message and "'unicorn'" in message and "aeroplane" in message


def test_unknown_class_ignore_drops_the_object(voc: Path):
    add_image(voc, "000003", [("dog", 0), ("unicorn", 0)])
    assert VOCReader(voc, "train", unknown_class="ignore").load("000003").labels == [DOG]


def test_names_with_stray_whitespace_or_case_still_match(voc: Path):
    add_image(voc, "000003", [("\n\t  dog  \n", 0), ("Person", 0)])
    assert VOCReader(voc, "train").load("000003").labels == [DOG, PERSON]


def test_given_class_list_reorders_labels_and_remaps_the_mask(voc: Path):
    reader = VOCReader(voc, "train", classes=["person", "dog"], unknown_class="ignore")
    sample = reader.load("000001")
    assert sample.labels == [0, 1]
    assert set(np.unique(sample.seg).tolist()) == {0, 1, 2, 255}
    assert int((sample.seg == 2).sum()) == 8 * 10  # dog is now class 1 → value 2
    assert reader.load("000002").labels == []  # cat is not in the list: ignored


def test_missing_xml_is_an_input_error_naming_it(voc: Path):
    (voc / "Annotations" / "000002.xml").unlink()
    with pytest.raises(InputError, match=r"000002\.xml: annotation XML missing"):
        VOCReader(voc, "train").load("000002")


def test_malformed_xml_is_an_input_error_naming_it(voc: Path):
    (voc / "Annotations" / "000002.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(InputError, match=r"000002\.xml: malformed XML"):
        VOCReader(voc, "train").load("000002")


def test_xml_with_another_root_element_is_an_input_error(voc: Path):
    (voc / "Annotations" / "000002.xml").write_text("<html><body/></html>")
    with pytest.raises(InputError, match="expected <annotation>"):
        VOCReader(voc, "train").load("000002")


def test_truncated_jpeg_is_an_input_error(voc: Path):
    data = jpeg_bytes(64, 64)
    (voc / "JPEGImages" / "000002.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"000002\.jpg: truncated"):
        VOCReader(voc, "train").load("000002")


def test_non_image_and_empty_jpeg_are_input_errors(voc: Path):
    reader = VOCReader(voc, "train")
    (voc / "JPEGImages" / "000002.jpg").write_bytes(b"<html>not a picture</html>")
    with pytest.raises(InputError, match="not an image"):
        reader.load("000002")
    (voc / "JPEGImages" / "000002.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        reader.load("000002")


def test_missing_jpeg_is_an_input_error_and_load_or_skip_records_it(voc: Path):
    (voc / "JPEGImages" / "000002.jpg").unlink()
    reader = VOCReader(voc, "train")
    with pytest.raises(InputError, match="image file missing"):
        reader.load("000002")
    skipped = reader.load_or_skip("000002")
    assert isinstance(skipped, Skipped)
    assert skipped.key == "000002" and skipped.source.endswith("000002.jpg")


def test_mask_of_another_size_is_an_input_error(voc: Path):
    (voc / "SegmentationClass" / "000001.png").write_bytes(palette_png(np.zeros((10, 10), np.uint8)))
    with pytest.raises(InputError, match="mask is 10x10 but the image is 32x24"):
        VOCReader(voc, "train").load("000001")


def test_mask_value_beyond_the_classes_is_an_input_error(voc: Path):
    mask = np.zeros((24, 32), np.uint8)
    mask[0, 0] = 77
    (voc / "SegmentationClass" / "000001.png").write_bytes(palette_png(mask))
    with pytest.raises(InputError, match=r"mask values \[77\]"):
        VOCReader(voc, "train").load("000001")


def test_missing_split_is_an_error_naming_the_path_and_the_splits_that_exist(voc: Path):
    write_split(voc, "val", ["000002"], image_set="Segmentation")
    write_split(voc, "aeroplane_train", ["000002"])  # class-specific lists are not offered as splits
    with pytest.raises(WysiwycError) as info:
        VOCReader(voc, "test").items()
    message = str(info.value)
    assert str(voc / "ImageSets" / "Main" / "test.txt") in message
    assert "does not exist" in message and "splits found: train, val" in message


def test_empty_split_is_an_error_naming_the_path(voc: Path):
    write_split(voc, "test", [])
    with pytest.raises(WysiwycError, match=r"test\.txt is empty; splits found: test, train"):
        VOCReader(voc, "test").items()


def test_split_prefers_main_unless_segmentation_is_asked_for(voc: Path):
    write_split(voc, "train", ["000001"], image_set="Segmentation")
    write_split(voc, "segonly", ["000001"], image_set="Segmentation")
    assert VOCReader(voc, "train").items() == ["000001", "000002"]
    assert VOCReader(voc, "train", image_set="segmentation").items() == ["000001"]
    assert VOCReader(voc, "segonly").items() == ["000001"]  # auto falls back when Main has no list
    with pytest.raises(WysiwycError, match="does not exist"):
        VOCReader(voc, "segonly", image_set="main").items()


def test_split_lines_take_the_first_column_and_drop_duplicates(voc: Path):
    (voc / "ImageSets" / "Main" / "dog_train.txt").write_text("000001  1\n000002 -1\n\n000001  1\n")
    assert VOCReader(voc, "dog_train").items() == ["000001", "000002"]


def test_xml_without_size_takes_the_size_from_the_image(voc: Path):
    add_image(voc, "000004", [], jpeg=jpeg_bytes(40, 30), xml=xml_text([("cat", 0)], size=None))
    sample = VOCReader(voc, "train").load("000004")
    assert (sample.width, sample.height, sample.labels) == (40, 30, [CAT])


def test_folder_class_file_defines_the_classes(tmp_path: Path):
    add_image(tmp_path, "a", [("blob", 0)], mask=np.full((24, 32), 2, np.uint8))
    (tmp_path / "classes.txt").write_text("thing\nblob\n")
    write_split(tmp_path, "train", ["a"])
    reader = VOCReader(tmp_path, "train")
    assert reader.classes == ["thing", "blob"]
    sample = reader.load("a")
    assert sample.labels == [1] and set(np.unique(sample.seg).tolist()) == {2}


def test_bad_options_and_duplicate_classes_are_errors(voc: Path):
    with pytest.raises(WysiwycError, match="segmentation='sometimes'"):
        VOCReader(voc, "train", segmentation="sometimes")
    with pytest.raises(WysiwycError, match="more than once"):
        VOCReader(voc, "train", classes=["dog", "dog"])


def test_reader_survives_pickling_for_worker_processes(voc: Path):
    reader = pickle.loads(pickle.dumps(VOCReader(voc, "train")))
    assert reader.load("000001").labels == [DOG, PERSON]


def test_ids_that_sanitise_alike_get_stable_distinct_keys_listed_in_the_manifest(voc: Path, tmp_path: Path):
    add_image(voc, "img.1", [("dog", 0)])
    add_image(voc, "img_1", [("cat", 0)])
    write_split(voc, "dup", ["img.1", "img_1", "000002"])
    expected = {"img.1": "img_1_04b9aa6a", "img_1": "img_1_ef298af0"}  # _ + sha1(id)[:8]
    for out, workers in ((tmp_path / "a", 1), (tmp_path / "b", 2)):  # 2: keys survive the worker processes
        summary = ingest(VOCReader(voc, "dup"), str(out), "dup", IngestConfig(workers=workers), progress=False)
        manifest = json.loads((out / "dup.manifest.json").read_text())
        assert summary["num_samples"] == 3 and summary["renamed_keys"] == 2 and manifest["renamed"] == expected
        # the shard reads back (it used to fail with "duplicate file name"), both samples with their labels
        read = {
            s["key"]: s["labels"].nonzero().flatten().tolist()
            for s in ShardDataset(str(out / "dup"), image_size=16, train=False)
        }
        assert read == {"img_1_04b9aa6a": [DOG], "img_1_ef298af0": [CAT], "000002": [CAT]}
    ((a,), (b,)) = ((tmp_path / "a").glob("dup-*.tar"), (tmp_path / "b").glob("dup-*.tar"))
    assert a.read_bytes() == b.read_bytes()


def test_an_id_that_spells_another_ids_disambiguated_key_is_an_error_naming_both(voc: Path):
    write_split(voc, "clash", ["img.1", "img_1", "img_1_04b9aa6a"])
    with pytest.raises(WysiwycError, match="inputs 'img.1' and 'img_1_04b9aa6a' get the same sample key"):
        VOCReader(voc, "clash").items()


def test_split_ids_leading_outside_the_image_folder_are_refused(voc: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    for folder, name in ((voc, "x"), (outside, "y")):  # readable image + XML where the id points
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes())
        (folder / f"{name}.xml").write_text(xml_text([("cat", 0)]))
    bad = ["../x", str(outside / "y")]
    write_split(voc, "escape", ["000001", *bad, "000002"])
    reader = VOCReader(voc, "escape")
    for image_id in bad:
        with pytest.raises(InputError, match=f"image id '{re.escape(image_id)}' in .*escape.txt leads outside"):
            reader.load(image_id)
    summary = ingest(reader, str(tmp_path / "skip"), "escape", IngestConfig(workers=1), progress=False)
    manifest = json.loads((tmp_path / "skip" / "escape.manifest.json").read_text())
    assert summary["num_samples"] == 2 and summary["skipped"] == 2
    assert [s["key"] for s in manifest["skipped"]] == ["x", safe_key(str(outside / "y"))]
    assert all(f"image id '{i}'" in s["reason"] for i, s in zip(bad, manifest["skipped"]))
    with pytest.raises(WysiwycError, match=r"image id '\.\./x'.*--on-error fail: nothing was published"):
        ingest(reader, str(tmp_path / "fail"), "escape", IngestConfig(workers=1, on_error="fail"), progress=False)
    assert not list((tmp_path / "fail").glob("*"))


# --- real VOC samples -----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_voc2007_test_split_labels_and_difficult_chairs():
    year = needs_realdata("voc2007", "VOCdevkit", "VOC2007")
    reader = VOCReader(year, "test")
    assert reader.items() == ["000001", "000002", "000003", "000004", "000005"]
    samples = {s.key: s for s in reader}
    assert all(not isinstance(s, Skipped) for s in samples.values())
    assert samples["000001"].labels == [DOG, PERSON]
    assert (samples["000001"].width, samples["000001"].height) == (353, 500)
    assert samples["000005"].labels == [CHAIR]
    assert samples["000001"].image == (year / "JPEGImages" / "000001.jpg").read_bytes()
    # 000005 has five chairs, two of them difficult: the label stays when difficult ones are dropped
    assert VOCReader(year, "test", use_difficult=False).load("000005").labels == [CHAIR]


@pytest.mark.realdata
def test_real_voc_devkit_with_two_years_asks_which_one():
    devkit = needs_realdata("voc2007", "VOCdevkit")
    with pytest.raises(WysiwycError, match="several VOC folders"):
        VOCReader(devkit, "test")
    assert VOCReader(devkit / "VOC2012", "test").load("2007_000032").labels == [
        VOC_CLASSES.index("aeroplane"),
        PERSON,
    ]


@pytest.fixture
def icevision_voc(tmp_path: Path) -> Path:
    """The icevision VOC samples (no ImageSets) with a split list built beside links to them."""
    source = needs_realdata("voc_seg", "icevision_voc")
    for sub in ("JPEGImages", "Annotations", "SegmentationClass"):
        (tmp_path / sub).symlink_to(source / sub, target_is_directory=True)
    write_split(tmp_path, "train", ["2007_000063", "2011_003353"])
    return tmp_path


@pytest.mark.realdata
def test_real_voc_mask_2007_000063_has_the_known_pixel_counts(icevision_voc: Path):
    sample = VOCReader(icevision_voc, "train").load("2007_000063")
    assert sample.labels == [CHAIR, DOG]
    values, counts = np.unique(sample.seg, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0: 72224, 9: 78930, 12: 27632, 255: 8714}
    assert (sample.width, sample.height) == (500, 375)


@pytest.mark.realdata
def test_real_voc2011_action_xml_with_reordered_fields_parses(icevision_voc: Path):
    # <filename> before <folder>, no <truncated>, an <actions> block, a <point>, size at the end
    sample = VOCReader(icevision_voc, "train").load("2011_003353")
    assert sample.labels == [PERSON]
    assert (sample.width, sample.height) == (375, 500)
    assert sample.seg is None
