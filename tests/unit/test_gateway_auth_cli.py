"""`python -m gateway.auth add --expires-at` (user32, session 32): a time already past made
a key that never worked, printed as if it did (exit 0), and a time that was not one failed
with Python's "Invalid isoformat string" naming no option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import auth


@pytest.mark.parametrize("when, words", [
    ("2020-01-01T00:00:00Z", "in the past"),
    ("next tuesday", "ISO-8601"),
    ("2030-01-01T00:00:00", "UTC offset"),
])
def test_add_refuses_an_expiry_that_is_past_or_not_a_time_naming_the_option(tmp_path: Path, capsys, when, words):
    keys = tmp_path / "keys.json"
    assert auth.main(["--file", str(keys), "add", "alice", "analyst", "--expires-at", when]) == 2
    err = capsys.readouterr().err
    assert "--expires-at" in err and words in err, err
    assert not keys.exists() or not auth.parse_api_keys(json.loads(keys.read_text()))   # nothing added


def test_add_with_a_future_expiry_makes_a_key_that_expires_then(tmp_path: Path, capsys):
    keys = tmp_path / "keys.json"
    assert auth.main(["--file", str(keys), "add", "alice", "analyst", "--expires-at", "2030-01-01T00:00:00Z"]) == 0
    [record] = auth.parse_api_keys(json.loads(keys.read_text()))
    assert record.expires_at.isoformat() == "2030-01-01T00:00:00+00:00"
