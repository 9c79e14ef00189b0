"""pipeline.storage on local paths and file:// URLs, redaction, and S3 pieces that need no server."""

from __future__ import annotations

import io
import os
import pickle
import socket
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.storage import S3Options


def _touch(root: Path, *names: str) -> None:
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())


def _hidden_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.name.startswith(".")]


# ------------------------------------------------------------------------------ URLs and paths


def test_join_appends_parts_to_paths_and_urls():
    assert storage.join("s3://bucket", "runs", "x.json") == "s3://bucket/runs/x.json"
    assert storage.join("s3://bucket/runs/", "/a/b", "", "c") == "s3://bucket/runs/a/b/c"
    assert storage.join("file:///data", "voc") == "file:///data/voc"
    assert storage.join("runs", "a", "b.txt") == "runs/a/b.txt"
    assert storage.join(Path("/tmp/x"), "y") == "/tmp/x/y"
    assert storage.join("/abs/", "/not-a-reset") == "/abs/not-a-reset"


def test_is_s3_and_split_s3():
    assert storage.is_s3("s3://b/k") and storage.is_s3("S3://b/k")
    assert not storage.is_s3("/tmp/s3://x") and not storage.is_s3(Path("runs"))
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(WysiwycError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_to_local_path_accepts_paths_and_file_urls(tmp_path: Path):
    assert storage.to_local_path("file:///data/my%20dir/x.png") == Path("/data/my dir/x.png")
    assert storage.to_local_path("file://localhost/data/x") == Path("/data/x")
    assert storage.to_local_path(tmp_path) == tmp_path
    assert storage.to_local_path("~/x") == Path.home() / "x"
    with pytest.raises(WysiwycError, match="not a local path"):
        storage.to_local_path("s3://bucket/x")


def test_unsupported_scheme_is_refused_with_the_url_redacted():
    with pytest.raises(WysiwycError, match="unsupported URL scheme 'gs'") as info:
        storage.read_bytes("gs://user:hunter2@bucket/x")
    assert "hunter2" not in str(info.value)


# ------------------------------------------------------------------------------- read / write


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_write_then_read_round_trip(tmp_path: Path, as_url: bool):
    base = tmp_path.as_uri() if as_url else str(tmp_path)
    url = storage.join(base, "deep", "dir", "blob.bin")
    storage.write_bytes(url, b"\x00payload")
    assert storage.read_bytes(url) == b"\x00payload"
    storage.write_text(url, "caf\u00e9")
    assert storage.read_text(url) == "caf\u00e9"
    with storage.open_read(url) as f:
        assert f.read(3) == b"caf"
    assert storage.size(url) == len("caf\u00e9".encode())
    assert _hidden_leftovers(tmp_path) == []


def test_open_write_publishes_only_when_the_block_succeeds(tmp_path: Path):
    dest = tmp_path / "shard-000000.tar"
    with storage.open_write(dest) as f:
        f.write(b"half")
        assert not dest.exists()  # a reader never sees a half-written file
        assert list(storage.list_prefix(tmp_path)) == []  # nor lists the temp file
        f.write(b" and the rest")
    assert dest.read_bytes() == b"half and the rest"
    assert _hidden_leftovers(tmp_path) == []


def test_open_write_error_publishes_nothing_and_removes_the_temp(tmp_path: Path):
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(dest) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_open_write_error_keeps_the_previous_version(tmp_path: Path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with storage.open_write(dest) as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert dest.read_bytes() == b"old"
    assert _hidden_leftovers(tmp_path) == []


def test_open_write_refuses_a_file_closed_inside_the_block(tmp_path: Path):
    with pytest.raises(WysiwycError, match="closed inside the block"):
        with storage.open_write(tmp_path / "x") as f:
            f.write(b"x")
            f.close()
    assert list(tmp_path.iterdir()) == []


def test_written_file_has_normal_permissions(tmp_path: Path):
    storage.write_bytes(tmp_path / "x", b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_file_raises_not_found_which_is_also_file_not_found(tmp_path: Path):
    missing = tmp_path / "nope.json"
    for call in (storage.read_bytes, storage.open_read, storage.size):
        with pytest.raises(storage.NotFound, match="nope.json"):
            call(missing)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    with pytest.raises(WysiwycError):
        storage.download_file(missing, tmp_path / "copy")


def test_reading_a_directory_is_a_clear_error(tmp_path: Path):
    with pytest.raises(WysiwycError, match="directory"):
        storage.read_bytes(tmp_path)


def test_upload_and_download_file_locally(tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    storage.upload_file(src, tmp_path / "published" / "dst.bin")
    assert (tmp_path / "published" / "dst.bin").read_bytes() == src.read_bytes()
    out = storage.download_file((tmp_path / "published" / "dst.bin").as_uri(), tmp_path / "dl" / "x")
    assert out == tmp_path / "dl" / "x" and out.read_bytes() == src.read_bytes()
    storage.upload_file(src, src)  # same file: a no-op, not a truncation
    assert src.stat().st_size == 3000
    with pytest.raises(storage.NotFound):
        storage.upload_file(tmp_path / "absent", tmp_path / "y")
    assert _hidden_leftovers(tmp_path) == []


def test_exists_delete_and_delete_prefix(tmp_path: Path):
    _touch(tmp_path, "d/a", "d/sub/b", "d2")
    assert storage.exists(tmp_path / "d" / "a") and storage.exists(tmp_path / "d")
    assert not storage.exists(tmp_path / "zz")
    storage.delete(tmp_path / "d" / "a")
    storage.delete(tmp_path / "d" / "a")  # missing is fine
    assert not storage.exists(tmp_path / "d" / "a")
    with pytest.raises(WysiwycError, match="delete_prefix"):
        storage.delete(tmp_path / "d")
    assert storage.delete_prefix(tmp_path / "d") == 1
    assert not (tmp_path / "d").exists() and (tmp_path / "d2").exists()
    assert storage.delete_prefix(tmp_path / "d") == 0


# ------------------------------------------------------------------------------------- listing


def test_list_prefix_is_recursive_sorted_and_treats_the_prefix_as_a_directory(tmp_path: Path):
    _touch(
        tmp_path,
        "data/b.txt",
        "data/a/x.txt",
        "data/a.txt",
        "data/a-b.txt",
        "data/c/d/e.txt",
        "data-000.tar",
        "data.manifest.json",
    )
    got = list(storage.list_prefix(tmp_path / "data"))
    keys = ["data/a-b.txt", "data/a.txt", "data/a/x.txt", "data/b.txt", "data/c/d/e.txt"]
    assert got == [str(tmp_path / k) for k in keys]
    assert keys == sorted(keys)  # the order S3 gives: lexicographic by key
    assert list(storage.list_prefix(str(tmp_path / "data") + "/")) == got
    assert list(storage.list_prefix(tmp_path / "data", recursive=False)) == [
        str(tmp_path / k) for k in ("data/a-b.txt", "data/a.txt", "data/b.txt")
    ]


def test_list_prefix_of_a_file_url_yields_file_urls(tmp_path: Path):
    _touch(tmp_path, "imgs/1.png", "imgs/2 two.png")
    got = list(storage.list_prefix((tmp_path / "imgs").as_uri()))
    assert got == [(tmp_path / "imgs" / n).as_uri() for n in ("1.png", "2 two.png")]
    assert storage.read_bytes(got[1]) == b"imgs/2 two.png"


def test_list_prefix_of_a_missing_directory_is_empty(tmp_path: Path):
    assert list(storage.list_prefix(tmp_path / "nothing-here")) == []


def test_list_startswith_and_list_glob_use_raw_name_prefixes(tmp_path: Path):
    _touch(
        tmp_path,
        "shards/train-000001.tar",
        "shards/train-000000.tar",
        "shards/train.manifest.json",
        "shards/val-000000.tar",
        "shards/train/extra.txt",
        "shards/trainee.tar",
    )
    shards = tmp_path / "shards"
    assert list(storage.list_startswith(shards / "train")) == [
        str(shards / n)
        for n in ("train-000000.tar", "train-000001.tar", "train.manifest.json", "train/extra.txt", "trainee.tar")
    ]
    assert list(storage.list_glob(str(shards / "train-*.tar"))) == [
        str(shards / "train-000000.tar"),
        str(shards / "train-000001.tar"),
    ]
    assert list(storage.list_glob(shards.as_uri() + "/*.manifest.json")) == [(shards / "train.manifest.json").as_uri()]
    assert list(storage.list_glob(str(shards / "**.txt"))) == [str(shards / "train/extra.txt")]
    assert list(storage.list_glob(str(shards / "*.txt"))) == []  # '*' does not cross '/'


def test_list_startswith_with_a_bare_name_lists_the_working_directory(tmp_path, monkeypatch):
    _touch(tmp_path, "run-1/a", "run-2", "other")
    monkeypatch.chdir(tmp_path)
    assert list(storage.list_startswith("run")) == ["run-1/a", "run-2"]


def test_listing_is_lazy(tmp_path: Path):
    _touch(tmp_path, "a/1", "a/2")
    it = storage.list_prefix(tmp_path / "a")
    assert next(it) == str(tmp_path / "a" / "1")


# ------------------------------------------------------------------------------------- redact


def test_redact_hides_passwords_in_url_userinfo():
    assert storage.redact("postgresql://mlflow:s3cr3t@db:5432/x") == "postgresql://mlflow:***@db:5432/x"
    assert storage.redact("fetch https://ghp_tokenvalue@github.com/o/r") == "fetch https://***@github.com/o/r"
    assert "p@ss" not in storage.redact("mysql://u:p@ss@host/db")
    assert storage.redact("http://127.0.0.1:8333/bucket") == "http://127.0.0.1:8333/bucket"


def test_redact_hides_presigned_and_token_query_parameters():
    url = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=FQoGZXIvYXdzE&X-Amz-Signature=deadbeef01"
    )
    out = storage.redact(url)
    for secret in ("AKIAEXAMPLE", "FQoGZXIvYXdzE", "deadbeef01"):
        assert secret not in out
    assert "X-Amz-Expires=3600" in out and "X-Amz-Signature=***" in out
    out = storage.redact("GET /x?token=abc123&sig=zzz9&access_token=qq11&page=2 password=pw1 secret=s1")
    assert out == "GET /x?token=***&sig=***&access_token=***&page=2 password=*** secret=***"
    assert storage.redact("design=ok signature_version=s3v4") == "design=ok signature_version=s3v4"
    assert storage.redact("storage.secret_access_key=abcd1234") == "storage.secret_access_key=***"


def test_redact_hides_current_aws_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEHoaCXVz")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    text = (
        "key AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG+bPxRfiCY "
        "encoded wJalrXUtnFEMI%2FK7MDENG%2BbPxRfiCY token IQoJb3JpZ2luX2VjEHoaCXVz"
    )
    out = storage.redact(text)
    assert out == "key *** secret *** encoded *** token ***"


def test_redact_keeps_ordinary_words_and_path_segments(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "data")  # too short to be masked wherever it occurs
    for text in (
        "/work/VOC2007/Annotations/x.xml: malformed XML (unclosed token: line 1, column 0)",
        "s3://bucket/data/train-000000.tar",
        "runs/data/secret/token/password/best.pt",
        "signature: expected (x, y), got (x,); token: line 2",
    ):
        assert storage.redact(text) == text
    text = (
        "secret_access_key=abcd1234efgh secret_access_key: abcd1234efgh X-Amz-Signature=deadbeef01 "
        '{"token": "tok-123", "password": "hunter2"} key wJalrXUtnFEMI/K7MDENG+bPxRfiCY password: hunter3'
    )
    assert storage.redact(text) == (
        "secret_access_key=*** secret_access_key: *** X-Amz-Signature=*** "
        '{"token": "***", "password": "***"} key *** password: ***'
    )


def test_redact_hides_secrets_of_s3_options():
    opts = S3Options(endpoint_url="http://h:1", access_key_id="ID-opts-123", secret_access_key="sk-opts-xyz")
    assert storage.redact(f"boom {opts.secret_access_key} {opts.access_key_id}") == "boom *** ***"


def test_s3_options_repr_hides_keys_and_pickles():
    opts = S3Options("http://127.0.0.1:8333", "us-east-1", "AKIDVISIBLE", "very-secret-value")
    assert "very-secret-value" not in repr(opts) and "AKIDVISIBLE" not in repr(opts)
    assert "http://127.0.0.1:8333" in repr(opts)
    assert pickle.loads(pickle.dumps(opts)) == opts and hash(opts) == hash(S3Options(*_fields(opts)))
    assert opts.to_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert S3Options().to_env() == {
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


def _fields(opts: S3Options) -> tuple:
    return (opts.endpoint_url, opts.region, opts.access_key_id, opts.secret_access_key)


# --------------------------------------------------------------------------- S3, no server


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_endpoint_names_the_endpoint_and_hides_the_secret(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    opts = S3Options(endpoint, "us-east-1", "AKIDUNREACH", "secret-unreachable-1")
    with pytest.raises(storage.EndpointUnreachable) as info:
        storage.read_bytes("s3://bucket/key", opts)
    message = str(info.value)
    assert endpoint in message and "s3://bucket/key" in message
    assert "secret-unreachable-1" not in message
    with pytest.raises(storage.EndpointUnreachable):
        list(storage.list_prefix("s3://bucket/x", opts))


def test_s3_options_need_both_keys_or_neither():
    with pytest.raises(storage.CredentialsError, match="together"):
        storage.exists("s3://b/k", S3Options(endpoint_url="http://127.0.0.1:1", access_key_id="only"))


def test_client_is_cached_per_options_and_environment(monkeypatch):
    a = S3Options("http://127.0.0.1:1", "us-east-1", "k1", "s1")
    b = S3Options("http://127.0.0.1:1", "us-east-1", "k2", "s2")
    assert storage._client(a) is storage._client(S3Options(*_fields(a)))
    assert storage._client(a) is not storage._client(b)
    client = storage._client(a)
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.request_checksum_calculation == "when_required"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "changed-env-secret")
    assert storage._client(None) is not None and storage._client(a) is not client


def test_s3_urls_without_a_key_are_refused_for_object_operations():
    opts = S3Options("http://127.0.0.1:1", "us-east-1", "k", "s")
    for call in (storage.read_bytes, storage.size):
        with pytest.raises(WysiwycError, match="names no object"):
            call("s3://bucket/dir/", opts)


class _FlakyBody:
    """A GetObject body that breaks once after ``fail_after`` bytes."""

    def __init__(self, data: bytes, fail_after: int | None):
        self._buf, self._fail_after, self.closed = io.BytesIO(data), fail_after, False

    def read(self, n: int = -1) -> bytes:
        from urllib3.exceptions import ProtocolError

        if self._fail_after is not None and self._buf.tell() >= self._fail_after:
            self._fail_after = None
            raise ProtocolError("Connection broken: IncompleteRead")
        if self._fail_after is not None:
            n = min(n if n >= 0 else 1 << 30, self._fail_after - self._buf.tell())
        return self._buf.read(n)

    def close(self) -> None:
        self.closed = True


class _FakeClient:
    def __init__(self, data: bytes):
        self.data, self.calls = data, []

    def get_object(self, **kwargs):
        self.calls.append(kwargs)
        start = int(kwargs["Range"][len("bytes=") : -1])
        return {"Body": _FlakyBody(self.data[start:], None)}


def test_s3_stream_resumes_with_a_ranged_get_after_a_broken_connection():
    data = os.urandom(300_000)
    client = _FakeClient(data)
    first = {"Body": _FlakyBody(data, fail_after=100_000), "ETag": '"e1"', "ContentLength": len(data)}
    raw = storage._S3RawReader(client, "b", "k", "s3://b/k", first)
    with io.BufferedReader(raw, 1 << 16) as f:
        assert f.read() == data
    assert client.calls == [{"Bucket": "b", "Key": "k", "Range": "bytes=100000-", "IfMatch": '"e1"'}]
