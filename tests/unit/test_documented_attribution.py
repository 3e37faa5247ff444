"""docs/attribution.md holds to the code: the methods, the entry point's parameters, the
"What you can ask" table (every API field is a field of the gateway's request with the
default the doc states, every CLI flag is an option of `hearth attribute`), the example
command line, and the Markov conventions' defaults."""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex

from gateway.routes.attribution import AttributionIn
from services.attribution.domain.api import METHODS, attribute
from services.attribution.domain.markov import MarkovConventions
from services.cli import build_parser
from tests.helpers.operator_docs import doc_text

DOC = "docs/attribution.md"


def _text() -> str:
    return doc_text(DOC)


def _flat() -> str:
    return doc_text(DOC, flat=True)


def _ask_rows() -> list[tuple[str, str, str]]:
    section = _text().split("## What you can ask", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [(q.strip(), api.strip(), cli.strip()) for q, api, cli in rows[1:]]


def test_the_methods_are_the_apis():
    methods = re.search(r"Methods: (.*?)\. Every report", _flat()).group(1)
    assert set(re.findall(r"`([a-z_]+)`", methods)) == set(METHODS)


def test_the_entry_points_parameters_exist():
    documented = re.search(r"api\.attribute\(([^)]*)\)", _flat()).group(1)
    names = [n.strip() for n in documented.split(",") if n.strip() not in ("*", "")]
    assert names == [n for n in inspect.signature(attribute).parameters]


def test_every_api_field_of_the_table_is_a_request_field_with_the_stated_default():
    fields = AttributionIn.model_fields
    checked = 0
    for _, api, _ in _ask_rows():
        asked = api.split("→", 1)[0]
        for name in re.findall(r"`([a-z_]+)(?::[^`]*)?`", asked):
            assert name in fields, name
            checked += 1
        for name, default in re.findall(r"`([a-z_]+)` \(([^)]+\]?)\)", asked):
            field = fields[name]
            value = field.default_factory() if field.default_factory else field.default
            assert value == eval(default), name   # noqa: S307 - a literal from our own doc
    assert checked >= 10


def test_every_cli_flag_of_the_table_is_an_option_of_hearth_attribute():
    parser = build_parser()
    attribute_parser = parser._subparsers._group_actions[0].choices["attribute"]
    options = {o for action in attribute_parser._actions for o in action.option_strings}
    flags = {f for _, _, cli in _ask_rows() for f in re.findall(r"(--[a-z-]+)", cli)}
    assert len(flags) >= 10 and sorted(flags - options) == []


def test_the_example_command_line_parses():
    (example,) = re.findall(r"Example: `(hearth attribute [^`]*)`", _flat())
    args = build_parser().parse_args(shlex.split(example)[1:])
    assert args.order == "auto" and args.bootstrap == 200 and args.sequence == ["display > search"]


def test_the_markov_conventions_table_is_the_dataclass():
    section = _text().split("**Switchable conventions**", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, re.MULTILINE)
    defaults = {f.name: f.default for f in dataclasses.fields(MarkovConventions)}
    assert len(rows) == 6
    for name, cell in rows:
        assert str(defaults[name]) == cell.strip().strip("`"), name
