"""Where a local Ray keeps its session files: a private folder, short enough for its socket paths."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from pipeline.raysession import ray_temp_dir


def test_the_configured_folder_is_made_private(monkeypatch):
    short = Path(tempfile.mkdtemp(prefix="wr", dir="/tmp"))  # pytest's tmp_path is too deep for Ray
    try:
        monkeypatch.setenv("WYSIWYC_RAY_TMP", str(short / "ray"))
        assert ray_temp_dir() == short / "ray" / "r"
        assert stat.S_IMODE((short / "ray").stat().st_mode) == 0o700
    finally:
        shutil.rmtree(short)


def test_a_folder_too_deep_for_rays_socket_paths_falls_back_to_a_private_one_in_tmp(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / "runs" / "ray"  # + Ray's 62 characters of session/socket: > 107 bytes
    monkeypatch.setenv("WYSIWYC_RAY_TMP", str(deep))
    temp = ray_temp_dir()
    assert temp.parent.name == f"wysiwyc-ray-{os.getuid()}" and temp.parent.parent.as_posix() == "/tmp"
    assert len(str(temp / "session_2026-12-05_19-10-34_654405_29151" / "sockets" / "plasma_store")) <= 107
    assert stat.S_IMODE(temp.parent.stat().st_mode) == 0o700 and not deep.exists()


def test_only_the_newest_session_folders_stay(tmp_path):
    """A local Ray leaves a session folder per command; ensure_ray prunes all but the newest SESSIONS_KEPT, and
    never one whose starting process (the pid ending its name) still runs."""
    from pipeline.raysession import SESSIONS_KEPT, prune_sessions

    temp = tmp_path / "r"
    gone = 2**22 + 1  # above Linux's default pid_max: no such process
    names = [f"session_2026-12-{day:02d}_10-00-00_000000_{gone}" for day in range(1, 16)]  # 15, oldest first
    running = f"session_2026-11-30_10-00-00_000000_{os.getpid()}"  # the oldest, but its process is this one
    names.insert(0, running)
    for name in names:
        (temp / name / "logs").mkdir(parents=True)
        (temp / name / "logs" / "raylet.out").write_text("log")
    (temp / "session_latest").symlink_to(temp / names[-1])
    (temp / "other").mkdir()
    removed = prune_sessions(temp)
    assert SESSIONS_KEPT == 10 and [p.name for p in removed] == names[1:6]
    left = sorted(p.name for p in temp.iterdir())
    assert left == sorted([running, *names[6:], "session_latest", "other"])
    assert (temp / "session_latest" / "logs" / "raylet.out").read_text() == "log"
    assert prune_sessions(temp) == [] and prune_sessions(tmp_path / "absent") == []


def test_rays_token_is_made_once_in_the_private_folder_and_exported(tmp_path, monkeypatch):
    from pipeline.raysession import auth_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    path = auth_token(tmp_path)
    assert path == tmp_path / "auth_token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert auth_token(tmp_path) == path and path.read_text() == token  # the next command: the same token
    # a cluster's own token, or auth turned off, is left alone; a named file that is gone is not a token
    theirs = tmp_path / "theirs"
    theirs.write_text("t" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(theirs))
    assert auth_token(tmp_path / "x") is None and os.environ["RAY_AUTH_TOKEN_PATH"] == str(theirs)
    theirs.unlink()  # e.g. inherited from a command whose folder was removed since
    (tmp_path / "x").mkdir()
    assert auth_token(tmp_path / "x") == tmp_path / "x" / "auth_token" == Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token(tmp_path / "y") is None and not (tmp_path / "y").exists()
