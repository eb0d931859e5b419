"""The self-contained HTML page of a comparison report: one file, readable offline, in any browser.

A reader goes top-down: title and subtitle (what was compared, on which data, when), the verdict, the table (one
section per comparability group, failed runs marked with their error), a glossary of the columns, the figures and
the notes. Everything is inline — CSS, the PNG figures as base64 ``data:`` URIs, a few lines of script — so the
page can be mailed, archived as a CI artifact or opened on a machine with no network, and nothing leaks a request.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas comes with arviz; it is only needed by whoever builds the table
    import pandas

__all__ = ["write_html"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MISSING = "\u2014"  # em dash: a NaN cell reads as "no value", not as the string "nan"

# System fonts only (no web fonts: nothing may be fetched); overflow-x on the wrapper so a wide table scrolls
# inside its box instead of widening the page.
_CSS = """
body { margin: 0; background: #fff; color: #1b1b1b;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.7rem; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .5rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .4rem; }
.subtitle { color: #555; margin: 0 0 1rem; }
.verdict { background: #f3f7fc; border-left: 4px solid #2f6db5; padding: .6rem 1rem .6rem 2rem; margin: 0; }
.verdict li { margin: .2rem 0; }
.hint { color: #555; font-size: .9rem; margin: .2rem 0 .5rem; }
.scroll { overflow-x: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: .9rem; min-width: 100%; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
thead th { background: #f5f5f5; border-bottom: 2px solid #ccc; white-space: nowrap; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody td:first-child { white-space: nowrap; }  /* the cell label: one line per row */
tr.failed td { background: #fdecec; color: #7a1d1d; }
tr.failed td.error { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
dl.columns dt { font-weight: 600; font-family: ui-monospace, Menlo, Consolas, monospace; }
dl.columns dd { margin: 0 0 .5rem 1.5rem; }
figure { margin: 1.25rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9rem; margin-top: .3rem; }
"""

# Test hook only (the page reads fine without script): a headless browser dumps the DOM after `load` and checks
# that every figure decoded and every row rendered.
_SCRIPT = """
addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesOk = String(imgs.every(function (i) { return i.complete && i.naturalWidth > 0; }));
  document.body.dataset.tableRows = String(document.querySelectorAll("tbody tr").length);
});
"""


def write_html(
    path: str | Path,
    *,
    title: str,
    verdict: list[str],
    table: pandas.DataFrame,
    column_docs: dict[str, str],
    figures: list[tuple[str, Path]],
    notes: Sequence[str] = (),
    subtitle: str = "",
) -> Path:
    """Write a comparison report as one self-contained HTML5 file and return its path.

    Args:
        path: the ``.html`` file to write (parent folders are created).
        title: the page heading; ``subtitle`` says what was compared, on which dataset, and when.
        verdict: short sentences shown first — the conclusion a reader should take away.
        table: one row per run. Optional columns with a meaning: ``group`` (rows are rendered in one section per
            comparability group, in order of first appearance, because runs of different groups must never be
            ranked against each other), ``status`` (rows with ``"failed"`` are highlighted) and ``error``.
            Floats are formatted to a few significant digits; NaN shows as an em dash.
        column_docs: ``{column: what it means}``, shown as a glossary after the table.
        figures: ``(caption, png_path)`` pairs, embedded as base64 ``data:`` URIs; the caption is also the alt text.
        notes: closing remarks (caveats, settings), one paragraph each.

    Every string taken from the arguments is HTML-escaped, so a label such as ``<script>`` shows as text.

    Raises:
        FileNotFoundError: a figure file does not exist (checked before anything is written).
        ValueError: a figure file is not a PNG.
        TypeError: ``verdict`` or ``notes`` is a single string instead of a list of sentences.
    """
    for name, value in (("verdict", verdict), ("notes", notes)):
        if isinstance(value, str):  # iterating a str would make one list item per character
            raise TypeError(f"{name} must be a list of sentences, got a single string: {value!r}")
    images = [(caption, _png_data_uri(Path(png))) for caption, png in figures]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="subtitle">{_esc(subtitle)}</p>')
    parts.append('<section id="verdict"><h2>Verdict</h2>')
    if verdict:
        parts.append('<ul class="verdict">' + "".join(f"<li>{_esc(s)}</li>" for s in verdict) + "</ul>")
    else:
        parts.append('<p class="hint">No verdict given.</p>')
    parts += ["</section>", '<section id="results"><h2>Results</h2>', *_tables(table, column_docs), "</section>"]
    if column_docs:
        # Glossary in table order first (where the reader's eye comes from), then any extra entries.
        order = [c for c in map(str, table.columns) if c in column_docs]
        order += [c for c in column_docs if c not in order]
        items = "".join(f"<dt>{_esc(c)}</dt><dd>{_esc(column_docs[c])}</dd>" for c in order)
        parts.append(f'<section id="columns"><h2>Columns</h2><dl class="columns">{items}</dl></section>')
    if images:
        parts.append('<section id="figures"><h2>Figures</h2>')
        for caption, uri in images:
            parts.append(
                f'<figure><img src="{uri}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'
            )
        parts.append("</section>")
    if notes:
        parts.append('<section id="notes"><h2>Notes</h2>' + "".join(f"<p>{_esc(n)}</p>" for n in notes) + "</section>")
    parts += ["</main>", f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_data_uri(png: Path) -> str:
    if not png.is_file():
        raise FileNotFoundError(f"figure file not found: {png}")
    data = png.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"figure file is not a PNG (figures are embedded as image/png): {png}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _tables(table: pandas.DataFrame, column_docs: dict[str, str]) -> list[str]:
    """One ``<table>`` per comparability group (or a single one without a ``group`` column)."""
    if len(table) == 0:
        return ['<p class="hint">No rows.</p>']
    # A meaningful index (named, or not the default 0..n-1) is shown as a row-header column; decided on the whole
    # table, since a group's slice of a default index no longer starts at 0.
    index = table.index
    show_index = index.name is not None or list(index) != list(range(len(index)))
    if "group" not in table.columns:
        return [_table(table, column_docs, show_index)]
    # Group labels in order of first appearance (the caller's order); a missing label is its own group.
    labels = ["(no group)" if _is_missing(g) else str(g) for g in table["group"]]
    shown = table.drop(columns="group")
    out = ['<p class="hint">Rows are comparable only within a group; groups are not ranked against each other.</p>']
    for label in dict.fromkeys(labels):
        rows = shown[[lab == label for lab in labels]]
        out += [
            f'<section class="group"><h3>Group: {_esc(label)}</h3>',
            _table(rows, column_docs, show_index),
            "</section>",
        ]
    return out


def _table(table: pandas.DataFrame, column_docs: dict[str, str], show_index: bool) -> str:
    columns = [str(c) for c in table.columns]
    index = table.index
    head = [f'<th scope="col">{_esc(index.name or "")}</th>'] if show_index else []
    for c, dtype in zip(columns, table.dtypes, strict=True):
        # Numbers are right-aligned, so their headers are too; the column's doc is a hover tooltip.
        numeric = dtype.kind in "iuf"
        attr = (' class="num"' if numeric else "") + (f' title="{_esc(column_docs[c])}"' if c in column_docs else "")
        head.append(f'<th scope="col"{attr}>{_esc(c)}</th>')
    body = []
    status = columns.index("status") if "status" in columns else None
    for key, row in zip(index, table.itertuples(index=False, name=None), strict=True):
        failed = status is not None and str(row[status]).strip().lower() == "failed"
        cells = [f'<th scope="row">{_esc(key)}</th>'] if show_index else []
        for c, v in zip(columns, row, strict=True):
            text, numeric = _format(v)
            cls = ["num"] if numeric else []
            if c == "error":
                cls.append("error")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{_esc(text)}</td>")
        body.append(('<tr class="failed">' if failed else "<tr>") + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table>'
        f"<thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody>"
        "</table></div>"
    )


def _is_missing(value: Any) -> bool:
    import pandas  # present whenever a DataFrame was passed; imported late so `import ppvae` stays light

    # None, float/numpy NaN, pandas NA and NaT; containers (a list in a cell) are never "missing".
    return pandas.api.types.is_scalar(value) and bool(pandas.isna(value)) or value is None


def _format(value: Any) -> tuple[str, bool]:
    """``(text, is_number)``: floats to 4 significant digits (fixed point where readable), NaN as an em dash."""
    if _is_missing(value):
        return _MISSING, False
    if isinstance(value, bool | np.bool_):
        return ("yes" if value else "no"), False
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}", True
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isinf(v):
            return ("\u2212\u221e" if v < 0 else "\u221e"), True
        a = abs(v)
        if a == 0:
            return "0", True
        if a >= 1e9 or a < 1e-4:
            return f"{v:.3e}", True
        if a >= 1000:  # e.g. a NLL of -4231.7 nats: keep one decimal rather than "4232" or "4.232e+03"
            return f"{v:,.1f}", True
        return f"{v:.4g}", True
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return ", ".join(map(str, value)), False
    return str(value), False
