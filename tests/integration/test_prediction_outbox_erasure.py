"""Erasure reaches clustering's undelivered predictions (services/clustering/prediction_log.py
erase_pending), on both SQL backends: since session 19 a prediction_outbox row is a chunk of
many households' predictions, so an erased household's are cut out of the chunks they share
(rewritten without them) and chunks of its own are deleted; rows of the older one-a-prediction
table go as before. What stays forwards untouched."""

from __future__ import annotations

import json

import pytest

from hearth.feedback.v1 import feedback_pb2 as fpb
from services.clustering.prediction_log import PredictionLog, _RECORD_FIELDS, erase_pending
from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope, ScopeKind
from services.common.predictions import PredictionRecord


def _record(pid: str, account: str, session: str = "") -> PredictionRecord:
    return PredictionRecord(pid, account, session or pid, "p1", {"p1": 0.75, "p2": 0.25}, "gmm", 3,
                            1796516596.5, False, 2)


@pytest.fixture()
def outbox(database):
    store = ClusteringStore(database)
    store.migrate()
    requests: list[fpb.RecordPredictionRequest] = []
    log = PredictionLog(database, requests.append, forward_interval_s=3600)   # forwarded by hand
    yield store, log, requests
    log.close()


def _stored(database) -> tuple[list[str], bytes]:
    """Every chunk's accounts column and all their bodies, concatenated."""
    with database.transaction(readonly=True) as tx:
        rows = tx.query("SELECT accounts, body FROM prediction_chunks")
    return [r[0] for r in rows], b"".join(bytes(r[1]) for r in rows)


def test_a_household_erasure_cuts_its_predictions_out_of_every_chunk(outbox, database):
    store, log, requests = outbox
    # A shared chunk (three households, one of them an id with LIKE's wildcard and a look-alike),
    # a chunk of the erased household alone, and a row the session-18 version queued.
    log.record([_record("pr-1", "acc_a"), _record("pr-2", "acc-b"), _record("pr-3", "acc_a"),
                _record("pr-4", "accXa"), _record("pr-5", "ACC_A")])
    log.record([_record("pr-6", "acc_a")])
    old = _record("pr-0", "acc_a")
    with database.transaction() as tx:
        tx.execute("INSERT INTO prediction_outbox (prediction_id, account_id, session_id, payload, created_at) "
                   "VALUES (?, ?, ?, ?, ?)", (old.prediction_id, old.account_id, old.session_id,
                                              json.dumps(["", *(getattr(old, f) for f in _RECORD_FIELDS)]), 1.0))
    outcome = store.erase(ErasureScope("acc_a", ScopeKind.HOUSEHOLD))
    assert outcome.deleted_ids_of("pending_predictions") == {"pr-0", "pr-1", "pr-3", "pr-6"}
    accounts, bodies = _stored(database)
    assert accounts == [" acc-b accXa ACC_A "]          # the shared chunk rewritten, the other gone
    assert b"acc_a" not in bodies and b"pr-1" not in bodies and b"pr-6" not in bodies
    assert log.forward_once() == 3 and log.forward_once() == 0
    assert [p.prediction_id for r in requests for p in r.predictions] == ["pr-2", "pr-4", "pr-5"]
    again = store.erase(ErasureScope("acc_a", ScopeKind.HOUSEHOLD))   # idempotent
    assert again.deleted_ids_of("pending_predictions") == set()


def test_a_session_erasure_takes_only_the_predictions_about_its_sessions(outbox, database):
    """Window, device and session scopes select by the sessions they delete; the retention
    purge (account None) looks at every household."""
    store, log, requests = outbox
    log.record([_record("pr-1", "acc-a", "s-1"), _record("pr-2", "acc-a", "s-2"), _record("pr-3", "acc-b", "s-1")])
    with database.transaction() as tx:
        gone = erase_pending(tx, lambda account, session: account == "acc-a" and session == "s-1", "acc-a")
    assert gone == ["pr-1"]
    with database.transaction() as tx:
        gone = erase_pending(tx, lambda _account, session: session == "s-1", None)
    assert gone == ["pr-3"]
    assert _stored(database)[0] == [" acc-a "]
    assert log.forward_once() == 1
    assert [p.session_id for r in requests for p in r.predictions] == ["s-2"]
