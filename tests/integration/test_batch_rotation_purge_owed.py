"""A batch rotation defers privacy's own key-table purge to the end of its pass
(keys/batch.py, session 29): the households' old wrapped keys are tombstoned one by one,
then purged once. Privacy killed between the last tombstone and that purge must not
leave the old wrapped keys in privacy's files for good: the tombstones' transactions
note the purge owed (PostgreSQL: ``erasures_awaiting_purge``), and the restarted
process's rotation sweep runs it (SQLite: its first sweep; PostgreSQL: every sweep).
review29's check of dc4b700."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_data_key_rotation import (  # noqa: F401 - fixtures
    Mesh, _aged, _batches, _officer, databases, purgeable_postgres)


def test_a_batch_pass_killed_before_its_one_key_table_purge_is_purged_by_the_next_sweep(databases, monkeypatch):
    from services.common.storage.sql import PENDING_TABLE

    mesh = Mesh(databases)
    accounts = ("acc-k1", "acc-k2")
    for account in accounts:
        mesh.fill(account, n=2)
    _aged(mesh, *accounts)
    old = {account: [r.wrapped for r in mesh.key_store.load(account) if r.dek_version == 1] for account in accounts}
    assert all(len(w) == 1 and w[0] for w in old.values())
    db = mesh.key_store.db
    purge = db.purge_erased

    def killed(*_args, **_kw):
        raise SystemExit("privacy killed before the pass's purge of its key tables")

    monkeypatch.setattr(db, "purge_erased", killed)
    batches = _batches(mesh, mesh.rotation())
    batches.request(3650, 10, principal=_officer())
    with pytest.raises(SystemExit):
        batches.run_due()
    monkeypatch.setattr(db, "purge_erased", purge)
    for account in accounts:   # both retired before the kill: version 1 tombstoned
        assert [r.wrapped for r in mesh.key_store.load(account) if r.dek_version == 1] == [b""]

    def left_behind() -> bool:
        if db.dialect == "sqlite":
            files = [p.read_bytes() for p in Path(db.path).parent.glob("privacy.db*")]
            return any(w[0] in data for w in old.values() for data in files)
        with db.transaction() as tx:
            return bool(tx.query(f"SELECT 1 FROM {PENDING_TABLE}"))

    assert left_behind()
    purged = []
    monkeypatch.setattr(db, "purge_erased", lambda tables=(): purged.append(purge(tables)) or purged[-1])
    mesh.rotation(mesh.replica()).sweep()                            # the restarted process's sweep
    if db.dialect == "sqlite":
        assert not left_behind()
    else:   # the key tables rewritten; WAL removal needs wal_recycle off (docs/privacy.md §11)
        assert len(purged) == 1 and "VACUUM (FULL, ANALYZE) data_keys" in purged[0]["action"], purged
        assert not left_behind()
