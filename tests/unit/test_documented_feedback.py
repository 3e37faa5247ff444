"""docs/feedback.md holds to the code: the signal table (kinds, weights), the trigger
thresholds, the RPC's kind mapping, the HTTP kinds and `group_by` values (the gateway's
and the service's, which must agree: until session 19 the gateway refused
`group_by=calibration_group`, which the service and this doc offer), the calibrator's
named constants, the configuration list and the `python -m services.feedback.cli` line."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import typing

from gateway.routes import feedback as feedback_routes
from hearth.feedback.v1 import feedback_pb2 as fpb
from services.feedback import cli as feedback_cli
from services.feedback.calibration import GROUP_BY
from services.feedback.domain import recalibration
from services.feedback.domain.signals import SignalKind, SignalWeights
from services.feedback.domain.triggers import TriggerThresholds
from services.feedback.servicer import KIND_BY_PB
from services.common.config import ServiceSettings
from services.feedback.settings import FeedbackSettings
from tests.helpers.operator_docs import doc_text

DOC = "docs/feedback.md"


def _text() -> str:
    return doc_text(DOC)


def _flat() -> str:
    return doc_text(DOC, flat=True)


def _section(title: str) -> str:
    return _text().split(title, 1)[1].split("\n#", 1)[0]


def test_the_signal_table_is_the_domains():
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9.]+) \|", _section("## Feedback signals and weights"), re.MULTILINE)
    assert {kind for kind, _ in rows} == {k.value for k in SignalKind}
    defaults = SignalWeights()
    assert {kind: float(weight) for kind, weight in rows} == {k.value: getattr(defaults, k.value) for k in SignalKind}
    assert f"min(|net|, {defaults.implicit_cap})" in _text()


def test_the_trigger_thresholds_are_the_defaults():
    defaults = TriggerThresholds()
    checked = 0
    for names, values in re.findall(r"^\| `([a-z_]+(?:` / `[a-z_]+)*)` \| ([0-9.]+(?: / [0-9.]+)*) \|",
                                    _section("## Retraining triggers"), re.MULTILINE):
        for name, value in zip(names.split("` / `"), values.split(" / "), strict=True):
            assert float(getattr(defaults, name)) == float(value), name
            checked += 1
    assert checked == 6


def test_the_rpc_kind_mapping_is_the_servicers():
    bullet = _flat().split("- **RecordFeedback**: kind mapping", 1)[1].split("Unknown prediction", 1)[0]
    documented = dict(re.findall(r"`([A-Z_]+)` → `([a-z_]+)`", bullet))
    assert documented == {fpb.FeedbackKind.Name(k).removeprefix("FEEDBACK_KIND_"): v.value
                          for k, v in KIND_BY_PB.items()}


def test_the_http_kinds_and_groups_are_the_gateways_and_the_services():
    kinds = re.search(r"kind: ([a-z_\\|]+),", _section("### HTTP")).group(1).split("\\|")
    assert kinds == list(typing.get_args(feedback_routes.FeedbackKindName))
    assert {fpb.FeedbackKind.Value("FEEDBACK_KIND_" + k.upper()) for k in kinds} == set(KIND_BY_PB)
    assert list(typing.get_args(feedback_routes.GroupBy)) == list(GROUP_BY)
    offered = _flat().split("- **GetCalibration**: `group_by`", 1)[1].split("`bins`", 1)[0]
    assert offered.startswith(' `""`')
    assert [g for g in GROUP_BY[1:] if f"`{g}`" not in offered] == []


def test_the_calibrators_named_constants_are_the_codes():
    flat = _flat()
    stated = re.findall(r"`([A-Z][A-Z_]+)` = \"?([0-9.]+|[a-z]+)\"?", flat) + \
        re.findall(r"`([A-Z][A-Z_]+)` \(([0-9.]+)\)", flat)
    checked = {name for name, _ in stated if hasattr(recalibration, name)}
    for name, value in stated:
        if name in checked:
            code = getattr(recalibration, name)
            assert (str(code) == value) if isinstance(code, str) else float(code) == float(value), name
    assert checked >= {"LEVEL_NOISE_MULTIPLE", "LEVEL_SEGMENT_PRIOR", "SHAPE_GATE_SE", "MIN_GROUP_FEEDBACK",
                       "FEEDBACK_GROUP_OF"}
    assert f"Fewer than {recalibration.MIN_SAMPLES_TO_FIT} feedback rows" in flat
    assert f"default `{list(recalibration.DEFAULT_SEGMENT_EDGES)}`" in flat


def test_the_configuration_list_is_the_services_own_settings():
    listed = re.findall(r"`(?:HEARTH_FEEDBACK)?(_[A-Z0-9_]+)`", _section("### Configuration"))
    own = {f"_{name.removeprefix('feedback_').upper()}" for name in FeedbackSettings.model_fields
           if name.startswith("feedback_") and name not in ServiceSettings.model_fields}
    assert sorted(listed) == sorted(own)


def test_the_report_command_line_parses():
    (line,) = re.findall(r"^python -m services\.feedback\.cli (.*)$", _text(), re.MULTILINE)
    # "[--bins 15] [--strategy uniform|quantile]": optional parts, the first choice of each
    argv = shlex.split(re.sub(r"\|[a-z]+", "", line.replace("[", "").replace("]", "")))
    parser = argparse.ArgumentParser(prog="python -m services.feedback.cli")
    feedback_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert (args.bins, args.strategy) == (feedback_cli.DEFAULT_BINS, "uniform")


def test_the_threshold_fields_exist():
    # the table names fields of the dataclass, not free text
    assert {f.name for f in dataclasses.fields(TriggerThresholds)} >= {
        "max_brier", "max_ece", "min_cohort_samples", "disagreement_count", "disagreement_window", "min_signal_weight"}


def _top_level_fields(cell: str) -> set[str]:
    """`{a, b: x|y, c?, d: [{...}]}` -> {"a", "b", "c", "d"}: the first object's own fields."""
    body = cell[cell.index("{") + 1:]
    depth, top = 0, []
    for char in body:
        if char in "{[":
            depth += 1
        elif char in "}]":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0:
            top.append(char)
    return {re.match(r"\s*([a-z_]+)", part).group(1) for part in "".join(top).split(",") if part.strip()}


def test_the_http_tables_bodies_and_answers_are_the_gateways_models():
    from gateway.app import create_app
    from gateway.config import GatewaySettings

    routes, todo = {}, list(create_app(GatewaySettings(edge_authorizer_port=8099)).routes)
    while todo:   # routers are included without a prefix (gateway/app.py)
        route = todo.pop()
        for method in getattr(route, "methods", ()):
            routes[f"{method} {route.path}"] = route
        todo += getattr(getattr(route, "original_router", None), "routes", [])
    checked = 0
    for line in _section("### HTTP").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        route = routes[cells[0].strip("`")]
        assert _top_level_fields(cells[2]) == set(route.response_model.model_fields), cells[0]
        if cells[1].startswith("`{"):
            assert _top_level_fields(cells[1]) == set(route.body_field.field_info.annotation.model_fields), cells[0]
        checked += 1
    assert checked == 6
