"""Every relative link and anchor in README.md and docs/ resolves: a file that exists, and a
heading of that file for `#anchor` (GitHub's anchors: lower case, punctuation dropped, spaces
to hyphens, a repeated heading numbered -1, -2, ...). Code blocks are skipped: a `# comment`
in a shell block is not a heading, a link in code is not a link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()):
        m = re.match(r"^#{1,6} (.*)", line)
        if m:
            a = github_anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [t for line in _prose(path.read_text()) for t in LINK.findall(line)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_rule_is_githubs():
    assert github_anchor("Many images: `predict --ray`") == "many-images-predict---ray"
    assert github_anchor("What `visiontune run` does") == "what-visiontune-run-does"
    assert github_anchor("When things go wrong: interruption, resume") == \
        "when-things-go-wrong-interruption-resume"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page():
    readme = set(links(ROOT / "README.md"))
    pages = {f"docs/{p.name}" for p in PAGES[1:]}
    linked = {t.partition("#")[0] for t in readme}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_every_limit_of_the_served_model_is_documented_with_its_default():
    """The Security table of docs/serving.md names every limit the served model reads from its
    environment, with the default the code uses: a new limit, or a changed default, shows up
    in the page an operator reads."""
    from components import imaging as pp
    from components.serving import image_classifier as mc

    table = (ROOT / "docs" / "serving.md").read_text()
    limits = {pp.MAX_PIXELS_ENV: pp.DEFAULT_MAX_PIXELS, pp.MAX_BYTES_ENV: pp.DEFAULT_MAX_BYTES,
              pp.MAX_REQUEST_PIXELS_ENV: pp.DEFAULT_MAX_REQUEST_PIXELS,
              mc.MAX_ROWS_ENV: mc.DEFAULT_MAX_ROWS}
    for env, default in limits.items():
        row = next((line for line in table.splitlines() if line.startswith(f"| `{env}` |")), "")
        assert f"{default:,}" in row, f"{env} (default {default:,}) not in docs/serving.md"
    assert f"| `{mc.PATH_ROOTS_ENV}` |" in table
    readme = (ROOT / "README.md").read_text()
    assert "## Security" in readme and "serving.md#security" in readme
