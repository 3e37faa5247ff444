"""docs/deploy.md's "Values" table names only values the chart has, every top-level
value of deploy/helm/hearth/values.yaml has a row there, and the defaults it states are
values.yaml's."""

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


# A default written in words in the table, as the chart has it.
_WORDS = {"hourly": "0 * * * *", "every 5 min": "*/5 * * * *", "appVersion": ""}


def _default(token: str):
    token = token.strip().strip("`")
    if token in _WORDS:
        return _WORDS[token]
    value = yaml.safe_load(token)
    return "" if value is None and token in ('""', "") else value


def _value(path: str):
    node = VALUES
    for part in path.split("."):
        node = node[part]
    if isinstance(node, dict) and set(node) >= {"repository", "tag"}:   # an image: repository:tag
        return f"{node['repository']}:{node['tag']}"
    return node


def test_the_documented_defaults_are_the_chart_defaults():
    # A row's default cell lists the defaults of the values it names, in order (the last
    # ones may go unsaid); a stale default there is a bug. Rows for a whole group
    # (`shutdown.*`) say theirs in prose and are not read.
    rows = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split("\n## Values\n", 1)[1]
    table = rows.strip().split("\n\n", 1)[0].splitlines()[2:]
    checked, wrong = 0, []
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        paths = _paths(cells[0])
        defaults = cells[1].split(", ") if cells[1] else []
        if ".*`" in cells[0] or len(defaults) > len(paths):
            continue
        for path, token in zip(paths, defaults):
            if _value(path) != _default(token):
                wrong.append(f"{path}: documented {token}, values.yaml {_value(path)!r}")
            checked += 1
    assert wrong == []
    assert checked >= 35
