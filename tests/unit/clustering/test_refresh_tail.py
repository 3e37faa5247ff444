"""The model refresh an ingest batch schedules reads only the sessions closed since the
model's last update (ClusteringStore.closed_tail, ModelKeeper._arrivals) and
leaves what main's refresh left, field by field: the stored model, every session's
person and probabilities, the drift events, the answers (docs/clustering.md "The model
refresh reads what changed")."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.clustering.app import ClusteringApp
from services.clustering.domain.events import ViewingEvent
from services.clustering.household import Envelope
from services.clustering.modeling import ModelKeeper, known_person, persons_for
from services.clustering.store import ClusteringStore, _person_rows
from services.common.erasure import ErasureScope
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek
from tests.helpers.incremental_sessions import GAP_S, T0, random_event
from tests.helpers.keys import ring_fetcher

ACCOUNT = "acc-1"
DEVICES = ("tv-1", "ph-1", "tb-1")


class ClockedStore(ClusteringStore):
    """Sessions close by ``self.now`` instead of the wall clock (both refresh paths read it)."""

    now = T0

    def closed_sessions(self, account_id, now=None, tx=None):
        return super().closed_sessions(account_id, self.now if now is None else now, tx=tx)

    def closed_tail(self, account_id, start, now=None, tx=None):
        return super().closed_tail(account_id, start, self.now if now is None else now, tx=tx)

    def closed_session_count(self, account_id, now=None, before=None):
        return super().closed_session_count(account_id, self.now if now is None else now, before)


class FullSnapshotKeeper(ModelKeeper):
    """Main's refresh before this change: every refresh reads every closed session."""

    def _arrivals(self, account_id, current, variant, reads):
        return None


class EveryRowKeeper(FullSnapshotKeeper):
    """Main's fold (d3fbe5f): every refresh reads every closed session by
    ``closed_sessions`` and writes every answer, changed or not."""

    def snapshot(self, account_id, reads=None):
        return self.snapshot_of(account_id, self.store.closed_sessions(account_id, tx=reads and reads.tx),
                                reads=reads)


def _store(root: Path, name: str, ring: KeyRing) -> ClockedStore:
    store = ClockedStore(SqliteDatabase(root / f"{name}.db"), gap_s=GAP_S,
                         cipher=FieldCipher(ring_fetcher(ring, [])), lateness_tolerance_s=1e9)
    store.migrate()
    return store


def _memory_dir():
    return tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)


# ---- the store: the closed tail is closed_sessions()[start:] ---------------------------

def _closed_rows(store: ClusteringStore) -> list[tuple]:
    return [(s.session_id, s.device_id, s.start_ts, s.end_ts, s.event_count, s.watch_seconds, s.features.tobytes(),
             s.label, s.person_id, s.closed) for s in store.closed_sessions(ACCOUNT)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(DEVICES), st.sampled_from((0.0, 0.0, 0.5))),
                min_size=1, max_size=30),
       st.lists(st.sampled_from((0.0, 900.0, 1799.0, 1800.0, 1801.0, 5000.0)), min_size=1, max_size=4),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_the_closed_tail_is_the_closed_sessions_from_that_position(events, clocks, orphan, seed):
    """Sessions on three devices (shared instants: the id orders them; sessions closing
    exactly one gap after their end, by the clock or a device's watermark; a session
    whose device row is gone, watermark 0): for every position, closed_tail gives
    closed_sessions()[start:] field by field, their count, the first id and the id just
    before the position."""
    rng = random.Random(seed)
    with _memory_dir() as root:
        store = _store(Path(root), "s", KeyRing([generate_kek("k1")], "k1"))
        store.ingest([random_event(rng, ACCOUNT, i, T0 + 600.0 * (step + frac), device=device)
                      for i, (step, device, frac) in enumerate(events)])
        if orphan:   # a session whose device row is missing counts with a watermark of 0
            with store.db.transaction() as tx:
                tx.execute("DELETE FROM devices WHERE account_id = ? AND device_id = ?", (ACCOUNT, events[0][1]))
        with store.db.transaction(readonly=True) as tx:
            last_end = float(tx.query("SELECT MAX(end_ts) FROM sessions WHERE account_id = ?", (ACCOUNT,))[0][0])
        for extra in clocks:
            store.now = last_end + extra
            full = store.closed_sessions(ACCOUNT)
            rows = _closed_rows(store)
            for start in range(len(full) + 3):
                tail = store.closed_tail(ACCOUNT, start)
                assert tail.count == len(full)
                assert tail.first_id == (full[0].session_id if full else "")
                assert tail.before_id == (full[start - 1].session_id if 0 < start <= len(full) else "")
                got = [(s.session_id, s.device_id, s.start_ts, s.end_ts, s.event_count, s.watch_seconds,
                        s.features.tobytes(), s.label, s.person_id, s.closed) for s in tail.sessions]
                assert got == rows[start:]
        store.db.close()


# ---- the keeper: the same stored model and answers as the full snapshot -----------------

def _household_events(rng: random.Random, spec) -> list[ViewingEvent]:
    """Sessions on the devices: (device, pause before it in gaps, events, spacing)."""
    out, clock = [], {d: T0 for d in DEVICES}
    i = 0
    for device, pause, n, spacing in spec:
        t = clock[device] + GAP_S * pause
        for _ in range(n):
            out.append(random_event(rng, ACCOUNT, i, t, device=device))
            i += 1
            t += spacing
        clock[device] = t
    out.sort(key=lambda e: (e.ts, e.event_id))
    return out


def _state(app: ClusteringApp, answer: tuple) -> tuple:
    """Everything a refresh leaves: what it returned, the stored model (the envelope's
    fields but the refit's wall-clock time, the model's bytes), every session's person
    and probabilities, the drift events, and the model's answers to every closed session."""
    version, envelope = answer
    store = app.store
    stored = store.get_model(ACCOUNT)
    model = None
    if stored is not None:
        env = Envelope.from_bytes(stored.blob, None)
        model = (stored.version, stored.variant, env.included, env.reference_end, env.drift_checked,
                 env.first_session_id, env.last_included_id, env.model.to_bytes())
    with store.db.transaction(readonly=True) as tx:
        persons = tx.query("SELECT session_id, person_id, person_probs FROM sessions WHERE account_id = ? "
                           "ORDER BY session_id", (ACCOUNT,))
        drift = tx.query("SELECT drift_type, severity, statistic, detected_at, refit_triggered FROM drift_events "
                         "WHERE account_id = ? ORDER BY id", (ACCOUNT,))
    answers = None
    closed = store.closed_sessions(ACCOUNT)
    if envelope is not None and closed:
        X = np.vstack([s.features for s in closed]).astype(np.float64)
        batch = envelope.model.assign_batch(X, device_ids=[s.device_id for s in closed])
        answers = (batch.person_ids, batch.person_index.tolist(), batch.probabilities.tobytes(),
                   batch.confidence.tobytes())
    return (version, envelope is None, model, persons, drift, answers)


_session = st.tuples(st.sampled_from(DEVICES), st.sampled_from((1.01, 1.5, 3.0, 10.0)), st.integers(1, 4),
                     st.sampled_from((60.0, 600.0, 1500.0)))
_op = st.one_of(
    st.tuples(st.just("batch"), st.integers(1, 6), st.sampled_from((0.0, 0.0, 600.0, 1801.0, 7200.0))),
    st.tuples(st.just("label"), st.integers(0, 200), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("erase_window"), st.integers(0, 200)),
)


def _run(spec, ops, variant: str, seed: int, keepers=(ModelKeeper, FullSnapshotKeeper)) -> int:
    rng = random.Random(seed)
    events = _household_events(rng, spec)
    ring = KeyRing([generate_kek("k1")], "k1")
    quick_refreshes = 0
    with _memory_dir() as root:
        apps = []
        for name, cls in zip(("tail", "full"), keepers):
            store = _store(Path(root), name, ring)
            apps.append(ClusteringApp(store, keeper=cls(store, lambda _a: variant), background=False))
        tail_app = apps[0]
        original = tail_app.keeper._arrivals

        def counted(*args):
            nonlocal quick_refreshes
            done = original(*args)
            quick_refreshes += done is not None
            return done
        tail_app.keeper._arrivals = counted
        rest = [("batch", 3, (0.0, 1801.0)[i % 2]) for i in range(len(events) // 3 + 1)]
        for op in [*ops, *rest, ("batch", len(events), 2 * GAP_S)]:
            answers = []
            if op[0] == "batch":
                batch, events = events[:op[1]], events[op[1]:]
                if not batch:
                    continue
                for app in apps:
                    app.store.now = max(app.store.now, max(e.ts for e in batch) + op[2])
                    app.ingest(batch)
                    answers.append(app.keeper.refresh(ACCOUNT))
            elif op[0] == "label":
                # a session from the newest (not folded in yet, often) and one of the
                # model's persons (or a name it does not know)
                closed = apps[1].store.closed_sessions(ACCOUNT)
                if not closed:
                    continue
                session = closed[-1 - op[1] % len(closed)].session_id
                _, env = apps[1].keeper.load(ACCOUNT)
                persons = [*(env.model.person_ids if env is not None else ()), "alice"]
                person = persons[op[2] % len(persons)]
                for app in apps:
                    if op[3]:   # feedback's RecordLabels: a refresh forced by the labels
                        app.record_labels([(ACCOUNT, session, person, "test")])
                    else:       # stored, picked up by the next ordinary refresh
                        app.store.record_labels([(ACCOUNT, session, person, "test")])
                    answers.append(app.keeper.refresh(ACCOUNT))
            else:
                lo = T0 + 600.0 * op[1]
                for app in apps:
                    app.erase(ErasureScope(ACCOUNT, "window", start=lo, end=lo + 1200.0))
                    answers.append(app.keeper.refresh(ACCOUNT))
            mine, theirs = (_state(app, a) for app, a in zip(apps, answers))
            names = ("version", "no model", "stored model", "persons", "drift events", "answers")
            for name, x, y in zip(names, mine, theirs):
                assert x == y, (op, name)
        for app in apps:
            app.close()
            app.store.db.close()
    return quick_refreshes


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_session, min_size=8, max_size=36), st.lists(_op, min_size=1, max_size=25),
       st.sampled_from(("gmm", "gmm", "kmeans")), st.integers(0, 2**32 - 1))
def test_a_refresh_from_the_closed_tail_leaves_what_the_full_snapshot_leaves(spec, ops, variant, seed):
    """Households of up to 36 sessions on three devices (overlapping: a long session
    closes after shorter ones that start later, and lands before them), posted in
    random batches with the clock moving (sessions closing by the clock and by the
    devices' watermarks), feedback labels stored (read by the next ordinary refresh) or
    sent (a forced refresh), windows erased: after every refresh the store holds what
    a keeper that always reads every closed session leaves (main's), field by field —
    the stored model to the byte, every session's person and probabilities, the drift
    events — and the two models answer every closed session the same."""
    _run(spec, ops, variant, seed)


def test_the_stream_takes_the_tail_path_and_a_session_closing_before_the_last_included_refits():
    """A fixed household where the tail path is taken (arrivals answered, nothing
    folded) and where a long TV session closes after later phone sessions were
    included (a shift: both refit): the same field by field, and the tail path ran."""
    spec = [("ph-1", 1.5, 2, 600.0)] * 12 + [("tv-1", 2.0, 40, 1500.0)] + [("ph-1", 1.01, 1, 60.0)] * 30
    ops = [("batch", 3, 0.0)] * 20 + [("label", 0, 0, False), ("label", 1, 1, False)] + [("batch", 1, 1801.0)] * 30
    assert _run(spec, ops, "gmm", 3) > 5


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_session, min_size=20, max_size=40), st.lists(_op, min_size=1, max_size=20),
       st.sampled_from(("gmm", "gmm", "kmeans")), st.integers(0, 2**32 - 1))
def test_a_fold_that_writes_only_the_changed_answers_leaves_what_writing_every_answer_leaves(spec, ops, variant,
                                                                                            seed):
    """Session 26: a fold writes only the persons and probabilities that differ from what
    its snapshot read (ClusteringStore.set_persons' ``unless_recorded``); main's wrote
    every closed session's. After every refresh (folds, arrivals, labels, erasures) the
    two stores hold the same persons and probabilities, models and drift events."""
    _run(spec, ops, variant, seed, keepers=(ModelKeeper, EveryRowKeeper))


def test_a_fold_writes_only_the_answers_that_changed(tmp_path):
    """On a household of ~120 closed sessions, a fold re-answers every session but writes
    only the rows whose person or probabilities differ from the stored ones; the stored
    rows are then every session's answer under the new model."""
    ring = KeyRing([generate_kek("k1")], "k1")
    store = _store(tmp_path, "fold", ring)
    app = ClusteringApp(store, background=False)
    events = _household_events(random.Random(2), [(DEVICES[i % 3], 2.0, 2, 600.0) for i in range(130)])
    first, rest = events[:240], events[240:]
    store.ingest(first)
    store.now = max(e.ts for e in first) + 2 * GAP_S
    _, before = app.keeper.refresh(ACCOUNT)
    written: list[int] = []
    original = store.set_persons, store.save_model

    def counted(*args, **kwargs):
        written.append(original[0](*args, **kwargs))
        return written[-1]

    def saved(account, *args, answers=None, **kwargs):   # the fold's answers are written with its model
        written.append(len(_person_rows(account, *answers)))
        return original[1](account, *args, answers=answers, **kwargs)
    store.set_persons, store.save_model = counted, saved
    store.ingest(rest)
    store.now = max(e.ts for e in rest) + 2 * GAP_S
    _, envelope = app.keeper.refresh(ACCOUNT)
    closed = store.closed_sessions(ACCOUNT)
    assert envelope.included == len(closed) > before.included >= 100
    assert len(written) == 1 and 0 < written[0] < len(closed)
    with store.db.transaction(readonly=True) as tx:
        stored = dict(((r[0], (r[1], r[2])) for r in tx.query(
            "SELECT session_id, person_id, person_probs FROM sessions WHERE account_id = ?", (ACCOUNT,))))
    persons, probs = persons_for(envelope.model, closed, [s.label for s in closed],
                                 included=np.arange(len(closed)) < before.included)
    assert {s: stored[s][0] for s in persons} == persons
    assert {s: json.loads(stored[s][1]) for s in persons} == probs
    # main's rounding: each numpy probability as float(), then round(, 6)
    batch = envelope.model.assign_batch(np.vstack([s.features for s in closed]).astype(np.float64),
                                        device_ids=[s.device_id for s in closed],
                                        included=np.arange(len(closed)) < before.included)
    unlabelled = [i for i, s in enumerate(closed) if known_person(envelope.model, s.label) is None]
    assert len(unlabelled) > 20
    assert {closed[i].session_id: probs[closed[i].session_id] for i in unlabelled} == {
        closed[i].session_id: {pid: round(float(p), 6) for pid, p in zip(batch.person_ids, batch.probabilities[i])}
        for i in unlabelled}
    app.close()
    store.db.close()


def test_a_small_batch_on_a_long_history_opens_only_the_new_sessions(tmp_path):
    """The refresh a stream's batch schedules on a household of 300 closed sessions
    opens no stored vector when no session closed, and one when one closed (main's
    opened all 300 each time); the closed session's person is recorded once, not
    rewritten by every later batch's refresh until the next fold (main rewrote it)."""
    ring = KeyRing([generate_kek("k1")], "k1")
    store = _store(tmp_path, "long", ring)
    app = ClusteringApp(store, background=False)
    rng = random.Random(1)
    spec = [(DEVICES[i % 3], 2.0, 2, 600.0) for i in range(300)]
    events = _household_events(rng, spec)
    store.ingest(events)
    store.now = max(e.ts for e in events) + 2 * GAP_S
    app.keeper.refresh(ACCOUNT)
    assert store.closed_session_count(ACCOUNT) == 300
    opened = []
    decrypt = store.cipher.decrypt_vector
    store.cipher.decrypt_vector = lambda *a: opened.append(a[1]) or decrypt(*a)
    t = store.now
    for i in range(4):   # a stream on the TV: its open session grows, nothing closes
        app.ingest([random_event(rng, ACCOUNT, 10_000 + i, t + 30.0 * i, device="tv-1")])
        app.keeper.refresh(ACCOUNT)
    assert opened == []
    store.now = t + 30.0 * 3 + GAP_S + 1   # the TV session closes: one new closed session
    version, envelope = app.keeper.refresh(ACCOUNT)
    assert opened == ["features"] and envelope.included == 300
    (stored,) = [s for s in store.household(ACCOUNT, now=store.now).sessions if s.start_ts >= t]
    with store.db.transaction(readonly=True) as tx:
        ((person, probs),) = tx.query("SELECT person_id, person_probs FROM sessions WHERE session_id = ?",
                                      (stored.session_id,))
    assert person in envelope.model.person_ids and json.loads(probs)[person] > 0
    # the next batches' refreshes answer it the same: nothing is written again
    writes, opened[:] = [], []
    set_persons = store.set_persons
    store.set_persons = lambda *a, **k: writes.append(a) or set_persons(*a, **k)
    for i in range(3):
        app.ingest([random_event(rng, ACCOUNT, 20_000 + i, store.now + 30.0 * i, device="ph-1")])
        assert app.keeper.refresh(ACCOUNT) == (version, envelope)
    assert writes == [] and opened == ["features"] * 3
    app.close()
    store.db.close()
