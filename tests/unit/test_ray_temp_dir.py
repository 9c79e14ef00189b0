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
