"""Render suite reports as ``report.md`` and a self-contained ``report.html`` (images inlined)."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

from experiments.common import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, SuiteReport
from experiments.store import atomic_write_text

_BADGE = {SUPPORTED: "#1a7f37", NOT_SUPPORTED: "#cf222e", INCONCLUSIVE: "#9a6700"}


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def suite_markdown(rep: SuiteReport, base: Path) -> str:
    """Markdown section of one suite; figure paths are relative to ``base``."""
    out = [f"## {rep.title} (`{rep.name}`)", "", rep.summary, ""]
    out.append(
        _md_table(
            ["Claim (seed source)", "Measured", "Verdict", "Rule"],
            [[f"{c.claim} ({c.source})", c.measured, f"**{c.verdict}**", c.rule] for c in rep.claims],
        )
    )
    out.append("")
    if rep.protocol:
        out += ["**Protocol: the source's setting and the one used here**", "",
                _md_table(PROTOCOL_HEADER, protocol_rows(rep)), ""]
    if rep.reproduce:
        out += [f"**At paper scale.** {rep.reproduce}", ""]
    for title, header, rows in rep.tables:
        out += [f"**{title}**", "", _md_table(header, rows), ""]
    for caption, path in rep.figures:
        out += [f"![{caption}]({os.path.relpath(path, base)})", "", f"*{caption}*", ""]
    for note in rep.notes:
        out.append(f"- Note: {note}")
    settings = ", ".join(f"{k}={v}" for k, v in rep.settings.items())
    out += ["", f"<sub>Settings: {settings}. Run time {rep.seconds:.0f} s.</sub>", ""]
    return "\n".join(out)


PROTOCOL_HEADER = ["Setting", "Source", "Used here", "Why it differs"]


def protocol_rows(rep: SuiteReport) -> list[list[str]]:
    return [[p.setting, p.source, p.used, p.why] for p in rep.protocol]


def overview_rows(reports: Sequence[SuiteReport]) -> list[list[str]]:
    return [[r.name, c.claim, c.verdict, c.rule] for r in reports for c in r.claims]


def comparison_table(reports: Sequence[SuiteReport]) -> tuple[list[str], list[list[str]]]:
    """Rows: every normalizer that ran; columns: the suites that report a headline accuracy
    (final test accuracy, mean ± standard error over seeds, at the setting the header names)."""
    cols = [r for r in reports if r.accuracy]
    norms: list[str] = []
    for r in cols:
        norms += [n for n in r.accuracy if n not in norms]
    header = ["Normalizer"] + [f"{r.name} ({r.accuracy_setting})" if r.accuracy_setting else r.name for r in cols]
    rows = [[n] + [r.accuracy[n].pct() if n in r.accuracy else "" for r in cols] for n in norms]
    return header, rows


_COMPARISON_NOTE = ("Final test accuracy, mean ± standard error over seeds (each suite's headline "
                    "setting in its column header); verdicts below, each with its rule.")


def write_markdown(reports: Sequence[SuiteReport], path: Path, title: str) -> None:
    base = path.parent
    parts = [f"# {title}", ""]
    header, rows = comparison_table(reports)
    if rows:
        parts += ["## Comparison", "", _COMPARISON_NOTE, "", _md_table(header, rows), ""]
    if len(reports) > 1:
        parts += ["## Verdicts", "", _md_table(["Suite", "Claim", "Verdict", "Rule"], overview_rows(reports)), ""]
    parts += [suite_markdown(r, base) for r in reports]
    atomic_write_text(path, "\n".join(parts))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], verdict_col: int | None = None) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            text = html.escape(str(c))
            if i == verdict_col:
                text = f'<b style="color:{_BADGE.get(str(c), "#000")}">{text}</b>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def write_html(reports: Sequence[SuiteReport], path: Path, title: str) -> None:
    """One HTML file with every figure embedded as a base64 PNG (no external files)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}",
        "th{background:#f3f3f3}img{max-width:100%}.small{color:#666;font-size:85%}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    header, rows = comparison_table(reports)
    if rows:
        parts += ["<h2>Comparison</h2>", f"<p>{html.escape(_COMPARISON_NOTE)}</p>", _html_table(header, rows)]
    if len(reports) > 1:
        parts += ["<h2>Verdicts</h2>", _html_table(["Suite", "Claim", "Verdict", "Rule"], overview_rows(reports), 2)]
    for r in reports:
        parts += [f"<h2>{html.escape(r.title)} (<code>{html.escape(r.name)}</code>)</h2>", f"<p>{html.escape(r.summary)}</p>"]
        rows = [[f"{c.claim} ({c.source})", c.measured, c.verdict, c.rule] for c in r.claims]
        parts.append(_html_table(["Claim (seed source)", "Measured", "Verdict", "Rule"], rows, 2))
        if r.protocol:
            parts += ["<p><b>Protocol: the source's setting and the one used here</b></p>",
                      _html_table(PROTOCOL_HEADER, protocol_rows(r))]
        if r.reproduce:
            parts.append(f"<p><b>At paper scale.</b> {html.escape(r.reproduce)}</p>")
        for t, header, trows in r.tables:
            parts += [f"<p><b>{html.escape(t)}</b></p>", _html_table(header, trows)]
        for caption, fig in r.figures:
            data = base64.b64encode(Path(fig).read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>")
            parts.append(f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if r.notes:
            parts.append("<ul>" + "".join(f"<li>Note: {html.escape(n)}</li>" for n in r.notes) + "</ul>")
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        parts.append(f"<p class='small'>Settings: {html.escape(settings)}. Run time {r.seconds:.0f} s.</p>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))


def write_reports(reports: Sequence[SuiteReport], out: Path, title: str = "normzoo comparison experiments") -> None:
    """Write ``out/report.md`` and ``out/report.html``."""
    write_markdown(reports, out / "report.md", title)
    write_html(reports, out / "report.html", title)
