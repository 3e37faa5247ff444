"""Every repository path the operator docs name exists, and a `path/module.name` reference
names something that module defines (docs/deploy.md named `tls.CHANNEL_OPTIONS`, a
constant that had become the function `channel_options()`)."""

from __future__ import annotations

import re
from tests.helpers.operator_docs import ROOT, doc_lines

_PATH = re.compile(r"(?<![\w./-])((?:services|gateway|deploy|scripts|tests|bench|docs|protos|\.ci)/[\w./<>*-]*[\w*>])")


def _missing(reference: str) -> bool:
    if (ROOT / reference).exists():
        return False
    module, _, name = reference.rpartition(".")
    source = ROOT / f"{module}.py"
    if not source.is_file():
        return True
    return not re.search(rf"^\s*(?:def|class|async def)\s+{name}\b|^{name}\s*[:=]", source.read_text(encoding="utf-8"),
                         re.MULTILINE)


def test_every_documented_path_exists():
    checked, missing = 0, []
    for doc, number, line in doc_lines():
        for reference in _PATH.findall(line):
            if any(c in reference for c in "<*>"):   # a pattern (`services/<svc>/...`), not a path
                continue
            checked += 1
            if _missing(reference):
                missing.append(f"{doc}:{number} {reference}")
    assert checked > 80
    assert missing == []


_TEST = re.compile(r"((?:tests|bench)/[\w./-]+\.py)::(\w+)")


def test_every_documented_test_name_is_defined_in_its_file():
    # A renamed test left its old name in a doc (docs/feedback.md named
    # test_a_window_erasure_takes_the_prediction_of_a_session_merged_away, session 21's
    # name of what became test_an_erasure_takes_the_prediction_of_a_session_merged_away).
    checked, missing = 0, []
    for doc, number, line in doc_lines():
        for path, name in _TEST.findall(line):
            checked += 1
            source = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).is_file() else ""
            if not re.search(rf"^\s*(?:async )?def {name}\(|^class {name}\b", source, re.MULTILINE):
                missing.append(f"{doc}:{number} {path}::{name}")
    assert checked > 50
    assert missing == []
