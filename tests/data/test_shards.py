"""Shard round trip on local storage: manifest contract, atomicity, errors, exactly-once reading."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data import shards
from pipeline.data.ingest import ingest
from pipeline.data.sample import Reader, Sample
from pipeline.errors import InputError, WysiwycError


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class TinyReader(Reader):
    """Item i: an 8×8 image whose left i%8 columns are class (i % 3); items in ``bad`` are unusable."""

    name = "tiny"

    def __init__(self, n, bad=(), size=8):
        self.n, self.bad, self.size = n, set(bad), size
        self.classes = ["a", "b", "c"]
        self.source = "memory://tiny"

    def items(self):
        return list(range(self.n))

    def describe(self, item):
        return f"s{item:04d}", f"memory://tiny/{item}"

    def expected(self, item):
        cls, cols = item % 3, item % self.size
        seg = np.zeros((self.size, self.size), np.uint8)
        seg[:, :cols] = cls + 1
        image = np.zeros((self.size, self.size, 3), np.uint8)
        image[..., 0] = seg * 80
        labels = [cls] if cols else []
        return image, seg, labels

    def load(self, item):
        if item in self.bad:
            raise InputError(f"memory://tiny/{item}: truncated image")
        image, seg, labels = self.expected(item)
        key, source = self.describe(item)
        return Sample(key, png_bytes(image), "png", labels, self.size, self.size, source, seg)


def run(reader, out, split="train", **kw):
    cfg = IngestConfig(**{"workers": 1, **kw})
    return ingest(reader, str(out), split, cfg, progress=False)


def shard(out, index, split="train"):
    """The path of shard ``index`` of ``split`` under ``out`` (its name carries the ingest's own RUN)."""
    (found,) = out.glob(f"{split}-*-{index:06d}.tar")
    return found


def test_manifest_lists_shards_with_counts_sha256_and_skipped(tmp_path):
    result = run(TinyReader(23, bad={4, 9}), tmp_path, shard_size=5)
    manifest = json.loads((tmp_path / "train.manifest.json").read_text())
    assert result["num_samples"] == manifest["num_samples"] == 21
    assert result["skipped"] == manifest["num_skipped"] == 2
    (run_id,) = {s["name"].split("-")[1] for s in manifest["shards"]}  # one ingest, one name of its own
    assert [s["name"] for s in manifest["shards"]] == [f"train-{run_id}-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 1]
    for shard in manifest["shards"]:
        data = (tmp_path / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert manifest["skipped"][0] == {
        "key": "s0004",
        "source": "memory://tiny/4",
        "reason": "memory://tiny/4: truncated image",
    }
    assert manifest["classes"] == ["a", "b", "c"]
    assert manifest["has_segmentation"] is True
    assert manifest["digest"] == shards.dataset_digest(manifest["classes"], manifest["shards"])


def test_sample_members_follow_the_data_contract(tmp_path):
    run(TinyReader(3), tmp_path)
    with tarfile.open(shard(tmp_path, 0)) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("s0002.json").read())
    assert names[:3] == ["s0000.png", "s0000.json", "s0000.seg.png"]
    assert meta == {"id": "s0002", "labels": [2], "width": 8, "height": 8, "source": "memory://tiny/2"}


def test_same_input_gives_byte_identical_shards_and_digest(tmp_path):
    a = run(TinyReader(12), tmp_path / "a", shard_size=4)
    b = run(TinyReader(12), tmp_path / "b", shard_size=4)
    assert a["digest"] == b["digest"]
    assert shard(tmp_path / "a", 2).read_bytes() == shard(tmp_path / "b", 2).read_bytes()
    assert shard(tmp_path / "a", 2).name != shard(tmp_path / "b", 2).name  # each ingest writes objects of its own


def test_max_bytes_rolls_over_to_a_new_shard(tmp_path):
    result = run(TinyReader(10), tmp_path, shard_size=1000, shard_max_bytes=30000)
    manifest = shards.read_manifest(str(tmp_path / "train"))
    assert result["shards"] > 1
    assert all(s["bytes"] <= 30000 for s in manifest["shards"])
    assert sum(s["num_samples"] for s in manifest["shards"]) == 10


def test_on_error_fail_publishes_nothing(tmp_path):
    with pytest.raises(WysiwycError, match=r"memory://tiny/7: truncated image \(--on-error fail"):
        run(TinyReader(20, bad={7}), tmp_path, shard_size=2, on_error="fail")
    assert list(tmp_path.iterdir()) == []


def test_existing_split_is_refused_unless_overwrite(tmp_path):
    run(TinyReader(10), tmp_path, shard_size=2)
    with pytest.raises(WysiwycError, match="already holds split 'train'.*--overwrite"):
        run(TinyReader(4), tmp_path, shard_size=2)
    assert shards.read_manifest(str(tmp_path / "train"))["num_samples"] == 10
    run(TinyReader(4), tmp_path, shard_size=2, overwrite=True)
    manifest = shards.read_manifest(str(tmp_path / "train"))
    assert manifest["num_samples"] == 4
    # the five shards of the earlier split are gone, once the new manifest replaced theirs
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == sorted(s["name"] for s in manifest["shards"])


def test_a_failed_overwrite_leaves_the_old_split_whole(tmp_path):
    """The new shards have names of their own: the old split is read, intact, until the new manifest replaces it
    (the overwrite used to delete the old manifest first, so a failure lost the split)."""
    run(TinyReader(10), tmp_path, shard_size=4)
    before = shards.read_manifest(str(tmp_path / "train"))
    with pytest.raises(WysiwycError, match="on-error fail"):
        run(TinyReader(12, bad={9}), tmp_path, shard_size=4, overwrite=True, on_error="fail")
    assert shards.read_manifest(str(tmp_path / "train")) == before
    keys = [s["key"] for s in shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False)]
    assert len(keys) == 10  # every shard still matches its recorded sha256
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == sorted(s["name"] for s in before["shards"])


def test_other_split_in_same_prefix_is_untouched(tmp_path):
    run(TinyReader(4), tmp_path, "train", shard_size=2)
    run(TinyReader(6), tmp_path, "val", shard_size=2)
    assert shards.read_manifest(str(tmp_path / "train"))["num_samples"] == 4
    assert shards.read_manifest(str(tmp_path / "val.manifest.json"))["num_samples"] == 6


def test_unfinished_ingest_is_invisible_and_rerun_replaces_it(tmp_path):
    run(TinyReader(6), tmp_path, shard_size=2)
    (tmp_path / "train.manifest.json").unlink()  # as if killed before the manifest was written
    with pytest.raises(WysiwycError, match="no shard manifest .*ingest did not finish"):
        shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False)
    run(TinyReader(6), tmp_path, shard_size=2)
    assert shards.read_manifest(str(tmp_path / "train"))["num_samples"] == 6


def test_empty_source_and_all_bad_inputs_are_errors(tmp_path):
    with pytest.raises(WysiwycError, match="empty"):
        run(TinyReader(0), tmp_path)
    with pytest.raises(WysiwycError, match="none of the 3 inputs .* was usable; first: memory://tiny/0"):
        run(TinyReader(3, bad={0, 1, 2}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reading_back_gives_the_written_labels_and_segmentation(tmp_path):
    reader = TinyReader(9)
    run(reader, tmp_path, shard_size=4)
    ds = shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False)
    got = {s["key"]: s for s in ds}
    assert len(got) == 9
    for item in range(9):
        image, seg, labels = reader.expected(item)
        sample = got[f"s{item:04d}"]
        assert torch.equal(sample["seg"], torch.from_numpy(seg).long())
        assert sample["labels"].tolist() == [1.0 if c in labels else 0.0 for c in range(3)]
        assert sample["image"].shape == (3, 8, 8)


def test_resize_keeps_segmentation_aligned_and_flip_moves_both(tmp_path):
    run(TinyReader(8), tmp_path)  # item 4: left 4 of 8 columns are class b
    raw = next(s for s in _raw_samples(shard(tmp_path, 0)) if s["__key__"] == "s0004")
    from pipeline.data.transforms import decode_sample

    plain = decode_sample(raw, image_size=16, num_classes=3)
    flipped = decode_sample(raw, image_size=16, num_classes=3, flip=True)
    assert set(plain["seg"].unique().tolist()) == {0, 2}  # nearest: no blended label values
    assert (plain["seg"][:, :8] == 2).all() and (plain["seg"][:, 8:] == 0).all()
    assert torch.equal(flipped["seg"], plain["seg"].flip(-1))
    assert torch.allclose(flipped["image"], plain["image"].flip(-1))
    # red channel is bright exactly where the object is
    assert plain["image"][0, :, :7].mean() > plain["image"][0, :, 9:].mean() + 1


def _raw_samples(path):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        out = {}
        for m in members:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(out.values())


def test_two_ranks_times_two_workers_read_every_sample_exactly_once(tmp_path):
    run(TinyReader(40), tmp_path, shard_size=5)  # 8 shards
    keys = []
    for rank in range(2):
        ds = shards.ShardDataset(
            str(tmp_path / "train"), image_size=8, train=True, shuffle_buffer=10, rank=rank, world_size=2, seed=3
        )
        ds.set_epoch(1)
        for batch in shards.make_loader(ds, batch_size=4, num_workers=2):
            keys.extend(batch["key"])
    assert len(keys) == 40
    assert sorted(keys) == [f"s{i:04d}" for i in range(40)]


def test_shuffle_changes_order_with_epoch_but_not_content(tmp_path):
    run(TinyReader(30), tmp_path, shard_size=3)
    ds = shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=True, shuffle_buffer=8, seed=0)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        orders.append([s["key"] for s in ds])
    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] != orders[1]


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(tmp_path):
    run(TinyReader(6), tmp_path, shard_size=2)  # 3 shards
    ds = shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False, rank=0, world_size=2)
    with pytest.raises(WysiwycError, match=r"3 shard\(s\) but 2 rank\(s\) × 2 loader worker\(s\) need at least 4"):
        shards.make_loader(ds, batch_size=2, num_workers=2)
    with pytest.raises(WysiwycError, match="smaller --shard-size"):
        shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False, rank=0, world_size=4)


def test_parallel_encoding_gives_the_same_shards_as_one_process(tmp_path):
    from pipeline.data.synthetic import SyntheticReader

    one = run(SyntheticReader(24, 5, "train", image_size=32), tmp_path / "one", shard_size=10, workers=1)
    two = run(SyntheticReader(24, 5, "train", image_size=32), tmp_path / "two", shard_size=10, workers=2)
    assert one["digest"] == two["digest"] and one["num_samples"] == 24


def _truncate_at_member(path, keep_members):
    """The tar cut after its first ``keep_members`` members (a clean member boundary, as a copy killed midway)."""
    with tarfile.open(path) as tar:
        end = tar.getmembers()[keep_members].offset
    data = path.read_bytes()[:end] + b"\0" * 1024  # still a readable tar: its end-of-archive blocks
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated at a member", "manifest count"])
def test_a_shard_that_does_not_match_its_manifest_fails_before_any_of_its_samples(tmp_path, damage):
    run(TinyReader(8), tmp_path, shard_size=4)
    second = shard(tmp_path, 1)
    intact = list(shards.raw_samples([str(second)]))  # bare URLs: read as they are
    assert len(intact) == 4
    if damage == "flipped byte":
        data = bytearray(second.read_bytes())
        data[600] ^= 0x01  # inside the first member's bytes: the tar still reads
        second.write_bytes(bytes(data))
    elif damage == "truncated at a member":
        _truncate_at_member(second, 6)  # 2 of its 4 samples' members are left
        assert len(list(shards.raw_samples([str(second)]))) < 4  # unchecked, it reads fewer, silently
    else:
        manifest_path = tmp_path / "train.manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["shards"][1]["num_samples"] = 5
        manifest_path.write_text(json.dumps(manifest))
    ds = shards.ShardDataset(str(tmp_path / "train"), image_size=8, train=False)
    got = []
    with pytest.raises(WysiwycError) as error:
        for sample in ds:
            got.append(sample["key"])
    message = str(error.value)
    assert str(second) in message and "re-ingest" in message
    expected = "holds 4 samples, its manifest says 5" if damage == "manifest count" else "does not match its manifest"
    assert expected in message
    assert got == ["s0000", "s0001", "s0002", "s0003"]  # the intact first shard, nothing of the second
