"""SyntheticReader: determinism, exact ground truth, class-independent colours, VOC export."""

from __future__ import annotations

import io
import pickle
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.classes import SYNTHETIC_CLASSES
from pipeline.data.sample import decode_png
from pipeline.data.synthetic import SyntheticReader, write_voc_folder
from pipeline.data.voc import VOCReader
from pipeline.errors import WysiwycError


@pytest.fixture(scope="module")
def rendered_200():
    reader = SyntheticReader(200, seed=7, split="train")
    return reader, [reader.render(i) for i in range(200)]


def test_same_seed_split_and_index_give_the_same_bytes_in_any_order():
    a = SyntheticReader(20, seed=3, split="train")
    b = SyntheticReader(20, seed=3, split="train")
    forward = [a.load(i).image for i in range(20)]
    backward = [b.load(i).image for i in reversed(range(20))][::-1]
    assert forward == backward
    copy = pickle.loads(pickle.dumps(a))  # as in a worker process
    assert copy.load(11).image == forward[11]
    assert np.array_equal(copy.load(11).seg, a.load(11).seg)


def test_other_seed_or_split_gives_other_images():
    base = SyntheticReader(5, seed=3, split="train").load(2).image
    assert SyntheticReader(5, seed=4, split="train").load(2).image != base
    assert SyntheticReader(5, seed=3, split="val").load(2).image != base
    assert len({SyntheticReader(5, seed=3, split="train").load(i).image for i in range(5)}) == 5


def test_seg_is_exactly_where_each_object_colour_is_visible(rendered_200):
    reader, rendered = rendered_200
    for r in rendered:
        assert r.image.shape == (64, 64, 3) and r.seg.shape == (64, 64)
        assert not r.seg[r.instances == 0].any()  # no object visible → background
        for j, obj in enumerate(r.objects):
            visible = r.instances == j + 1
            assert visible.sum() == obj.visible > 0
            assert (r.seg[visible] == obj.label + 1).all()
            assert (r.image[visible] == obj.colour).all()
            assert obj.shape == reader.classes[obj.label]


def test_labels_are_the_classes_visible_in_seg(rendered_200):
    reader, rendered = rendered_200
    for i, r in enumerate(rendered[:50]):
        sample = reader.load(i)
        assert sample.labels == r.labels
        assert sample.labels == sorted(int(v) - 1 for v in np.unique(sample.seg) if v)
        assert np.array_equal(sample.seg, r.seg)
        assert np.array_equal(decode_png(sample.image), r.image)  # PNG is lossless


def test_earlier_objects_stay_mostly_visible_when_overlapped(rendered_200):
    reader, rendered = rendered_200
    shares = [o.visible / o.area for r in rendered for o in r.objects]
    assert min(shares) >= reader.min_visible
    assert any(share < 1.0 for share in shares)  # overlaps do happen


def test_one_to_three_objects_and_every_class_and_multiple_labels_occur(rendered_200):
    _, rendered = rendered_200
    objects = Counter(len(r.objects) for r in rendered)
    assert set(objects) == {1, 2, 3}
    labels = Counter(len(r.labels) for r in rendered)
    assert labels[2] + labels[3] >= 40
    per_class = Counter(o.label for r in rendered for o in r.objects)
    assert sorted(per_class) == list(range(len(SYNTHETIC_CLASSES)))
    assert min(per_class.values()) >= 40


def test_object_colour_does_not_depend_on_its_class(rendered_200):
    _, rendered = rendered_200
    colours: dict[int, list] = {}
    for r in rendered:
        for o in r.objects:
            colours.setdefault(o.label, []).append(o.colour)
    overall = np.concatenate([np.array(c) for c in colours.values()]).mean(axis=0)
    for label, values in colours.items():
        values = np.array(values, dtype=float)
        # each class spans the colour cube: a mean near the overall mean and a wide spread
        assert np.abs(values.mean(axis=0) - overall).max() < 30, label
        assert (values.std(axis=0) > 55).all(), label
    # a nearest-class-mean colour classifier is no better than chance (1/6) plus a margin
    means = {label: np.array(v, float).mean(axis=0) for label, v in colours.items()}
    hits = total = 0
    for label, values in colours.items():
        for colour in values:
            guess = min(means, key=lambda k: np.linalg.norm(means[k] - colour))
            hits += guess == label
            total += 1
    assert hits / total < 1 / len(colours) + 0.12


def test_background_is_cluttered_not_flat(rendered_200):
    _, rendered = rendered_200
    r = rendered[0]
    background = r.image[r.instances == 0].astype(float)
    assert background.std(axis=0).min() > 10
    assert len(np.unique(background, axis=0)) > 500


def test_image_size_format_and_class_options():
    sample = SyntheticReader(2, seed=0, split="t", image_size=96).load(0)
    assert (sample.width, sample.height, sample.ext) == (96, 96, "png")
    assert decode_png(sample.image).shape == (96, 96, 3)
    wide = SyntheticReader(2, seed=0, split="t", image_size=(80, 48), image_format="jpeg").load(1)
    assert wide.ext == "jpg" and wide.seg.shape == (48, 80)
    assert Image.open(io.BytesIO(wide.image)).size == (80, 48)
    two = SyntheticReader(30, seed=0, split="t", classes=["ring", "star"])
    assert two.classes == ["ring", "star"]
    assert {o.shape for i in range(30) for o in two.render(i).objects} == {"ring", "star"}


def test_keys_are_unique_without_dots_and_sources_name_the_sample():
    reader = SyntheticReader(3, seed=5, split="val")
    keys = [reader.describe(i)[0] for i in reader.items()]
    assert keys == ["syn_val_000000", "syn_val_000001", "syn_val_000002"]
    assert reader.describe(1)[1] == "synthetic://val?seed=5&size=64x64&index=1"


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(WysiwycError, match="num_images"):
        SyntheticReader(0, seed=0, split="train")
    with pytest.raises(WysiwycError, match="not drawable"):
        SyntheticReader(5, seed=0, split="train", classes=["circle", "dog"])
    with pytest.raises(WysiwycError, match="image_size"):
        SyntheticReader(5, seed=0, split="train", image_size=8)
    with pytest.raises(WysiwycError, match="image_format"):
        SyntheticReader(5, seed=0, split="train", image_format="gif")


def test_generation_is_fast_on_one_core():
    reader = SyntheticReader(150, seed=1, split="bench")
    started = time.perf_counter()
    for i in reader.items():
        reader.load(i)
    rate = 150 / (time.perf_counter() - started)
    assert rate > 60, f"{rate:.0f} images/s"  # ~700/s on an idle core; a loose bound for busy machines


def test_voc_folder_round_trips_through_the_voc_reader(tmp_path: Path):
    root = write_voc_folder(tmp_path / "syn", num_images=12, seed=9, size=48, split="val")
    generator = SyntheticReader(12, seed=9, split="val", image_size=48)
    reader = VOCReader(root, "val")
    assert reader.classes == SYNTHETIC_CLASSES
    assert reader.items() == [f"val_{i:06d}" for i in range(12)]
    assert VOCReader(root, "val", image_set="segmentation").items() == reader.items()
    for i, image_id in enumerate(reader.items()):
        sample = reader.load(image_id)
        rendered = generator.render(i)
        assert sample.labels == rendered.labels
        assert np.array_equal(sample.seg, rendered.seg)
        assert sample.ext == "jpg" and (sample.width, sample.height) == (48, 48)
    # boxes are those of the visible pixels, in VOC 1-based coordinates
    rendered = generator.render(0)
    objects = ET.parse(root / "Annotations" / "val_000000.xml").getroot().findall("object")
    assert [o.findtext("name") for o in objects] == [generator.classes[o.label] for o in rendered.objects]
    ys, xs = np.nonzero(rendered.instances == 1)
    box = objects[0].find("bndbox")
    assert [int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] == [
        xs.min() + 1,
        ys.min() + 1,
        xs.max() + 1,
        ys.max() + 1,
    ]
    with Image.open(root / "SegmentationClass" / "val_000000.png") as mask:
        assert mask.mode == "P"


def test_the_hard_set_has_smaller_objects_more_clutter_and_the_same_exact_ground_truth():
    hard = SyntheticReader(120, seed=7, split="train", difficulty="hard")
    standard = SyntheticReader(120, seed=7, split="train")
    assert hard.source.endswith("&difficulty=hard") and "difficulty" not in standard.source
    h = [hard.render(i) for i in range(120)]
    s = [standard.render(i) for i in range(120)]
    radius = [o.radius / 64 for r in h for o in r.objects]
    assert 0.07 <= min(radius) and max(radius) <= 0.20  # circumradius 7–20% of the side (standard 14–30%)
    assert np.mean([(r.seg > 0).mean() for r in h]) < 0.6 * np.mean([(r.seg > 0).mean() for r in s])
    assert {len(r.objects) for r in h} == {1, 2, 3}
    for r in h:  # the ground truth stays exact: seg is where each object's colour is visible, labels its classes
        assert {int(v) - 1 for v in np.unique(r.seg) if v} == set(r.labels)
        for j, obj in enumerate(r.objects):
            assert (r.image[r.instances == j + 1] == obj.colour).all()
    # clutter: the background away from objects varies more than the standard set's
    spread = [r.image[r.seg == 0].std(axis=0).mean() for r in h]
    assert np.median(spread) > np.median([r.image[r.seg == 0].std(axis=0).mean() for r in s])
    with pytest.raises(WysiwycError, match="difficulty='harder'; use standard or hard"):
        SyntheticReader(1, seed=0, split="x", difficulty="harder")


def test_ingest_synthetic_takes_the_difficulty(tmp_path):
    import json

    from conftest import cli

    out = json.loads(
        cli("ingest", "synthetic", "--num-images", "4", "--seed", "0", "--split", "t", "--out", str(tmp_path),
            "--image-size", "32", "--difficulty", "hard", "--json").stdout
    )  # fmt: skip
    assert out["source"] == "synthetic://t?seed=0&size=32x32&difficulty=hard" and out["num_samples"] == 4
    bad = cli("ingest", "synthetic", "--num-images", "4", "--seed", "0", "--split", "t", "--out", str(tmp_path),
              "--difficulty", "extreme", check=False)  # fmt: skip
    assert bad.returncode == 2 and "difficulty='extreme'; use standard or hard" in bad.stderr
