"""The off-site deletion ledger file (services/privacy/backup.py): round trip, refusal of
anything that is not an intact export, and the union restore uses."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from services.common.erasure import ErasureScope
from services.privacy.backup import Ledger, _digest, merge_ledgers, read_ledger_file, write_ledger_file
from services.privacy.deletion.domain import JobState, job_to_dict, new_job
from services.testing.mesh import ROOT


def _job(state: str, account: str = "acc-1", job_id: str = "job-1") -> dict:
    job = new_job(job_id, ErasureScope.from_dict({"kind": "household", "account_id": account}), "officer",
                  "privacy_officer", datetime(2026, 1, 1, tzinfo=UTC))
    return job_to_dict(dataclasses.replace(job, state=JobState(state)))


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


def _forged(path, jobs: dict, shredded: list) -> None:
    """A ledger file with a matching checksum (an unkeyed SHA-256: anyone may recompute it)."""
    body = {"jobs": jobs, "shredded_accounts": shredded}
    path.write_text(json.dumps({"format": "hearth-deletion-ledger/1", "exported_at": 1.0, **body,
                                "sha256": _digest(body)}))


@pytest.mark.parametrize("jobs, shredded, named", [
    ({"job-000": {"state": "completed"}}, [], "jobs.job-000"),
    ({"job-000": ["not", "a", "job"]}, [], "jobs.job-000"),
    ({"job-000": {**_job("completed"), "state": "finished"}}, [], "jobs.job-000"),
    ({}, [{"an": "object"}], "shredded_accounts[0]"),
    ({}, ["acc 1\n"], "shredded_accounts[0]"),
])
def test_a_malformed_entry_is_refused_naming_it(tmp_path, jobs, shredded, named):
    """attack31: the checksum proves a copy intact, not well formed; an entry that is not a
    job raised only while the restore re-applied the ledger, after the databases were
    replaced (or a TypeError for a shredded account that is not a string)."""
    path = tmp_path / "ledger.json"
    _forged(path, jobs, shredded)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")) as info:
        read_ledger_file(path)
    assert str(path) in str(info.value)


def test_a_restore_with_a_malformed_ledger_entry_replaces_nothing(tmp_path):
    """attack31, through the real CLI: a ledger whose first entry is not a job (sorted
    before the others) failed the restore only after every database had been replaced, so
    none of the ledger's deletions was re-applied — the households erased since the
    snapshot were back, their keys alive — and the command said only "job.services:
    missing". Now the ledger is checked before anything is replaced."""
    env = {**os.environ, "HEARTH_STORAGE": "sqlite"}
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    with sqlite3.connect(source / "clustering.db") as db:
        db.execute("CREATE TABLE t (x)")

    def hearth(data_dir, *args):
        return subprocess.run([sys.executable, "-m", "services.cli", *args, "--data-dir", str(data_dir)], cwd=ROOT,
                              env={**env, "HEARTH_DATA_DIR": str(data_dir)}, capture_output=True, text=True,
                              timeout=120)

    taken = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert taken.returncode == 0, taken.stderr
    snapshot = json.loads(taken.stdout.strip().splitlines()[-1])["snapshot"]
    ledger = tmp_path / "ledger.json"
    _forged(ledger, {"job-000": {"state": "completed"}, "job-1": _job("completed", "acc-erased")}, ["acc-erased"])
    done = hearth(target, "restore", snapshot, "--ledger", str(ledger))
    assert done.returncode != 0 and "jobs.job-000" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (target / "clustering.db").exists()
