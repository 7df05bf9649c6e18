"""Sections added to a written report by later tasks (the MLflow runs, the promotion decision, the data)."""

from __future__ import annotations

import json
from pathlib import Path

from covidct.core.atomic import write_text_atomic
from covidct.reporting.formatting import jsonable
from covidct.reporting.rendering import environment

HTML_NAME, MARKDOWN_NAME, SUMMARY_NAME = "report.html", "report.md", "summary.json"


def append_section(report_dir: Path, key: str, template: str, data: dict, images: dict | None = None) -> None:
    """Add (or replace) a section at the end of a written report, and ``data`` as ``summary.json[key]``.

    For what later tasks add to the run's report (the MLflow runs, the promotion decision, what the
    validation found in the data): ``section_<template>.html.j2`` goes before ``</body>``,
    ``section_<template>.md.j2`` at the end of the Markdown. ``images`` (name -> PNG path in the
    report folder) reach the templates as ``images``, not ``summary.json``. Each file is rewritten
    atomically; a section added again replaces itself.
    """
    report_dir = Path(report_dir)
    begin, end = f"<!-- covidct:{key} -->", f"<!-- /covidct:{key} -->"
    for kind, name in (("html", HTML_NAME), ("md", MARKDOWN_NAME)):
        path = report_dir / name
        text = path.read_text(encoding="utf-8")
        if begin in text and end in text:
            text = text[: text.index(begin)].rstrip("\n") + "\n" + text[text.index(end) + len(end) :].lstrip("\n")
        ext = "html" if kind == "html" else "md"
        block = (
            environment(kind)
            .get_template(f"section_{template}.{ext}.j2")
            .render(data=jsonable(data), images=images or {})
        )
        block = f"{begin}\n{block.strip()}\n{end}\n"
        if kind == "html" and "</body>" in text:
            at = text.rindex("</body>")
            text = text[:at] + block + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
        write_text_atomic(path, text)
    summary_path = report_dir / SUMMARY_NAME
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary[key] = jsonable(data)
    write_text_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
