"""A mesh process's JSON log lines (services/common/telemetry.JsonLogFormatter: one object
a line, a record's ``fields`` at the top level)."""

from __future__ import annotations

import json
from pathlib import Path


def json_log_lines(path: Path, **match: object) -> list[dict]:
    """Every JSON object line of ``path`` whose keys hold the values ``match`` gives."""
    found = []
    for raw in Path(path).read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and all(line.get(k) == v for k, v in match.items()):
            found.append(line)
    return found
