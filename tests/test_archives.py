"""Archives are unpacked once, and again when they change."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from container.archives import ArchiveError, unpack_once


def _tar(path: Path, name: str, content: bytes) -> Path:
    source = path.parent / name
    source.write_bytes(content)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(source, arcname=name)
    return path


def test_same_archive_is_reused_a_changed_one_is_unpacked_again(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "model.tar.gz", "a.txt", b"first")
    dest = unpack_once(archive, tmp_path / "out" / "model")
    assert (dest / "a.txt").read_bytes() == b"first"
    (dest / "left-over").write_text("from the first unpack")
    assert unpack_once(archive, dest) == dest
    assert (dest / "left-over").exists()  # reused, not unpacked again

    _tar(archive, "b.txt", b"second")
    os.utime(archive, ns=(1, 1))  # a different archive, whatever the clock says
    unpack_once(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]


def test_paths_that_escape_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 0
        tf.addfile(info)
    with pytest.raises(ArchiveError, match=r"cannot unpack .*evil\.tar"):
        unpack_once(archive, tmp_path / "out" / "evil")
    assert not (tmp_path / "out" / "escaped.txt").exists()
