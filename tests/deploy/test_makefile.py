"""`make help` and the `make` commands the docs give: every documented target exists, and
`make help` lists every target that carries a `##` description. Until session 18 its
pattern left out any target with a digit in its name, so `make test-e2e` never showed,
and `.PHONY` named three targets that had no rule (`make test-contract` did nothing)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
RULES = set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", MAKEFILE, re.MULTILINE))


def test_every_phony_target_has_a_rule():
    phony = set()
    for block in re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", MAKEFILE, re.MULTILINE):
        phony |= set(block.replace("\\\n", " ").split())
    assert sorted(phony - RULES) == []


def test_make_help_lists_every_described_target():
    described = set(re.findall(r"^([A-Za-z0-9_-]+):.*## ", MAKEFILE, re.MULTILINE))
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^\s+make (\S+)", out, re.MULTILINE))
    assert listed == described
    assert {"run", "test", "test-e2e", "verify"} <= listed
    # One column of descriptions: until session 34 the names past 18 characters
    # (bench-movielens-latest, bench-export-memory) pushed theirs out of it.
    starts = {line.index(description) for line in out.splitlines()
              for description in re.findall(r"^\s+make \S+\s+(.*)$", line)}
    assert len(starts) == 1, out


def test_every_make_command_in_the_docs_names_a_target():
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            names = re.findall(r"`make ([a-z][a-z0-9-]*[a-z0-9])\b(?!-\*)", line)
            names += re.findall(r"^\s*(?:[A-Z_]+=\S+\s+)*make ([a-z][a-z0-9-]*[a-z0-9])\b", line)
            missing += [f"{doc.name}:{number} make {name}" for name in names if name not in RULES]
    assert missing == []


def test_the_partial_suites_go_through_the_runner_that_names_a_dead_worker():
    """`make test-unit` ran one plain pytest: a worker that hung or crashed was not named
    with its test as `make test`'s runner does (scripts/run_tests.py, suite29). Both partial
    targets use the runner narrowed to their directory; test-e2e provisions PostgreSQL and
    Redis as `make test` does, since its meshes run on them."""
    for target, path in (("test-unit", "tests/unit"), ("test-e2e", "tests/e2e")):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert re.search(rf"scripts/run_tests\.py {path}\b", dry), (target, dry)
    assert re.search(r"^test-e2e:.*\bprovision\b", MAKEFILE, re.MULTILINE)
