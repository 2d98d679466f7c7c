"""Unpacking the archives users hand over (.zip, .tar, .tar.gz): datasets, model.tar.gz, once."""

from __future__ import annotations

import fcntl
import logging
import shutil
import tarfile
import zipfile
from pathlib import Path

__all__ = ["ArchiveError", "is_archive", "unpack_once"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class ArchiveError(ValueError):
    """Raised when an archive cannot be unpacked; the message names it and the problem."""


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SUFFIXES)


def unpack_once(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into `dest` and return `dest`.

    Several processes of one host may ask at once: they queue on a lock file, and the ones after
    the first find a completion marker naming this archive and reuse the result; a different
    archive (other path, size or mtime) is unpacked afresh. Member paths are confined to `dest`
    (zipfile sanitises names; tar members are checked by `_untar`).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = dest.with_name(dest.name + ".complete")
    stat = archive.stat()
    identity = f"{archive.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and done.read_text() == identity:
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        logger.info("Unpacking %s to %s", archive, dest)
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(dest)
            else:
                _untar(archive, dest)
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"cannot unpack {archive}: {exc}") from exc
        done.write_text(identity)
    return dest


def _untar(archive: Path, dest: Path) -> None:
    """Extract with tarfile's "data" filter: no links or devices, nothing outside `dest`.

    The filter arrived in Python 3.11.4; the image's Python (Debian bookworm's 3.11.2) lacks it,
    so there the same rules are applied here, more strictly: regular files and folders only.
    """
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
            return
        root = dest.resolve()
        for member in tf.getmembers():
            if not (member.isfile() or member.isdir()):
                raise tarfile.TarError(f"{member.name!r} is a link or a special file")
            if not (root / member.name).resolve().is_relative_to(root):
                raise tarfile.TarError(f"{member.name!r} would be written outside {dest}")
        tf.extractall(dest)
