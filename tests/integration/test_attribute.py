"""Batch attribution (``pipeline.attribute``) on a real local Ray (2 CPUs), a real SeaweedFS and a model
registered in a real ``mlflow server``.

The corpus: 200 synthetic 32-px PNGs under an ``s3://`` prefix, plus a prefix of odd inputs (grayscale,
RGBA, a truncated JPEG, a zero-byte file, a text file). The models: a freshly built ``small_cnn``
Explanandum (its head scaled so that probabilities spread) and ``compact`` Explainer, registered as
``models:/wysiwyc-attr`` with alias ``champion``. Untrained nets say nothing about quality; what is
pinned here is the contract: one row per image, the classes the rule picks, masks equal to a direct
:class:`~pipeline.models.predictor.Predictor` call (read back through :func:`pipeline.attribute.read_masks`
in both output formats), error rows, resume exactly once, idempotent reruns, drift between runs and their
MLflow runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import classifier_state, cli, environ, explainer_state
from PIL import Image

from pipeline import storage
from pipeline.attribute import attribute, iter_masks, read_index, read_masks
from pipeline.checkpoint import save_checkpoint
from pipeline.config import IngestConfig, load_config
from pipeline.data.classes import SYNTHETIC_CLASSES
from pipeline.data.ingest import ingest
from pipeline.data.shards import read_manifest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.models.predictor import load_predictor

pytestmark = pytest.mark.s3

SIZE = 32
NUM_IMAGES = 200
MODEL_NAME = "wysiwyc-attr"
BIN = Path(sys.executable).parent


def _checkpoints(bucket: str, opts) -> str:
    """An untrained small_cnn + compact pair in the bucket; returns the Explainer checkpoint URI."""
    classes = list(SYNTHETIC_CLASSES)
    classifier = classifier_state(classes, SIZE)
    with torch.no_grad():  # BatchNorm at init keeps features tiny: spread the logits
        classifier["model"]["fc.weight"].mul_(300)
        classifier["model"]["fc.bias"].zero_()
    clf_uri, exp_uri = f"s3://{bucket}/models/classifier.pt", f"s3://{bucket}/models/explainer.pt"
    sha = save_checkpoint(classifier, clf_uri, opts)
    save_checkpoint(explainer_state(classes, SIZE, clf_uri, sha), exp_uri, opts)
    return exp_uri


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _odd_inputs() -> dict[str, bytes]:
    """Two good synthetic images and the odd ones, by file name."""
    reader = SyntheticReader(2, seed=9, split="odd", image_size=SIZE)
    files = {f"good{i}.png": reader.load(i).image for i in range(2)}
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(jpeg, format="JPEG")
    files["corrupt.jpg"] = jpeg.getvalue()[:200]  # truncated
    files["zero.jpg"] = b""
    files["gray.png"] = _png(Image.new("L", (40, 24), 90))
    files["rgba.png"] = _png(Image.new("RGBA", (20, 30), (10, 200, 30, 128)))
    files["readme.txt"] = b"not an image: ignored by the listing"
    return files


def _threshold(probs: torch.Tensor) -> float:
    """A threshold in the widest gap between the direct probabilities (no class sits on the edge)."""
    values = torch.sort(probs.flatten()).values
    inner = [(values[i + 1] - values[i], i) for i in range(len(values) - 1) if 0.2 < values[i] < 0.8]
    gap, i = max(inner)
    assert gap > 1e-3, "the test models give no clear threshold"
    return float((values[i] + values[i + 1]) / 2)


@pytest.fixture(scope="module")
def ctx(s3_server, mlflow_server, ray_cluster):
    """Bucket with corpus, odd inputs and models; the model registered (@champion); the session's Ray."""
    bucket = s3_server.make_bucket("attribute")
    opts = s3_server.opts
    env = {**s3_server.env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # the env before anything reads s3:// through it (registration, Ray workers)
    with environ(env):
        exp_uri = _checkpoints(bucket, opts)
        reader = SyntheticReader(NUM_IMAGES, seed=0, split="corpus", image_size=SIZE)
        corpus = {f"s3://{bucket}/corpus/img_{i:04d}.png": reader.load(i).image for i in range(NUM_IMAGES)}
        odd = {f"s3://{bucket}/odd/{name}": data for name, data in _odd_inputs().items()}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: storage.write_bytes(item[0], item[1], opts), [*corpus.items(), *odd.items()]))
        ingest(
            SyntheticReader(12, seed=4, split="test", image_size=SIZE),
            f"s3://{bucket}/shards",
            "test",
            IngestConfig(workers=1, shard_size=5),
            opts=opts,
            progress=False,
        )

        predictor = load_predictor(exp_uri, opts=opts)  # the direct call the outputs must match
        sources = sorted(corpus)
        x = torch.stack([predictor.preprocess(Image.open(io.BytesIO(corpus[s]))) for s in sources])
        direct = predictor(x)

        from pipeline.registry import register_checkpoint

        registered = register_checkpoint(exp_uri, MODEL_NAME, load_config(None, [f"tracking.uri={mlflow_server.uri}"]))
        mlflow_server.client().set_registered_model_alias(MODEL_NAME, "champion", registered["version"])
        yield {
            "bucket": bucket,
            "opts": opts,
            "s3": s3_server,
            "exp_uri": exp_uri,
            "sources": sources,
            "masks": direct.masks,
            "probs": direct.probs,
            "threshold": _threshold(direct.probs),
            "version": registered["version"],
            "tracking": mlflow_server.uri,
            "mlflow": mlflow_server,
            "odd": odd,
            "gcs": ray_cluster,
        }


def _overrides(ctx, run_id: str, *extra: str) -> list[str]:
    b = ctx["bucket"]
    return [
        f"explainer.checkpoint={ctx['exp_uri']}",
        f"attribute.input=s3://{b}/corpus/",
        f"output=s3://{b}/out",
        f"attribute.run_id={run_id}",
        f"attribute.threshold={ctx['threshold']}",
        "attribute.batch_size=16",
        "attribute.preview_images=4",
        "attribute.shard_size=64",
        f"tracking.uri={ctx['tracking']}",
        *extra,
    ]


def _config(ctx, run_id: str, *extra: str):
    return load_config(None, _overrides(ctx, run_id, *extra))


def _index(ctx, run_id: str, output: str = "out") -> list[dict]:
    """The run's index rows sorted by source (the index is a directory of parts, in chunk order)."""
    rows = read_index(f"s3://{ctx['bucket']}/{output}/{run_id}", ctx["opts"]).to_pylist()
    return sorted(rows, key=lambda r: r["source"])


def _objects(ctx, prefix: str) -> dict[str, tuple[str, str]]:
    """``{key: (etag, last modified)}`` of every object under ``prefix``."""
    pages = ctx["s3"].client().get_paginator("list_objects_v2").paginate(Bucket=ctx["bucket"], Prefix=prefix)
    return {o["Key"]: (o["ETag"], str(o["LastModified"])) for page in pages for o in page.get("Contents", [])}


def _expected_classes(probs: torch.Tensor, threshold: float) -> list[str]:
    """The default rule: classes with p ≥ threshold, most probable first, at least the top-1."""
    order = sorted(range(len(probs)), key=lambda c: -float(probs[c]))
    chosen = [c for c in order if probs[c] >= threshold] or order[:1]
    return [SYNTHETIC_CLASSES[c] for c in chosen]


@pytest.fixture(scope="module")
def champion_run(ctx):
    """The corpus attributed with ``models:/wysiwyc-attr@champion``."""
    summary = attribute(_config(ctx, "main", f"explainer.checkpoint=models:/{MODEL_NAME}@champion"), progress=False)
    return summary, _index(ctx, "main")


def test_index_has_one_row_per_image_with_the_classes_the_rule_picks(ctx, champion_run):
    summary, rows = champion_run
    assert summary["status"] == "complete" and summary["num_samples"] == NUM_IMAGES == summary["num_ok"]
    assert summary["model_uri"] == f"models:/{MODEL_NAME}/{ctx['version']}" and summary["version"] == ctx["version"]
    assert [r["source"] for r in rows] == ctx["sources"]  # one row each
    for i, row in enumerate(rows):
        assert row["status"] == "ok" and row["error"] is None
        assert (row["width"], row["height"]) == (SIZE, SIZE)
        assert (row["model_name"], row["model_version"]) == (MODEL_NAME, ctx["version"])
        np.testing.assert_allclose(row["probs"], ctx["probs"][i].numpy(), atol=1e-4)
        assert row["explained_classes"] == _expected_classes(ctx["probs"][i], ctx["threshold"])
        assert row["predicted_classes"] == [
            c for c in row["explained_classes"] if ctx["probs"][i][SYNTHETIC_CLASSES.index(c)] >= ctx["threshold"]
        ]
    # the rule did pick different class sets across images, including the top-1 floor
    assert len({tuple(r["explained_classes"]) for r in rows}) > 1
    manifest = json.loads(storage.read_bytes(summary["manifest"], ctx["opts"]))
    assert manifest["output_format"] == "shards" and summary["index"].endswith("/out/main/parts")
    # 200 images in shards of 64: 4 plan chunks, 4 output shards, ≤ 2 parts per shard
    assert 4 + 4 + 4 <= summary["output_objects"] <= 4 + 4 + 8 + 4 + 6 + 1
    assert 0 < summary["peak_rss_mb"] < 4096 and summary["drift"] is None
    assert manifest["counts"] == {
        "images": NUM_IMAGES,
        "ok": NUM_IMAGES,
        "errors": 0,
        "processed": NUM_IMAGES,
        "resumed": 0,
    }
    assert manifest["model"]["model"] == f"models:/{MODEL_NAME}@champion"
    assert manifest["model"]["model_version"] == ctx["version"]
    record = json.loads(storage.read_bytes(f"s3://{ctx['bucket']}/out/main/_run.json", ctx["opts"]))
    assert record["model"]["model_uri"] == summary["model_uri"]  # the version is pinned for a resume


def _check_masks(ctx, i: int, row: dict, masks) -> None:
    """``masks`` (read back by the reader helper) are the direct call's for image ``i``."""
    assert masks.source == row["source"] == ctx["sources"][i]
    assert masks.names == row["explained_classes"] and masks.classes == row["explained_indices"]
    expected = (ctx["masks"][i, masks.classes] * 255).round().numpy()
    assert masks.masks.dtype == np.uint8 and np.abs(masks.masks.astype(float) - expected).max() <= 1
    np.testing.assert_allclose(row["mask_areas"], ctx["masks"][i, masks.classes].mean((1, 2)).numpy(), atol=1e-4)
    assert np.array_equal(masks.mask, masks.masks.max(axis=0))  # same size here: no resize


def test_packed_masks_round_trip_through_the_reader(ctx, champion_run):
    """Every image's masks come back out of the output shards equal to a direct predictor call."""
    _, rows = champion_run
    assert {r["mask_uri"] for r in rows} == {None} and len({r["output_shard"] for r in rows}) == 4
    assert all(r["output_shard"].startswith(f"s3://{ctx['bucket']}/out/main/shards/shard-") for r in rows)
    by_source = {r["source"]: (i, r) for i, r in enumerate(rows)}
    seen = [m.source for m in iter_masks(f"s3://{ctx['bucket']}/out/main", ctx["opts"])]
    assert sorted(seen) == ctx["sources"]  # every image once
    for masks in iter_masks(f"s3://{ctx['bucket']}/out/main", ctx["opts"]):
        _check_masks(ctx, *by_source[masks.source], masks)
    i, row = by_source[ctx["sources"][7]]  # one image, looked up by its source URI
    _check_masks(ctx, i, row, read_masks(f"s3://{ctx['bucket']}/out/main", ctx["sources"][7], ctx["opts"]))
    with pytest.raises(WysiwycError, match="has no row for it"):
        read_masks(f"s3://{ctx['bucket']}/out/main", "s3://elsewhere/x.png", ctx["opts"])


def test_preview_page_shows_the_first_images(ctx, champion_run):
    summary, rows = champion_run
    page = storage.read_text(summary["preview"], ctx["opts"])
    previews = json.loads(storage.read_bytes(summary["manifest"], ctx["opts"]))["previews"]
    assert [p["source"] for p in previews] == ctx["sources"][:4]  # the plan's first images
    keys = {r["source"]: r["key"] for r in rows}
    for preview in previews:
        assert f'src="previews/{keys[preview["source"]]}.png"' in page
        with Image.open(io.BytesIO(storage.read_bytes(preview["uri"], ctx["opts"]))) as im:
            assert im.size == (2 * 256 + 4, 256)  # mask overlay | masked image, enlarged to 256 px


def test_rerun_of_a_finished_run_rewrites_nothing(ctx, champion_run):
    before = _objects(ctx, "out/main/")
    summary = attribute(_config(ctx, "main", f"explainer.checkpoint=models:/{MODEL_NAME}@champion"), progress=False)
    assert summary["status"] == "already complete" and summary["processed"] == 0
    assert summary["num_samples"] == NUM_IMAGES
    assert _objects(ctx, "out/main/") == before


def test_bad_model_or_missing_input_fails_before_any_work(ctx):
    with pytest.raises(WysiwycError, match="wysiwyc-attr@nope"):
        attribute(_config(ctx, "bad-model", f"explainer.checkpoint=models:/{MODEL_NAME}@nope"), progress=False)
    with pytest.raises(WysiwycError, match="does not exist"):
        attribute(
            _config(ctx, "bad-model", f"explainer.checkpoint=s3://{ctx['bucket']}/models/none.pt"), progress=False
        )
    with pytest.raises(WysiwycError, match="holds nothing"):
        attribute(_config(ctx, "bad-input", f"attribute.input=s3://{ctx['bucket']}/missing/"), progress=False)
    assert _objects(ctx, "out/bad-") == {}


def test_odd_images_get_error_rows_and_grayscale_rgba_succeed(ctx):
    """Format objects: two files per image, the aggregated mask at the image's own size; a rerun writes
    nothing."""
    b = ctx["bucket"]
    config = _config(
        ctx,
        "odd",
        f"attribute.input=s3://{b}/odd",
        "attribute.max_error_fraction=0.5",
        "attribute.output_format=objects",
    )
    summary = attribute(config, progress=False)
    assert (summary["num_samples"], summary["num_ok"], summary["num_errors"]) == (6, 4, 2)
    # 4 × (mask + npz) + 1 plan chunk + 1 part + plan, record, index.html, 4 previews, manifest
    assert summary["output_objects"] == len(_objects(ctx, "out/odd/")) == 8 + 1 + 1 + 3 + 4 + 1
    rows = {r["source"].rsplit("/", 1)[1]: r for r in _index(ctx, "odd")}
    assert set(rows) == {"good0.png", "good1.png", "corrupt.jpg", "zero.jpg", "gray.png", "rgba.png"}
    assert rows["zero.jpg"]["status"] == "error" and "empty file" in rows["zero.jpg"]["error"]
    assert rows["corrupt.jpg"]["status"] == "error" and "truncated" in rows["corrupt.jpg"]["error"]
    for name, size in (("gray.png", (40, 24)), ("rgba.png", (20, 30))):
        row = rows[name]
        assert row["status"] == "ok" and (row["width"], row["height"]) == size
        with Image.open(io.BytesIO(storage.read_bytes(row["mask_uri"], ctx["opts"]))) as mask:
            assert mask.size == size and mask.mode == "L"  # the aggregated mask at the source size
        back = read_masks(f"s3://{b}/out/odd", row["source"], ctx["opts"])
        assert back.mask.shape == size[::-1] and back.names == row["explained_classes"]
    before = _objects(ctx, "out/odd/")
    assert attribute(config, progress=False)["status"] == "already complete"
    assert _objects(ctx, "out/odd/") == before


def test_too_many_bad_images_abort_with_a_clear_message(ctx):
    b = ctx["bucket"]
    with pytest.raises(WysiwycError, match=r"2 of 6 images failed, more than attribute.max_error_fraction=0.1"):
        attribute(
            _config(ctx, "odd-strict", f"attribute.input=s3://{b}/odd", "attribute.max_error_fraction=0.1"),
            progress=False,
        )
    assert "out/odd-strict/_manifest.json" not in _objects(ctx, "out/odd-strict/")


@pytest.mark.slow  # minutes: a kill and a relaunch (`make test-slow`)
@pytest.mark.parametrize("fmt", ["shards", "objects"])
def test_killed_run_relaunched_has_every_image_exactly_once(ctx, fmt):
    run = f"killed-{fmt}"
    extra = (
        "attribute.batch_size=2",
        "attribute.num_actors=1",
        "attribute.shard_size=4",
        f"attribute.output_format={fmt}",
    )
    args = _overrides(ctx, run, *extra)
    env = {**os.environ, "RAY_ADDRESS": ctx["gcs"]}
    proc = subprocess.Popen(
        [str(BIN / "wysiwyc"), "attribute", *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def parts() -> list[str]:
        return [k for k in _objects(ctx, f"out/{run}/parts/") if k.endswith(".parquet")]

    deadline = time.monotonic() + 180
    try:
        while len(parts()) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no index part within 180 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert f"out/{run}/_manifest.json" not in _objects(ctx, f"out/{run}/")  # killed midway
    done_before = len(parts())

    summary = attribute(_config(ctx, run, *extra), progress=False)
    rows = _index(ctx, run)
    assert [r["source"] for r in rows] == ctx["sources"]  # every image exactly once
    assert summary["resumed"] >= 2 * done_before >= 6 and summary["processed"] == NUM_IMAGES - summary["resumed"]
    assert sorted(m.source for m in iter_masks(f"s3://{ctx['bucket']}/out/{run}", ctx["opts"])) == ctx["sources"]
    if fmt == "objects":  # deterministic keys: a batch redone after the kill overwrote its own files
        assert len(_objects(ctx, f"out/{run}/masks/")) == NUM_IMAGES


def test_shard_split_input_reads_every_sample_of_the_manifest(ctx):
    b = ctx["bucket"]
    summary = attribute(_config(ctx, "shards", f"attribute.input=s3://{b}/shards/test"), progress=False)
    rows = _index(ctx, "shards")
    assert summary["num_samples"] == summary["num_ok"] == 12
    shards = sorted({r["shard"] for r in rows})
    listed = read_manifest(f"s3://{b}/shards/test", ctx["opts"])["shards"]
    assert shards == [f"s3://{b}/shards/{s['name']}" for s in listed] and len(shards) == 3
    assert all(r["source"] == f"{r['shard']}#{r['member']}" for r in rows)
    assert sorted(r["member"] for r in rows) == [f"syn_test_{i:06d}" for i in range(12)]
    previews = json.loads(storage.read_bytes(summary["manifest"], ctx["opts"]))["previews"]
    assert len(previews) == 4  # previews read their images back from the input shards
    assert all(storage.exists(p["uri"], ctx["opts"]) for p in previews)


def test_uri_list_input_and_a_listed_object_that_is_missing(ctx):
    b = ctx["bucket"]
    listed = ctx["sources"][:3]
    text = "# three images and one that is not there\n" + "\n".join(listed) + f"\ns3://{b}/corpus/gone.png\n"
    storage.write_text(f"s3://{b}/lists/images.txt", text, ctx["opts"])
    summary = attribute(
        _config(ctx, "list", f"attribute.input=s3://{b}/lists/images.txt", "attribute.max_error_fraction=0.5"),
        progress=False,
    )
    rows = {r["source"]: r for r in _index(ctx, "list")}
    assert (summary["num_samples"], summary["num_errors"]) == (4, 1)
    assert "gone since the listing" in rows[f"s3://{b}/corpus/gone.png"]["error"]
    for i, source in enumerate(listed):
        np.testing.assert_allclose(rows[source]["probs"], ctx["probs"][i].numpy(), atol=1e-4)


def _launch(ctx, run_id: str, model: str, listing: str) -> subprocess.Popen:
    args = _overrides(
        ctx,
        run_id,
        f"explainer.checkpoint={model}",
        f"attribute.input={listing}",
        "attribute.batch_size=5",
        "attribute.num_actors=1",
    )
    return subprocess.Popen(
        [str(BIN / "wysiwyc"), "attribute", *args, "--json"],
        env={**os.environ, "RAY_ADDRESS": ctx["gcs"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # minutes: two launches of one run racing for it (`make test-slow`)
def test_two_launches_of_one_run_id_at_once_have_one_owner(ctx):
    from pipeline import checkpoint as ckpt

    b, opts = ctx["bucket"], ctx["opts"]
    state, _ = ckpt.load_checkpoint(ctx["exp_uri"], opts)  # another Explainer for the same classifier
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    other = f"s3://{b}/models/explainer-other.pt"
    ckpt.save_checkpoint(state, other, opts)
    listing = f"s3://{b}/lists/twenty.txt"
    storage.write_text(listing, "\n".join(ctx["sources"][:20]), opts)

    # two models, one run id, started together: exactly one writes, the other refuses naming the owner
    procs = [_launch(ctx, "race", model, listing) for model in (ctx["exp_uri"], other)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert re.search(
        r"(belongs to|was started by|made by) the launch on \S+ \(pid \d+\) started \d{4}-\d\d-\d\dT", outs[loser][1]
    ), outs[loser][1]
    version = json.loads(outs[winner][0])["version"]
    record = json.loads(storage.read_text(f"s3://{b}/out/race/_run.json", opts))
    manifest = json.loads(storage.read_text(f"s3://{b}/out/race/_manifest.json", opts))
    assert record["model"]["model_version"] == manifest["model"]["model_version"] == version
    assert record["owner"]["pid"] == procs[winner].pid
    rows = _index(ctx, "race")
    assert [r["source"] for r in rows] == ctx["sources"][:20] and {r["model_version"] for r in rows} == {version}

    # the same model twice: the second joins (or finds the run complete); every image once
    procs = [_launch(ctx, "twins", other, listing) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = _index(ctx, "twins")
    assert [r["source"] for r in rows] == ctx["sources"][:20]


def test_a_finished_run_relaunched_with_another_model_is_refused(ctx, champion_run):
    with pytest.raises(
        WysiwycError,
        match=r"run main is complete, made by the launch on .* with --model "
        rf"models:/{MODEL_NAME}@champion, not s3://",
    ):
        attribute(_config(ctx, "main", f"explainer.checkpoint={ctx['exp_uri']}"), progress=False)


def test_an_output_that_cannot_be_written_is_named_as_such(ctx, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    for output in (tmp_path / "a-file" / "out", Path("/sys/wysiwyc-out")):  # root may not write /sys either
        with pytest.raises(
            WysiwycError,
            match=rf"attribute: cannot write the output {re.escape(str(output))} "
            r"\(cannot (read|write) .*\): give an --output this process can write",
        ):
            attribute(_config(ctx, "unwritable", f"output={output}"), progress=False)


def test_drift_between_runs_of_a_schedule_and_their_mlflow_runs(ctx):
    """Two runs on the same corpus: no class drifts. A run on the corpus without the images that predict
    one class: that class is flagged, and with attribute.fail_on_drift the command exits 3."""
    b, opts = ctx["bucket"], ctx["opts"]
    threshold = float(torch.quantile(ctx["probs"][:, 0], 0.7))  # class 0 predicted on 30% of the images
    predicted = ctx["probs"] >= threshold
    share = predicted.float().mean(0)
    k = int(torch.argmax(torch.minimum(share, 1 - share)))  # a class predicted on some images, not all
    assert 0.1 < share[k] < 0.9, share
    name = SYNTHETIC_CLASSES[k]
    storage.write_text(f"s3://{b}/lists/all.txt", "\n".join(ctx["sources"]), opts)
    kept = [s for i, s in enumerate(ctx["sources"]) if not predicted[i, k]]
    storage.write_text(f"s3://{b}/lists/without.txt", "\n".join(kept), opts)
    common = (f"output=s3://{b}/out-drift", "attribute.preview_images=0", f"attribute.threshold={threshold}")

    first = attribute(_config(ctx, "week1", *common, f"attribute.input=s3://{b}/lists/all.txt"), progress=False)
    assert first["drift"] is None
    second = attribute(
        _config(ctx, "week2", *common, f"attribute.input=s3://{b}/lists/all.txt", "attribute.compare_to=previous"),
        progress=False,
    )
    assert second["drift"]["compared_to"] == "week1" and second["drift"]["flagged"] == []
    assert all(v["psi_frequency"] == 0 for v in second["drift"]["per_class"].values())

    args = _overrides(
        ctx,
        "week3",
        *common,
        f"attribute.input=s3://{b}/lists/without.txt",
        "attribute.compare_to=week1",
        "attribute.fail_on_drift=true",
    )
    done = cli("attribute", *args, "--json", check=False)  # in this process: the session's Ray
    assert done.returncode == 3, done.stderr[-3000:]
    third = json.loads(done.stdout)
    assert third["status"] == "complete" and third["num_samples"] == len(kept)
    # the class is flagged and drifted most (the untrained test model's classes are correlated, so
    # others may move too; tests/unit/test_attribute_stream.py pins the exact flags on independent ones)
    psis = {c: v["psi_frequency"] for c, v in third["drift"]["per_class"].items()}
    assert name in third["drift"]["flagged"] and max(psis, key=psis.get) == name, third["drift"]
    assert psis[name] > 1
    assert f"drift in {name}" in done.stderr
    page = storage.read_text(third["preview"], opts)
    assert 'src="drift.png"' in page and name in page
    with Image.open(io.BytesIO(storage.read_bytes(f"s3://{b}/out-drift/week3/drift.png", opts))) as im:
        assert im.width > 300
    with pytest.raises(WysiwycError, match="no complete run nope"):
        attribute(_config(ctx, "week4", *common, "attribute.compare_to=nope"), progress=False)

    client = ctx["mlflow"].client()
    experiment = client.get_experiment_by_name("attribution")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"week1", "week2", "week3"} <= set(runs)
    week3 = runs["week3"].data
    assert week3.params["model_version"] == first["version"] and week3.params["run_id"] == "week3"
    assert week3.params["input"] == f"s3://{b}/lists/without.txt"
    assert week3.metrics["images"] == len(kept) and week3.metrics["error_rate"] == 0
    assert week3.metrics[f"frequency.{name}"] == 0 and week3.metrics[f"drift_psi.{name}"] > 1
    assert runs["week1"].data.metrics[f"frequency.{name}"] == pytest.approx(float(share[k]), abs=1e-6)


def test_a_corpus_explained_for_an_exported_softmax_classifier_on_s3(ctx, tmp_path):
    """F a torch.export program of its own normalisation, single-label, in the bucket beside its sidecar: the Ray
    actors get it as its file (an exported module does not pickle) and every row is the direct call's."""
    import hashlib

    from outside import MEAN, STD, save_export, tiny

    b, opts = ctx["bucket"], ctx["opts"]
    local = tmp_path / "f.pt2"
    save_export(tiny(len(SYNTHETIC_CLASSES)), local, SIZE)
    f_uri = f"s3://{b}/byo/f.pt2"
    storage.write_bytes(f_uri, local.read_bytes(), opts)
    interface = {"classes": list(SYNTHETIC_CLASSES), "output": "softmax", "mean": list(MEAN), "std": list(STD)}
    storage.write_bytes(f"s3://{b}/byo/f.json", json.dumps(interface).encode(), opts)
    record = {
        "uri": f_uri,
        "sha256": hashlib.sha256(local.read_bytes()).hexdigest(),
        "form": "export",
        "interface": interface,
    }
    exp_uri = f"s3://{b}/byo/explainer.pt"
    save_checkpoint(
        explainer_state(list(SYNTHETIC_CLASSES), SIZE, f_uri, record["sha256"], explanandum=record), exp_uri, opts
    )
    predictor = load_predictor(exp_uri, opts=opts)
    x = torch.stack([predictor.preprocess(Image.open(io.BytesIO(storage.read_bytes(s, opts)))) for s in ctx["sources"]])
    direct = predictor(x)
    torch.testing.assert_close(direct.probs.sum(dim=1), torch.ones(len(x)))  # F's softmax
    summary = attribute(
        _config(ctx, "byo", f"explainer.checkpoint={exp_uri}", "attribute.threshold=0.9"), progress=False
    )
    assert summary["status"] == "complete" and summary["num_ok"] == NUM_IMAGES
    rows = _index(ctx, "byo")
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row["probs"], direct.probs[i].numpy(), atol=1e-4)
        assert row["explained_classes"] == _expected_classes(direct.probs[i], 0.9)
