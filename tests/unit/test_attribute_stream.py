"""The parts of batch attribution whose memory must not grow with the corpus, on local folders: the plan
streams the listing into chunk files, a resume counts what is done from part names, the index is
deduplicated one chunk at a time; and the drift statistics between two runs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as scipy_stats

from pipeline import storage
from pipeline.attribute import plan as plan_module
from pipeline.attribute.inputs import Input, open_input
from pipeline.attribute.outputs import chunk_parts, dedup_chunk, done_counts, index_schema, part_url, table_bytes
from pipeline.attribute.plan import make_plan, read_plan
from pipeline.attribute.stats import Stats, drift, ks_histograms, psi
from pipeline.errors import WysiwycError


def _images(folder, n: int) -> list[str]:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"img_{i:05d}.png").write_bytes(b"x")
    (folder / "notes.txt").write_text("not an image")
    return sorted(str(folder / f"img_{i:05d}.png") for i in range(n))


def test_the_plan_streams_the_listing_into_chunks(tmp_path, monkeypatch):
    """The planner never holds more than one chunk of the listing: when a chunk file is written, the
    listing has been read at most one image beyond it."""
    sources = _images(tmp_path / "corpus", 2500)
    pulled, written = [0], []
    real_list = storage.list_prefix

    def counting_list(url, opts=None, **kw):
        for item in real_list(url, opts, **kw):
            pulled[0] += 1
            yield item

    real_write = storage.write_bytes

    def recording_write(url, data, opts=None, **kw):
        if "/plan/" in str(url):
            written.append((len(json.loads(data)), pulled[0]))
        return real_write(url, data, opts, **kw)

    monkeypatch.setattr(storage, "list_prefix", counting_list)
    monkeypatch.setattr(plan_module.storage, "write_bytes", recording_write)
    inputs = open_input(str(tmp_path / "corpus"))
    assert pulled[0] == 1  # opening the input reads the listing up to the first image only
    pulled[0] = 0
    plan = make_plan(inputs, str(tmp_path / "run"), 1000, None)
    assert [c["count"] for c in plan["chunks"]] == [1000, 1000, 500] and plan["total"] == 2500
    assert plan["ignored"] == 1
    assert [w[0] for w in written] == [1000, 1000, 500]
    assert [w[1] for w in written[:2]] == [1000, 2000]  # chunk k written after ≤ k·1000 listed images
    chunks = [json.loads(storage.read_bytes(c["url"])) for c in plan["chunks"]]
    assert sum(chunks, []) == sources  # the listing's order, every image once
    assert read_plan(str(tmp_path / "run"), None) == plan


def test_a_second_plan_of_the_same_run_adopts_the_first(tmp_path):
    _images(tmp_path / "corpus", 30)
    inputs = open_input(str(tmp_path / "corpus"))
    first = make_plan(inputs, str(tmp_path / "run"), 8, None)
    (tmp_path / "corpus" / "img_00000.png").unlink()  # the corpus changed since the first launch planned
    assert make_plan(inputs, str(tmp_path / "run"), 8, None) == first


def test_a_uri_list_is_read_line_by_line_and_an_empty_one_is_refused(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n  \n# comment\na.png\na.png\n/abs/b.jpg\ns3://bucket/c.png\n")  # a.png twice
    plan = make_plan(Input("list", str(listing)), str(tmp_path / "run"), 2, None)
    entries = [json.loads(storage.read_bytes(c["url"])) for c in plan["chunks"]]
    assert entries == [[str(tmp_path / "a.png"), "/abs/b.jpg"], ["s3://bucket/c.png"]]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(WysiwycError, match="lists no image URI"):
        open_input(str(tmp_path / "empty.txt"))


def _rows(sources: list[str], chunk: str, status: str = "ok") -> pa.Table:
    rows = [
        {
            "source": s,
            "key": s,
            "chunk": chunk,
            "status": status,
            "error": None if status == "ok" else f"{s}: bad",
            "probs": [0.9, 0.1],
            "explained_indices": [0],
            "mask_areas": [0.25],
        }
        for s in sources
    ]
    return pa.Table.from_pylist(rows, index_schema())


def _write_part(root: str, chunk: str, table: pa.Table) -> str:
    errors = sum(1 for s in table["status"].to_pylist() if s == "error")
    url = part_url(root, chunk, table["source"].to_pylist(), errors)
    storage.write_bytes(url, table_bytes(table))
    return url


def test_done_counts_come_from_the_part_names_and_dedup_merges_one_chunk(tmp_path):
    root = str(tmp_path / "run")
    _write_part(root, "chunk-000000", _rows(["a", "b", "c"], "chunk-000000"))
    _write_part(root, "chunk-000000", _rows(["c", "d"], "chunk-000000", status="error"))  # c twice
    _write_part(root, "chunk-000001", _rows(["e"], "chunk-000001"))
    assert done_counts(root, None) == {"chunk-000000": [5, 2], "chunk-000001": [1, 0]}
    table = dedup_chunk(root, "chunk-000000", None)
    assert sorted(table["source"].to_pylist()) == ["a", "b", "c", "d"]
    assert done_counts(root, None) == {"chunk-000000": [4, 1], "chunk-000001": [1, 0]}  # one merged part
    assert len(list(storage.list_prefix(f"{root}/parts/chunk-000000"))) == 1
    again = dedup_chunk(root, "chunk-000000", None)  # idempotent
    assert again.to_pylist() == chunk_parts(root, "chunk-000000", None)[0].to_pylist()
    assert sorted(again["source"].to_pylist()) == ["a", "b", "c", "d"]


def test_a_part_merged_away_between_listing_and_reading_makes_the_reader_list_again(tmp_path, monkeypatch):
    """Two launches joined one run: one merges a chunk's parts (the merged part first, then it deletes the rest)
    while the other lists and reads them. The reader that finds a listed part gone lists again, and gets every
    row once (it used to die with an uncaught NotFound: exit 1, seen in `make test-slow`)."""
    root = str(tmp_path / "run")
    _write_part(root, "chunk-000000", _rows(["a", "b", "c"], "chunk-000000"))
    _write_part(root, "chunk-000000", _rows(["c", "d"], "chunk-000000"))
    real_list, merged = storage.list_prefix, {"done": False}

    def listing_then_merge(prefix, opts=None):
        listed = list(real_list(prefix, opts))
        if not merged["done"] and "chunk-000000" in prefix:
            merged["done"] = True
            with monkeypatch.context() as inner:
                inner.setattr(storage, "list_prefix", real_list)
                dedup_chunk(root, "chunk-000000", None)  # the other launch, right after this listing
        return listed

    monkeypatch.setattr(storage, "list_prefix", listing_then_merge)
    table, urls = chunk_parts(root, "chunk-000000", None)
    assert merged["done"] and len(urls) == 1
    assert sorted(table["source"].to_pylist()) == ["a", "b", "c", "d"]


def test_psi_by_hand_and_its_edges():
    # p = 0.3 now, q = 0.1 before: (0.2·ln 3) + (−0.2·ln(0.7/0.9))
    assert psi(0.3, 0.1) == pytest.approx(0.2 * np.log(3) - 0.2 * np.log(0.7 / 0.9))
    assert psi(0.3, 0.3) == 0 and psi(0.3, 0.1) == pytest.approx(psi(0.1, 0.3))
    assert psi(0.0, 0.3) > 1  # a class that vanished: large and finite


def test_ks_of_histograms_equals_scipys_two_sample_statistic():
    rng = np.random.default_rng(0)
    bins = 20
    a = (rng.integers(0, bins, 300) + 0.5) / bins  # values at bin centres: the histogram loses nothing
    b = (np.clip(rng.normal(8, 3, 200), 0, bins - 1).astype(int) + 0.5) / bins
    hist = lambda v: np.histogram(v, bins=bins, range=(0, 1))[0].tolist()  # noqa: E731
    assert ks_histograms(hist(a), hist(b)) == pytest.approx(scipy_stats.ks_2samp(a, b).statistic)


def _stats(frequency: dict[str, float], n: int = 400, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    classes = list(frequency)
    stats = Stats(classes, 0.5)
    probs = [[0.9 if rng.random() < frequency[c] else 0.1 for c in classes] for _ in range(n)]
    explained = [[c for c, p in enumerate(row) if p > 0.5] or [0] for row in probs]
    areas = [[float(rng.uniform(0.1, 0.4)) for _ in e] for e in explained]
    stats.add(pa.table({"status": ["ok"] * n, "probs": probs, "explained_indices": explained, "mask_areas": areas}))
    return stats.as_dict()


def test_drift_flags_a_class_that_vanished_and_nothing_between_equal_runs():
    base = _stats({"cat": 0.3, "dog": 0.4, "car": 0.2})
    same = drift(base, base, 0.2, 0.2, 20)
    assert same["flagged"] == [] and all(v["psi_frequency"] == 0 for v in same["per_class"].values())
    resampled = drift(_stats({"cat": 0.3, "dog": 0.4, "car": 0.2}, seed=1), base, 0.2, 0.2, 20)
    assert resampled["flagged"] == []  # sampling noise of 400 images stays under both limits
    gone = drift(_stats({"cat": 0.3, "dog": 0.4, "car": 0.0}, seed=1), base, 0.2, 0.2, 20)
    assert gone["flagged"] == ["car"]
    assert gone["per_class"]["car"]["ks_mask_area"] is None  # too few images explain it now
    assert gone["per_class"]["car"]["psi_frequency"] > 0.2


def test_previous_is_the_last_complete_run_under_the_output(tmp_path):
    from pipeline.attribute.stats import previous_run

    def run(name: str, finished: str | None) -> None:
        (tmp_path / name).mkdir()
        if finished:
            (tmp_path / name / "_manifest.json").write_text(json.dumps({"timings": {"finished": finished}}))

    run("2026-12-01", "2026-12-01T03:00:00Z")
    run("2026-12-02", "2026-12-02T03:10:00Z")
    run("2026-12-03", None)  # killed: no manifest
    run("rerun-of-01", "2026-11-30T23:00:00Z")  # finished before the others
    assert previous_run(str(tmp_path), "2026-12-03", None) == "2026-12-02"
    assert previous_run(str(tmp_path), "2026-12-02", None) == "2026-12-01"
    assert previous_run(str(tmp_path / "nothing-here"), "x", None) is None
