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

`read_archive` walks an archive held in memory (a request body) by the same rules, writing nothing:
it lists the regular files from the headers alone, and each `ArchiveFile` reads its bytes on demand,
held to the size its header declares.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import logging
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "ArchiveBudget",
    "ArchiveError",
    "ArchiveFile",
    "ArchiveMemberError",
    "ArchiveTooLargeError",
    "is_archive",
    "read_archive",
    "unpack_name",
    "unpack_once",
]

logger = logging.getLogger(__name__)

_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_BLOCK = 4096  # on disk a file takes whole blocks, and a folder or an empty file about one
_CHUNK = 1 << 20
_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0
_ZIP_CENTRAL_HEADER = b"PK\x01\x02"  # starts each entry of the central directory
_GZIP_MAGIC = b"\x1f\x8b"
# A tar entry beyond its data: its header, a pax or GNU long-name header and its data, and padding.
_TAR_ENTRY_OVERHEAD = 4 * tarfile.BLOCKSIZE


class ArchiveError(ValueError):
    """Raised when an archive cannot be unpacked; the message names it, the problem and the fix.

    From `read_archive`, which has no path to name, the message says what is wrong, and the caller
    adds what to send instead.
    """


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


class ArchiveMemberError(ArchiveError):
    """Raised for one member of an in-memory archive that cannot be read.

    By `read_archive` for an encrypted zip member, and by `ArchiveFile.read` for a member whose
    data is damaged (CRC error, corrupt compressed data), cut short, compressed with a method
    zipfile lacks, or not the size its header declares. `member` is its path in the archive, as
    the archive spells it (not made safe to show); the message says what is wrong, not which member.
    """

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(problem)
        self.member = member


class ArchiveTooLargeError(ArchiveError):
    """Raised by `read_archive`, before any member is read, for an archive over one of its limits.

    `limit` names the parameter exceeded: "max_entries" (entries of any kind), or "max_bytes" (a
    gzip-compressed tar that decompresses to more than that and its headers). The message gives
    the figure and the limit; the caller adds what raises it.
    """

    def __init__(self, message: str, limit: Literal["max_entries", "max_bytes"]) -> None:
        super().__init__(message)
        self.limit = limit


class _RefusedError(Exception):
    """Raised inside this module when an archive breaks a rule; `unpack_once` names the archive."""


class _MemberRefusedError(_RefusedError):
    """A `_RefusedError` about one member, which `read_archive` reports by name."""

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(f"{member!r} {problem}")
        self.member = member
        self.problem = problem


@dataclass(frozen=True)
class _Member:
    """One entry of an archive, as its header declares it."""

    name: str
    size: int
    is_dir: bool
    executable: bool
    open: Callable[[], IO[bytes]]
    special: bool = False  # a link, device or FIFO, walked past only when not refused


@dataclass(frozen=True)
class _Size:
    members: int
    declared: int
    on_disk: int


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SUFFIXES)


def _identity(archive: Path) -> str:
    info = archive.stat()
    return f"{archive.resolve()} {info.st_size} {info.st_mtime_ns}"


def unpack_name(archive: Path) -> str:
    """A folder name for `archive` unpacked: its stem and a digest of its path, size and mtime.

    Servers of one host unpack under one parent. Named so, each archive gets a folder of its own,
    and no server replaces a tree that another is loading from; the workers of one server, given
    the same archive, share one.
    """
    digest = hashlib.sha256(_identity(archive).encode()).hexdigest()[:16]
    return f"{archive.name.split('.')[0]}-{digest}"


def unpack_once(archive: Path, dest: Path, budget: ArchiveBudget = ArchiveBudget()) -> Path:
    """Unpack `archive` into `dest` within `budget` and return `dest`.

    Several processes of one host may ask at once. They queue on a lock file, and the ones after
    the first find a completion marker naming this archive and reuse the result. A different
    archive (other path, size or mtime) is unpacked afresh. A refused or broken archive leaves
    nothing behind except the lock file: no `dest`, no marker, no partial tree.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = dest.with_name(dest.name + ".complete")
    identity = _identity(archive)
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


def _zip_members(zf: zipfile.ZipFile, refuse_special: bool = True) -> Iterator[_Member]:
    """The entries of the central directory; a link or special file is refused, or yielded with
    `special` set for the caller to skip."""
    for info in zf.infolist():  # the central directory, read when the file was opened
        mode = info.external_attr >> 16  # Unix st_mode, or 0 when the zip was made elsewhere
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            if refuse_special:
                raise _RefusedError(_not_plain(info.filename))
            yield _special(info.filename)
            continue
        if info.flag_bits & _ZIP_ENCRYPTED:
            raise _MemberRefusedError(
                info.filename, "is encrypted; make the archive without a password"
            )
        # not info.is_dir(), which raises IndexError for an empty name
        is_dir = info.filename.endswith("/") or stat.S_ISDIR(mode)
        yield _Member(
            name=info.filename,
            size=0 if is_dir else info.file_size,
            is_dir=is_dir,
            executable=bool(mode & 0o111),
            open=functools.partial(zf.open, info),
        )


def _tar_members(tf: tarfile.TarFile, refuse_special: bool = True) -> Iterator[_Member]:
    # Iterating reads one header at a time and skips the data, so a compressed tar is measured in
    # a single pass through the stream, and unpacked in a single pass too.
    for info in tf:
        if not (info.isfile() or info.isdir()):
            if refuse_special:
                raise _RefusedError(_not_plain(info.name))
            yield _special(info.name)
            continue
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


def _special(name: str) -> _Member:
    return _Member(name, 0, is_dir=False, executable=False, open=io.BytesIO, special=True)


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


# --- archives held in memory ----------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveFile:
    """One regular file of an archive held in memory: its path there and its declared size.

    Listing costs only the headers; `read` reads the data, and only then is the data checked.
    """

    name: str
    size: int
    _open: Callable[[], IO[bytes]] = field(repr=False, compare=False)

    def read(self) -> bytes:
        """Its bytes, reading at most one byte past the declared size.

        Headers can lie, and zipfile and tarfile stop at the declared size without saying whether
        there was more, so the one byte more is what shows it. ArchiveMemberError when the data
        cannot be read out of the archive or is not the size declared.
        """
        try:
            with self._open() as source:
                data = source.read(self.size + 1)
        # BadZipFile, and ValueError for a local header offset before the start: a damaged zip.
        # TarError: a tar cut short inside this member. EOFError: compressed data cut short.
        # zlib.error, LZMAError, OSError (bz2): corrupt compressed data. NotImplementedError: a
        # compression method or zip feature zipfile lacks.
        except (
            zipfile.BadZipFile,
            ValueError,
            tarfile.TarError,
            EOFError,
            zlib.error,
            lzma.LZMAError,
            OSError,
            NotImplementedError,
        ) as exc:
            raise ArchiveMemberError(self.name, _unreadable(exc)) from exc
        if len(data) > self.size:
            raise ArchiveMemberError(
                self.name,
                f"holds more than the {self.size:,} bytes its header declares; make the archive "
                "again",
            )
        if len(data) < self.size:
            raise ArchiveMemberError(
                self.name,
                f"holds {len(data):,} of the {self.size:,} bytes its header declares: the archive "
                "is cut short or damaged; make it again and send it whole",
            )
        return data


def _unreadable(exc: Exception) -> str:
    """Why a member's data cannot be read, without the library's text where it quotes the name."""
    if isinstance(exc, zipfile.BadZipFile | ValueError):
        if "CRC" in str(exc):
            return "fails its CRC check: the archive is damaged; make it again"
        return "has a damaged local header: the archive is damaged; make it again"
    if isinstance(exc, tarfile.TarError | EOFError):
        return "is cut short: the archive ends inside it; send the whole archive"
    if isinstance(exc, NotImplementedError):
        return (
            f"uses a zip feature this server cannot read ({exc}); make the archive with deflate, "
            "the zip tools' default"
        )
    return f"holds damaged compressed data ({exc}); make the archive again"


def read_archive(
    body: bytes, kind: Literal["zip", "tar"], *, max_entries: int, max_bytes: int
) -> list[ArchiveFile]:
    """The regular files of the .zip, or the .tar or .tar.gz, held in `body`, in archive order.

    Only headers are read here. Folders, links and special files are skipped, but count towards
    `max_entries` all the same, since each costs a header in memory; the files' data is read by
    `ArchiveFile.read`. A gzip stream is decompressed first (tar headers lie inside it), held to
    `max_bytes` plus room for the tar headers of `max_entries` entries. The files' declared sizes
    are the caller's to check, before reading them.

    ArchiveTooLargeError over either limit, ArchiveMemberError for an encrypted zip member, and
    ArchiveError for a body that is not such an archive: its message says what is wrong, and the
    caller says what to send instead.
    """
    try:
        if kind == "zip":
            members = _zip_in_memory(body, max_entries)
        else:
            members = _tar_in_memory(body, max_entries, max_bytes)
    except _MemberRefusedError as exc:
        raise ArchiveMemberError(exc.member, exc.problem) from exc
    except ArchiveTooLargeError:
        raise  # a ValueError, like some of what follows, but one that says what is wrong
    # zipfile: BadZipFile, UnicodeDecodeError (a ValueError) for a name flagged UTF-8 that is not,
    # and NotImplementedError for a zip version it does not know. tarfile: TarError, and
    # ValueError for a seek before the start of the body. zlib.error: a damaged gzip stream.
    except (
        _RefusedError,
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        ValueError,
        NotImplementedError,
    ) as exc:
        what = ".zip" if kind == "zip" else ".tar or .tar.gz"
        raise ArchiveError(f"it is damaged or not a {what} ({exc})") from exc
    return [ArchiveFile(m.name, m.size, m.open) for m in members if not (m.is_dir or m.special)]


def _too_many(max_entries: int) -> ArchiveTooLargeError:
    return ArchiveTooLargeError(
        f"holds more than {max_entries:,} entries (files, folders and links)", "max_entries"
    )


def _zip_in_memory(body: bytes, max_entries: int) -> list[_Member]:
    # zipfile reads the whole central directory when it opens the archive, and each entry there
    # starts with this signature, so counting it first bounds what zipfile makes. It over-counts
    # only when the data holds the same four bytes: about once in 4 GiB of compressed data.
    if body.count(_ZIP_CENTRAL_HEADER) > max_entries:
        raise _too_many(max_entries)
    # Not closed: the files read from it later, and it holds no more than `body`.
    archive = zipfile.ZipFile(io.BytesIO(body))
    return list(_zip_members(archive, refuse_special=False))


def _tar_in_memory(body: bytes, max_entries: int, max_bytes: int) -> list[_Member]:
    if body.startswith(_GZIP_MAGIC):
        # Decompressed here, within a bound, not by tarfile: tarfile reads a pax or GNU long-name
        # header's data whole, whatever size it declares, before it hands over a single member.
        body = _gunzip(body, max_bytes + max_entries * _TAR_ENTRY_OVERHEAD + tarfile.RECORDSIZE)
    archive = tarfile.TarFile(fileobj=io.BytesIO(body))  # plain tar: nothing left to decompress
    members: list[_Member] = []
    try:
        for member in _tar_members(archive, refuse_special=False):
            if len(members) == max_entries:  # also ends the loop of a header pointing backwards
                raise _too_many(max_entries)
            if member.size < 0:
                raise _RefusedError(f"a header declares a size of {member.size}")
            members.append(member)
    except tarfile.ReadError:
        # tarfile itself ends an archive at a damaged header after the first. It raises when a
        # member's data runs past the end: that member's read reports it, and those before stand.
        if not members:
            raise
    return members


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    """The gzip stream (one or more members) decompressed, refused once over `max_bytes`."""
    chunks: list[bytes] = []
    size = 0
    rest = body
    while rest:
        stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
        chunk = stream.decompress(rest, max_bytes + 1 - size)  # never 0, which means no limit
        size += len(chunk)
        if size > max_bytes:
            raise ArchiveTooLargeError(
                f"decompresses to more than {_human(max_bytes)} of tar", "max_bytes"
            )
        if not stream.eof:
            raise _RefusedError("the gzip stream is cut short")
        chunks.append(chunk)
        rest = stream.unused_data.lstrip(b"\0")  # gzip allows zeros after a member, as padding
    return b"".join(chunks)


def _human(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KB"
