"""The Ray session every Ray stage (train, tune, attribute, serve) runs in.

An existing session (``ray.init`` done by the caller, or ``RAY_ADDRESS``) is used as is;
otherwise a local one is started with the logical CPUs the caller needs (at least the cores), no
dashboard, token auth off and its session files under ``runs/ray/r`` (``runs/ray``: or
``$WYSIWYC_RAY_TMP``, a folder only its owner can enter, 0700; :func:`ray_temp_dir`).

Credentials never travel in a ``runtime_env``: Ray writes a job's runtime environment into the
session's logs (``runtime_env_agent.log``). A local Ray is started with them in its environment,
so its workers inherit them; on a cluster (``RAY_ADDRESS``) the workers take them from the pod's
identity (IRSA) or a mounted secret, and the ``runtime_env`` carries only the settings that are no
secret (endpoint, region, tracking URI, ...): :func:`worker_env`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.lease import process_running
from pipeline.storage import S3Options

log = logging.getLogger(__name__)

_ENV_PREFIXES = ("AWS_", "MLFLOW_")


def worker_env(options: S3Options, credentials: bool = False) -> dict[str, str]:
    """Environment for the workers: ``AWS_*`` / ``MLFLOW_*`` of this process and of ``options`` (``storage.*``).

    Args:
        credentials: keep the credentials (``storage.CREDENTIAL_ENV_VARS``): only for a local Ray's own
            environment, never for a ``runtime_env`` (see the module docstring).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    env.update(options.to_env())
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if credentials:
        return env
    return {k: v for k, v in env.items() if k not in storage.CREDENTIAL_ENV_VARS}


def ensure_ray(options: S3Options, num_cpus: int | None = None, use_gpu: bool = False) -> None:
    """Use the running Ray session, or ``RAY_ADDRESS``'s cluster, or start a local one.

    Args:
        options: the object storage the workers reach (``storage.*``; credentials only into a local Ray's
            own environment).
        num_cpus: logical CPUs of a local cluster (default: the cores; more when trials or actors each hold one).
        use_gpu: a local cluster gets the GPUs (else none).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": worker_env(options)}, log_to_driver=False)
        return
    cpus = num_cpus or os.cpu_count() or 1
    temp = ray_temp_dir()
    prune_sessions(temp)
    auth_token(temp.parent)
    # the local Ray's processes (and so every worker) inherit this process's environment at ray.init:
    # the credentials of storage.* join it for the start, and no runtime_env (which Ray logs) is needed
    saved = dict(os.environ)
    os.environ.update(worker_env(options, credentials=True))
    try:
        ray.init(
            num_cpus=cpus,
            num_gpus=None if use_gpu else 0,
            include_dashboard=False,
            _temp_dir=str(temp),
            log_to_driver=False,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def auth_token(folder: Path) -> Path | None:
    """Ray's token authentication (on by default since Ray 2.60) for a local cluster, with the token in our private
    folder (``runs/ray/auth_token``, 0600 in a 0700 folder) rather than ``~/.ray``: made once, exported as
    ``RAY_AUTH_TOKEN_PATH`` to this process and so to every Ray process and worker it starts. Nothing is done
    when the environment already names a token (``RAY_AUTH_TOKEN``, or a ``RAY_AUTH_TOKEN_PATH`` file that exists:
    a cluster's) or turns auth off (``RAY_AUTH_MODE=disabled``). Returns the token file (None when not ours)."""
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if (
        os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"
        or os.environ.get("RAY_AUTH_TOKEN")
        or (named and Path(named).is_file())
    ):
        return None
    path = folder / "auth_token"
    # whole or not at all (a process starting at the same moment reads the same token); kept by later commands
    if storage.create_exclusive(str(path), secrets.token_hex(32).encode()):
        path.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path


SESSIONS_KEPT = 10  # a local Ray leaves a session folder (logs, ~1 MB and more) per command: the newest ones stay


def prune_sessions(temp: Path, keep: int = SESSIONS_KEPT) -> list[Path]:
    """Delete all but the ``keep`` newest ``session_*`` folders of a local Ray's temp dir (their names sort by
    start time and end with the pid of the process that started the session); a session whose process still
    runs stays whatever its age, and ``session_latest`` and anything else stay. Returns the folders deleted."""
    if not temp.is_dir():
        return []
    sessions = sorted(p for p in temp.iterdir() if p.name.startswith("session_2") and p.is_dir() and not p.is_symlink())
    old = [p for p in sessions[: max(0, len(sessions) - keep)] if not process_running(p.name.rsplit("_", 1)[-1])]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    if old:
        log.info("removed %d old Ray session folder(s) under %s (the newest %d stay)", len(old), temp, keep)
    return old


# what Ray appends to its temp dir for a socket: /session_2026-12-05_19-10-34_654405_29151/sockets/plasma_store
_RAY_SOCKET_SUFFIX = 62
_MAX_SOCKET_PATH = 107  # AF_UNIX


def ray_temp_dir() -> Path:
    """The local Ray's temp dir: ``r`` in ``$WYSIWYC_RAY_TMP``, else in ``runs/ray`` of the working folder.

    Ray makes its folders 0777 (every process it starts applies it again): they live in a folder of ours
    that only its owner may enter (0700), so the session's logs and sockets are that user's alone. A
    session's socket paths must stay under 108 bytes: when the folder is too deep for that (a deep working
    folder), ``/tmp/wysiwyc-ray-UID`` is used instead (said in a log line).

    Raises:
        WysiwycError: the fallback folder exists and belongs to another user.
    """
    private = Path(os.environ.get("WYSIWYC_RAY_TMP", "runs/ray")).resolve()
    if len(str(private / "r")) + _RAY_SOCKET_SUFFIX > _MAX_SOCKET_PATH:
        fallback = Path("/tmp") / f"wysiwyc-ray-{os.getuid()}"
        log.info("Ray's session folder goes to %s: %s is too deep for its socket paths", fallback, private)
        private = fallback
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private.stat().st_uid != os.getuid():
        raise WysiwycError(f"{private} belongs to another user: set WYSIWYC_RAY_TMP to a short folder of yours")
    private.chmod(0o700)
    return private / "r"
