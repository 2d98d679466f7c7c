"""The README and docs/ stay true: generated tables match the code, every link and cited section
exists, and the README stays a short front door."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from container.gpu_drivers import markdown_table as gpu_table
from container.serving.settings import markdown_table as serving_table
from container.training.hyperparameters import markdown_table as hyperparameter_table
from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 150
"""Issue 13: the README is a front door; everything else lives in docs/."""

# Source files that may cite a docs page, and folders that hold none of ours.
_SOURCE_NAMES = {"Dockerfile", "Makefile", "constraints.txt"}
_SOURCE_SUFFIXES = {".py", ".sh", ".yml"}
_SKIP_DIRS = {"opt_ml", "node_modules", "__pycache__"}

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_LINK = re.compile(r"\]\(([^()\s]+)\)")
_SECTION_NUMBER = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
# `docs/<page>.md §2.3`, also broken over a line (with a comment's `#`), and `§2.3, §4.1` lists.
_CITATION = re.compile(r"docs/([\w.-]+\.md)(?:[\s#]*(§\d+(?:\.\d+)*(?:,\s*§\d+(?:\.\d+)*)*))?")
_DRIVER_FLOOR = re.compile(r"\bdriver (?:525|580)\b|\b(?:525|580)\+")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans, where no link or heading lives."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor: lowercase, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"<[^>]+>", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _headings(page: Path) -> list[str]:
    return [m.group(2) for m in _HEADING.finditer(_FENCE.sub("", page.read_text(encoding="utf-8")))]


def _anchors(page: Path) -> set[str]:
    """Every anchor GitHub makes for `page`, repeated headings numbered as GitHub does."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _headings(page):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _sections(page: Path) -> set[str]:
    """Section numbers of `page`'s headings: `2` for "## 2. Training", `2.3` for "### 2.3 ..."."""
    return {m.group(1) for h in _headings(page) if (m := _SECTION_NUMBER.match(h))}


def _sources() -> Iterator[Path]:
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS and "egg-info" not in d
        ]
        for name in files:
            if name in _SOURCE_NAMES or Path(name).suffix in _SOURCE_SUFFIXES:
                yield Path(folder) / name


def test_hyperparameter_table_matches_the_schema() -> None:
    assert hyperparameter_table() in (DOCS / "training.md").read_text(encoding="utf-8")


def test_serving_settings_table_matches_the_settings() -> None:
    assert serving_table() in (DOCS / "serving.md").read_text(encoding="utf-8")


def test_gpu_driver_table_matches_the_table_launch_uses() -> None:
    assert gpu_table() in (DOCS / "image.md").read_text(encoding="utf-8")


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_make_commands_the_docs_name_exist() -> None:
    """Every `make TARGET` in README.md and docs/ is a Makefile target, and CI runs `make test`."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    # A command starts a code line or a code span: `make test-fast`, "make run DATA=..." in a block.
    command = re.compile(r"(?:^|`)make ([a-z][\w-]*)", re.MULTILINE)
    named = {name for page in PAGES for name in command.findall(page.read_text())}
    assert {"run", "test", "test-fast"} <= named, "the README's quick start names them"
    assert named <= targets, f"not in the Makefile: {sorted(named - targets)}"
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


# The project's notes on SageMaker's contract before docs/sagemaker-contract.md: not in the
# repository, so a citation of it cannot be followed.
_OUTSIDE = re.compile(r"\bCONTRACT\.md\b")


def test_every_docs_section_cited_in_the_code_exists() -> None:
    cited = 0
    broken = []
    for source in _sources():
        text = source.read_text(encoding="utf-8", errors="replace")
        if outside := _OUTSIDE.search(text):
            broken.append(
                f"{source.relative_to(ROOT)}: cites {outside.group()}, which is not in the "
                "repository; cite docs/sagemaker-contract.md §N"
            )
        for match in _CITATION.finditer(text):
            where = f"{source.relative_to(ROOT)}: docs/{match.group(1)}"
            page = DOCS / match.group(1)
            cited += 1
            if not page.exists():
                broken.append(f"{where}: no such page")
                continue
            numbers = re.findall(r"§(\d+(?:\.\d+)*)", match.group(2) or "")
            broken += [
                f"{where} §{n}: no such heading" for n in numbers if n not in _sections(page)
            ]
    assert cited, "no citation found: the scan itself is broken"
    assert not broken, "\n".join(broken)


def test_the_contract_page_cites_only_its_own_sections() -> None:
    page = DOCS / "sagemaker-contract.md"
    text = _prose(page.read_text(encoding="utf-8"))
    missing = set(re.findall(r"§(\d+(?:\.\d+)*)", text)) - _sections(page)
    assert not missing, f"sagemaker-contract.md cites sections it does not have: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_driver_floor_is_stated_only_by_the_generated_table(page: Path) -> None:
    """Which driver a CUDA build needs lives in container/gpu_drivers.py; prose links its table."""
    assert not _DRIVER_FLOOR.findall(page.read_text(encoding="utf-8"))
