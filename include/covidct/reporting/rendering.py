"""The one Jinja2 environment of every covidct page: the report, its later sections, the unchanged-run page.

Presentation lives in ``templates/``: ``*.html.j2`` are autoescaped (every ``{{ }}`` escaped as
``html.escape`` does; markup from macros passes), ``*.md.j2`` are not (table cells go through the
``md`` filter). Undefined names are errors.
"""

from __future__ import annotations

import base64
import functools
import html
from pathlib import Path

import jinja2
from markupsafe import Markup

from covidct.reporting.formatting import fmt, fmt_ci, fmt_p, mean_sd, min_max, seconds, seed_ranges

TEMPLATES = "templates"


def html_escape(value):
    """Every ``{{ }}`` of the HTML template is escaped as html.escape does (markup from macros passes)."""
    return value if hasattr(value, "__html__") else Markup(html.escape(str(value)))


def md(text) -> str:
    """A Markdown table cell: ``|`` escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


@functools.cache
def environment(kind: str) -> jinja2.Environment:
    """The environment for ``kind`` "html" (autoescaped) or "md", with the formatting filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("covidct.reporting", TEMPLATES),
        autoescape=kind == "html",
        finalize=html_escape if kind == "html" else None,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=fmt, fmt_ci=fmt_ci, fmt_p=fmt_p, seconds=seconds, md=md, data_uri=data_uri,
                       seed_ranges=seed_ranges, mean_sd=mean_sd, min_max=min_max)  # fmt: skip
    return env


def render(template: str, context: dict) -> str:
    """Render ``templates/<template>`` with ``context`` (HTML autoescaped where the name ends ``.html.j2``)."""
    kind = "html" if template.endswith(".html.j2") else "md"
    return environment(kind).get_template(template).render(context)
