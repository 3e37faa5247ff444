"""The docs an operator or a newcomer reads, which the tests/unit/test_documented_*.py
tests hold to the code. docs/clustering.md and docs/benchmarks.md are histories of
measurements: they may name a flag or a benchmark setting that existed then."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DOCS = ("README.md", "docs/operations.md", "docs/deploy.md", "docs/security.md", "docs/privacy.md",
                 "docs/feedback.md", "docs/features.md", "docs/attribution.md")


def doc_lines() -> Iterator[tuple[str, int, str]]:
    """(doc, line number, line) of every operator doc."""
    for doc in OPERATOR_DOCS:
        for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
            yield doc, number, line


def doc_text(doc: str, flat: bool = False) -> str:
    """The text of ``doc`` (e.g. "docs/privacy.md"); ``flat``: every run of whitespace one
    space, so a claim can be matched across the doc's line breaks."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    return re.sub(r"\s+", " ", text) if flat else text
