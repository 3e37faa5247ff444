"""`hearth backup` / `hearth restore` on a real PostgreSQL (pg_dump / pg_restore of each
service's schema): what was written after the snapshot is gone, and a deletion made
after it is re-applied (key tombstoned again, job re-queued). The SQLite path is
drilled through real processes in tests/e2e/test_restore_drill.py."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import psycopg
import pytest

from services import cli
from services.common import config
from services.common.storage.sql import open_database
from services.privacy.backup import _privacy_db
from services.common.erasure import ErasureScope, ScopeKind
from services.privacy.deletion.domain import new_job
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.keys.domain import WrappedDek
from services.privacy.keys.store import DataKeyStore

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_env(postgres_dsn, monkeypatch):
    name = f"backup_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("HEARTH_STORAGE", "postgres")
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", dsn)
    return dsn


def _key(account: str, version: int = 1) -> WrappedDek:
    return WrappedDek(account, version, "k1", os.urandom(60), datetime.now(UTC))   # nonce+key+tag


def test_postgres_backup_restore_reapplies_later_deletions(pg_env, tmp_path, capsys):
    settings = config.load(service_name="privacy")
    for service in ("clustering", "attribution", "feedback"):
        open_database(settings, service).close()       # each schema exists, as in a mesh
    db = _privacy_db(settings)
    keys = DataKeyStore(db)
    for account in ("pg-keep", "pg-gone"):
        assert keys.insert_new(_key(account))
    db.close()

    assert cli.main(["backup", "--out", str(tmp_path)]) == 0
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert snapshot["backend"] == "postgres" and len(snapshot["services"]) == 4

    # After the snapshot: a write that the restore loses, and a household deletion
    # (key shredded, job recorded) that the restore must keep.
    db = _privacy_db(settings)
    keys, jobs = DataKeyStore(db), DeletionJobStore(db)
    assert keys.insert_new(_key("pg-keep", 2))
    keys.overwrite([replace(r, wrapped=b"", destroyed_at=datetime.now(UTC)) for r in keys.load("pg-gone")])
    job = new_job("job-gone", ErasureScope(kind=ScopeKind.HOUSEHOLD, account_id="pg-gone"), "dpo", "privacy_officer",
                  datetime.now(UTC))
    jobs.create(job, "req-gone", "gdpr_art17", next_due=job.requested_at)
    db.close()

    assert cli.main(["restore", snapshot["snapshot"]]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [j["replaces"] for j in report["requeued_jobs"]] == ["job-gone"]
    assert report["keys_tombstoned"] == 1

    db = _privacy_db(settings)
    try:
        keys, jobs = DataKeyStore(db), DeletionJobStore(db)
        assert [r.dek_version for r in keys.load("pg-keep")] == [1]          # the later write is gone
        gone = keys.load("pg-gone")
        assert gone and all(r.wrapped == b"" and r.destroyed_at for r in gone)
        requeued = jobs.by_request("restore:job-gone")
        assert requeued.job.scope.account_id == "pg-gone" and requeued.job.state.value == "pending"
    finally:
        db.close()


def test_restore_refuses_a_corrupt_snapshot(pg_env, tmp_path, capsys):
    settings = config.load(service_name="privacy")
    for service in ("clustering", "attribution", "feedback", "privacy"):
        open_database(settings, service).close()
    assert cli.main(["backup", "--out", str(tmp_path)]) == 0
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    with open(f"{snapshot}/privacy.pgdump", "ab") as fh:
        fh.write(b"x")
    assert cli.main(["restore", snapshot]) == 2
    assert "privacy.pgdump: missing or corrupt" in capsys.readouterr().err


def test_restore_clears_the_services_redis_copies_of_the_replaced_data(pg_env, redis_url, monkeypatch, tmp_path,
                                                                        capsys):
    """The services' Redis namespaces hold copies of the data as it was before the restore
    (a model fitted on sessions the snapshot does not have, cached for up to an hour) and
    a service reads its cache first: restore deletes them (session 18; before, nothing
    did). Other keys in the same Redis are left alone."""
    import redis

    settings = config.load(service_name="privacy")
    for service in ("clustering", "attribution", "feedback"):
        open_database(settings, service).close()
    _privacy_db(settings).close()
    assert cli.main(["backup", "--out", str(tmp_path)]) == 0
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    r = redis.Redis.from_url(redis_url)
    # The Redis is the run's shared one: earlier tests may have left keys in the namespaces.
    earlier = {service: sum(1 for _ in r.scan_iter(f"hearth:{service}:*")) for service in ("clustering", "feedback")}
    r.set("hearth:clustering:model:acc-newer", b"a model newer than the snapshot")
    r.set("hearth:feedback:calibrator", b"x")
    r.set("someone-else:key", b"kept")
    monkeypatch.setenv("HEARTH_REDIS_URL", redis_url)

    assert cli.main(["restore", snapshot["snapshot"]]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["redis_keys_cleared"]["clustering"] == earlier["clustering"] + 1
    assert report["redis_keys_cleared"]["feedback"] == earlier["feedback"] + 1
    assert not any(r.scan_iter("hearth:clustering:*")) and not any(r.scan_iter("hearth:feedback:*"))
    assert r.get("hearth:clustering:model:acc-newer") is None and r.get("hearth:feedback:calibrator") is None
    assert r.get("someone-else:key") == b"kept"

    monkeypatch.setenv("HEARTH_REDIS_URL", "redis://127.0.0.1:1/0")   # unreachable: said, and exit 1
    assert cli.main(["restore", snapshot["snapshot"]]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "hearth:<service>:*" in report["redis_error"]
    r.delete("someone-else:key")
    r.close()
