"""The operator docs name every HEARTH_* variable the code reads, with its true default,
and name no variable the code does not read (docs/operations.md, "Settings: every
`HEARTH_*` variable"). A stale claim is a bug: before this test the README's table and
the chart docs had drifted (variables with no doc at all, a help text promising what the
code no longer did)."""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from gateway.config import GatewaySettings
from services.attribution.settings import AttributionSettings
from services.clustering.settings import ClusteringSettings
from services.common import config
from services.feedback.settings import FeedbackSettings
from services.privacy.settings import PrivacySettings
from tests.helpers.operator_docs import OPERATOR_DOCS, ROOT, doc_lines, doc_text

OPERATIONS = ROOT / "docs" / "operations.md"
SECTION = "## Settings: every `HEARTH_*` variable"
COMPONENTS = {"gateway": GatewaySettings, "clustering": ClusteringSettings, "attribution": AttributionSettings,
              "privacy": PrivacySettings, "feedback": FeedbackSettings}
SERVICES = ["clustering", "attribution", "privacy", "feedback"]
# Defaults that differ per process (resolved from the service's name): their cell says so.
PER_SERVICE = {"HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT", "HEARTH_SERVICE_NAME"}
_ROW = re.compile(r"^\|\s*`(HEARTH_[A-Z0-9_]+)`\s*\|(.*)\|\s*$")


def _render(field) -> str:
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{int(value) if value.is_integer() else value!r}`"
    if isinstance(value, BaseModel):
        return "`" + json.dumps(value.model_dump()) + "`"
    if isinstance(value, dict):
        return "`" + json.dumps(value) + "`"
    return f"`{value}`"


def _same_default(cell: str, rendered: str) -> bool:
    if cell == rendered:
        return True
    if cell.startswith("`{") and rendered.startswith("`{"):   # JSON: 50 and 50.0 are one value
        return json.loads(cell.strip("`")) == json.loads(rendered.strip("`"))
    return False


def _readers(name: str) -> str:
    field = name[len(config.ENV_PREFIX):].lower()
    comps = [n for n, cls in COMPONENTS.items() if field in cls.model_fields]
    if len(comps) == len(COMPONENTS):
        return "all"
    return "services" if comps == SERVICES else ", ".join(comps)


def _tables(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    settings, tooling = {}, {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match:
            cells = [c.strip() for c in match.group(2).split(" | ")]
            (settings if len(cells) == 3 else tooling)[match.group(1)] = cells
    return settings, tooling


def _settings_variables() -> dict[str, object]:
    fields = {}
    for cls in COMPONENTS.values():
        for name, field in cls.model_fields.items():
            fields.setdefault(config.ENV_PREFIX + name.upper(), []).append(field)
    return fields


def test_every_setting_is_documented_once_with_its_default_and_readers():
    settings, tooling = _tables(OPERATIONS.read_text(encoding="utf-8"))
    fields = _settings_variables()
    assert set(fields) == config.known_variables() - set(config.OTHER_VARIABLES)
    assert sorted(set(fields) - set(settings)) == [], "read by the code, missing from docs/operations.md"
    assert sorted(set(settings) - set(fields)) == [], "in docs/operations.md, read by no component"
    assert set(tooling) == set(config.OTHER_VARIABLES)
    for name, (default, readers, meaning) in settings.items():
        assert readers == _readers(name), name
        assert meaning, name
        if name in PER_SERVICE:
            assert default.startswith("per service"), name
            continue
        rendered = {_render(f) for f in fields[name]}
        assert len(rendered) == 1, f"{name}: components disagree on the default {rendered}"
        assert _same_default(default, rendered.pop()), f"{name}: documented default {default}"


def test_readme_rows_state_the_code_defaults():
    # The README keeps a few rows for a newcomer; each must agree with the code.
    fields = _settings_variables()
    rows = [_ROW.match(line) for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    checked = 0
    for match in filter(None, rows):
        name, default = match.group(1), match.group(2).split(" | ")[0].strip()
        assert name in fields, name
        if name not in PER_SERVICE:
            assert _same_default(default, _render(fields[name][0])), f"README.md {name}: {default}"
            checked += 1
    assert checked


def test_the_docs_name_no_variable_the_code_does_not_read():
    known = config.known_variables()
    # A name followed by `_*` or `_<...>` is a family (`HEARTH_JWT_*`), not one variable.
    pattern = re.compile(r"HEARTH_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*[*<])")
    unknown = []
    for doc, number, line in doc_lines():
        unknown += [f"{doc}:{number} {name}" for name in pattern.findall(line) if name not in known]
    assert unknown == []


# A default stated in prose beside a setting: "`HEARTH_X` (default 3600", "`HEARTH_X` 1 s",
# "`HEARTH_X`, 30 min", "(64 MiB)"; not a count ("(30 times") nor a past value ("30 s then").
# Until session 28 only docs/privacy.md, feedback.md and attribution.md were read.
_STATED = re.compile(r"`(HEARTH_[A-Z0-9_]+)`(?:,| \(|) ?(?:default )?"
                     r"(?>(\d[\d,]*(?:\.\d+)?)(?: ?(s|min|h|days|KiB|MiB)\b)?)(?! times| then)")
_UNITS = {"": 1, "s": 1, "days": 1, "min": 60, "h": 3600, "KiB": 1024, "MiB": 1024 ** 2}


def test_the_defaults_the_docs_state_beside_a_setting_are_the_codes():
    fields = _settings_variables()
    checked, wrong = [], []
    for doc in OPERATOR_DOCS:
        for name, number, unit in _STATED.findall(doc_text(doc, flat=True)):
            scale = 1 if name.endswith("_MB") else _UNITS[unit]   # `HEARTH_AUDIT_RESERVE_MB`, 4 MiB
            value = float(number.replace(",", "")) * scale
            defaults = {float(f.default) for f in fields[name]}
            if defaults != {value}:
                wrong.append(f"{doc}: {name} stated {number} {unit}, the code's default {defaults}")
            checked.append(name)
    assert wrong == []
    assert len(checked) >= 50


def test_the_per_service_ports_are_the_codes():
    # The defaults the table above cannot render ("per service"): docs/operations.md's
    # "Processes and ports" and its HEARTH_GRPC_PORT / HEARTH_METRICS_PORT rows.
    text = OPERATIONS.read_text(encoding="utf-8")
    settings, _ = _tables(text)
    processes = text.split("## Processes and ports", 1)[1].split("\n## ", 1)[0]
    for service, (grpc_port, metrics_port) in config.DEFAULT_PORTS.items():
        row = re.search(rf"^\| {service} \| `python -m services\.{service}` \| (\d+) \| (\d+) \|$", processes, re.M)
        assert row and (int(row.group(1)), int(row.group(2))) == (grpc_port, metrics_port), service
        assert f"{grpc_port} {service}" in settings["HEARTH_GRPC_PORT"][2], service
        assert f"{metrics_port} {service}" in settings["HEARTH_METRICS_PORT"][2], service
