"""The incremental session update against the full rebuild (tests/unit/test_incremental_sessions.py,
tests/integration/test_storage.py): a store that always rebuilds (main's behaviour until
session 22), random event streams cut into batches, and every session row read back
decrypted, field by field."""

from __future__ import annotations

import json
import random

from services.clustering.domain.events import ViewingEvent
from services.clustering.domain.sessions import build_session_states, build_sessions
from services.clustering.store import _EVENT_COLUMNS, ClusteringStore

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
GAP_S = 1800.0
GENRE_NAMES = ("drama", "comedy", "Kids", "sci-fi", "anime", "telenovela", " Drama ")
TITLES = tuple(f"t{i}" for i in range(6))
SERIES = (None, "s1", "s2")


class FullRebuildStore(ClusteringStore):
    """Every batch rebuilds the sessions it touches from their stored events."""

    def _update_sessions(self, tx, account, device, fresh, prepared=None):
        return self._rebuild_sessions(tx, account, device, min(e.ts for e in fresh))


def session_rows(store: ClusteringStore, account: str) -> list[tuple]:
    """Every session row of ``account``, sealed columns opened, by session id."""
    with store.db.transaction(readonly=True) as tx:
        rows = tx.query("SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                        "watch_seconds, feature_version, features, label, person_id, person_probs, "
                        "unknown_genres, state FROM sessions WHERE account_id = ? ORDER BY session_id", (account,))
    return [(*r[:9], store._open_vector(account, "features", r[9]), store._open_text(account, "label", r[10]),
             r[11], r[12], store._open_text(account, "unknown_genres", r[13]),
             None if r[14] is None else store._open_blob(account, "session_state", r[14])) for r in rows]


def assert_same_sessions(incremental: ClusteringStore, full: ClusteringStore, account: str) -> None:
    """The two stores hold the same sessions, field by field; only each device's newest
    session carries a running state, and the sessions are build_sessions' of the stored
    events (the definition)."""
    mine, theirs = session_rows(incremental, account), session_rows(full, account)
    assert [r[0] for r in mine] == [r[0] for r in theirs]
    names = ("session_id", "account_id", "device_id", "device_type", "start_ts", "end_ts", "event_count",
             "watch_seconds", "feature_version", "features", "label", "person_id", "person_probs",
             "unknown_genres", "state")
    for a, b in zip(mine, theirs):
        for name, x, y in zip(names, a, b):
            assert x == y, (name, a[0], x, y)
    assert_sessions_of_stored_events(incremental, account)


def assert_sessions_of_stored_events(store: ClusteringStore, account: str) -> None:
    """The store's sessions are build_sessions' of its stored events (the definition the
    full rebuild keeps), and each device's newest session carries the running state of
    all its events, the others none."""
    mine = session_rows(store, account)
    newest: dict[str, tuple] = {}
    for r in mine:
        if r[2] not in newest or r[5] > newest[r[2]][5]:
            newest[r[2]] = r
    for r in mine:
        if r is not newest[r[2]]:
            assert r[14] is None, r[0]
    with store.db.transaction(readonly=True) as tx:
        stored = tx.query(f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ?", (account,))
    events = [store._event_from_row(r) for r in stored]
    expected, states = {}, {}
    for device in {e.device_id for e in events}:
        mine_ = [e for e in events if e.device_id == device]
        for s in build_sessions(mine_, store.gap_s, store.vocabulary):
            expected[s.session_id] = s
        states[device] = build_session_states(mine_, store.gap_s, store.vocabulary)[-1].to_bytes()
    assert sorted(expected) == [r[0] for r in mine]
    for device, r in newest.items():
        assert r[14] in (None, states[device]), r[0]
    for r in mine:
        s = expected[r[0]]
        assert (r[3], r[4], r[5], r[6], r[7], r[8]) == (s.device_type, s.start_ts, s.end_ts, len(s.event_ids),
                                                         s.watch_seconds, s.feature_version), r[0]
        assert r[9] == s.features.astype("<f4").tobytes() and r[10] == s.label, r[0]
        assert r[13] == (json.dumps(s.unknown_genres) if s.unknown_genres else None), r[0]


def name_persons(stores: list[ClusteringStore], account: str, tag: str) -> None:
    """What an assignment writes: a person and probabilities on every session without one."""
    for store in stores:
        with store.db.transaction() as tx:
            for (session_id,) in tx.query("SELECT session_id FROM sessions WHERE account_id = ? "
                                          "AND person_id IS NULL", (account,)):
                tx.execute("UPDATE sessions SET person_id = ?, person_probs = ? WHERE session_id = ?",
                           (f"p-{tag}", json.dumps({f"p-{tag}": 0.75}), session_id))


def random_event(rng: random.Random, account: str, i: int, ts: float, device: str = "tv-1",
                 event_id: str | None = None, utc_offset_minutes: int | None = None) -> ViewingEvent:
    return ViewingEvent(
        event_id=event_id or f"e{i}", account_id=account, device_id=device,
        device_type=rng.choice(("tv", "tv", "tv", "mobile")), ts=ts, kind="heartbeat",
        title_id=rng.choice(TITLES + ("",)), series_id=rng.choice(SERIES),
        genres=tuple(rng.sample(GENRE_NAMES, rng.randint(0, 3))), duration_s=rng.choice((0.0, 30.0, rng.uniform(0, 3600))),
        maturity=rng.choice((None, "kids", "teen", "adult")), vpn=rng.random() < 0.2,
        profile_hint=rng.choice((None, None, "alice", "bob")), utc_offset_minutes=utc_offset_minutes)
