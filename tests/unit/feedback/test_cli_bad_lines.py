"""``hearth report calibration`` names the line of a bad row (user32, session 32).

docs/feedback.md: "Exit 2 with the line number on bad input". A row whose probabilities
were out of [0, 1] or did not sum to 1 was refused only once the whole file was read, as
"vectors: row 0 sums to 1.8" — the index among non-blank rows, from 0, not the line; and
`persons` of another length than `probabilities` was accepted, so a label named by a
person was scored against whichever probability sat at that person's index."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.feedback import cli

GOOD = '{"probabilities": [0.6, 0.4], "persons": ["p1", "p2"], "label": "p1"}\n'


@pytest.mark.parametrize("row, words", [
    ('{"probabilities": [0.9, 0.9], "persons": ["p1", "p2"], "label": "p1"}', "sums to 1.8"),
    ('{"probabilities": [1.5, -0.5], "label": 0}', "[0, 1]"),
    ('{"probabilities": [0.7, 0.3], "persons": ["p1"], "label": "p1"}', "persons"),
    ('{"probabilities": [0.7, 0.3], "persons": ["p1", "p1"], "label": "p1"}', "persons"),
    ('{"probabilities": [0.7, 0.3], "persons": ["p1", 2], "correct": true}', "persons"),
])
def test_a_bad_row_is_refused_naming_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], row, words):
    source = tmp_path / "p.jsonl"
    source.write_text(GOOD + "\n" + GOOD + row + "\n")   # a blank line: the bad row is line 4
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and words in err, err
