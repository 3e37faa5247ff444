"""VerifyAudit on a log the service keeps appending to (review32, session 32), on real SQLite
and PostgreSQL. Every RPC of the mesh is audited, so a live log grows while it is verified:
the writer commits each batch's rows with its signed head. The verification read the newest
head first and then every row and stored head, so rows and heads committed meanwhile were
reported as tampering — ``inserted`` ("25 entries but the signed tree head covers 20") on
main after audit32's streaming, ``modified`` (a head past the rows read) on 960ab3f. Now the
log up to the start's head is verified, and what was appended meanwhile is called tampering
only if no genuine head signed by the end covers it. The writes meanwhile are made at fixed
points of the read (deterministic), not by a racing thread."""

from __future__ import annotations

import pytest

from services.common import audit
from tests.integration.test_audit_log import _INSERT, _fill, _forged, _records, _row, key, log  # noqa: F401


@pytest.fixture(autouse=True)
def small_pages(monkeypatch):
    """Pages of 4 rows and 2 heads, so that what is appended after the first row (after the
    last row) is read by a later page of rows (of heads)."""
    from services.privacy.audit import store

    monkeypatch.setattr(store, "ROWS_PAGE", 4)
    monkeypatch.setattr(store, "HEADS_PAGE", 2)


def _appending(log, when: str):
    """The store's row stream, appending a batch of 5 records after its first row
    (``during``) or once it is exhausted (``after``: before the stored heads past it are read)."""
    rows = log.app.store.iter_rows

    def stream(*args, **kwargs):
        for i, row in enumerate(rows(*args, **kwargs)):
            yield row
            if i == 0 and when == "during":
                log.app.append(_records(5, tag="meanwhile", event=audit.INGEST))
        if when == "after":
            log.app.append(_records(5, tag="meanwhile", event=audit.INGEST))

    return stream


@pytest.mark.parametrize("when", ["during", "after"])
def test_records_appended_while_verifying_are_not_tampering(log, monkeypatch, when):
    _fill(log, (5, 5, 5, 5))
    monkeypatch.setattr(log.app.store, "iter_rows", _appending(log, when))
    checked = log.app.verify()
    assert checked.result.ok, checked.result.message
    assert checked.sth.tree_size == 20 and checked.entries == 20   # what the answer's head covers
    monkeypatch.setattr(log.app.store, "iter_rows", type(log.app.store).iter_rows.__get__(log.app.store))
    again = log.app.verify()   # the next verify covers what was appended
    assert again.result.ok and again.entries == 25 and again.sth.tree_size == 25, again.result.message


def test_a_row_no_head_covers_is_still_inserted_while_records_are_appended(log, monkeypatch):
    """Rows past the start's head are not taken on trust: one beyond the newest genuine head
    at the end is ``inserted`` at that head's size."""
    _fill(log, (5, 5, 5, 5))
    monkeypatch.setattr(log.app.store, "iter_rows", _appending(log, "during"))
    with log.db.transaction() as tx:   # a forged row where the writer's next batch will not reach
        tx.execute(_INSERT, _row(_forged(40)))
    checked = log.app.verify()
    assert (checked.result.ok, checked.result.reason and checked.result.reason.value,
            checked.result.first_bad_seq) == (False, "inserted", 25), checked.result.message
