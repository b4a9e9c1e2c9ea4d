"""Atomic outputs: whole or nothing, with ordinary permissions."""

import os
import stat

import pytest

from pipeline.io import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_file_replaces_and_has_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.txt"]  # no temp file left


def test_atomic_directory_swaps_whole_or_keeps_old(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
