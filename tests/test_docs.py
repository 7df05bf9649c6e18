"""The documentation's links: docs/ built by MkDocs in strict mode (pages, anchors, nav), and the README's links.

MkDocs (``mkdocs.yml``: ``strict``, ``validation``) fails the build on a link to a missing page or
anchor; the README is not part of the site, so its relative links and anchors are checked here the
same way, with the heading slugs MkDocs gives (Python-Markdown's ``toc`` extension).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"
#: [text](target) and ![alt](target), outside code spans.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_build_strict(tmp_path):
    result = mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


@pytest.mark.parametrize(
    ("page", "text"),
    [
        ("operations.md", "\nSee [the bounds](no-such-page.md).\n"),
        ("operations.md", "\nSee [the bounds](pipeline.md#no-such-heading).\n"),
    ],
    ids=["missing-page", "missing-anchor"],
)
def test_a_broken_docs_link_fails_the_build(tmp_path, page, text):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project)
    with open(project / "docs" / page, "a") as f:
        f.write(text)
    result = mkdocs_build(project, tmp_path / "site")
    assert result.returncode != 0
    assert "Aborted with" in result.stdout + result.stderr


def slugs(markdown: str) -> set[str]:
    """The anchors MkDocs gives a page's headings (``toc``'s slugify; repeated headings get ``_1``...)."""
    from markdown.extensions.toc import slugify

    found: set[str] = set()
    fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        match = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))
            slug = slugify(text, "-")
            base, n = slug, 0
            while slug in found:
                n += 1
                slug = f"{base}_{n}"
            found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file or anchor does not exist (code blocks and spans skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in LINK.findall(text):
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            continue  # an external link: not checked (no network in tests)
        file = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not file.exists():
            broken.append(f"{target} (no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif parts.fragment and file.suffix == ".md" and parts.fragment not in slugs(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{parts.fragment} in {file.name})")
    return broken


def test_readme_links_point_at_existing_pages_and_headings():
    assert broken_links(ROOT / "README.md") == []


def test_the_readme_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "README.md"
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page.write_text("[ok](docs/operations.md#offline) [gone](docs/nowhere.md) [no heading](docs/operations.md#nope)\n")
    assert [b.split(" ")[0] for b in broken_links(page)] == ["docs/nowhere.md", "docs/operations.md#nope"]
