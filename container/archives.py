"""Unpacking the archives users hand over (.zip, .tar, .tar.gz): datasets, model.tar.gz, once.

Nothing in an archive is trusted. Before anything is written, the members that the zip central
directory or the tar headers declare are counted and their sizes summed against an
`ArchiveBudget` and the free space at the destination: a few hundred KB of gzip can declare
gigabytes of zeros. Then each member is written by a streaming copy that stops at its declared
size. Only regular files and folders are unpacked, and only inside the destination. Modes are
reduced to 0o644 or 0o755, never setuid, setgid, sticky or world-writable, and owners are not
restored. The tree is built in a sibling folder and renamed into place only when it is complete.

The same code handles tar and zip, and it does not depend on tarfile's "data" filter, which the
image's Python (Debian bookworm's 3.11.2) lacks.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["ArchiveBudget", "ArchiveError", "is_archive", "unpack_once"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_BLOCK = 4096  # on disk a file takes whole blocks, and a folder or an empty file about one
_CHUNK = 1 << 20
_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0


class ArchiveError(ValueError):
    """Raised when an archive cannot be unpacked; the message names it, the problem and the fix."""


@dataclass(frozen=True)
class ArchiveBudget:
    """The most one archive may unpack to, checked against its headers before anything is written.

    `max_bytes` caps the sum of the members' declared sizes; None leaves free space as the only
    cap. `max_members` caps files plus folders, because each costs an inode on disk and a header in
    memory while unpacking. `keep_free` is left free at the destination for what the job writes
    afterwards: logs, checkpoints and the model.
    """

    max_bytes: int | None = None
    max_members: int = 1_000_000
    keep_free: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be None or >= 0, not {self.max_bytes}")
        if self.max_members < 0:
            raise ValueError(f"max_members must be >= 0, not {self.max_members}")
        if self.keep_free < 0:
            raise ValueError(f"keep_free must be >= 0, not {self.keep_free}")


class _RefusedError(Exception):
    """Raised inside this module when an archive breaks a rule; `unpack_once` names the archive."""


@dataclass(frozen=True)
class _Member:
    """One entry of an archive, as its header declares it."""

    name: str
    size: int
    is_dir: bool
    executable: bool
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class _Size:
    members: int
    declared: int
    on_disk: int


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SUFFIXES)


def unpack_once(archive: Path, dest: Path, budget: ArchiveBudget = ArchiveBudget()) -> Path:
    """Unpack `archive` into `dest` within `budget` and return `dest`.

    Several processes of one host may ask at once. They queue on a lock file, and the ones after
    the first find a completion marker naming this archive and reuse the result. A different
    archive (other path, size or mtime) is unpacked afresh. A refused or broken archive leaves
    nothing behind except the lock file: no `dest`, no marker, no partial tree.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = dest.with_name(dest.name + ".complete")
    info = archive.stat()
    identity = f"{archive.resolve()} {info.st_size} {info.st_mtime_ns}"
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and done.read_text() == identity:
            return dest
        done.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        partial_prefix = f"{dest.name}.partial-"
        for stale in dest.parent.iterdir():  # left by a process killed while unpacking
            if stale.name.startswith(partial_prefix):
                shutil.rmtree(stale, ignore_errors=True)
        partial = dest.with_name(f"{partial_prefix}{os.getpid()}")
        try:
            _unpack(archive, partial, dest, budget)
        except _RefusedError as exc:
            raise ArchiveError(f"cannot unpack {archive}: {exc}") from exc
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # already gone once renamed
        done.write_text(identity)
    return dest


def _unpack(archive: Path, root: Path, dest: Path, budget: ArchiveBudget) -> None:
    """Measure the headers, write the members under `root`, then rename it to `dest`."""
    try:
        with _members(archive) as members:
            size = _measure(members, budget.max_members)
        _check(size, budget, root.parent)
        logger.info(
            "Unpacking %s (%d files and folders, %s) to %s",
            archive,
            size.members,
            _human(size.declared),
            dest,
        )
        root.mkdir()
        with _members(archive) as members:
            _extract(members, root.resolve(), size)
        root.rename(dest)
    # EOFError and zlib.error: a gzip stream cut short or corrupt under a tar. NotImplementedError:
    # a zip member compressed with a method zipfile cannot read.
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError) as exc:
        raise _RefusedError(
            f"{exc}: it is damaged or not a .zip, .tar or .tar.gz; check it with `unzip -t` or "
            "`tar -tf` and upload it again"
        ) from exc
    except OSError as exc:
        raise _RefusedError(f"cannot read it or write under {root.parent}: {exc}") from exc


@contextmanager
def _members(archive: Path) -> Iterator[Iterator[_Member]]:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            yield _zip_members(zf)
    else:
        with tarfile.open(archive) as tf:
            yield _tar_members(tf)


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():  # the central directory, read when the file was opened
        mode = info.external_attr >> 16  # Unix st_mode, or 0 when the zip was made elsewhere
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _RefusedError(_not_plain(info.filename))
        if info.flag_bits & _ZIP_ENCRYPTED:
            raise _RefusedError(
                f"{info.filename!r} is encrypted; make the archive without a password"
            )
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        yield _Member(
            name=info.filename,
            size=0 if is_dir else info.file_size,
            is_dir=is_dir,
            executable=bool(mode & 0o111),
            open=functools.partial(zf.open, info),
        )


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    # Iterating reads one header at a time and skips the data, so a compressed tar is measured in
    # a single pass through the stream, and unpacked in a single pass too.
    for info in tf:
        if not (info.isfile() or info.isdir()):
            raise _RefusedError(_not_plain(info.name))
        yield _Member(
            name=info.name,
            size=info.size if info.isfile() else 0,
            is_dir=info.isdir(),
            executable=bool(info.mode & 0o111),
            open=functools.partial(_open_tar_member, tf, info),
        )


def _open_tar_member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    source = tf.extractfile(info)
    if source is None:  # not reached: only regular files are opened
        raise _RefusedError(_not_plain(info.name))
    return source


def _not_plain(name: str) -> str:
    return (
        f"{name!r} is a link or a special file; only regular files and folders are unpacked, "
        "so archive the files themselves"
    )


def _measure(members: Iterator[_Member], max_members: int) -> _Size:
    count = declared = on_disk = 0
    for member in members:
        count += 1
        if count > max_members:  # stop reading: the headers of a huge archive fill memory too
            raise _RefusedError(
                f"it holds more than {max_members:,} files and folders, the most one archive "
                "may hold; upload fewer files"
            )
        declared += member.size
        on_disk += max(-(-member.size // _BLOCK), 1) * _BLOCK
    return _Size(count, declared, on_disk)


def _check(size: _Size, budget: ArchiveBudget, where: Path) -> None:
    if budget.max_bytes is not None and size.declared > budget.max_bytes:
        raise _RefusedError(
            f"its members declare {_human(size.declared)}, more than the "
            f"{_human(budget.max_bytes)} one archive may unpack to; upload a smaller archive"
        )
    free = shutil.disk_usage(where).free
    if size.on_disk > free - budget.keep_free:
        raise _RefusedError(
            f"it unpacks to about {_human(size.on_disk)}, and {where} has {_human(free)} free, "
            f"of which {_human(budget.keep_free)} is kept for what the job writes next; free "
            "space there, raise the job's VolumeSizeInGB or upload a smaller archive"
        )


def _extract(members: Iterator[_Member], root: Path, size: _Size) -> None:
    """Write the members under `root`, holding them to what the first pass measured."""
    count = declared = 0
    for member in members:
        count += 1
        declared += member.size
        if count > size.members or declared > size.declared:
            raise _RefusedError("it changed while it was being unpacked; upload it again")
        out = _create(_confined(root, member.name), member)
        if out is None:
            continue
        with out, member.open() as source:
            os.fchmod(out.fileno(), 0o755 if member.executable else 0o644)
            _copy(source, out, member)
    # Folders get their mode last: parents created on the way got the umask's, not the archive's.
    for folder, _, _ in os.walk(root):
        os.chmod(folder, 0o755)


def _confined(root: Path, name: str) -> Path:
    # Only folders and regular files exist under `root`, so normalising the path lexically is
    # enough: there is no link to follow out.
    target = Path(os.path.normpath(root / name))
    if "\0" in name or not target.is_relative_to(root):
        raise _RefusedError(
            f"{name!r} would be written outside the destination; archive relative paths"
        )
    return target


def _create(target: Path, member: _Member) -> IO[bytes] | None:
    """The file `member` is written to, or None for a folder, which this creates."""
    try:
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "wb")
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise _RefusedError(
            f"{member.name!r} clashes with another member (a file where a folder is needed, or "
            "the reverse); archive each path once"
        ) from exc


def _copy(source: IO[bytes], out: IO[bytes], member: _Member) -> None:
    """Copy at most the declared size: zipfile and tarfile stop there, and this holds them to it."""
    written = 0
    while chunk := source.read(_CHUNK):
        written += len(chunk)
        if written > member.size:
            raise _RefusedError(
                f"{member.name!r} holds more than the {member.size:,} bytes it declares"
            )
        out.write(chunk)
    if written != member.size:
        raise _RefusedError(
            f"{member.name!r} holds {written:,} of the {member.size:,} bytes it declares: the "
            "archive is cut short; upload it again"
        )


def _human(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KB"
