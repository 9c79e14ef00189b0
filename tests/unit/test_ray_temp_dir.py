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
