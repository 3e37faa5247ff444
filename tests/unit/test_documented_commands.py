"""Every `hearth ...` command line in a shell block of the operator docs parses with the
`hearth` command's own parser (the README's `hearth audit verify EXPORT.jsonl` lacked the
required `--public-key` until session 18), and every subcommand the README names exists."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from services.cli import build_parser
from tests.helpers.operator_docs import OPERATOR_DOCS, ROOT



def _shell_commands() -> list[tuple[str, str]]:
    found = []
    for doc in OPERATOR_DOCS:
        fence, lines = None, []
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                if fence is None:
                    fence, lines = line[3:].strip(), []
                    continue
                if fence in ("", "sh", "bash", "shell"):
                    for command in "\n".join(lines).replace("\\\n", " ").splitlines():
                        if command.strip().startswith("hearth "):
                            found.append((doc, command.strip()))
                fence = None
            elif fence is not None:
                lines.append(line)
    return found


def _inline_commands() -> list[tuple[str, str]]:
    # `hearth x y ARG --opt V` written out in full (placeholders in capitals), not a bare name.
    found = []
    for doc in OPERATOR_DOCS:
        for command in re.findall(r"`(hearth [^`|\[]+)`", (ROOT / doc).read_text(encoding="utf-8")):
            if re.search(r"\s[A-Z][A-Z.]*\b", command):
                found.append((doc, command))
    return found


@pytest.mark.parametrize("doc,command", _shell_commands() + _inline_commands())
def test_documented_command_parses(doc, command):
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{doc}: `{command}` does not parse") from exc


def test_there_are_commands_to_check():
    assert len(_shell_commands()) >= 5 and len(_inline_commands()) >= 5


# The gateway route whose answer a documented command prints as it is (services/privacy/keys/cli.py).
ANSWER_ROUTES = {("keys", "rotate"): ("POST", "/v1/keys/rotate"),
                 ("keys", "rotate-household"): ("POST", "/v1/household/{account_id}/rotate-key"),
                 ("keys", "rotate-households"): ("POST", "/v1/keys/rotate-households")}


def _printed_answers() -> list[tuple[str, str, dict]]:
    """(doc, command, answer) for each `hearth ...` line of a shell block followed by the
    answer it prints, as `# {...}` comment lines."""
    found = []
    for doc in OPERATOR_DOCS:
        lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if not line.strip().startswith("hearth "):
                continue
            printed = []
            for after in lines[number + 1:]:
                if not after.strip().startswith("# "):
                    break
                printed.append(after.strip()[2:])
            if printed and printed[0].startswith("{"):
                found.append((doc, line.strip(), json.loads(" ".join(printed))))
    return found


def _answer_fields(method: str, path: str) -> set[str]:
    from gateway.app import create_app
    from gateway.config import GatewaySettings

    todo = list(create_app(GatewaySettings(edge_authorizer_port=8099)).routes)
    while todo:   # routers are included without a prefix (gateway/app.py)
        route = todo.pop()
        if getattr(route, "path", None) == path and method in getattr(route, "methods", ()):
            return set(route.response_model.model_fields)
        todo += getattr(getattr(route, "original_router", None), "routes", [])
    raise AssertionError(f"no route {method} {path}")


def test_a_documented_answer_has_the_fields_the_command_prints():
    # Session 28 (docs28): the rotate-household example lacked `incomplete_purges` (added
    # in session 27) and showed `kept_versions: [1]`, which this release no longer keeps.
    answers = _printed_answers()
    assert len(answers) >= 2
    for doc, command, answer in answers:
        words = shlex.split(command)[1:3]
        fields = _answer_fields(*ANSWER_ROUTES[tuple(words)])
        assert set(answer) == fields, f"{doc}: `{command}` prints {sorted(fields)}, the doc shows {sorted(answer)}"
