"""Report writer: Markdown + HTML with PNG figures and a JSON of every number.

A :class:`Report` is built block by block (headings, paragraphs, lists, tables,
figures) and written atomically into a directory::

    REPORT_DIR/report.md      Markdown, figures referenced as figures/<name>.png
    REPORT_DIR/report.html    the same content, self-contained apart from the PNGs
    REPORT_DIR/report.json    {"title", "command", "numbers": {...}} (NaN -> null)
    REPORT_DIR/figures/*.png  matplotlib (Agg backend) figures
    REPORT_DIR/<extra files>  e.g. pairs.csv

Figures are rendered to PNG bytes when added and the matplotlib figure is
closed at once, so reports with many figures stay small in memory.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fuse.output_dir import atomic_output_dir, check_output  # noqa: E402

FIG_DIR = "figures"


def jsonable(x: Any) -> Any:
    """numpy/torch scalars and arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def fmt(x: Any, digits: int = 4) -> str:
    """Table cell text: floats with ``digits`` significant digits, None/NaN as 'n/a'."""
    if x is None:
        return "n/a"
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "n/a"
        return f"{float(x):.{digits}g}"
    return str(x)


def intake_bullets(summary: str, note: str | None, skipped: Sequence[tuple[Any, Any]],
                   extra: Sequence[str] = ()) -> list[str]:
    """The "which images went in" bullet list every report starts with: the extraction summary,
    the sampling note, any ``extra`` lines, then one line per skipped (unreadable) image."""
    items = [summary + "."]
    if note:
        items.append(note + ".")
    items += list(extra)
    items += [f"skipped `{a}`: {b}" for a, b in skipped]
    return items


@dataclass
class Report:
    """Accumulates blocks and numbers; :meth:`write` puts them on disk."""

    title: str
    command: str = ""
    blocks: list[tuple] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    # -- content ------------------------------------------------------------
    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> None:
        self.blocks.append(("table", list(headers), [[fmt(c, digits) for c in r] for r in rows]))

    def figure(self, fig: "plt.Figure", name: str, caption: str, dpi: int = 100) -> str:
        """Render ``fig`` to ``figures/<name>.png`` (closing it) and reference it here."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        while name in self.figures:
            name += "_"
        buf = io.BytesIO()
        if not fig.get_layout_engine():
            fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        self.figures[name] = buf.getvalue()
        self.blocks.append(("fig", f"{FIG_DIR}/{name}.png", caption))
        return f"{FIG_DIR}/{name}.png"

    def image(self, png: bytes, name: str, caption: str) -> str:
        """Add an already encoded PNG (e.g. a PIL contact sheet)."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.figures[name] = png
        self.blocks.append(("fig", f"{FIG_DIR}/{name}.png", caption))
        return f"{FIG_DIR}/{name}.png"

    def attach(self, filename: str, data: bytes | str, caption: str | None = None) -> None:
        """An extra file written beside the report (CSV...), linked when ``caption`` is given."""
        self.files[filename] = data.encode() if isinstance(data, str) else data
        if caption:
            self.blocks.append(("link", filename, caption))

    # -- rendering ----------------------------------------------------------
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.command:
            out += [f"`{self.command}`", ""]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b[1]] + [""]
            elif kind == "table":
                heads, rows = b[1], b[2]
                out.append("| " + " | ".join(_md_cell(h) for h in heads) + " |")
                out.append("|" + "|".join("---" for _ in heads) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "fig":
                out += [f"![{b[2]}]({b[1]})", "", f"*{b[2]}*", ""]
            elif kind == "link":
                out += [f"[{b[2]}]({b[1]})", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        if self.command:
            body.append(f"<p><code>{e(self.command)}</code></p>")
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                lvl = min(6, b[1])
                body.append(f"<h{lvl}>{e(b[2])}</h{lvl}>")
            elif kind == "p":
                body.append(f"<p>{_inline_code(e(b[1]))}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline_code(e(x))}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "fig":
                body.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
            elif kind == "link":
                body.append(f'<p><a href="{e(b[1])}">{e(b[2])}</a></p>')
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "text-align:right}th{background:#eee}img{max-width:100%}figcaption{color:#555;font-size:90%}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(self.title)}</title>"
                f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")

    def to_json(self) -> str:
        return json.dumps(jsonable({"title": self.title, "command": self.command, "numbers": self.numbers}),
                          indent=2, allow_nan=False)

    @staticmethod
    def check_output(out_dir: str | os.PathLike, force: bool = False, inputs: Sequence[tuple[str, Any]] = ()) -> None:
        """Fail early (before any work) when ``out_dir`` may not be written (exists without ``force``;
        with ``force``, anything but an empty directory or an earlier output of this toolkit; or it
        overlaps one of ``inputs``, e.g. the fused model or the images the report reads)."""
        check_output(out_dir, force, inputs)

    def write(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write everything into ``out_dir`` atomically (refuses an existing dir without ``force``)."""
        with atomic_output_dir(out_dir, force=force) as tmp:
            (tmp / FIG_DIR).mkdir()
            for name, png in self.figures.items():
                (tmp / FIG_DIR / f"{name}.png").write_bytes(png)
            for name, data in self.files.items():
                (tmp / name).write_bytes(data)
            (tmp / "report.md").write_text(self.markdown())
            (tmp / "report.html").write_text(self.html())
            (tmp / "report.json").write_text(self.to_json())
        return Path(out_dir)


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _inline_code(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


# ---------------------------------------------------------------------------
# Common figures
# ---------------------------------------------------------------------------
def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, annotate: bool = True,
            col_labels: Sequence[str] | None = None) -> "plt.Figure":
    """A labelled heat map of ``matrix [R, C]`` (cells annotated when small)."""
    m = np.asarray(matrix, dtype=float)
    r, c = m.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * c + 2.5), max(3.5, 0.5 * r + 2)))
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(c), labels=list(col_labels or labels), rotation=45, ha="right")
    ax.set_yticks(range(r), labels=list(labels))
    if annotate and r * c <= 144:
        for i in range(r):
            for j in range(c):
                if np.isfinite(m[i, j]):
                    red, green, blue, _ = im.cmap(im.norm(m[i, j]))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    fig.tight_layout()
    return fig
