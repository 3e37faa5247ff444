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
from tests.helpers.waiting import wait_for


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


def test_a_chunk_gone_between_the_forwarders_two_reads_is_not_a_failure(outbox, database):
    """Two replicas' forwarders on one PostgreSQL (or an erasure) may delete a chunk between
    the forwarder's list of chunks and its read of their bodies (PostgreSQL reads each
    statement committed so far). The forward sends what is still there; until review19 it
    raised KeyError: a forwarding failure, a warning and a backoff."""
    store, log, requests = outbox
    log.record([_record("pr-1", "acc-a")])
    log.record([_record("pr-2", "acc-b")])
    with _racing(database, "SELECT chunk_id, body, predictions, traceparents FROM prediction_chunks", " acc-a "):
        delivered = log.forward_once()
    sent = [p.prediction_id for r in requests for p in r.predictions]
    assert "pr-2" in sent and delivered == len(sent)
    assert log.forward_once() == 0


def test_every_chunk_gone_before_the_outbox_is_counted_is_not_a_failure(outbox, database):
    """The same when the outbox empties between the page of chunks and their count (a full
    page: more may wait): SUM over no row is NULL (it was None + int, a TypeError)."""
    store, _log, _requests = outbox
    requests: list[fpb.RecordPredictionRequest] = []
    log = PredictionLog(database, requests.append, forward_interval_s=3600, batch=1)
    try:
        log.record([_record("pr-1", "acc-a")])
        with _racing(database, "SELECT SUM(predictions) FROM prediction_chunks", " acc-a "):
            assert log.forward_once() in (0, 1)   # SQLite's snapshot still holds the chunk
        assert log.forward_once() == 0
    finally:
        log.close()


def _racing(database, before: str, accounts: str):
    """Within the forwarder's read-only transaction, just before the query that starts
    with ``before``, another connection deletes the chunks of ``accounts`` (another
    replica's forwarder that delivered them) and commits."""
    import threading
    from contextlib import contextmanager

    real = database.transaction

    class Racing:
        def __init__(self, tx) -> None:
            self._tx = tx

        def __getattr__(self, name):
            return getattr(self._tx, name)

        def query(self, sql, params=()):
            if sql.startswith(before):
                def other_replica() -> None:
                    with real() as tx:
                        tx.execute("DELETE FROM prediction_chunks WHERE accounts = ?", (accounts,))
                worker = threading.Thread(target=other_replica)
                worker.start()
                worker.join()
            return self._tx.query(sql, params)

    @contextmanager
    def racing_transaction(readonly=False, **kwargs):
        with real(readonly=readonly, **kwargs) as tx:
            yield Racing(tx) if readonly else tx

    @contextmanager
    def patched():
        database.transaction = racing_transaction
        try:
            yield
        finally:
            database.transaction = real

    return patched()


def test_a_forward_in_flight_that_carries_the_household_is_delivered_before_its_erasure(database):
    """A forward that read a chunk before clustering's erase committed and delivers it after
    feedback's erase left the household's predictions in feedback after the deletion job
    completed (its receipt saying erased). The forward's send here is slow: it waits for
    the deletion job (clustering's erase, then feedback's, as the job orders them) for up to
    a few seconds. Without the lock the erase commits meanwhile and the job finishes before
    the send delivers; with it the erase waits for the send, so feedback's erase takes what
    it delivered."""
    import threading

    store = ClusteringStore(database)
    store.migrate()
    feedback: dict[str, str] = {}            # what feedback holds: prediction id -> account
    sending, job_done = threading.Event(), threading.Event()

    def send(request: fpb.RecordPredictionRequest) -> None:
        sending.set()
        job_done.wait(5.0)
        feedback.update((p.prediction_id, p.account_id) for p in request.predictions)

    log = PredictionLog(database, send, forward_interval_s=3600)
    try:
        log.record([_record("pr-1", "acc-a"), _record("pr-2", "acc-b"), _record("pr-3", "acc-a")])
        forward = threading.Thread(target=log.forward_once)
        forward.start()
        assert sending.wait(60)

        def deletion_job() -> None:
            store.erase(ErasureScope("acc-a", ScopeKind.HOUSEHOLD))
            for prediction_id in [p for p, account in feedback.items() if account == "acc-a"]:
                del feedback[prediction_id]
            job_done.set()

        job = threading.Thread(target=deletion_job)
        job.start()
        job.join(120)
        forward.join(120)
        assert not job.is_alive() and not forward.is_alive()
        assert feedback == {"pr-2": "acc-b"}
        assert _stored(database) == ([], b"")
    finally:
        log.close()


def test_a_rewritten_chunk_keeps_no_trace_id_of_the_erased_household(outbox, database):
    """A chunk names the traceparents of the requests that made its predictions. An erasure
    that cuts a household's predictions out of a shared chunk must take its requests'
    trace ids with them (until session 20 the rewritten row kept every traceparent): no
    column of any row says anything of the household afterwards, and on SQLite no byte of
    the database's files does (the purge after the erase)."""
    from pathlib import Path

    from services.clustering.prediction_log import _Request

    store, log, requests = outbox
    ids = {name: (f"{name * 4}{n:028x}", f"{name * 4}{n:012x}") for n, name in enumerate(("a1e7", "b2f8", "c3d9"))}
    traceparent = {name: f"00-{trace}-{span}-01" for name, (trace, span) in ids.items()}
    # One group commit: the erased household's two requests around another household's.
    log._store([_Request([_record("pr-1", "acc-erased"), _record("pr-2", "acc-erased")], (), traceparent["a1e7"]),
                _Request([_record("pr-3", "acc-kept")], (), traceparent["b2f8"]),
                _Request([_record("pr-4", "acc-erased")], (), traceparent["c3d9"])])
    with database.transaction(readonly=True) as tx:
        before = " ".join(map(str, tx.query("SELECT * FROM prediction_chunks")))
    assert all(trace in before for trace, _span in ids.values())      # the row names all three

    outcome = store.erase(ErasureScope("acc-erased", ScopeKind.HOUSEHOLD))

    assert outcome.deleted_ids_of("pending_predictions") == {"pr-1", "pr-2", "pr-4"}
    with database.transaction(readonly=True) as tx:
        rows = tx.query("SELECT * FROM prediction_chunks")
    assert len(rows) == 1
    text = " ".join(bytes(v).decode("latin-1") if isinstance(v, (bytes, memoryview)) else str(v) for v in rows[0])
    for erased in ("acc-erased", *ids["a1e7"], *ids["c3d9"]):
        assert erased not in text
    assert ids["b2f8"][0] in text and "acc-kept" in text
    if database.dialect == "sqlite":
        files = b"".join(p.read_bytes() for p in Path(database.path).parent.glob(Path(database.path).name + "*"))
        assert ids["b2f8"][0].encode() in files               # the scan sees the file
        for erased in (*ids["a1e7"], *ids["c3d9"]):
            assert erased.encode() not in files
    assert log.forward_once() == 1
    assert [p.prediction_id for r in requests for p in r.predictions] == ["pr-3"]


def test_a_window_erasure_reads_only_the_chunks_that_can_hold_its_sessions(outbox, database, monkeypatch):
    """The retention purge (a window over every account) parsed every chunk of the outbox to
    find the predictions about the sessions it deletes: after a feedback outage, the whole
    backlog, holding SQLite's write lock meanwhile (docs/benchmarks.md "bench-outbox-purge").
    A chunk records the earliest session start of its predictions: a window deletes
    sessions that started before its end, and a session can have started at most the
    lateness tolerance (plus the session gap, a margin) before the start a prediction saw,
    so chunks whose sessions all started after that are not read. A chunk with a
    prediction without a session start is read, as one near the boundary."""
    from services.clustering import prediction_log

    store, log, requests = outbox
    day, t0 = 86400.0, 1_780_000_000.0
    with database.transaction() as tx:
        tx.execute("INSERT INTO events (event_id, account_id, device_id, device_type, ts, kind, title_id, "
                   "series_id, genres, duration_s, maturity, country, vpn, profile_hint) VALUES "
                   "('ev-old', 'acc-old', 'tv', 'tv', ?, 'play_start', 't', NULL, 'drama', 1800, 'adult', NULL, 0, NULL)",
                   (t0,))
        tx.execute("INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, "
                   "event_count, watch_seconds, feature_version, features, label, person_id) VALUES "
                   "('se-old', 'acc-old', 'tv', 'tv', ?, ?, 1, 1800, 1, ?, NULL, 'p1')", (t0, t0 + 1800, b"\0" * 8))

    def made(pid: str, account: str, session: str, start: float | None) -> PredictionRecord:
        return PredictionRecord(pid, account, session, "p1", {"p1": 0.75, "p2": 0.25}, "gmm", 3, t0 + 100 * day,
                                False, 2, "tv", start, None if start is None else start + 1800)

    end = t0 + day
    log.record([made("pr-old", "acc-old", "se-old", t0), made("pr-a", "acc-a", "se-a", t0 + 50 * day)])
    log.record([made(f"pr-new-{i}", "acc-b", f"se-b{i}", t0 + 60 * day + i) for i in range(3)])   # not read
    log.record([made("pr-none", "acc-c", "se-c", None)])                            # no session start: read
    log.record([made("pr-near", "acc-d", "se-d", end + 60)])                         # within the margin: read
    parsed = []
    real = prediction_log.fpb

    class Request:   # feedback_pb2.RecordPredictionRequest, counting the chunks parsed
        def __call__(self, *args, **kwargs):
            return real.RecordPredictionRequest(*args, **kwargs)

        def FromString(self, body):
            request = real.RecordPredictionRequest.FromString(body)
            parsed.append(sorted(p.prediction_id for p in request.predictions))
            return request

    class Counting:
        RecordPredictionRequest = Request()

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(prediction_log, "fpb", Counting())
    outcome = store.erase(ErasureScope("*", ScopeKind.TIME_WINDOW, end=end))
    monkeypatch.setattr(prediction_log, "fpb", real)

    assert outcome.deleted_ids_of("sessions") == {"se-old"}
    assert outcome.deleted_ids_of("pending_predictions") == {"pr-old"}
    assert sorted(parsed) == [["pr-a", "pr-old"], ["pr-near"], ["pr-none"]]
    while log.forward_once():
        pass
    assert sorted(p.prediction_id for r in requests for p in r.predictions) == \
        ["pr-a", "pr-near", "pr-new-0", "pr-new-1", "pr-new-2", "pr-none"]


def test_a_window_erasure_reads_a_chunk_whose_session_was_stretched_back_under_an_earlier_tolerance(outbox, database):
    """The skip of test_a_window_erasure_reads_only_the_chunks_that_can_hold_its_sessions
    reasons with the lateness tolerance in force at the erasure; events accepted under a
    larger one before (the setting lowered since) moved a session's start further back
    than that. A floor of a week on the margin keeps such a chunk read, and its
    prediction erased with the session (before the floor it outlived the erasure)."""
    day, t0 = 86400.0, 1_780_000_000.0
    end = t0 + day
    store, log, _requests = outbox
    with database.transaction() as tx:
        # The session as stored now starts before the window's end (late events, accepted
        # under a 3-day tolerance, stretched it back); the prediction saw it start 2 days after.
        tx.execute("INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, "
                   "event_count, watch_seconds, feature_version, features, label, person_id) VALUES "
                   "('se-stretched', 'acc-s', 'tv', 'tv', ?, ?, 2, 1800, 1, ?, NULL, 'p1')",
                   (end - 3600, end + 2 * day + 1800, b"\0" * 8))
        tx.execute("INSERT INTO events (event_id, account_id, device_id, device_type, ts, kind, title_id, "
                   "series_id, genres, duration_s, maturity, country, vpn, profile_hint) VALUES "
                   "('ev-late', 'acc-s', 'tv', 'tv', ?, 'play_start', 't', NULL, 'drama', 1800, 'adult', NULL, 0, NULL)",
                   (end - 3600,))
    log.record([PredictionRecord("pr-stretched", "acc-s", "se-stretched", "p1", {"p1": 0.75, "p2": 0.25}, "gmm",
                                 3, t0 + 10 * day, False, 2, "tv", end + 2 * day, end + 2 * day + 1800)])
    outcome = store.erase(ErasureScope("*", ScopeKind.TIME_WINDOW, end=end))
    assert outcome.deleted_ids_of("sessions") == {"se-stretched"}
    assert outcome.deleted_ids_of("pending_predictions") == {"pr-stretched"}
    assert log.forward_once() == 0


def test_a_postgres_forward_holds_only_the_chunks_it_sends(postgres_dsn):
    """On PostgreSQL the forward holds the chunks it sends (FOR UPDATE SKIP LOCKED) until it
    has deleted them. Until session 21 it locked up to ``batch`` chunk rows and sent only
    the first ones, up to ``batch`` predictions: while that send hung, an erasure of a
    household in the other locked chunks waited for it (up to ~15 s with feedback hung),
    and another replica's forwarder skipped them. Now it locks only what it sends: the
    erasure of a household the send does not carry goes at once, another replica sends
    the next chunks, and each prediction is still sent once."""
    import threading
    import uuid

    from services.common.storage.sql import PostgresDatabase

    db = PostgresDatabase(postgres_dsn, f"outbox_{uuid.uuid4().hex[:10]}", max_size=6)
    store = ClusteringStore(db)
    store.migrate()
    sent: list[str] = []
    sending, release = threading.Event(), threading.Event()

    def slow(request: fpb.RecordPredictionRequest) -> None:   # feedback hangs
        sent.extend(p.prediction_id for p in request.predictions)
        sending.set()
        release.wait(90)

    first = PredictionLog(db, slow, forward_interval_s=3600, batch=10)
    second = PredictionLog(db, lambda r: sent.extend(p.prediction_id for p in r.predictions),
                           forward_interval_s=3600, batch=10)
    try:
        for i in range(6):   # six chunks of five predictions, one household each
            first.record([_record(f"pr-{i}-{j}", f"acc-{i}") for j in range(5)])
        forward = threading.Thread(target=first.forward_once)
        forward.start()
        assert sending.wait(60)
        assert sorted(sent) == sorted(f"pr-{i}-{j}" for i in (0, 1) for j in range(5))   # two chunks a batch
        erase = threading.Thread(target=lambda: store.erase(ErasureScope("acc-4", ScopeKind.HOUSEHOLD)))
        erase.start()
        erase.join(60)
        assert not erase.is_alive(), "the erasure of a household the hung send does not carry waited for it"
        assert second.forward_once() == 10                    # the next two chunks, beside the hung send
        assert sorted(sent[10:]) == sorted(f"pr-{i}-{j}" for i in (2, 3) for j in range(5))
        release.set()
        forward.join(60)
        assert not forward.is_alive()
        assert second.forward_once() == 5 and second.forward_once() == 0
        assert sorted(sent) == sorted(f"pr-{i}-{j}" for i in (0, 1, 2, 3, 5) for j in range(5))   # once each
    finally:
        release.set()
        first.close(), second.close()
        db.close()


def test_an_erasure_waiting_for_a_forward_holds_nothing_of_the_household_meanwhile(database):
    """With feedback hung, a forward carrying the household's predictions takes up to ~15 s
    and the household's erasure waits for it (the race session 20 closed). Until session 21
    it waited inside its transaction on PostgreSQL, holding the household's lock and its
    deleted session rows: every write of the household (an assignment's group commit,
    which writes its sessions' persons, with every other household's in it) waited too.
    Now it waits before it takes anything (SQLite already did: its gate comes before the
    write lock), and still commits only after the forward delivered."""
    import threading
    import time

    store = ClusteringStore(database)
    store.migrate()
    with database.transaction() as tx:
        tx.execute("INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, "
                   "event_count, watch_seconds, feature_version, features, label, person_id) VALUES "
                   "('se-a', 'acc-a', 'tv', 'tv', 1796500000, 1796501800, 1, 1800, 1, ?, NULL, 'p1')", (b"\0" * 8,))
    delivered: dict[str, float] = {}
    sending, release = threading.Event(), threading.Event()

    def hung(request: fpb.RecordPredictionRequest) -> None:
        sending.set()
        release.wait(90)
        delivered.update((p.prediction_id, time.monotonic()) for p in request.predictions)

    log = PredictionLog(database, hung, forward_interval_s=3600)
    erased: list[float] = []
    try:
        log.record([_record("pr-1", "acc-a", "se-a"), _record("pr-2", "acc-b")])
        forward = threading.Thread(target=log.forward_once)
        forward.start()
        assert sending.wait(60)
        erase = threading.Thread(target=lambda: (store.erase(ErasureScope("acc-a", ScopeKind.HOUSEHOLD)),
                                                 erased.append(time.monotonic())))
        erase.start()
        wait_for(lambda: _erasure_waits(database), timeout_s=60, interval_s=0.05, what="the erasure's wait")

        def household_write() -> None:   # what an assignment's group commit does for the household
            with database.transaction() as tx:
                tx.lock_household("acc-a")
                tx.execute("UPDATE sessions SET person_id = 'p2' WHERE session_id = 'se-a'")

        write = threading.Thread(target=household_write)
        write.start()
        write.join(30)
        assert not write.is_alive(), "the household's write waited for the erasure waiting for the forward"
        assert erase.is_alive() and not delivered       # the erasure still waits for the forward
        release.set()
        forward.join(60), erase.join(60)
        assert not forward.is_alive() and not erase.is_alive()
        assert set(delivered) == {"pr-1", "pr-2"} and erased[0] >= delivered["pr-1"]
        with database.transaction(readonly=True) as tx:
            assert tx.query("SELECT session_id FROM sessions WHERE account_id = 'acc-a'") == []
    finally:
        release.set()
        log.close()


def _scopes_of_one_session(account: str) -> list[ErasureScope]:
    """The window, device and person scopes that cover the tests' session of ``account``
    on device "tv", predicted as person "p1", from 1_780_003_900 to 1_780_006_000."""
    return [ErasureScope(account, ScopeKind.TIME_WINDOW, start=1_780_003_900.0, end=1_780_006_000.0),
            ErasureScope(account, ScopeKind.DEVICE, device_id="tv"),
            ErasureScope(account, ScopeKind.PERSON, person_id="p1")]


def _erasure_waits(database) -> bool:
    """An erasure waits for a forward in flight: SQLite, at the forward gate; PostgreSQL,
    on a row lock of the outbox."""
    if database.dialect == "sqlite":
        from services.clustering.prediction_log import _gate

        return _gate(database)._erasing > 0
    with database.transaction(readonly=True) as tx:
        return bool(tx.query("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE ?",
                             ("%prediction_chunks%FOR UPDATE",)))


@pytest.mark.parametrize("scope", _scopes_of_one_session("acc-m"), ids=["window", "device", "person"])
def test_an_erasure_takes_the_prediction_of_a_session_merged_away(outbox, database, scope):
    """A late event that joins a session to the one before it (or moves its start) replaces
    its id: a prediction made about it before, still in the outbox, names an id no session
    has any more. A window erasure over that session's time, its device's or its predicted
    person's erasure went by the ids of the sessions they deleted, so the prediction stayed
    and was forwarded after the erasure (feedback's own erasure goes by what the prediction
    recorded: the session's times, its device, its person; it took it only if it arrived
    before feedback's erase). Now clustering applies the same rules (the window since
    session 21's first change, the device and the person since its second)."""
    from services.clustering.domain.events import ViewingEvent

    store, log, requests = outbox
    t0 = 1_780_000_000.0

    def event(n: int, ts: float) -> ViewingEvent:
        return ViewingEvent(f"ev-{n}", "acc-m", "tv", "tv", ts, "play_start", "t", None, ("drama",), 600.0)

    def sessions() -> dict[str, float]:
        with database.transaction(readonly=True) as tx:
            return {r[0]: float(r[1]) for r in tx.query(
                "SELECT session_id, start_ts FROM sessions WHERE account_id = 'acc-m'")}

    store.ingest([event(0, t0), event(1, t0 + 600)])
    store.ingest([event(2, t0 + 4000), event(3, t0 + 4600)])      # 3,400 s later: a session of its own
    later = next(sid for sid, start in sessions().items() if start == t0 + 4000)
    log.record([PredictionRecord("pr-later", "acc-m", later, "p1", {"p1": 0.75, "p2": 0.25}, "gmm", 3,
                                 t0 + 5300, False, 2, "tv", t0 + 4000, t0 + 5200)])
    store.ingest([event(4, t0 + 2300)])                         # late, between them: one session
    assert len(sessions()) == 1 and later not in sessions()
    outcome = store.erase(scope)
    assert outcome.deleted_ids_of("pending_predictions") == {"pr-later"}
    assert log.forward_once() == 0 and requests == []


@pytest.mark.parametrize("scope", [ErasureScope("acc-c", ScopeKind.HOUSEHOLD),
                                   ErasureScope("acc-c", ScopeKind.DEVICE, device_id="tv-c"),
                                   ErasureScope("acc-c", ScopeKind.TIME_WINDOW, start=1_780_000_100.0,
                                                end=1_780_000_200.0)],
                         ids=["household", "device", "window"])
def test_an_erasure_leaves_no_copy_of_the_household_in_the_encoders_cache(outbox, database, scope):
    """Since session 21 the outbox's encoder keeps the shared fields' bytes of a household's
    predictions from one message to the next (prediction_log._head, a module-level cache of
    up to 4,096 entries): the account id, the device id and the session's first and last
    instant, in its keys and its bytes. An erasure must not leave them behind in the
    process once the store has erased them (review21: they stayed until 4,096 other
    households' predictions had filled the cache: in a small deployment, for as long as
    the process ran)."""
    from services.clustering import prediction_log

    store, log, _requests = outbox
    log.record([PredictionRecord("pr-c", "acc-c", "s-c", "p1", {"p1": 0.75, "p2": 0.25}, "gmm", 3,
                                 1_780_000_300.0, False, 2, "tv-c", 1_780_000_150.0, 1_780_000_180.0)])
    cached = repr(prediction_log._HEADS).encode() + b"".join(b for parts in prediction_log._HEADS.values()
                                                             for b in parts)
    assert b"acc-c" in cached and b"tv-c" in cached   # what the test looks for is there to find
    store.erase(scope)
    cached = repr(prediction_log._HEADS).encode() + b"".join(b for parts in prediction_log._HEADS.values()
                                                             for b in parts)
    assert b"acc-c" not in cached and b"tv-c" not in cached and b"1780000150" not in cached


@pytest.mark.parametrize("scope", _scopes_of_one_session("acc-l"), ids=["window", "device", "person"])
def test_a_legacy_outbox_row_is_taken_by_what_it_records_too(outbox, database, scope):
    """A row of the one-prediction-a-row table (queued before session 19, forwarded first
    after an upgrade) about a session whose id no stored session has any more (merged away
    by a late event) is taken by a window, device or person erasure by what it records,
    as the chunks' predictions are since session 21 (review21: the rule was applied to the
    chunks only, so such a row stayed and was forwarded after the erasure). A row the scope
    does not cover stays."""
    store, log, requests = outbox
    t0 = 1_780_000_000.0
    covered = PredictionRecord("pr-old", "acc-l", "s-merged-away", "p1", {"p1": 0.75, "p2": 0.25}, "gmm", 3,
                               t0 + 5300, False, 2, "tv", t0 + 4000, t0 + 5200)
    other = PredictionRecord("pr-kept", "acc-l", "s-other", "p2", {"p1": 0.25, "p2": 0.75}, "gmm", 3,
                             t0 + 90000, False, 2, "phone", t0 + 80000, t0 + 81000)
    with database.transaction() as tx:
        for n, old in enumerate((covered, other)):
            tx.execute("INSERT INTO prediction_outbox (prediction_id, account_id, session_id, payload, created_at) "
                       "VALUES (?, ?, ?, ?, ?)", (old.prediction_id, old.account_id, old.session_id,
                                                  json.dumps(["", *(getattr(old, f) for f in _RECORD_FIELDS)]),
                                                  1.0 + n))
    outcome = store.erase(scope)
    assert outcome.deleted_ids_of("pending_predictions") == {"pr-old"}
    assert log.forward_once() == 1
    assert [p.prediction_id for r in requests for p in r.predictions] == ["pr-kept"]
