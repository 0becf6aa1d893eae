"""common.files: the cache root, the inter-process lock, atomic writes and whole-folder publishes."""
from __future__ import annotations

import fcntl
import json
import os

import pytest

from common import files
from common.files import atomic_write_bytes, atomic_write_json, atomic_write_text, cache_root, file_lock, publish_dir


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WEBQA_GYM_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("WEBQA_GYM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "webqa-gym" and cache_root().is_dir()


def test_atomic_writes_round_trip_and_leave_no_temp_file(tmp_path):
    atomic_write_json(tmp_path / "sub" / "a.json", {"ä": [1, 2]})
    assert json.loads((tmp_path / "sub" / "a.json").read_text(encoding="utf-8")) == {"ä": [1, 2]}
    assert "ä" in (tmp_path / "sub" / "a.json").read_text(encoding="utf-8")  # not escaped
    atomic_write_text(tmp_path / "b.txt", "one\n")
    atomic_write_text(tmp_path / "b.txt", "two\n")
    assert (tmp_path / "b.txt").read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.txt", "sub"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "c.bin"
    atomic_write_bytes(target, b"old")

    def no_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]


def test_file_lock_is_exclusive_while_held(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    with file_lock(lock):
        with open(lock, "a+") as other:  # another open file description, as another process would have
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit
        fcntl.flock(other, fcntl.LOCK_UN)


def test_publish_dir_replaces_the_final_folder_whole(tmp_path):
    final = tmp_path / "index"
    final.mkdir()
    (final / "stale").write_text("x")
    tmp = tmp_path / ".index.tmp"
    tmp.mkdir()
    (tmp / "fresh").write_text("y")
    publish_dir(tmp, final)
    assert sorted(os.listdir(final)) == ["fresh"] and not tmp.exists()
