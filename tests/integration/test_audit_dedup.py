"""Idempotent appends on the real stores (SQLite and PostgreSQL) once record ids have
left the writer's in-memory window: a retried record_id gets the seq of its first
append, found through the ts index, during a run and after a restart. A tiny window
(4 ids per generation) makes the table look-up the common case here."""

from __future__ import annotations

import pytest

from services.common import audit
from services.common.identity import Principal, Role
from services.common.storage.sql import migrate
from services.privacy.audit.app import AuditApp
from services.privacy.keys.signing import generate_private_key
from services.privacy.migrations import MIGRATIONS

WINDOW = 4
WHO = Principal("svc:dedup", Role.SERVICE)


def _records(n: int, tag: str) -> list[audit.AuditRecord]:
    return [audit.make_record(audit.INGEST, f"household:{tag}-{i}", details={"i": i},
                              principal=WHO, trace_id=f"{tag}{i:04x}") for i in range(n)]


@pytest.fixture
def key():
    return generate_private_key()


@pytest.fixture
def app(database, key):
    migrate(database, MIGRATIONS)
    opened = AuditApp(database, key, max_delay_s=0.001, dedup_window=WINDOW)
    yield opened
    opened.close()


def _fill(app: AuditApp, batches: int = 6, size: int = 3) -> list[list[audit.AuditRecord]]:
    sent = [_records(size, f"b{b}") for b in range(batches)]
    for records in sent:
        app.append(records)
    return sent


def test_a_retry_older_than_the_id_window_gets_its_first_seq(app):
    sent = _fill(app)
    first_batch = sent[0]
    # These ids have left memory (two generations of WINDOW ids were filled since):
    # only the table can answer for them.
    assert all(r.record_id not in app.writer._ids and r.record_id not in app.writer._ids_previous
               for r in first_batch)
    fresh = _records(2, "new")
    again = app.append([first_batch[1], *fresh, first_batch[0], sent[-1][2], fresh[0]])
    assert again == [1, 18, 19, 0, 17, 18]
    assert app.writer.size == 20 and app.verify().result.ok


def test_a_retry_after_a_restart_gets_its_first_seq(database, key, app):
    sent = _fill(app)
    app.close()
    reopened = AuditApp(database, key, max_delay_s=0.001, dedup_window=WINDOW)
    try:
        old, recent = sent[0][2], sent[-1][0]
        assert reopened.append([old, recent]) == [2, 15]
        assert reopened.append(_records(1, "after")) == [18]
        assert reopened.writer.size == 19 and reopened.verify().result.ok
    finally:
        reopened.close()


def test_repeats_inside_one_call_and_over_grpc_style_untrusted_appends(app):
    records = _records(3, "u")
    caller = Principal("svc:other", Role.SERVICE)
    assert app.append_untrusted([records[0], records[1], records[0]], caller) == [0, 1, 0]
    _fill(app, batches=4)
    assert app.append_untrusted([records[1], records[2]], caller) == [1, 14]
    assert app.verify().result.ok and app.writer.size == 15
