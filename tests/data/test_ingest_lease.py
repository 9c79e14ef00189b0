"""One writer per split (pipeline.lease through pipeline.data.ingest): two ingests into one split at once, a
crashed ingest's lease, a lease lost before publishing."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.data import shards
from pipeline.data.ingest import LEASE_SUFFIX, ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.lease import Lease

SIZE = 24


class SlowReader(SyntheticReader):
    """Synthetic samples, one every ``delay`` seconds once ``started`` is set (an ingest that takes a while)."""

    def __init__(self, *args, delay: float, started: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.started = delay, started

    def load(self, item):
        self.started.set()
        time.sleep(self.delay)
        return super().load(item)


def _shards_match_their_manifest(out, split) -> int:
    manifest = shards.read_manifest(f"{out}/{split}")
    for source in shards.shard_sources(manifest):
        shards.check_shard(source, storage.read_bytes(source["url"]))  # raises on another run's bytes
    return manifest["num_samples"]


def test_a_second_ingest_into_a_split_being_written_is_refused_and_the_first_stays_whole(tmp_path):
    out = str(tmp_path / "data")
    started, results = threading.Event(), {}
    slow = SlowReader(12, 0, "train", image_size=SIZE, delay=0.05, started=started)

    def first():
        results["first"] = ingest(slow, out, "train", IngestConfig(workers=1, shard_size=4), progress=False)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    other = SyntheticReader(8, 1, "train", image_size=SIZE)
    with pytest.raises(WysiwycError, match=r"the split .train. of .* \(being ingested\) is held by \w+ \(pid \d+ on "):
        ingest(other, out, "train", IngestConfig(workers=1, shard_size=4, overwrite=True), progress=False)
    thread.join(60)
    assert results["first"]["num_samples"] == 12
    assert _shards_match_their_manifest(out, "train") == 12  # no shard holds the other run's bytes
    assert not (tmp_path / "data" / f"train{LEASE_SUFFIX}").exists()  # released
    # now free: the overwrite goes through
    assert ingest(other, out, "train", IngestConfig(workers=1, overwrite=True), progress=False)["num_samples"] == 8


def test_the_lease_of_a_crashed_ingest_is_taken_over(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    lease = out / f"train{LEASE_SUFFIX}"
    # on this host, by a process that is gone: taken over at once
    dead = {"host": socket.gethostname(), "pid": 2**22 + 7, "user": "x", "token": "t", "expires_at": time.time() + 3600}
    lease.write_text(json.dumps(dead))
    reader = SyntheticReader(4, 0, "train", image_size=SIZE)
    assert ingest(reader, str(out), "train", IngestConfig(workers=1), progress=False)["num_samples"] == 4
    # on another host, not expired: refused, naming the holder and the file to delete
    alive = {**dead, "host": "elsewhere", "pid": 1}
    lease.write_text(json.dumps(alive))
    with pytest.raises(WysiwycError, match=r"held by x \(pid 1 on elsewhere\).*train.ingest.lease.*delete that file"):
        ingest(reader, str(out), "train", IngestConfig(workers=1, overwrite=True), progress=False)
    # expired: taken over
    lease.write_text(json.dumps({**alive, "expires_at": time.time() - 1}))
    assert ingest(reader, str(out), "train", IngestConfig(workers=1, overwrite=True), progress=False)["num_samples"]


def test_an_ingest_whose_lease_was_taken_over_publishes_no_manifest(tmp_path, monkeypatch):
    out = str(tmp_path / "data")
    reader = SyntheticReader(4, 0, "train", image_size=SIZE)
    monkeypatch.setattr(Lease, "still_held", lambda self: False)  # expired and taken by another meanwhile
    with pytest.raises(WysiwycError, match="expired and was taken by another ingest; this one published no manifest"):
        ingest(reader, out, "train", IngestConfig(workers=1), progress=False)
    assert not storage.exists(f"{out}/train{shards.MANIFEST_SUFFIX}")


def test_a_lease_is_released_only_by_its_holder(tmp_path):
    url = str(tmp_path / "x.lease")
    mine = Lease.take(url, "x", 60)
    assert mine.still_held()
    storage.delete(url)
    theirs = Lease.take(url, "x", 60)  # mine was lost (expired and taken over, say)
    mine.release()
    assert theirs.still_held() and storage.exists(url)
    theirs.release()
    assert not storage.exists(url)
