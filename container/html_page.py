"""Self-contained HTML pages: tables, notes and matplotlib figures inlined as PNG.

One page builder for every page the project writes: the training job's evaluation and profile
reports, and `launch report` and `launch explain` on the host. Torch-free for that reason (it
needs only matplotlib, which the `launch` extra brings).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

from matplotlib.figure import Figure

__all__ = ["Html", "figure", "note", "page", "paragraph", "png", "section", "table"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
table.sortable th { cursor: pointer; }
"""

# Click a header of a table.sortable: its rows sort by that column (numbers as numbers, empty
# cells last), and a second click reverses the order.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const descending = th.dataset.order !== "desc";
    th.dataset.order = descending ? "desc" : "asc";
    const key = (row) => {
      const text = row.cells[th.cellIndex].textContent.trim();
      const number = parseFloat(text);
      return text === "" ? null : isNaN(number) ? text : number;
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      const numbers = typeof x === "number" && typeof y === "number";
      const order = numbers ? x - y : String(x).localeCompare(String(y));
      return descending ? -order : order;
    });
    rows.forEach((row) => body.appendChild(row));
  });
});
"""


def _text(text: str) -> str:
    """Text as element content: `<`, `>` and `&` escaped; quotes need no escaping there."""
    return html.escape(text, quote=False)


def png(data: str | bytes, alt: str) -> str:
    """An <img> of a PNG (its bytes, or already base64 text) inlined as a data: URI."""
    text = data if isinstance(data, str) else base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{text}">'


def figure(fig: Figure, alt: str) -> str:
    """An <img> holding the figure as an inline PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return png(buffer.getvalue(), alt)


class Html(str):
    """A table cell's content that is HTML already (an image): written as is, not escaped."""


def _cell(value: object) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{_text('' if value is None else str(value))}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], sortable: bool = False) -> str:
    """A table; numbers are right-aligned, floats shown to 4 decimals, text escaped. A sortable
    one sorts by a column when its header is clicked (again: the other way)."""
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    kind = ' class="sortable"' if sortable else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str) -> str:
    return f"<h2>{_text(title)}</h2>" + "".join(parts)


def paragraph(text: str) -> str:
    return f"<p>{_text(text)}</p>"


def note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


def page(title: str, *sections: str, style: str = "") -> str:
    """The whole page: `title` as its title and heading, then `sections` (HTML) in order;
    `style` adds CSS rules to the common ones."""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_text(title)}</title>'
        f"<style>{_STYLE}{style}</style></head><body><h1>{_text(title)}</h1>"
        + "".join(sections)
        + f"<script>{_SORT_SCRIPT}</script></body></html>"
    )
