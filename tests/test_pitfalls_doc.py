"""docs/PITFALLS.md is the one place help texts and docstrings cite for the lessons behind the design: every cited
anchor is a section there, every test a section names exists, and nothing in the repository points outside it."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PITFALLS.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, spaces to '-', punctuation other than '-' dropped."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    files = [ROOT / f for f in out.stdout.split()] if out.returncode == 0 else []
    return files or [p for pat in patterns for p in ROOT.glob(f"**/{pat}") if ".venv" not in p.parts]


def test_every_cited_anchor_is_a_section():
    anchors = {slug(line[3:]) for line in DOC.read_text().splitlines() if line.startswith("## ")}
    cited = {}
    for f in tracked("*.py", "*.md", "*.yaml"):
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"docs/PITFALLS\.md:?((?:[ ,]*(?:and )?#[a-z0-9-]+)+)", text):
            for a in re.findall(r"#([a-z0-9-]+)", m.group(1)):
                cited.setdefault(a, str(f.relative_to(ROOT)))
    assert cited, "no citation found: the pattern is wrong"
    missing = {a: f for a, f in cited.items() if a not in anchors}
    assert not missing, missing


def test_every_named_test_exists():
    names = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", DOC.read_text())
    assert len(names) >= 20
    for path, name in names:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (path, name)


def test_no_citation_outside_the_repository():
    """No 'PITFALLS n' / 'PITFALLS.md #n' (a file users do not have) and no path into ../shared, in the package,
    its configs, README and docs."""
    bad = []
    for f in tracked("*.py", "*.md", "*.yaml", "Makefile"):
        if f.relative_to(ROOT).parts[0] in ("tests", "benchmarks"):
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"PITFALLS(\.md)?\s*(item\s*|#)?\d", line) or re.search(r"\.\./shared|/work/shared", line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, bad
