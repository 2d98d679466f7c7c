"""Files written whole or not at all: through a temporary file beside them, then `os.replace`.

A reader (SageMaker tarring /opt/ml, `serve` loading a model, a resumed job reading a checkpoint)
sees the old file or the new one, never part of one. One helper for every such write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_text_atomically"]


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` fill a temporary file beside `path`, then move it over `path`; on any
    failure the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically; the folder is created when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
