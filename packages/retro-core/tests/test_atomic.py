"""Tests of retro_core.atomic: a write appears whole or not at all."""

import json

import pytest

from retro_core.atomic import atomic_path, atomic_write, atomic_write_json, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old\n")

    def boom(f):
        f.write(b"half a file")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, boom)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"also half")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_writes_replace_the_file_with_the_usual_mode(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": [1, 2]}, indent=2)
    assert json.loads(path.read_text()) == {"x": [1, 2]} and path.read_text().endswith("\n")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # the mode open() gives under this umask (not mkstemp's 0600)
    assert path.stat().st_mode == plain.stat().st_mode
