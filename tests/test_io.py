"""Files appear whole or not at all, with the permissions a normal write would give."""

import os

import pytest

from duodiff.core import io


def test_atomic_write_replaces_whole_file_and_respects_umask(tmp_path):
    path = tmp_path / "sub" / "x.json"
    io.write_json(path, {"a": 1})
    assert io.read_json(path) == {"a": 1}
    old = os.umask(0o022)
    try:
        io.write_text(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_stray_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "images").mkdir()
    kept = [tmp_path / "images" / "000000.png", tmp_path / "stats.json", tmp_path / "images" / "tmp-not-ours.png"]
    stray = [tmp_path / "images" / ".tmp-000001.png-abc123", tmp_path / ".tmp-stats.json-x"]
    for path in kept + stray:
        path.write_text("x")
    assert io.remove_stray_temporaries(tmp_path) == sorted(stray)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stray)
    assert io.remove_stray_temporaries(tmp_path / "missing") == []
