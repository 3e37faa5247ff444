"""docs/deploy.md's "Values" table names only values the chart has, and every top-level
value of deploy/helm/hearth/values.yaml has a row there."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "hearth" / "values.yaml").read_text(encoding="utf-8"))


def _rows() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    table = text.split("\n## Values\n", 1)[1].strip().split("\n\n", 1)[0]
    return [line.split("|")[1] for line in table.splitlines()[2:]]


def _paths(cell: str) -> list[str]:
    """`a.b`, `.c` -> a.b, a.c; `image.repository/tag` -> image.repository, image.tag;
    `x.*` -> x; `services.<name>.*` -> services.clustering."""
    paths, base = [], ""
    for token in re.findall(r"`([^`]+)`", cell):
        token = token.replace("<name>", "clustering").removesuffix(".*")
        if token.startswith("."):
            token = base + token
        else:
            base = token.rsplit(".", 1)[0] if "." in token else token
        head, _, tail = token.rpartition(".")
        leaves = tail.split("/")
        paths += [f"{head}.{leaf}" if head else leaf for leaf in leaves]
    return paths


def _exists(path: str) -> bool:
    node = VALUES
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_documented_value_exists_and_every_top_level_value_is_documented():
    documented = [p for cell in _rows() for p in _paths(cell)]
    assert len(documented) > 40
    assert [p for p in documented if not _exists(p)] == []
    assert sorted(set(VALUES) - {p.split(".")[0] for p in documented}) == []
