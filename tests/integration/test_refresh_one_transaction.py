"""A refresh that stores a model writes it, its drift events and its sessions' answers in one
write transaction (``ClusteringStore.save_model``'s ``drift`` and ``answers``; session 33,
ingest33). Before, the model's compare-and-swap was one transaction and the persons another
(and each drift event one more): two BEGIN/COMMITs a household on every refresh that saves,
and a failure between them left a stored model whose sessions' answers were not written.
What must stay true: the answers are written only when the compare-and-swap wins (a lost one
writes nothing and the keeper redoes its update on top of the winner's), and they are the
answers the stored model gives."""

from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import pytest

from services.clustering.modeling import ModelKeeper, persons_for
from services.clustering.store import ClusteringStore, DriftRow
from services.common.errors import Conflict
from tests.helpers.incremental_sessions import random_event

GAP_S = 1800.0
T0 = time.time() - 3 * 86400


def _store(database) -> ClusteringStore:
    store = ClusteringStore(database, gap_s=GAP_S)
    store.migrate()
    return store


def _household(store: ClusteringStore, account: str, sessions: int = 12) -> None:
    """``sessions`` closed sessions on two devices (a gap between each)."""
    rng = random.Random(account)
    store.ingest([random_event(rng, account, i, T0 + i * 2 * GAP_S, device="tv-1" if i % 3 else "phone-1")
                  for i in range(sessions)])


def _write_transactions(store: ClusteringStore) -> list[list[str]]:
    """Each write transaction's statements from now on (read-only ones are not kept)."""
    writes: list[list[str]] = []
    begin = store.db.transaction

    @contextlib.contextmanager
    def counted(readonly: bool = False, **kwargs):
        with begin(readonly, **kwargs) as tx:
            if readonly:
                yield tx
                return
            statements: list[str] = []
            writes.append(statements)
            execute, executemany = tx.execute, tx.executemany
            tx.execute = lambda sql, *a, **k: statements.append(sql) or execute(sql, *a, **k)
            tx.executemany = lambda sql, *a, **k: statements.append(sql) or executemany(sql, *a, **k)
            yield tx
    store.db.transaction = counted
    return writes


def _stored_answers(store: ClusteringStore, account: str) -> dict[str, tuple[str | None, str | None]]:
    with store.db.transaction(readonly=True) as tx:
        return {r[0]: (r[1], r[2]) for r in tx.query(
            "SELECT session_id, person_id, person_probs FROM sessions WHERE account_id = ?", (account,))}


def test_a_refresh_that_saves_writes_its_model_and_answers_in_one_transaction(database):
    store = _store(database)
    _household(store, "acc-1")
    keeper = ModelKeeper(store, lambda _account: "gmm")
    writes = _write_transactions(store)
    version, envelope = keeper.refresh("acc-1")
    assert version == 1 and envelope is not None
    assert len(writes) == 1, writes   # before: two (the model's, then the persons')
    assert any("household_models" in sql for sql in writes[0])
    assert any(sql.startswith("UPDATE sessions SET person_id") for sql in writes[0])
    closed = store.closed_sessions("acc-1")
    persons, probs = persons_for(envelope.model, closed, [s.label for s in closed],
                                 included=np.arange(len(closed)) < envelope.included)
    stored = _stored_answers(store, "acc-1")
    assert len(closed) == 12 and {s: stored[s][0] for s in persons} == persons
    assert all(stored[s][1] is not None for s in persons)


def test_a_failed_answers_write_stores_no_model(database):
    """The answers' write fails (the database refuses it): the model is not stored either,
    so the next refresh fits and answers again. Before, the model was committed on its own
    and its sessions kept no answer until the household's next fold."""
    store = _store(database)
    _household(store, "acc-2")
    keeper = ModelKeeper(store, lambda _account: "gmm")
    begin = store.db.transaction

    @contextlib.contextmanager
    def refusing(readonly: bool = False, **kwargs):
        with begin(readonly, **kwargs) as tx:
            executemany = tx.executemany

            def refuse(sql, *a, **k):
                if sql.startswith("UPDATE sessions SET person_id"):
                    raise RuntimeError("the answers' write refused")
                return executemany(sql, *a, **k)
            tx.executemany = refuse
            yield tx
    store.db.transaction = refusing
    with pytest.raises(RuntimeError, match="refused"):
        keeper.refresh("acc-2")
    store.db.transaction = begin
    assert store.get_model("acc-2") is None
    assert all(person is None for person, _ in _stored_answers(store, "acc-2").values())
    keeper.forget("acc-2")
    assert keeper.refresh("acc-2")[0] == 1
    assert all(person is not None for person, _ in _stored_answers(store, "acc-2").values())


def test_answers_and_drift_events_are_written_only_when_the_compare_and_swap_wins(database):
    store = _store(database)
    _household(store, "acc-3", sessions=4)
    (first, *_rest) = store.closed_sessions("acc-3")
    drift = DriftRow("composition", 0.9, 3.2, T0, True)
    assert store.save_model("acc-3", 0, "gmm", b"the winner's", drift=[drift],
                            answers=({first.session_id: "p-winner"}, {first.session_id: {"p-winner": 1.0}}, None)) == 1
    with pytest.raises(Conflict):   # another replica's save from the same version: it lost
        store.save_model("acc-3", 0, "gmm", b"the loser's", drift=[DriftRow("seasonal", 0.5, 1.0, T0, True)],
                         answers=({first.session_id: "p-loser"}, None, None))
    assert store.get_model("acc-3").blob == b"the winner's"
    assert _stored_answers(store, "acc-3")[first.session_id] == ("p-winner", '{"p-winner": 1.0}')
    assert [d.drift_type for d in store.drift_events("acc-3")] == ["composition"]
    # an answer already stored as it is (``unless_recorded``) is not written again
    writes = _write_transactions(store)
    assert store.save_model("acc-3", 1, "gmm", b"next", answers=(
        {first.session_id: "p-winner"}, {first.session_id: {"p-winner": 1.0}},
        {first.session_id: ("p-winner", '{"p-winner": 1.0}')})) == 2
    assert len(writes) == 1 and not any(sql.startswith("UPDATE sessions SET person_id") for sql in writes[0])
