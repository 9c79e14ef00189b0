"""Ingest into a real SeaweedFS (S3) and read back: the issue's "done when" checks, plus bad storage input."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image

from pipeline import storage
from pipeline.data import shards

pytestmark = pytest.mark.s3


def wysiwyc(env, *args, check=True):
    return cli(*args, env=env, check=check)


@pytest.fixture
def cli_env(s3_server):
    import os

    return {**os.environ, **s3_server.env}


def read_all(spec, opts, image_size=32, ranks=1, workers=0):
    samples = []
    for rank in range(ranks):
        ds = shards.ShardDataset(spec, image_size=image_size, train=False, rank=rank, world_size=ranks, opts=opts)
        if workers:
            for batch in shards.make_loader(ds, batch_size=1, num_workers=workers):
                samples.append({k: (v[0] if k != "key" else v[0]) for k, v in batch.items()})
        else:
            samples.extend(ds)
    return samples


def raw_members(spec, opts):
    """{key: {ext: bytes}} of every sample in the split, straight from the tar shards."""
    import tarfile

    out = {}
    manifest = shards.read_manifest(spec, opts)
    for url in manifest["shard_urls"]:
        with storage.open_read(url, opts) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_voc_folder_to_s3_labels_equal_xml_and_seg_equals_png(tmp_path, s3_server, s3_bucket, cli_env):
    from pipeline.data.classes import SYNTHETIC_CLASSES
    from pipeline.data.synthetic import write_voc_folder

    root = tmp_path / "VOCdevkit" / "VOC2007"
    write_voc_folder(root, num_images=30, seed=4, size=48)
    ids = (root / "ImageSets/Main/train.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # one bad image
    out = f"s3://{s3_bucket}/voc"
    proc = wysiwyc(
        cli_env,
        "ingest",
        "voc",
        "--source",
        str(tmp_path / "VOCdevkit"),
        "--split",
        "train",
        "--out",
        out,
        "--shard-size",
        "7",
        "--classes",
        ",".join(SYNTHETIC_CLASSES),
        "--json",
    )
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == len(ids) - 1 and summary["skipped"] == 1
    assert summary["manifest"] == f"{out}/train.manifest.json"
    manifest = shards.read_manifest(f"{out}/train", s3_server.opts)
    assert manifest["skipped"][0]["key"] == ids[3] and "JPEGImages" in manifest["skipped"][0]["reason"]

    members = raw_members(f"{out}/train", s3_server.opts)
    assert sorted(members) == sorted(i for i in ids if i != ids[3])
    for key, files in members.items():
        xml = ET.parse(root / "Annotations" / f"{key}.xml").getroot()
        names = {o.findtext("name").strip() for o in xml.iter("object")}
        meta = json.loads(files["json"])
        assert meta["labels"] == sorted(SYNTHETIC_CLASSES.index(n) for n in names)
        png = np.array(Image.open(root / "SegmentationClass" / f"{key}.png"))
        assert np.array_equal(np.array(Image.open(__import__("io").BytesIO(files["seg.png"]))), png)
        assert files["jpg"] == (root / "JPEGImages" / f"{key}.jpg").read_bytes()  # source bytes kept


def test_reading_s3_shards_with_two_ranks_and_two_workers_yields_each_sample_once(s3_server, s3_bucket, cli_env):
    out = f"s3://{s3_bucket}/syn"
    wysiwyc(
        cli_env,
        "ingest",
        "synthetic",
        "--num-images",
        "32",
        "--seed",
        "0",
        "--split",
        "train",
        "--out",
        out,
        "--shard-size",
        "4",
        "--image-size",
        "32",
        "--json",
    )
    samples = read_all(f"{out}/train", s3_server.opts, ranks=2, workers=2)
    keys = [s["key"] for s in samples]
    assert len(keys) == 32 and len(set(keys)) == 32


def test_coco_to_s3_labels_equal_annotations(realdata, s3_server, s3_bucket, cli_env):
    base = realdata / "coco2017" / "icevision_coco"
    out = f"s3://{s3_bucket}/coco"
    proc = wysiwyc(
        cli_env,
        "ingest",
        "coco",
        "--annotations",
        str(base / "annotations.json"),
        "--images",
        str(base / "images"),
        "--split",
        "val",
        "--out",
        out,
        "--json",
    )
    summary = json.loads(proc.stdout)
    doc = json.loads((base / "annotations.json").read_text())
    assert summary["num_samples"] == len(doc["images"]) == 6 and summary["skipped"] == 0
    cat_ids = sorted(c["id"] for c in doc["categories"])
    manifest = shards.read_manifest(f"{out}/val", s3_server.opts)
    assert manifest["classes"] == [next(c["name"] for c in doc["categories"] if c["id"] == i) for i in cat_ids]
    by_file = {im["file_name"]: im["id"] for im in doc["images"]}
    members = raw_members(f"{out}/val", s3_server.opts)
    assert len(members) == 6
    for files in members.values():
        meta = json.loads(files["json"])
        image_id = by_file[Path(meta["source"]).name]
        expected = sorted({cat_ids.index(a["category_id"]) for a in doc["annotations"] if a["image_id"] == image_id})
        assert meta["labels"] == expected
        seg = np.array(Image.open(__import__("io").BytesIO(files["seg.png"])))
        assert (seg.shape[1], seg.shape[0]) == (meta["width"], meta["height"])
        present = set(np.unique(seg).tolist()) - {0, 255}
        assert present == {c + 1 for c in expected}


def test_missing_bucket_is_a_clear_error(s3_server, cli_env, tmp_path):
    proc = wysiwyc(
        cli_env,
        "ingest",
        "synthetic",
        "--num-images",
        "2",
        "--seed",
        "0",
        "--split",
        "train",
        "--out",
        "s3://no-such-bucket-xyz/p",
        check=False,
    )
    assert proc.returncode == 2
    assert "no-such-bucket-xyz" in proc.stderr and "does not exist" in proc.stderr


def test_wrong_credentials_are_rejected_without_leaking_the_secret(s3_server, s3_bucket, cli_env):
    env = {**cli_env, "AWS_SECRET_ACCESS_KEY": "WRONGsecretVALUE123"}
    proc = wysiwyc(
        env,
        "ingest",
        "synthetic",
        "--num-images",
        "2",
        "--seed",
        "0",
        "--split",
        "train",
        "--out",
        f"s3://{s3_bucket}/p",
        "--json",
        check=False,
    )
    assert proc.returncode == 2
    assert "credentials" in proc.stderr.lower()
    assert "WRONGsecretVALUE123" not in proc.stderr + proc.stdout


def test_config_credentials_work_and_never_appear_in_outputs(s3_server, s3_bucket, cli_env):
    env = {k: v for k, v in cli_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    out = f"s3://{s3_bucket}/cfgcreds"
    proc = wysiwyc(
        env,
        "ingest",
        "synthetic",
        "--num-images",
        "4",
        "--seed",
        "0",
        "--split",
        "train",
        "--out",
        out,
        "--json",
        f"storage.access_key_id={s3_server.access_key}",
        f"storage.secret_access_key={s3_server.secret_key}",
        f"storage.endpoint_url={s3_server.endpoint}",
    )
    assert json.loads(proc.stdout)["num_samples"] == 4
    manifest_text = storage.read_bytes(f"{out}/train.manifest.json", s3_server.opts).decode()
    for text in (proc.stdout, proc.stderr, manifest_text):
        assert s3_server.secret_key not in text


def test_prefix_with_shards_is_refused_unless_overwrite(s3_server, s3_bucket, cli_env):
    out = f"s3://{s3_bucket}/twice"
    args = ["ingest", "synthetic", "--num-images", "4", "--seed", "0", "--split", "train", "--out", out]
    wysiwyc(cli_env, *args)
    proc = wysiwyc(cli_env, *args, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    wysiwyc(cli_env, *args, "--overwrite")


def test_images_prefix_on_s3_to_shards_keeps_sources_and_skips_bad_objects(s3_server, s3_bucket, cli_env):
    import io

    def jpeg(color, size):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="JPEG")
        return buf.getvalue()

    corpus = f"s3://{s3_bucket}/corpus"
    storage.write_bytes(f"{corpus}/a/one.jpg", jpeg("red", (40, 30)), s3_server.opts)
    storage.write_bytes(f"{corpus}/a/two.JPEG", jpeg("blue", (20, 20)), s3_server.opts)
    storage.write_bytes(f"{corpus}/b/three.png", jpeg("green", (10, 12)), s3_server.opts)  # JPEG bytes, .png name
    storage.write_bytes(f"{corpus}/b/empty.jpg", b"", s3_server.opts)
    storage.write_bytes(f"{corpus}/b/notes.txt", b"not an image", s3_server.opts)
    out = f"s3://{s3_bucket}/corpus-shards"
    proc = wysiwyc(cli_env, "ingest", "images", "--source", corpus + "/", "--out", out, "--json")
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == 3 and summary["skipped"] == 1
    manifest = shards.read_manifest(f"{out}/images", s3_server.opts)
    assert manifest["skipped"][0]["source"] == f"{corpus}/b/empty.jpg"
    metas = [json.loads(files["json"]) for files in raw_members(f"{out}/images", s3_server.opts).values()]
    assert sorted(m["source"] for m in metas) == [
        f"{corpus}/a/one.jpg",
        f"{corpus}/a/two.JPEG",
        f"{corpus}/b/three.png",
    ]
    assert {(m["width"], m["height"]) for m in metas} == {(40, 30), (20, 20), (10, 12)}
    assert all(m["labels"] == [] for m in metas)
