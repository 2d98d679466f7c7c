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
    (zipfile sanitises names; tarfile's "data" filter refuses links and paths that escape).
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
                with tarfile.open(archive) as tf:
                    tf.extractall(dest, filter="data")
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"cannot unpack {archive}: {exc}") from exc
        done.write_text(identity)
    return dest
