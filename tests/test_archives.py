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


@pytest.fixture(params=["data filter", "python < 3.11.4"])
def tar_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways tar members are checked: tarfile's "data" filter, and ours where it is missing
    (the image's Debian Python 3.11.2)."""
    if request.param == "python < 3.11.4":
        monkeypatch.delattr(tarfile, "data_filter")


@pytest.mark.usefixtures("tar_filter")
@pytest.mark.parametrize(
    ("name", "kind"), [("../escaped.txt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)]
)
def test_paths_that_escape_are_refused(tmp_path: Path, name: str, kind: bytes) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ArchiveError, match=r"cannot unpack .*evil\.tar"):
        unpack_once(archive, tmp_path / "out" / "evil")
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "out" / "evil" / "link").exists()


@pytest.mark.usefixtures("tar_filter")
def test_a_model_archive_with_folders_unpacks(tmp_path: Path) -> None:
    (tmp_path / "src" / "code").mkdir(parents=True)
    (tmp_path / "src" / "code" / "a.py").write_text("x = 1")
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src", arcname=".")
    dest = unpack_once(tmp_path / "model.tar.gz", tmp_path / "out" / "model")
    assert (dest / "code" / "a.py").read_text() == "x = 1"
