"""A report as data (sections of text, tables and PNG figures) written as one self-contained HTML file
(figures embedded as base64) and as Markdown with the PNG files beside it. Every file is written atomically."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from distdpo.io import write_bytes_atomic, write_text_atomic


@dataclass
class Figure:
    name: str  # file stem, e.g. "b1_local_steps"
    caption: str
    png: bytes


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    meta: list[tuple[str, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4}figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.holds{color:#1a7f37;font-weight:600}.no{color:#c62828;font-weight:600}
.partly{color:#b26a00;font-weight:600}caption{caption-side:bottom;font-size:.85em;color:#555;text-align:left}
"""


def _verdict_class(cell: str) -> str:
    c = cell.lower()
    if c.startswith("holds"):
        return "holds"
    if c.startswith("does not hold"):
        return "no"
    if c.startswith(("direction only", "inconclusive", "partly")):
        return "partly"
    return ""


def to_html(report: Report) -> str:
    """The whole report as one HTML document; figures are embedded ``data:image/png;base64`` URIs."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    if report.meta:
        out.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.meta) + "</table>")
    for s in report.sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for t in s.tables:
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="{_verdict_class(c)}">{e(c)}</td>' if _verdict_class(c) else f"<td>{e(c)}</td>"
                    for c in r
                )
                + "</tr>"
                for r in t.rows
            )
            cap = f"<caption>{e(t.caption)}</caption>" if t.caption else ""
            out.append(f"<table>{cap}<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers) + f"</tr>{rows}</table>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode()
            out.append(
                f'<figure><img alt="{e(f.name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(f.caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report, figure_dir: str = "figures") -> str:
    """The report as Markdown; figures are referenced as ``figure_dir/<name>.png``."""
    out = [f"# {report.title}", ""]
    if report.meta:
        out += ["| | |", "|---|---|"] + [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in report.meta] + [""]
    for s in report.sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for t in s.tables:
            out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
            out.append("|" + "---|" * len(t.headers))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
            if t.caption:
                out += ["", f"*{t.caption}*"]
            out.append("")
        for f in s.figures:
            out += [f"![{f.name}]({figure_dir}/{f.name}.png)", "", f"*{f.caption}*", ""]
    return "\n".join(out) + "\n"


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into ``out_dir``."""
    out = Path(out_dir)
    for s in report.sections:
        for f in s.figures:
            write_bytes_atomic(out / "figures" / f"{f.name}.png", f.png)
    write_text_atomic(out / "report.md", to_markdown(report))
    write_text_atomic(out / "report.html", to_html(report))
    return out / "report.html", out / "report.md"
