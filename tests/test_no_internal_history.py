"""The project's text speaks of the library, not of how it was made.

README, docs, changelog, the package's docstrings and comments, the tests, the
benchmarks and the examples must not cite the project's own tracker or work log ("issue 16's
targets", "seed 004's model", "what fits this session"): a reader has none of it.
References to other projects' issues stay (``LMFlow #726``,
``Lightning-AI/pytorch-lightning#15062``): they name the other project.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted({*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"),
                *(ROOT / "src").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
                *(ROOT / "examples").rglob("*.py"), ROOT / "mkdocs.yml", ROOT / "Makefile",
                ROOT / "pyproject.toml",
                *(p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name)})
PATTERNS = {
    "a tracker reference (issue 16, issue #12, PR 3)":
        re.compile(r"\b(issues?|PRs?|pull requests?|tickets?)\s*#?\d+", re.I),
    "a numbered work seed (seed 003, seed-004's)": re.compile(r"\bseeds?[ -]0\d\d\b", re.I),
    "the work session": re.compile(r"\b(this|that|the|a|next|previous|one) session\b", re.I),
}


def _hits(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for what, pattern in PATTERNS.items():
            match = pattern.search(line)
            if match:
                out.append(f"{path.relative_to(ROOT)}:{n}: {what}: {match.group(0)!r}")
    return out


def test_the_scan_sees_the_project() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "docs/benchmarks.md", "docs/guarantees.md"} <= names
    assert sum(n.startswith("src/torchfreeze/") for n in names) >= 20


def test_the_patterns_catch_what_they_are_for() -> None:
    caught = ["Against issue 16's targets", "(issue #12)", "seed 003: Adam over everything",
              "seed-004's LR", "24 steps is what fits this session"]
    kept = ["a test reproduces LMFlow #726", "Lightning-AI/pytorch-lightning#15062",
            "seed=0", "seeds 0-2", "seed 0's JSON lines", "a test session fixture"]
    for text in caught:
        assert any(p.search(text) for p in PATTERNS.values()), text
    for text in kept:
        assert not any(p.search(text) for p in PATTERNS.values()), text


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_no_internal_history(path: Path) -> None:
    assert _hits(path) == []
