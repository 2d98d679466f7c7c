"""What every benchmark's command line shares: its --output and --workdir, the command shown in
the document it writes, the folder it works in, and its log lines."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench._runs import REPO

__all__ = ["add_output_argument", "add_workdir_argument", "command", "log_to_stderr", "work_in"]


def add_output_argument(parser: argparse.ArgumentParser, document: str, what: str) -> None:
    """--output: the Markdown file under docs/ (`document`) the benchmark writes `what` into."""
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "docs" / document,
        help=f"Markdown file {what} (default: docs/{document})",
    )


def add_workdir_argument(parser: argparse.ArgumentParser, kept: str) -> None:
    """--workdir: where to keep `kept` after the run."""
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"keep {kept} under this folder (default: a temporary folder, deleted afterwards)",
    )


def command(module: str, argv: list[str] | None) -> str:
    """How this run was started, for the document: `.venv/bin/python -m MODULE ARGS`."""
    shown = sys.argv[1:] if argv is None else argv
    return " ".join([f".venv/bin/python -m {module}", *shown])


@contextmanager
def work_in(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """A fresh folder for one run: inside `workdir`, kept; else a temporary one, deleted after."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def log_to_stderr(quiet_httpx: bool = True) -> None:
    """Timestamped INFO lines on stderr (stdout carries the result); httpx's one line per
    request left out."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    if quiet_httpx:
        logging.getLogger("httpx").setLevel(logging.WARNING)
