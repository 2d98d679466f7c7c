"""Archives unpack once, again when they change, within a budget, plainly, or not at all."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from container.archives import ArchiveBudget, ArchiveError, unpack_once
from tests.crafted import Zeros

MiB = 1 << 20


def _tar(path: Path, name: str, content: bytes) -> Path:
    source = path.parent / name
    source.write_bytes(content)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(source, arcname=name)
    return path


def _tar_members(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for info, content in members:
            info.size = len(content) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return path


def _member(name: str, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    return info


def _left_in(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_same_archive_is_reused_a_changed_one_is_unpacked_again(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "model.tar.gz", "a.txt", b"first")
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    (tmp_path / "out" / "model.partial-1").mkdir()  # left by a process killed while unpacking
    assert unpack_once(archive, dest) == dest
    assert (dest / "a.txt").read_bytes() == b"first"
    assert _left_in(dest) == ["model", "model.complete", "model.lock"]
    (dest / "left-over").write_text("from the first unpack")
    assert unpack_once(archive, dest) == dest
    assert (dest / "left-over").exists()  # reused, not unpacked again

    _tar(archive, "b.txt", b"second")
    os.utime(archive, ns=(1, 1))  # a different archive, whatever the clock says
    unpack_once(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]


def test_a_model_archive_with_folders_unpacks(tmp_path: Path) -> None:
    (tmp_path / "src" / "code").mkdir(parents=True)
    (tmp_path / "src" / "code" / "a.py").write_text("x = 1")
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src", arcname=".")
    dest = unpack_once(tmp_path / "model.tar.gz", tmp_path / "out" / "model")
    assert (dest / "code" / "a.py").read_text() == "x = 1"


def test_a_zip_with_folders_unpacks(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "data.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/", b"")
        zf.writestr("train/cat/1.jpg", b"jpeg" * 1000)
        zf.writestr("train/dog/2.jpg", b"jpeg")  # its folder only implied
    dest = unpack_once(tmp_path / "data.zip", tmp_path / "out" / "data")
    assert (dest / "train" / "cat" / "1.jpg").read_bytes() == b"jpeg" * 1000
    assert (dest / "train" / "dog" / "2.jpg").read_bytes() == b"jpeg"


BOMB = 256 * MiB


def _tar_bomb(path: Path) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = BOMB
        tf.addfile(info, Zeros(BOMB))  # type: ignore[arg-type]
    return path


def _zip_bomb(path: Path) -> Path:
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("zeros.bin", "w", force_zip64=True) as out,
    ):
        shutil.copyfileobj(Zeros(BOMB), out, MiB)
    return path


@pytest.mark.parametrize(("make", "name"), [(_tar_bomb, "bomb.tar.gz"), (_zip_bomb, "bomb.zip")])
def test_a_bomb_is_refused_before_anything_is_written(
    tmp_path: Path, make: Callable[[Path], Path], name: str
) -> None:
    archive = make(tmp_path / name)
    assert archive.stat().st_size < BOMB / 100
    dest = tmp_path / "out" / "bomb"
    with pytest.raises(ArchiveError, match=r"bomb\..* declare 256\.0 MB, more than the 1\.0 MB"):
        unpack_once(archive, dest, ArchiveBudget(max_bytes=MiB))
    assert _left_in(dest) == ["bomb.lock"]


def test_more_than_the_free_space_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "data.tar.gz", "a.txt", b"small")
    dest = tmp_path / "out" / "data"
    dest.parent.mkdir()
    everything = ArchiveBudget(keep_free=shutil.disk_usage(dest.parent).total)
    with pytest.raises(ArchiveError, match=r"data\.tar\.gz: .* free.*VolumeSizeInGB"):
        unpack_once(archive, dest, everything)
    assert _left_in(dest) == ["data.lock"]


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    archive = _tar_members(tmp_path / "many.tar", *((_member(f"{i}.txt"), b"x") for i in range(5)))
    dest = tmp_path / "out" / "many"
    with pytest.raises(ArchiveError, match=r"many\.tar: it holds more than 3 files and folders"):
        unpack_once(archive, dest, ArchiveBudget(max_members=3))
    assert _left_in(dest) == ["many.lock"]


def test_modes_are_plain_and_owners_are_not_restored(tmp_path: Path) -> None:
    members = [
        (_member("shared", 0o1777, tarfile.DIRTYPE), b""),
        (_member("shared/setuid", 0o4777), b"#!/bin/sh"),
        (_member("shared/writable", 0o666), b"data"),
        (_member("private/run", 0o700), b"#!/bin/sh"),  # its folder only implied
    ]
    for info, _ in members:
        info.uid, info.gid = 4321, 4321
    zip_path = tmp_path / "modes.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        info = zipfile.ZipInfo("setgid")
        info.external_attr = (stat.S_IFREG | stat.S_ISGID | 0o777) << 16
        zf.writestr(info, b"#!/bin/sh")
    umask = os.umask(0)  # modes are set, not left to the umask, which may be as lax as this
    try:
        dest = unpack_once(_tar_members(tmp_path / "modes.tar", *members), tmp_path / "out" / "t")
        unpacked_zip = unpack_once(zip_path, tmp_path / "out" / "zip")
    finally:
        os.umask(umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(dest) == mode(dest / "shared") == mode(dest / "private") == 0o755
    assert mode(dest / "shared" / "setuid") == mode(dest / "private" / "run") == 0o755
    assert mode(dest / "shared" / "writable") == 0o644
    assert mode(unpacked_zip / "setgid") == 0o755
    assert os.stat(dest / "shared" / "setuid").st_uid == os.getuid()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../escaped.txt", tarfile.REGTYPE),
        ("/tmp/absolute.txt", tarfile.REGTYPE),
        ("link", tarfile.SYMTYPE),
        ("hard", tarfile.LNKTYPE),
        ("fifo", tarfile.FIFOTYPE),
    ],
)
def test_tar_paths_that_escape_and_links_are_refused(
    tmp_path: Path, name: str, kind: bytes
) -> None:
    info = _member(name, kind=kind)
    info.linkname = "/etc/passwd"
    archive = _tar_members(tmp_path / "evil.tar", (_member("ok.txt"), b"fine"), (info, b""))
    dest = tmp_path / "out" / "evil"
    with pytest.raises(ArchiveError, match=r"cannot unpack .*evil\.tar: .*(outside|link)"):
        unpack_once(archive, dest)
    assert _left_in(dest) == ["evil.lock"]
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "link"])
def test_zip_paths_that_escape_and_links_are_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd")
    dest = tmp_path / "out" / "evil"
    with pytest.raises(ArchiveError, match=r"cannot unpack .*evil\.zip: .*(outside|link)"):
        unpack_once(archive, dest)
    assert _left_in(dest) == ["evil.lock"]
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_truncated_archive_leaves_nothing_behind(tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"cut{suffix}"
    _tar_members(archive, *((_member(f"{i}.bin"), os.urandom(MiB)) for i in range(4)))
    dest = tmp_path / "out" / "cut"
    unpack_once(archive, dest)  # a complete unpack, then the archive is replaced by a cut one
    archive.write_bytes(archive.read_bytes()[: int(3.5 * MiB)])
    with pytest.raises(ArchiveError, match=r"cannot unpack .*cut\.tar.*(damaged|cut short)"):
        unpack_once(archive, dest)
    assert _left_in(dest) == ["cut.lock"]


def test_a_failure_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    # "a" is a file, so "a/b" cannot be written: found only once "a" and "big" are on disk.
    archive = _tar_members(
        tmp_path / "clash.tar.gz",
        (_member("a"), b"file"),
        (_member("big"), b"x" * MiB),
        (_member("a/b"), b"under a file"),
    )
    dest = tmp_path / "out" / "clash"
    with pytest.raises(ArchiveError, match=r"clash\.tar\.gz: 'a/b' clashes with another member"):
        unpack_once(archive, dest)
    assert _left_in(dest) == ["clash.lock"]


def _central_size(data: bytes, size: int) -> bytes:
    """The zip with its one member's uncompressed size in the central directory set to `size`."""
    at = data.index(b"PK\x01\x02") + 24
    return data[:at] + size.to_bytes(4, "little") + data[at + 4 :]


@pytest.mark.parametrize(("declared", "match"), [(10, "CRC|Bad"), (1000, "100 of the 1,000")])
def test_a_zip_member_must_hold_what_it_declares(tmp_path: Path, declared: int, match: str) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", b"x" * 100)
    archive.write_bytes(_central_size(archive.read_bytes(), declared))
    dest = tmp_path / "out" / "liar"
    with pytest.raises(ArchiveError, match=match):
        unpack_once(archive, dest)
    assert _left_in(dest) == ["liar.lock"]


def test_a_budget_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="max_members must be >= 0"):
        ArchiveBudget(max_members=-1)
