"""The documentation holds together: relative links resolve, and nothing points outside the repository.

- Every relative link (and image) in README.md and docs/*.md names an existing file, and every
  `#anchor` names a heading of the target page (GitHub's heading slugs).
- No source, test or document refers to a team document that is not in the repository or to an
  issue number: the repository must be readable on its own.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCANNED = ["ssm", "kernels", "experiments", "tests", "docs", "README.md", "BENCHMARKS.md"]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".json"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Names of team documents kept outside the repository (written in capitals), and references to
# tracker entries: the word "issue" or "issues" followed by a number or "#" (case-insensitive).
_FORBIDDEN = re.compile(r"SPEC section|SPEC §|\bSPEC\b|CONVENTIONS|(?i:\bissues?\s*#|\bissues?\s+\d)")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fenced = False
    for n, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, _INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """All heading anchors of a markdown page (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def test_slug_rules():
    assert slug("O(N) matrix-vector product") == "on-matrix-vector-product"
    assert slug("`log dt` initialization") == "log-dt-initialization"
    assert slug("Streaming: diagonalized step") == "streaming-diagonalized-step"
    assert slug("Normal plus low rank (NPLR)") == "normal-plus-low-rank-nplr"


def _links(page: Path):
    for n, line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            yield n, target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), f"{page} is missing"
    problems = []
    for n, target in _links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def _scanned_files():
    this = Path(__file__).resolve()
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts and f.resolve() != this:
                yield f


_DOC_REF = re.compile(r"\bdocs/([A-Za-z0-9_-]+\.md)(?:#([\w-]+))?")


def test_doc_references_in_code_resolve():
    """`docs/<page>.md#<anchor>` written in a comment or docstring names an existing page and heading."""
    problems = []
    for f in _scanned_files():
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            for page, anchor in _DOC_REF.findall(line):
                dest = ROOT / "docs" / page
                if not dest.exists():
                    problems.append(f"{f.relative_to(ROOT)}:{n}: docs/{page} does not exist")
                elif anchor and anchor not in anchors(dest):
                    problems.append(f"{f.relative_to(ROOT)}:{n}: no heading #{anchor} in docs/{page}")
    assert not problems, "references to missing docs sections:\n" + "\n".join(problems)


def test_no_references_outside_the_repository():
    hits = []
    for f in _scanned_files():
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            m = _FORBIDDEN.search(line)
            if m:
                hits.append(f"{f.relative_to(ROOT)}:{n}: {m.group(0)!r} in: {line.strip()[:100]}")
    assert not hits, (f"{len(hits)} references to documents outside the repository or to issue numbers "
                      "(point to docs/*.md instead):\n" + "\n".join(hits))


def test_architecture_traces_name_functions_that_exist():
    """Every "`path.py` `Name`" pair in docs/architecture.md's traced calls names a function, class
    or `Class.method` defined in that file."""
    import ast
    import re

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    traced = text[text.index("## One forward call"):text.index("## Adding a layer kind")]
    pairs = re.findall(r"`([\w/]+\.py)`\s+`([A-Za-z_][\w.]*)`", traced)
    missing = []
    for path, name in pairs:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
        if name not in names:
            missing.append(f"{path}: {name}")
    assert len(pairs) >= 15
    assert not missing, f"names in docs/architecture.md that do not exist where it says: {missing}"
