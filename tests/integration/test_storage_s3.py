"""pipeline.storage against a real SeaweedFS S3 server (the ``s3_server`` fixture)."""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import tarfile
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.storage import S3Options

pytestmark = pytest.mark.s3


def test_round_trip_with_explicit_options(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/a/b/blob.bin"
    storage.write_bytes(url, b"\x00\x01payload", s3_server.opts)
    assert storage.read_bytes(url, s3_server.opts) == b"\x00\x01payload"
    storage.write_text(url, "caf\u00e9", s3_server.opts)
    assert storage.read_text(url, s3_server.opts) == "caf\u00e9"
    assert storage.size(url, s3_server.opts) == 5


def test_round_trip_with_options_from_the_environment(s3_env, s3_bucket):
    url = storage.join(f"s3://{s3_bucket}", "env", "x.json")
    storage.write_bytes(url, b"{}")
    assert storage.read_bytes(url) == b"{}"
    assert storage.exists(url)


def test_read_small_reads_through_pyarrow_what_read_bytes_reads(s3_server, s3_bucket):
    urls = [f"s3://{s3_bucket}/small/{i}.bin" for i in range(20)]
    for i, url in enumerate(urls):
        storage.write_bytes(url, os.urandom(100 + i), s3_server.opts)
    small = [storage.read_small(u, s3_server.opts) for u in urls]
    assert small == [storage.read_bytes(u, s3_server.opts) for u in urls]
    key = (s3_server.opts, os.getpid())
    assert storage._ARROW[key] is not None  # the fast path was used (and kept: nothing failed)


def test_open_read_streams_a_tar_in_stream_mode(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/shards/train-000000.tar"
    members = {f"{i:04d}.json": os.urandom(5000) for i in range(20)}
    with storage.open_write(url, s3_server.opts) as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = {}
    with storage.open_read(url, s3_server.opts) as stream:
        assert stream.readable() and not stream.seekable()
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                got[member.name] = tar.extractfile(member).read()
    assert got == members


def test_open_write_of_20_mb_is_a_multipart_upload(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/big/object.bin"
    data = os.urandom(20 * 1024 * 1024)
    with storage.open_write(url, s3_server.opts) as f:
        for start in range(0, len(data), 1 << 20):  # written in pieces, spooled to disk
            f.write(data[start : start + (1 << 20)])
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big/object.bin")
    parts = -(-len(data) // storage.MULTIPART_CHUNKSIZE)
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # a multipart ETag: md5-of-md5s "-N"
    assert storage.size(url, s3_server.opts) == len(data)
    with storage.open_read(url, s3_server.opts) as stream:
        assert stream.read() == data


def test_upload_file_and_download_file(s3_server, s3_bucket, tmp_path: Path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(os.urandom(9 * 1024 * 1024))  # above the multipart threshold
    url = f"s3://{s3_bucket}/ckpt/best.pt"
    storage.upload_file(src, url, s3_server.opts)
    out = storage.download_file(url, tmp_path / "dl" / "best.pt", s3_server.opts)
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["best.pt"]  # no temp left behind


def test_listing_more_than_1000_keys_paginates_and_keeps_order(s3_server, s3_bucket):
    opts = s3_server.opts
    keys = [f"data/{i:05d}.bin" for i in range(1100)]
    client = s3_server.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"x"), keys))
    for extra in ("data-000000.tar", "data.manifest.json", "data/sub/z.bin"):
        storage.write_bytes(f"s3://{s3_bucket}/{extra}", b"y", opts)

    calls = []
    storage._client(opts).meta.events.register("before-call.s3.ListObjectsV2", lambda **_: calls.append(1))
    got = list(storage.list_prefix(f"s3://{s3_bucket}/data", opts))
    assert len(calls) == 2  # two pages of at most 1000 keys
    assert sorted(got) == [f"s3://{s3_bucket}/{k}" for k in sorted(keys + ["data/sub/z.bin"])]
    # the keys of one "directory" come in name order (the store's order is deterministic)
    flat = [u for u in got if "/sub/" not in u]
    assert flat == [f"s3://{s3_bucket}/{k}" for k in keys]
    assert list(storage.list_prefix(f"s3://{s3_bucket}/data", opts)) == got

    shallow = list(storage.list_prefix(f"s3://{s3_bucket}/data/", opts, recursive=False))
    assert len(shallow) == 1100 and f"s3://{s3_bucket}/data/sub/z.bin" not in shallow
    assert list(storage.list_glob(f"s3://{s3_bucket}/data-*.tar", opts)) == [f"s3://{s3_bucket}/data-000000.tar"]
    starts = set(storage.list_startswith(f"s3://{s3_bucket}/data", opts))
    assert starts == set(got) | {f"s3://{s3_bucket}/data-000000.tar", f"s3://{s3_bucket}/data.manifest.json"}


def test_exists_size_delete_and_delete_prefix(s3_server, s3_bucket):
    opts = s3_server.opts
    for key in ("run/a.json", "run/sub/b.json", "run-2/c.json"):
        storage.write_bytes(f"s3://{s3_bucket}/{key}", b"{}", opts)
    assert storage.exists(f"s3://{s3_bucket}/run/a.json", opts)
    assert storage.exists(f"s3://{s3_bucket}/run", opts)  # a "directory"
    assert storage.exists(f"s3://{s3_bucket}", opts)
    assert not storage.exists(f"s3://{s3_bucket}/run/zzz.json", opts)
    assert not storage.exists(f"s3://{s3_bucket}/ru", opts)
    storage.delete(f"s3://{s3_bucket}/run/a.json", opts)
    storage.delete(f"s3://{s3_bucket}/run/a.json", opts)  # missing is fine
    assert not storage.exists(f"s3://{s3_bucket}/run/a.json", opts)
    assert storage.delete_prefix(f"s3://{s3_bucket}/run", opts) == 1
    assert list(storage.list_prefix(f"s3://{s3_bucket}", opts)) == [f"s3://{s3_bucket}/run-2/c.json"]


def test_missing_object_raises_not_found(s3_server, s3_bucket, tmp_path: Path):
    url = f"s3://{s3_bucket}/nope/missing.json"
    for call in (
        lambda: storage.read_bytes(url, s3_server.opts),
        lambda: storage.read_small(url, s3_server.opts),
        lambda: storage.size(url, s3_server.opts),
        lambda: storage.download_file(url, tmp_path / "x", s3_server.opts),
    ):
        with pytest.raises(storage.NotFound, match="missing.json"):
            call()
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_missing_bucket_is_named_with_the_endpoint(s3_server):
    opts = s3_server.opts
    url = "s3://no-such-bucket-here/x/y.json"
    calls = {
        "read": lambda: storage.read_bytes(url, opts),
        "read_small": lambda: storage.read_small(url, opts),
        "write": lambda: storage.write_bytes(url, b"1", opts),
        "list": lambda: list(storage.list_prefix(url, opts)),
        "exists": lambda: storage.exists(url, opts),
        "size": lambda: storage.size(url, opts),
    }
    for name, call in calls.items():
        with pytest.raises(storage.BucketNotFound) as info:
            call()
        message = str(info.value)
        assert "bucket 'no-such-bucket-here' does not exist" in message, name
        assert s3_server.endpoint in message and "create it or fix the URL" in message, name
    assert not storage.exists("s3://no-such-bucket-here", opts)


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_are_rejected_without_showing_the_secret(s3_server, s3_bucket, wrong):
    secret = "wrong-secret-" + os.urandom(6).hex()
    key = s3_server.access_key if wrong == "secret" else "WYNOSUCHKEY000"
    opts = S3Options(s3_server.endpoint, "us-east-1", key, secret)
    url = f"s3://{s3_bucket}/x.bin"
    storage.write_bytes(url, b"1", s3_server.opts)
    calls = [
        lambda: storage.read_bytes(url, opts),
        lambda: storage.read_small(url, opts),
        lambda: storage.write_bytes(url, b"2", opts),
        lambda: list(storage.list_prefix(f"s3://{s3_bucket}", opts)),
        lambda: storage.exists(url, opts),
        lambda: storage.size(url, opts),
    ]
    for call in calls:
        with pytest.raises(storage.CredentialsError, match="credentials rejected") as info:
            call()
        message = str(info.value)
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and url.split("/x")[0] in message
        assert secret not in message and s3_server.secret_key not in message
        assert isinstance(info.value, WysiwycError)
    assert storage.read_bytes(url, s3_server.opts) == b"1"  # the bad writer changed nothing


def test_exception_inside_open_write_publishes_nothing(s3_server, s3_bucket):
    opts = s3_server.opts
    url = f"s3://{s3_bucket}/out/result.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(url, opts) as f:
            f.write(os.urandom(9 * 1024 * 1024))
            raise RuntimeError("boom")
    assert not storage.exists(url, opts)
    assert list(storage.list_prefix(f"s3://{s3_bucket}", opts)) == []

    storage.write_bytes(url, b"old", opts)
    with pytest.raises(RuntimeError):
        with storage.open_write(url, opts) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert storage.read_bytes(url, opts) == b"old"


def test_redact_hides_the_server_secret_and_presigned_signatures(s3_server, s3_bucket, s3_env):
    for version, signature in (("s3v4", "X-Amz-Signature=***"), ("s3", "Signature=***")):
        presigned = s3_server.client(signature_version=version).generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": "x"}, ExpiresIn=60
        )
        out = storage.redact(f"failed: {presigned} with {s3_server.secret_key}")
        assert s3_server.secret_key not in out and s3_server.access_key not in out
        assert signature in out and f"/{s3_bucket}/x?" in out and "Expires=" in out


def test_options_travel_into_another_process(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/shared.bin"
    storage.write_bytes(url, b"from the parent", s3_server.opts)
    storage.read_bytes(url, s3_server.opts)  # the parent has a cached client; the child makes its own
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        assert pool.submit(storage.read_bytes, url, s3_server.opts).result(timeout=60) == b"from the parent"


def test_create_exclusive_lets_only_the_first_writer_create(s3_server, s3_bucket, tmp_path):
    for url, opts in ((f"s3://{s3_bucket}/run/_run.json", s3_server.opts), (str(tmp_path / "run" / "_run.json"), None)):
        assert storage.create_exclusive(url, b"first", opts) is True
        assert storage.create_exclusive(url, b"second", opts) is False
        assert storage.read_bytes(url, opts) == b"first"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["_run.json"]  # no temp file left
