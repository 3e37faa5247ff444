"""The off-site deletion ledger file (services/privacy/backup.py): round trip, refusal of
anything that is not an intact export, and the union restore uses."""

from __future__ import annotations

import json

import pytest

from services.privacy.backup import Ledger, merge_ledgers, read_ledger_file, write_ledger_file


def _job(state: str, account: str = "acc-1") -> dict:
    return {"state": state, "scope": {"kind": "household", "account_id": account}}


def test_round_trip_is_atomic_and_private(tmp_path):
    ledger = Ledger({"job-1": _job("completed"), "job-2": _job("pending", "acc-2")}, {"acc-1"})
    path = tmp_path / "offsite" / "ledger.json"
    report = write_ledger_file(ledger, path, exported_at=1.5)
    assert report["jobs"] == 2 and report["shredded_accounts"] == 1
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temporary file left
    again = read_ledger_file(path)
    assert again.jobs == ledger.jobs and again.shredded_accounts == {"acc-1"}
    # Overwriting replaces the whole file.
    write_ledger_file(Ledger({}, set()), path)
    assert read_ledger_file(path).jobs == {}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(shredded_accounts=[]), "checksum"),
    (lambda d: d["jobs"].pop("job-1"), "checksum"),
    (lambda d: d.update(format="something-else"), "not a hearth-deletion-ledger/1"),
    (lambda d: d.pop("jobs"), "missing"),
])
def test_a_modified_or_foreign_file_is_refused_naming_it(tmp_path, mutate, message):
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, {"acc-1"}), path)
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message) as info:
        read_ledger_file(path)
    assert str(path) in str(info.value)


def test_truncated_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, set()), path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="not readable"):
        read_ledger_file(path)
    with pytest.raises(ValueError, match="not readable"):
        read_ledger_file(tmp_path / "absent.json")


def test_merge_is_a_union_keeping_the_most_advanced_state():
    database = Ledger({"job-1": _job("pending"), "job-2": _job("completed", "acc-2")}, {"acc-2"})
    offsite = Ledger({"job-1": _job("completed"), "job-3": _job("running", "acc-3")}, {"acc-1"})
    merged = merge_ledgers(database, offsite)
    assert {k: v["state"] for k, v in merged.jobs.items()} == {
        "job-1": "completed", "job-2": "completed", "job-3": "running"}
    assert merged.shredded_accounts == {"acc-1", "acc-2"}
    # Order does not matter for the state kept.
    assert merge_ledgers(offsite, database).jobs["job-1"]["state"] == "completed"
