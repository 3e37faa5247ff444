"""Every `hearth ...` command line in a shell block of the operator docs parses with the
`hearth` command's own parser (the README's `hearth audit verify EXPORT.jsonl` lacked the
required `--public-key` until session 18), and every subcommand the README names exists."""

from __future__ import annotations

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
