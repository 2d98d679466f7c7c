"""Markdown output: tables, and one marked section of a document replaced in place.

A benchmark owns the text between its `<!-- NAME:start -->` and `<!-- NAME:end -->` markers, so
re-running it rewrites its own numbers and leaves every other section of the file as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from container.atomic import write_text_atomically

__all__ = ["replace_section", "table"]

_NEW_DOCUMENT = (
    "# Benchmarks\n\nHow fast the training image is, measured by the scripts in `bench/`.\n"
)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], labels: int = 1) -> str:
    """A GitHub-flavoured Markdown table: the first `labels` columns left-aligned, numbers right."""
    align = [":---" if i < labels else "---:" for i in range(len(header))]
    lines = [list(header), align, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def replace_section(path: Path, name: str, body: str, after: str | None = None) -> None:
    """Put `body` between the `name` markers of `path`: replaced if there, else put right after
    the section `after` (when there is one), else appended."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else _NEW_DOCUMENT
    first, last = text.find(start), text.find(end)
    previous = f"<!-- {after}:end -->" if after else None
    if first != -1 and last > first:
        text = text[:first] + block + text[last + len(end) :]
    elif previous and previous in text:
        text = text.replace(previous, f"{previous}\n\n{block}", 1)
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    write_text_atomically(path, text)
