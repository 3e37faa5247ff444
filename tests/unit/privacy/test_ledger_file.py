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
from services.privacy.backup import (
    Ledger, _digest, _ledger_signing_key, merge_ledgers, read_ledger_file, write_ledger_file)
from services.privacy.deletion.domain import JobState, job_to_dict, new_job
from services.privacy.keys.signing import (
    generate_private_key, key_id, load_public_key, private_key_to_pem, public_key_to_pem)
from services.testing.mesh import ROOT

KEY = generate_private_key()          # the receipt signing key (session 32's ledger key)
LEDGER_KEY = generate_private_key()   # the ledger's own (HEARTH_LEDGER_SIGNING_KEY, session 33)
PUBLIC = [KEY.public_key()]


def _job(state: str, account: str = "acc-1", job_id: str = "job-1") -> dict:
    job = new_job(job_id, ErasureScope.from_dict({"kind": "household", "account_id": account}), "officer",
                  "privacy_officer", datetime(2026, 1, 1, tzinfo=UTC))
    return job_to_dict(dataclasses.replace(job, state=JobState(state)))


def test_round_trip_is_atomic_and_private(tmp_path):
    ledger = Ledger({"job-1": _job("completed"), "job-2": _job("pending", "acc-2")}, {"acc-1"})
    path = tmp_path / "offsite" / "ledger.json"
    report = write_ledger_file(ledger, path, KEY, exported_at=1.5)
    assert report["jobs"] == 2 and report["shredded_accounts"] == 1 and report["entries"] == 3
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temporary file left
    again = read_ledger_file(path, PUBLIC)
    assert again.jobs == ledger.jobs and again.shredded_accounts == {"acc-1"}
    # Overwriting replaces the whole file.
    write_ledger_file(Ledger({}, set()), path, KEY)
    assert read_ledger_file(path, PUBLIC).jobs == {}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="something-else"), "not a hearth-deletion-ledger/2"),
    (lambda d: d.pop("entries"), "missing"),
    (lambda d: d.update(exported_at=d["exported_at"] + 86400), "head: signature"),   # made to look newer
])
def test_a_modified_or_foreign_file_is_refused_naming_it(tmp_path, mutate, message):
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, {"acc-1"}), path, KEY)
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message) as info:
        read_ledger_file(path, PUBLIC)
    assert str(path) in str(info.value)


def _signed(tmp_path, accounts=("acc-1", "acc-2", "acc-3")) -> tuple:
    path = tmp_path / "ledger.json"
    jobs = {f"job-{i}": _job("completed", account, f"job-{i}") for i, account in enumerate(accounts)}
    write_ledger_file(Ledger(jobs, set(accounts[:2])), path, KEY)
    return path, json.loads(path.read_text())


def _another_export_entry(tmp_path, n: int) -> dict:
    other = tmp_path / "other.json"
    write_ledger_file(Ledger({f"job-{n}": _job("completed", "acc-victim", f"job-{n}")}, set()), other, KEY)
    entry = json.loads(other.read_text())["entries"][0]
    return {**entry, "n": n}


@pytest.mark.parametrize("tamper, named", [
    # entries: job-0, job-1, job-2, shredded acc-1, shredded acc-2 (5), one head
    (lambda d, t: d["entries"][1]["data"].update(account_id="acc-victim"), r"entry 1 \(jobs.job-1\): signature"),
    (lambda d, t: d["entries"][3].update(id="acc-victim"), r"entry 3 \(shredded_accounts.acc-victim\): signature"),
    (lambda d, t: d["entries"].insert(2, {**d["entries"][1], "id": "job-1b", "n": 2}), r"entry 2 \(jobs.job-1b\): signature"),
    (lambda d, t: d["entries"].__setitem__(slice(1, 3), d["entries"][2:0:-1]), r"entry 1 \(jobs.job-2\): signed as entry 2"),
    (lambda d, t: d["entries"].pop(2), r"entry 2 \(shredded_accounts.acc-1\): signed as entry 3"),
    (lambda d, t: d["entries"].pop(), r"truncated: the head signs 5 entries, the file ends after 4 \(entry 4 missing\)"),
    (lambda d, t: d["entries"].append({**d["entries"][-1], "n": 5}), r"entry 5: beyond the 5 entries"),
    (lambda d, t: (d["entries"].pop(), d["head"].update(entries=4)), r"head: signature"),
    (lambda d, t: d["entries"].__setitem__(1, _another_export_entry(t, 1)), r"entry 1 \(jobs.job-1\): signature"),
    (lambda d, t: d["entries"][4].update(data={"note": "unsigned"}), r"entry 4 \(shredded_accounts.acc-2\): unexpected"),
], ids=["job-altered", "shredded-altered", "inserted", "reordered", "removed", "truncated", "appended",
        "truncated-with-head-edited", "from-another-export", "unsigned-field"])
def test_a_forged_reordered_or_truncated_signed_ledger_is_refused_naming_the_entry(tmp_path, tamper, named):
    """audit32: the ledger was protected by an unkeyed SHA-256 only, which whoever can
    write the off-site copy recomputes; each of these was read as a genuine ledger."""
    path, document = _signed(tmp_path)
    assert read_ledger_file(path, PUBLIC).shredded_accounts == {"acc-1", "acc-2"}
    tamper(document, tmp_path)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=named) as info:
        read_ledger_file(path, PUBLIC)
    assert str(path) in str(info.value)


def test_a_ledger_signed_by_another_key_is_refused_and_an_earlier_key_given_is_accepted(tmp_path):
    path = tmp_path / "ledger.json"
    earlier = generate_private_key()    # the receipt key before a rotation
    write_ledger_file(Ledger({"job-1": _job("completed")}, {"acc-1"}), path, earlier)
    with pytest.raises(ValueError, match="signed by key .* not one of the keys given") as info:
        read_ledger_file(path, PUBLIC)
    assert "--ledger-public-key" in str(info.value)
    assert read_ledger_file(path, [*PUBLIC, earlier.public_key()]).shredded_accounts == {"acc-1"}
    # A forger who signs with a key of their own is the same case: their key is not given.
    with pytest.raises(ValueError, match="signed by key"):
        read_ledger_file(path, [])


def test_an_unsigned_ledger_of_before_session_32_is_refused_unless_accepted(tmp_path):
    path = tmp_path / "ledger.json"
    _forged(path, {"job-1": _job("completed")}, ["acc-1"])
    with pytest.raises(ValueError, match="unsigned .* --accept-unsigned-ledger"):
        read_ledger_file(path, PUBLIC)
    assert read_ledger_file(path, PUBLIC, accept_unsigned=True).shredded_accounts == {"acc-1"}
    document = json.loads(path.read_text())
    document["shredded_accounts"] = []
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="checksum"):
        read_ledger_file(path, PUBLIC, accept_unsigned=True)


def test_truncated_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, set()), path, KEY)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="not readable"):
        read_ledger_file(path, PUBLIC)
    with pytest.raises(ValueError, match="not readable"):
        read_ledger_file(tmp_path / "absent.json", PUBLIC)


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
        read_ledger_file(path, PUBLIC, accept_unsigned=True)
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
    done = hearth(target, "restore", snapshot, "--ledger", str(ledger), "--accept-unsigned-ledger")
    assert done.returncode != 0 and "jobs.job-000" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (target / "clustering.db").exists()


def _forge_deletion(path, account: str) -> None:
    """What whoever can write the off-site copy (but has no key of the mesh) does to make a
    restore erase ``account``: add a completed deletion of it and its key shredded, and
    make the file consistent again as far as they can — the checksum of an unsigned ledger
    recomputed; a signed one re-signed, entries and head, with a key of their own."""
    document = json.loads(path.read_text())
    job = _job("completed", account, "job-forged")
    if "sha256" in document:
        document["jobs"]["job-forged"] = job
        document["shredded_accounts"].append(account)
        document["sha256"] = _digest({"jobs": document["jobs"], "shredded_accounts": document["shredded_accounts"]})
    else:
        jobs = {e["id"]: e["data"] for e in document["entries"] if e["kind"] == "job"}
        shredded = {e["id"] for e in document["entries"] if e["kind"] == "shredded"}
        write_ledger_file(Ledger({**jobs, "job-forged": job}, shredded | {account}), path, generate_private_key(),
                          exported_at=document["exported_at"])
        return
    path.write_text(json.dumps(document))


def _cli(tmp_path, env: dict):
    """`hearth ...` as a real process on a SQLite data dir, with ``env`` on top of ours."""
    def hearth(data_dir, *args, extra_env: dict | None = None):
        merged = {**os.environ, "HEARTH_STORAGE": "sqlite", **env, **(extra_env or {}), "HEARTH_DATA_DIR": str(data_dir)}
        for name in [n for n, v in merged.items() if v is None]:
            merged.pop(name)
        return subprocess.run([sys.executable, "-m", "services.cli", *args, "--data-dir", str(data_dir)], cwd=ROOT,
                              env=merged, capture_output=True, text=True, timeout=120)
    return hearth


def _source_with_a_snapshot(tmp_path, hearth) -> tuple:
    source = tmp_path / "source"
    source.mkdir()
    with sqlite3.connect(source / "clustering.db") as db:
        db.execute("CREATE TABLE t (x)")
    sqlite3.connect(source / "privacy.db").close()
    taken = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert taken.returncode == 0, taken.stderr
    return source, json.loads(taken.stdout.strip().splitlines()[-1])["snapshot"]


def _report(done) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restore_refuses_an_offsite_ledger_forged_without_the_key(tmp_path):
    """audit32, through the real CLI: `hearth ledger export` of a privacy database, then the
    off-site copy edited to add the deletion of a household nobody asked to erase. Before,
    with the checksum recomputed, `hearth restore --ledger` replaced every database and
    re-queued the forged deletion (exit 0); now the ledger is refused before anything is
    replaced, naming the key it was signed with, and the genuine copy restores.

    ledger33: the export holds the ledger's own key (HEARTH_LEDGER_SIGNING_KEY) and no
    receipt signing key, as the chart's CronJob; before, it refused without the receipt
    key (and with it, signed with it)."""
    hearth = _cli(tmp_path, {"HEARTH_LEDGER_SIGNING_KEY": private_key_to_pem(LEDGER_KEY),
                             "HEARTH_RECEIPT_SIGNING_KEY": None})
    source, snapshot = _source_with_a_snapshot(tmp_path, hearth)
    target = tmp_path / "target"
    genuine = tmp_path / "offsite" / "ledger.json"
    exported = _report(hearth(source, "ledger", "export", "--out", str(genuine)))
    assert exported["key_id"] == key_id(LEDGER_KEY) != key_id(KEY)
    forged = tmp_path / "offsite" / "forged.json"
    forged.write_text(genuine.read_text())
    _forge_deletion(forged, "acc-victim")
    done = hearth(target, "restore", snapshot, "--ledger", str(forged))
    assert done.returncode != 0 and "signed by key" in done.stderr and "Traceback" not in done.stderr, done.stdout
    assert not (target / "clustering.db").exists()
    report = _report(hearth(target, "restore", snapshot, "--ledger", str(genuine)))
    assert report["requeued_jobs"] == []
    (covered,) = report["ledger_coverage"]
    assert covered["signed_with"] == "ledger key (HEARTH_LEDGER_SIGNING_KEY)" and covered["source"] == str(genuine)


@pytest.fixture
def hearth_in_process(monkeypatch, capsys):
    """`hearth ...` in this process (cli.main; each subprocess costs ~2 s of imports on this
    machine — the real processes are tests/e2e/test_restore_offsite_ledger.py's):
    (exit code, the JSON report or None, stderr). The umask the commands set is put back."""
    from services import cli

    monkeypatch.setenv("HEARTH_STORAGE", "sqlite")
    for name in ("HEARTH_LEDGER_SIGNING_KEY", "HEARTH_RECEIPT_SIGNING_KEY", "HEARTH_POSTGRES_DSN"):
        monkeypatch.delenv(name, raising=False)
    umask = os.umask(0o022)
    os.umask(umask)

    def hearth(data_dir, *args):
        monkeypatch.setenv("HEARTH_DATA_DIR", str(data_dir))
        capsys.readouterr()
        code = cli.main([*args, "--data-dir", str(data_dir)])
        out, err = capsys.readouterr()
        return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err

    yield hearth
    os.umask(umask)


def _source(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    with sqlite3.connect(source / "clustering.db") as db:
        db.execute("CREATE TABLE t (x)")
    sqlite3.connect(source / "privacy.db").close()
    return source


def test_the_ledger_has_its_own_key_and_ledgers_signed_before_a_rotation_need_the_old_key(
        tmp_path, monkeypatch, hearth_in_process):
    """ledger33: the export never signs with the receipt signing key any more (before: it
    did, so the CronJob held a key that signs deletion receipts); without
    HEARTH_LEDGER_SIGNING_KEY on SQLite it makes a development key of its own, private, its
    public half published. One signed with a ledger key since rotated needs
    --ledger-public-key. (A ledger signed with the receipt key: the next test.)"""
    hearth = hearth_in_process
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))
    source = _source(tmp_path)
    code, taken, err = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert code == 0, err
    snapshot = taken["snapshot"]
    code, exported, err = hearth(source, "ledger", "export", "--out", str(tmp_path / "dev.json"))
    assert code == 0, err
    assert exported["key_id"] != key_id(KEY)
    assert oct((source / "privacy-ledger-signing.key").stat().st_mode & 0o777) == "0o600"
    published = load_public_key((source / "privacy-ledger-signing.pub").read_text())
    assert exported["key_id"] == key_id(published)
    # The restore on the same data dir trusts its development ledger key.
    (source / "privacy.db").unlink()
    code, report, err = hearth(source, "restore", snapshot, "--ledger", str(tmp_path / "dev.json"))
    assert code == 0 and report["ledger_coverage"][0]["signed_with"].startswith("ledger key ("), err

    target = tmp_path / "target"
    ledger = Ledger({"job-1": _job("completed", "acc-9")}, {"acc-9"})
    earlier = generate_private_key()   # the ledger key before a rotation
    rotated = tmp_path / "before-rotation.json"
    write_ledger_file(ledger, rotated, earlier)
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(LEDGER_KEY))
    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(rotated))
    assert code == 2 and "--ledger-public-key" in err, err
    old_pub = tmp_path / "ledger-old.pub"
    old_pub.write_text(public_key_to_pem(earlier.public_key()))
    code, report, err = hearth(target, "restore", snapshot, "--ledger", str(rotated), "--ledger-public-key", str(old_pub))
    assert code == 0 and report["ledger_coverage"][0]["signed_with"] == f"--ledger-public-key {old_pub}", err
    # A ledger key that is not one: named, exit 2, nothing replaced (nor exported).
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", "c2hvcnQ=")
    elsewhere = tmp_path / "elsewhere"
    code, _, err = hearth(elsewhere, "restore", snapshot, "--ledger", str(rotated))
    assert code == 2 and "HEARTH_LEDGER_SIGNING_KEY: raw Ed25519 key must be 32 bytes" in err, err
    assert not elsewhere.exists() or not (elsewhere / "clustering.db").exists()
    code, _, err = hearth(source, "ledger", "export", "--out", str(tmp_path / "never.json"))
    assert code == 2 and "HEARTH_LEDGER_SIGNING_KEY" in err and not (tmp_path / "never.json").exists()


def test_a_ledger_signed_with_the_receipt_key_is_refused_unless_its_public_half_is_given(
        tmp_path, monkeypatch, hearth_in_process):
    """ledger35: through session 34 a restore trusted the receipt signing key's public half
    for ledgers (those exported before session 33 were signed with it), so whoever holds
    the receipt key — every privacy pod — could sign a ledger a restore accepted (exit 0,
    the ledger's deletions re-applied, a warning on stderr only). Now such a ledger is
    refused, naming the file, the key (the receipt key, as the restore knows it) and the
    way on, before anything is replaced; given explicitly with --ledger-public-key it
    restores, and the report says the key that verified it was the receipt key given so."""
    hearth = hearth_in_process
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))   # privacy's config
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(LEDGER_KEY))
    source = _source(tmp_path)
    code, taken, err = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert code == 0, err
    snapshot, target = taken["snapshot"], tmp_path / "target"
    by_receipt_key = tmp_path / "session32.json"
    write_ledger_file(Ledger({"job-1": _job("completed", "acc-9")}, {"acc-9"}), by_receipt_key, KEY)

    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(by_receipt_key))
    assert code == 2, err
    assert (f"--ledger {by_receipt_key}: signed by key {key_id(KEY)[:16]}, the receipt signing key "
            "(HEARTH_RECEIPT_SIGNING_KEY)") in err, err
    assert "--ledger-public-key FILE" in err and "Upgrading to session 35" in err, err
    assert not (target / "clustering.db").exists()
    # Where the restore does not know the receipt key (no HEARTH_RECEIPT_SIGNING_KEY, no
    # development key): refused too, the message naming the receipt key's public half.
    monkeypatch.delenv("HEARTH_RECEIPT_SIGNING_KEY")
    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(by_receipt_key))
    assert code == 2 and f"signed by key {key_id(KEY)[:16]}, which is not one of the keys given" in err, err
    assert "signed with the receipt signing key) the receipt key's" in err and "--ledger-public-key FILE" in err
    assert not (target / "clustering.db").exists()
    # In development the receipt key's published half under HEARTH_DATA_DIR is recognised.
    target.mkdir()
    (target / "privacy-receipt-signing.pub").write_text(public_key_to_pem(KEY.public_key()))
    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(by_receipt_key))
    assert code == 2 and f"the receipt signing key ({target / 'privacy-receipt-signing.pub'})" in err, err
    assert not (target / "clustering.db").exists()

    # The operator's explicit word: the receipt key's public half given. It restores, and
    # says which key verified the file.
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))
    report, err = _restored_given_the_receipt_keys_public_half(hearth, tmp_path, target, snapshot, by_receipt_key)
    assert [j["replaces"] for j in report["requeued_jobs"]] == ["job-1"]
    assert "warning" not in err, err


def _restored_given_the_receipt_keys_public_half(hearth, tmp_path, target, snapshot, ledger):
    """Restore with ``ledger`` and the receipt key's public half given explicitly (the
    operator's word): it restores, the report naming that key. (report, stderr)"""
    receipt_pub = tmp_path / "receipt.pub"
    receipt_pub.write_text(public_key_to_pem(KEY.public_key()))
    code, report, err = hearth(target, "restore", snapshot, "--ledger", str(ledger),
                               "--ledger-public-key", str(receipt_pub))
    assert code == 0, err
    assert report["ledger_coverage"][0]["signed_with"] == (
        f"--ledger-public-key {receipt_pub}: the receipt signing key (HEARTH_RECEIPT_SIGNING_KEY)")
    return report, err


def test_a_ledger_key_that_is_the_receipt_key_is_refused_by_the_restore_and_the_export(
        tmp_path, monkeypatch, hearth_in_process):
    """review35 R1: an operator who filled HEARTH_LEDGER_SIGNING_KEY with the receipt signing
    key (the one key they had when session 33 asked for a ledger key) kept what session 35
    removed — whoever holds the receipt key, every privacy pod, signs ledgers a restore
    accepts — and the restore trusted it silently, as "the ledger key". Now the restore
    refuses before anything is replaced, naming both variables and the way on, and the
    export, where it sees the receipt key, refuses to sign with it."""
    hearth = hearth_in_process
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))
    source = _source(tmp_path)
    code, taken, err = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert code == 0, err
    snapshot, target = taken["snapshot"], tmp_path / "target"
    forged = tmp_path / "by-a-privacy-pod.json"   # what anyone holding the receipt key can write
    write_ledger_file(Ledger({"job-1": _job("completed", "acc-9")}, {"acc-9"}), forged, KEY)

    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(KEY))   # the mistake
    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(forged))
    assert code == 2, err
    assert (f"HEARTH_LEDGER_SIGNING_KEY: is the receipt signing key (HEARTH_RECEIPT_SIGNING_KEY; key "
            f"{key_id(KEY)[:16]})") in err, err
    assert "--ledger-public-key FILE" in err, err
    assert not (target / "clustering.db").exists()
    code, _, err = hearth(source, "ledger", "export", "--out", str(tmp_path / "never.json"))
    assert code == 2 and "HEARTH_LEDGER_SIGNING_KEY: is the receipt signing key" in err, err
    assert not (tmp_path / "never.json").exists()

    # The way on: the ledger key configured apart, the copy's key given explicitly.
    monkeypatch.delenv("HEARTH_LEDGER_SIGNING_KEY")
    _restored_given_the_receipt_keys_public_half(hearth, tmp_path, target, snapshot, forged)


def test_read_ledger_file_refuses_a_receipt_key_it_recognises_naming_it(tmp_path):
    """The rule itself (ledger35): a key recognised as the receipt key verifies nothing;
    the same key among the public keys given does."""
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, {"acc-1"}), path, KEY)
    receipt = {key_id(KEY): "receipt signing key (somewhere)"}
    with pytest.raises(ValueError, match=r"the receipt signing key \(somewhere\): an export of before session 33"):
        read_ledger_file(path, [LEDGER_KEY.public_key()], receipt_keys=receipt)
    ledger = read_ledger_file(path, [KEY.public_key()], key_labels={key_id(KEY): "given"}, receipt_keys=receipt)
    assert ledger.signed_with == "given" and ledger.shredded_accounts == {"acc-1"}


def test_without_a_configured_ledger_key_the_export_on_postgres_refuses(tmp_path, monkeypatch):
    """A development key made up in a CronJob's pod would be gone with it: on PostgreSQL the
    export refuses naming HEARTH_LEDGER_SIGNING_KEY, and never falls back to the receipt key."""
    from types import SimpleNamespace

    monkeypatch.delenv("HEARTH_LEDGER_SIGNING_KEY", raising=False)
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))
    with pytest.raises(ValueError, match="HEARTH_LEDGER_SIGNING_KEY: not set"):
        _ledger_signing_key(SimpleNamespace(storage="postgres", data_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", "not a key")
    with pytest.raises(ValueError, match="HEARTH_LEDGER_SIGNING_KEY"):
        _ledger_signing_key(SimpleNamespace(storage="postgres", data_dir=tmp_path))


def test_a_restore_refuses_a_genuine_ledger_older_than_the_snapshot_or_the_max_age(tmp_path, monkeypatch,
                                                                                   hearth_in_process):
    """review32 R19: a genuine export older than the snapshot knows none of the deletions
    since it, and one older than --ledger-max-age-s may miss the latest ones; without the
    privacy database, restoring with it brought every household erased after its export
    back (exit 0). Refused now, naming the file and what it covers, before anything is
    replaced; --accept-stale-ledger restores with it. (Through real processes:
    tests/e2e/test_restore_offsite_ledger.py.)"""
    hearth = hearth_in_process
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(LEDGER_KEY))
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))   # the restore's: privacy's config
    source, target = _source(tmp_path), tmp_path / "target"
    older, newest = tmp_path / "offsite" / "older.json", tmp_path / "offsite" / "newest.json"
    assert hearth(source, "ledger", "export", "--out", str(older))[0] == 0
    code, taken, err = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert code == 0, err
    snapshot = taken["snapshot"]
    assert hearth(source, "ledger", "export", "--out", str(newest))[0] == 0

    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(older))
    assert code == 2 and f"--ledger {older}: stale: exported at" in err and "before the snapshot" in err, err
    assert "--accept-stale-ledger" in err and "0 deletion job(s)" in err
    assert not (target / "clustering.db").exists()
    code, _, err = hearth(target, "restore", snapshot, "--ledger", str(newest), "--ledger-max-age-s", "0")
    assert code == 2 and "more than --ledger-max-age-s (0 s)" in err, err
    assert not (target / "clustering.db").exists()
    with pytest.raises(SystemExit):
        hearth(target, "restore", snapshot, "--ledger", str(newest), "--ledger-max-age-s", "nan")
    # The newest of several copies is what counts; an operator who knows the older one is
    # the last there was says so.
    assert hearth(target, "restore", snapshot, "--ledger", str(older), "--ledger", str(newest))[0] == 0
    (target / "privacy.db").unlink()
    code, report, err = hearth(target, "restore", snapshot, "--ledger", str(older), "--accept-stale-ledger")
    assert code == 0, err
    (covered,) = report["ledger_coverage"]
    assert covered["source"] == str(older) and covered["exported_at"] and covered["age_s"] >= 0


def test_a_restore_refuses_a_ledger_exported_in_the_future_naming_it(tmp_path, monkeypatch, hearth_in_process):
    """A genuine export whose signed time is ahead of the restoring machine's clock (the
    exporting machine's clock ran ahead) passed the stale check however old it really was:
    its age read as negative. Refused now beyond the clock-skew tolerance
    (MAX_FUTURE_SKEW_S, 10 minutes), naming the file, before anything is replaced; one
    within the tolerance restores."""
    import time

    from services.common.ids import MAX_FUTURE_SKEW_S

    hearth = hearth_in_process
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(LEDGER_KEY))
    monkeypatch.setenv("HEARTH_RECEIPT_SIGNING_KEY", private_key_to_pem(KEY))
    source, target = _source(tmp_path), tmp_path / "target"
    code, taken, err = hearth(source, "backup", "--out", str(tmp_path / "out"))
    assert code == 0, err
    ahead, skewed = tmp_path / "offsite" / "ahead.json", tmp_path / "offsite" / "skewed.json"
    ahead.parent.mkdir()
    write_ledger_file(Ledger({}, set()), ahead, LEDGER_KEY, exported_at=time.time() + MAX_FUTURE_SKEW_S + 600)
    code, _, err = hearth(target, "restore", taken["snapshot"], "--ledger", str(ahead))
    assert code == 2 and f"--ledger {ahead}: exported at" in err and "in the future" in err, err
    assert "Traceback" not in err and not (target / "clustering.db").exists()
    write_ledger_file(Ledger({}, set()), skewed, LEDGER_KEY, exported_at=time.time() + MAX_FUTURE_SKEW_S / 2)
    code, _, err = hearth(target, "restore", taken["snapshot"], "--ledger", str(skewed))
    assert code == 0, err


def test_the_stale_rule_reads_the_newest_export_time():
    from services.privacy.backup import stale_ledger_reason

    ledger = Ledger({"job-1": _job("completed")}, {"acc-1"}, exported_at=1000.0, signed_with="ledger key (x)")
    assert stale_ledger_reason([("a.json", ledger)], 900.0, 1100.0, 3600) == ""
    assert "a.json: stale: exported at 1970-01-01T00:16:40+00:00, before the snapshot" in stale_ledger_reason(
        [("a.json", ledger)], 1001.0, 1100.0, 3600)
    assert "more than --ledger-max-age-s (60 s)" in stale_ledger_reason([("a.json", ledger)], 900.0, 1100.0, 60)
    newer = dataclasses.replace(ledger, exported_at=1050.0)
    assert stale_ledger_reason([("a.json", ledger), ("b.json", newer)], 1001.0, 1100.0, 3600) == ""
    # An unsigned /1 file (--accept-unsigned-ledger) may say anything: no crash, a message.
    odd = dataclasses.replace(ledger, exported_at=1e300)
    assert "c.json: exported at 1e+300, " in stale_ledger_reason([("c.json", odd)], 900.0, 1100.0, 3600)
    # Ahead of the restoring clock: within the tolerance it is read as now, beyond it refused.
    assert stale_ledger_reason([("a.json", ledger)], 900.0, 1000.0 - 600, 3600) == ""
    assert "in the future" in stale_ledger_reason([("a.json", ledger)], 900.0, 1000.0 - 601, 3600)
    assert "no export time" in stale_ledger_reason([("d.json", dataclasses.replace(ledger, exported_at=None))],
                                                   900.0, 1100.0, 3600)
    assert "1e+300" in stale_ledger_reason([("c.json", odd)], 2e300, 1100.0, 3600)


def test_the_ledger_key_public_half_is_printed_for_the_restore(tmp_path, monkeypatch, capsys, hearth_in_process):
    """`hearth ledger public-key`: the PEM a restore verifies with (--ledger-public-key)
    where the private key should not be, and what to keep before rotating it."""
    from services import cli

    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path))
    assert cli.main(["ledger", "public-key", "--data-dir", str(tmp_path)]) == 2
    assert "HEARTH_LEDGER_SIGNING_KEY: not set" in capsys.readouterr().err
    monkeypatch.setenv("HEARTH_LEDGER_SIGNING_KEY", private_key_to_pem(LEDGER_KEY))
    assert cli.main(["ledger", "public-key", "--data-dir", str(tmp_path)]) == 0
    pem = capsys.readouterr().out
    assert key_id(load_public_key(pem)) == key_id(LEDGER_KEY) and "PRIVATE" not in pem
    path = tmp_path / "ledger.json"
    write_ledger_file(Ledger({"job-1": _job("completed")}, {"acc-1"}), path, LEDGER_KEY)
    assert read_ledger_file(path, [load_public_key(pem)]).shredded_accounts == {"acc-1"}
