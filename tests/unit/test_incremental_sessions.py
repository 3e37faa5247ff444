"""The incremental session update (ClusteringStore._update_sessions, domain/sessions.py
SessionState) gives the full rebuild's sessions, field by field, for any arrival order
and batch split; a batch appended to a long session does not re-read it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.clustering.domain.events import ViewingEvent
from services.clustering.domain.features import GenreVocabulary
from services.clustering.domain.sessions import SessionState, build_session_states, build_sessions
from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.errors import NotFound, Unavailable
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.common.telemetry import pseudonym
from services.privacy.keys.domain import KeyNotFoundError, KeyRing, generate_kek
from tests.helpers.incremental_sessions import (GAP_S, T0, FullRebuildStore, assert_same_sessions,
                                                assert_sessions_of_stored_events, name_persons,
                                                random_event, session_rows)
from tests.helpers.keys import NOW, ring_fetcher

ACCOUNT = "acc-1"


def _stores(root: Path, tolerance_s: float, vocabulary: GenreVocabulary | None = None):
    ring = KeyRing([generate_kek("k1")], "k1")
    out = []
    for name, cls in (("incremental", ClusteringStore), ("full", FullRebuildStore)):
        store = cls(SqliteDatabase(root / f"{name}.db"), gap_s=GAP_S, lateness_tolerance_s=tolerance_s,
                    cipher=FieldCipher(ring_fetcher(ring, [])), vocabulary=vocabulary)
        store.migrate()
        out.append(store)
    return out


# Events: (time step, event id, device, seed of its other fields, fraction of a step, UTC
# offset in minutes or none). Steps of 600 s against a gap of 1,800 s: sessions split,
# touch at exactly one gap, share instants (the event id orders them) and are bridged by
# late events; ids repeat; a session's events may carry different offsets (a daylight
# saving change, a journey; a late first event brings another offset to the session).
_event = st.tuples(st.integers(0, 40), st.integers(0, 60), st.sampled_from(("tv-1", "tv-1", "ph-1")),
                   st.integers(0, 2**32 - 1), st.sampled_from((0.0, 0.0, 0.25, 0.5)),
                   st.sampled_from((None, None, None, 0, -300, -240, 330, 840)))
# What happens between: the next batch of the stream (its size), persons named (an
# assignment), a window or a person erased.
_op = st.one_of(
    st.tuples(st.just("batch"), st.integers(1, 8)),
    st.tuples(st.just("batch"), st.integers(1, 3)),
    st.tuples(st.just("persons"), st.integers(0, 3)),
    st.tuples(st.just("erase_window"), st.integers(0, 40), st.integers(1, 6)),
    st.tuples(st.just("erase_person"), st.integers(0, 3)),
)


def _arrival(events: list, order: str, moves: list[tuple[int, int]]) -> list[ViewingEvent]:
    """The events in their order of arrival: as drawn ("random"), in time order as a
    client streams them ("stream"), or in time order with some arriving late ("late":
    each move takes an event to a later position)."""
    out = [random_event(random.Random(seed), ACCOUNT, i, T0 + 600.0 * (step + frac), device=device,
                        utc_offset_minutes=offset)
           for step, i, device, seed, frac, offset in events]
    if order != "random":
        out.sort(key=lambda e: (e.ts, e.event_id))
    if order == "late":
        for a, b in moves:
            a, b = a % len(out), b % len(out)
            if a < b:
                out.insert(b, out.pop(a))
    return out


def _run(events: list[ViewingEvent], ops, tolerance_s: float) -> None:
    # In memory-backed storage where there is one: SQLite's fsyncs are not what is tested.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as root:
        stores = _stores(Path(root), tolerance_s)
        for op in [*ops, ("batch", len(events))]:
            if op[0] == "batch":
                batch, events = events[:op[1]], events[op[1]:]
                if not batch:
                    continue
                results = [store.ingest(batch) for store in stores]
                assert results[0] == results[1]
            elif op[0] == "persons":
                name_persons(stores, ACCOUNT, str(op[1]))
            elif op[0] == "erase_window":
                lo = T0 + 600.0 * op[1]
                for store in stores:
                    store.erase(ErasureScope(ACCOUNT, "window", start=lo, end=lo + 600.0 * op[2]))
            else:
                for store in stores:
                    store.erase(ErasureScope(ACCOUNT, "person", person_id=f"p-{op[1]}"))
            assert_same_sessions(*stores, ACCOUNT)
        for store in stores:
            store.db.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_event, min_size=1, max_size=40), st.sampled_from(("stream", "stream", "late", "random")),
       st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), max_size=4),
       st.lists(_op, min_size=1, max_size=14), st.sampled_from((1e9, 3600.0)))
def test_incremental_sessions_equal_the_full_rebuild(events, order, moves, ops, tolerance_s):
    """Random streams (ties, duplicate ids, late events inside, before and between
    sessions, bridges, two devices) in random orders, cut into random batches, with
    persons named and windows and persons erased between them: after every operation the
    incremental store's sessions equal the full rebuild's field by field (features to the
    byte, labels, unknown genres, persons, person probabilities, the newest session's
    running state, its UTC offset) and build_sessions' of the stored events."""
    _run(_arrival(events, order, moves), ops, tolerance_s)


def test_a_stream_of_small_batches_equals_one_batch(tmp_path):
    """A long session posted two events at a time (the incremental path every time
    after the first) equals the full rebuild's and the same events posted at once."""
    rng = random.Random(7)
    events = [random_event(rng, ACCOUNT, i, T0 + 30.0 * i + (3000.0 if i >= 150 else 0.0)) for i in range(200)]
    stores = _stores(tmp_path, 1e9)
    for start in range(0, len(events), 2):
        for store in stores:
            store.ingest(events[start:start + 2])
    assert_same_sessions(*stores, ACCOUNT)
    (tmp_path / "once").mkdir()
    once = _stores(tmp_path / "once", 1e9)[1]
    once.ingest(events)
    assert session_rows(stores[0], ACCOUNT) == session_rows(once, ACCOUNT)
    assert len(session_rows(once, ACCOUNT)) == 2


class _CountingCipher(FieldCipher):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.opened = 0

    def decrypt(self, account_id, field, blob):
        self.opened += 1
        return super().decrypt(account_id, field, blob)

    def decrypt_text(self, account_id, field, stored):
        self.opened += 1
        return super().decrypt_text(account_id, field, stored)


def test_a_batch_appended_to_a_long_session_does_not_reopen_its_events(tmp_path):
    """The cost of a batch is the batch's: two heartbeats appended to a 300-event open
    session open one sealed value (the session's running state), not the session's 1,500
    sealed event fields (the full rebuild opened every one at every batch)."""
    ring = KeyRing([generate_kek("k1")], "k1")
    cipher = _CountingCipher(ring_fetcher(ring, []))
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S, cipher=cipher)
    store.migrate()
    rng = random.Random(3)
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 30.0 * i) for i in range(300)])
    cipher.opened = 0
    result = store.ingest([random_event(rng, ACCOUNT, i, T0 + 30.0 * i) for i in (300, 301)])
    assert result.accepted == 2 and result.sessions_touched == 1
    assert cipher.opened == 1
    # A late event inside the session takes the full rebuild, and the next append is
    # incremental again.
    store.ingest([random_event(rng, ACCOUNT, 999, T0 + 15.0)])
    cipher.opened = 0
    store.ingest([random_event(rng, ACCOUNT, 302, T0 + 30.0 * 302)])
    assert cipher.opened == 1


def test_the_running_state_round_trips_every_float():
    rng = random.Random(11)
    events = [random_event(rng, ACCOUNT, i, T0 + 7.3 * i) for i in range(40)]
    vocabulary = GenreVocabulary({"sci-fi": "scifi"})
    (state,) = build_session_states(events, GAP_S, vocabulary)
    again = SessionState.from_bytes(state.to_bytes())
    assert again.to_bytes() == state.to_bytes()
    (session,) = build_sessions(events, GAP_S, vocabulary)
    assert again.session(vocabulary).features.tobytes() == session.features.tobytes()
    assert again.vocabulary != GenreVocabulary().signature     # an alias changes the placements


def test_a_changed_vocabulary_or_gap_takes_the_full_rebuild(tmp_path):
    """Running sums kept under one vocabulary (or gap) are not extended under another:
    the sessions are those the full rebuild under the new one gives (an alias placing
    the session's earlier unknown names, a shorter gap splitting it)."""
    ring = KeyRing([generate_kek("k1")], "k1")
    rng = random.Random(5)
    steps = (0, 300, 600, 900, 1200, 1500, 1800, 2100, 2160, 2220, 2280, 2340)
    events = [random_event(rng, ACCOUNT, i, T0 + step) for i, step in enumerate(steps)]
    assert any("anime" in e.genres for e in events[:10])
    for n, (vocabulary, gap_s) in enumerate(((GenreVocabulary({"anime": "animation", "telenovela": "drama"}), GAP_S),
                                             (None, 120.0))):
        db = SqliteDatabase(tmp_path / f"{n}.db")
        before = ClusteringStore(db, gap_s=GAP_S, cipher=FieldCipher(ring_fetcher(ring, [])))
        before.migrate()
        before.ingest(events[:10])
        after = ClusteringStore(db, gap_s=gap_s, cipher=FieldCipher(ring_fetcher(ring, [])), vocabulary=vocabulary)
        after.ingest(events[10:])
        full = FullRebuildStore(SqliteDatabase(tmp_path / f"{n}-full.db"), gap_s=GAP_S,
                                cipher=FieldCipher(ring_fetcher(ring, [])))
        full.migrate()
        full.ingest(events[:10])
        full = FullRebuildStore(full.db, gap_s=gap_s, cipher=full.cipher, vocabulary=vocabulary)
        full.ingest(events[10:])
        assert_same_sessions(after, full, ACCOUNT)


def test_a_newest_session_replaced_under_the_batch_takes_the_full_rebuild(tmp_path):
    """The retention purge (an Erase of account "*", privacy's, on any clustering replica)
    takes no household lock: on PostgreSQL it can delete and rebuild a device's newest
    session (one that started before the horizon) between an ingest's read of that
    session's state and its UPDATE. The UPDATE then matches no row (the rebuilt session
    starts later: another id) and, until review22, the batch's events were stored in no
    session, for good: the next batches extended the purge's state without them. Now an
    UPDATE that matches no row takes the full rebuild, which sees the purge's rows.
    Simulated here in one SQLite transaction: the purge's statements run right after the
    ingest read the newest session."""
    rng = random.Random(5)
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S)
    store.migrate()
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in range(40)])
    horizon = T0 + 60.0 * 20 + 1.0   # inside the one session
    transaction = store.db.transaction

    @contextlib.contextmanager
    def purging_under_the_ingest(readonly: bool = False):
        with transaction(readonly) as tx:
            query = tx.query

            def query_then_purge(sql, params=()):
                rows = query(sql, params)
                if sql.startswith("SELECT session_id, start_ts, end_ts, feature_version, state FROM sessions"):
                    tx.query = query
                    # What the purge's window erasure (no household lock) commits meanwhile.
                    tx.execute("DELETE FROM events WHERE ts < ?", (horizon,))
                    tx.execute("DELETE FROM sessions WHERE start_ts < ?", (horizon,))
                    # Its rebuild of what remains, from the events committed before the
                    # ingest's (it cannot see those: they are not committed yet).
                    remaining = [store._event_from_row(r) for r in query(
                        "SELECT event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, "
                        "genres, duration_s, maturity, country, vpn, profile_hint FROM events WHERE ts < ?",
                        (T0 + 60.0 * 40,))]
                    store._insert_sessions(tx, store._session_rows(
                        build_session_states(remaining, GAP_S, store.vocabulary), {}))
                return rows

            tx.query = query_then_purge
            yield tx

    store.db.transaction = purging_under_the_ingest
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in (40, 41)])
    store.db.transaction = transaction
    assert_sessions_of_stored_events(store, ACCOUNT)
    store.ingest([random_event(rng, ACCOUNT, 42, T0 + 60.0 * 42)])   # extends the state it left
    assert_sessions_of_stored_events(store, ACCOUNT)


def _not_found_fetcher(ring: KeyRing):
    """privacy's GetDataKey as the remote FieldCipher sees it: a version the household
    does not have is NotFound (services/privacy/keys/app.py)."""
    fetch = ring_fetcher(ring, [])

    def fetcher(account: str, version: int) -> tuple[int, bytes]:
        try:
            return fetch(account, version)
        except KeyNotFoundError as exc:
            raise NotFound(str(exc), "dek_version") from None

    return fetcher


def _seal_json(store: ClusteringStore, text: str) -> bytes:
    return store._seal(ACCOUNT, "session_state", text.encode())


def _valid_state_with(store: ClusteringStore, stored: bytes, **changes) -> bytes:
    d = json.loads(store._open_blob(ACCOUNT, "session_state", stored))
    d.update(changes)
    return _seal_json(store, json.dumps(d))


def _sums_with(store: ClusteringStore, stored: bytes, **changes) -> bytes:
    d = json.loads(store._open_blob(ACCOUNT, "session_state", stored))
    d["sums"].update(changes)
    return _seal_json(store, json.dumps(d))


_BAD_STATES = {
    # The sealed bytes altered (a torn write, a disk error): does not authenticate.
    "altered": ("undecryptable", lambda store, b: b[:-1] + bytes([b[-1] ^ 1])),
    # Sealed under a data key version the household does not have.
    "unknown_key_version": ("undecryptable", lambda store, b: b[:1] + (999).to_bytes(4, "big") + b[5:]),
    "not_sealed": ("undecryptable", lambda store, b: b"{}"),
    # Opens, but is not a state to_bytes wrote.
    "not_json": ("unparseable", lambda store, b: _seal_json(store, "{not json")),
    "not_utf8": ("unparseable", lambda store, b: store._seal(ACCOUNT, "session_state", b"\xff\xfe")),
    "a_list": ("unparseable", lambda store, b: _seal_json(store, "[1, 2]")),
    "a_field_missing": ("unparseable", lambda store, b: _seal_json(store, json.dumps(
        {k: v for k, v in json.loads(store._open_blob(ACCOUNT, "session_state", b)).items() if k != "sums"}))),
    # Fields of the wrong type that main's parser took: a string of hints became a
    # count per character (the label "a"), a string of titles a set of characters.
    "hints_a_string": ("unparseable", lambda store, b: _valid_state_with(store, b, hints="aaab")),
    "count_a_string": ("unparseable", lambda store, b: _valid_state_with(store, b, event_count="3")),
    "watch_not_finite": ("unparseable", lambda store, b: _valid_state_with(store, b, watch_seconds=float("nan"))),
    "offset_a_string": ("unparseable", lambda store, b: _valid_state_with(store, b, utc_offset_minutes="60")),
    "offset_out_of_range": ("unparseable", lambda store, b: _valid_state_with(store, b, utc_offset_minutes=100_000)),
    "titles_a_string": ("unparseable", lambda store, b: _sums_with(store, b, titles="t1t2")),
    "series_a_list": ("unparseable", lambda store, b: _sums_with(store, b, series=["s1"])),
    "genre_seconds_strings": ("unparseable", lambda store, b: _sums_with(
        store, b, genre_seconds=["1"] * len(json.loads(store._open_blob(ACCOUNT, "session_state", b))["sums"]["genre_seconds"]))),
}


@pytest.mark.parametrize("corruption", sorted(_BAD_STATES))
def test_a_bad_kept_state_falls_back_to_the_full_rebuild(tmp_path, caplog, corruption):
    """The kept running state is a cache of the stored events: one that does not open
    (altered bytes, a key version the household does not have, not sealed) or does not
    parse as a state (not JSON, a field missing or of the wrong type) must not block the
    household's ingest (before session 23 it raised: INTERNAL or NOT_FOUND for every
    batch of that device, for good, or — a field of the wrong type — it was extended into
    a wrong session). The batch takes the full rebuild from the stored events, which
    writes a good state; counted in hearth_session_state_fallbacks_total{reason} and
    logged under the household's pseudonym."""
    reason, corrupt = _BAD_STATES[corruption]
    ring = KeyRing([generate_kek("k1")], "k1")
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S,
                            cipher=FieldCipher(_not_found_fetcher(ring)))
    store.migrate()
    rng = random.Random(13)
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in range(20)])
    with store.db.transaction() as tx:
        ((session_id, stored),) = tx.query("SELECT session_id, state FROM sessions WHERE state IS NOT NULL")
        tx.execute("UPDATE sessions SET state = ? WHERE session_id = ?", (corrupt(store, bytes(stored)), session_id))
    before = REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": reason}) or 0.0
    with caplog.at_level(logging.WARNING, logger="hearth.clustering.store"):
        result = store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in (20, 21)])
    assert result.accepted == 2 and result.sessions_touched == 1
    assert_sessions_of_stored_events(store, ACCOUNT)
    assert REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": reason}) == before + 1
    (record,) = [r for r in caplog.records if "session state" in r.getMessage()]
    assert ACCOUNT not in record.getMessage() and pseudonym(ACCOUNT) in record.getMessage()
    # The rebuild wrote a good state: the next batch is incremental again.
    store.ingest([random_event(rng, ACCOUNT, 22, T0 + 60.0 * 22)])
    assert REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": reason}) == before + 1
    assert_sessions_of_stored_events(store, ACCOUNT)


def test_a_bad_kept_state_falls_back_without_a_cipher(tmp_path):
    """Plaintext stores (no cipher) too: bytes that are not a state are rebuilt."""
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S)
    store.migrate()
    rng = random.Random(17)
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in range(5)])
    with store.db.transaction() as tx:
        tx.execute("UPDATE sessions SET state = ? WHERE state IS NOT NULL", (b"\x00garbage",))
    store.ingest([random_event(rng, ACCOUNT, 5, T0 + 300.0)])
    assert_sessions_of_stored_events(store, ACCOUNT)


def test_a_key_service_outage_while_opening_the_state_still_fails_the_batch(tmp_path):
    """Not every error opening the state is a bad state: the data key service being
    unavailable is transient (the rebuild may need it too), so the batch fails retryably
    (UNAVAILABLE, the gateway's 503) and is not counted as a fallback. Here the state
    is sealed under the household's first key, the batch under its second (a rotation),
    and only the first cannot be fetched."""
    ring = KeyRing([generate_kek("k1")], "k1")
    fetch = ring_fetcher(ring, [])
    down = {"on": False}

    def fetcher(account: str, version: int) -> tuple[int, bytes]:
        if down["on"] and version == 1:
            raise Unavailable("data key service unavailable", "account_id")
        return fetch(account, version)

    cipher = FieldCipher(fetcher)
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S, cipher=cipher)
    store.migrate()
    rng = random.Random(19)
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 60.0 * i) for i in range(5)])
    ring.create_dek(ACCOUNT, NOW)
    cipher.forget_all()
    down["on"] = True
    before = sum(REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": r}) or 0.0
                 for r in ("undecryptable", "unparseable"))
    with pytest.raises(Unavailable):
        store.ingest([random_event(rng, ACCOUNT, 5, T0 + 300.0)])
    assert sum(REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": r}) or 0.0
               for r in ("undecryptable", "unparseable")) == before
    down["on"] = False
    store.ingest([random_event(rng, ACCOUNT, 5, T0 + 300.0)])
    assert_sessions_of_stored_events(store, ACCOUNT)


class _BeforeSession23(ClusteringStore):
    """A clustering replica older than session 23 on the same database, as in a rolling
    upgrade: it knows nothing of UTC offsets — an event's offset does not reach it (the
    proto field is unknown to it), it reads none from the stored events, extends a kept
    state ignoring its offset (its parser took any extra key) and writes states as
    ``to_bytes`` did then: without the key."""

    def ingest(self, events, *args, **kwargs):
        return super().ingest([dataclasses.replace(e, utc_offset_minutes=None) for e in events], *args, **kwargs)

    def _event_from_row(self, r):
        return dataclasses.replace(super()._event_from_row(r), utc_offset_minutes=None)

    def _kept_state(self, account, stored):
        state = super()._kept_state(account, stored)
        if state is not None:
            state.utc_offset_minutes = None
        return state

    def _session_rows(self, states, persons, *args):
        rows = super()._session_rows(states, persons, *args)
        if rows and rows[-1][13] is not None:
            old = {k: v for k, v in json.loads(states[-1].to_bytes()).items() if k != "utc_offset_minutes"}
            rows[-1] = (*rows[-1][:13], self._seal(rows[-1][1], "session_state", json.dumps(old).encode()))
        return rows


def _offset_fallbacks() -> float:
    return REGISTRY.get_sample_value("hearth_session_state_fallbacks_total", {"reason": "offset_unknown"}) or 0.0


def _mixed_mesh(tmp_path: Path):
    ring = KeyRing([generate_kek("k1")], "k1")
    db = SqliteDatabase(tmp_path / "c.db")
    new, old = (cls(db, gap_s=GAP_S, cipher=FieldCipher(ring_fetcher(ring, []))) for cls in (ClusteringStore, _BeforeSession23))
    new.migrate()
    return new, old


def _stream(rng, steps, offset):
    return [random_event(rng, ACCOUNT, i, T0 + 60.0 * i, device="tv-1", utc_offset_minutes=offset) for i in steps]


def test_a_state_an_older_replica_rewrote_without_the_offset_is_rebuilt_in_local_time(tmp_path):
    """review23, dek24: in a rolling upgrade a replica older than session 23 extended a
    device's session (its first event at +330 min) and wrote the state without the
    offset; the next batch on a current replica extended that state as UTC, so the
    session's hour and weekday were the UTC ones for good, against its stored events.
    A state without the key now says it cannot tell: the store rebuilds from the
    device's first event with an offset (counted, ``offset_unknown``); the rebuilt
    state has the key, so the next batch is incremental again."""
    new, old = _mixed_mesh(tmp_path)
    rng = random.Random(23)
    new.ingest(_stream(rng, range(0, 5), 330))
    old.ingest(_stream(rng, range(5, 8), 330))                  # the same session, on the old replica
    (stored,) = [r[14] for r in session_rows(new, ACCOUNT) if r[14] is not None]
    assert "utc_offset_minutes" not in json.loads(stored)       # the state as the old code wrote it
    before = _offset_fallbacks()
    new.ingest(_stream(rng, range(8, 10), 330))
    assert_sessions_of_stored_events(new, ACCOUNT)              # local time: the first event's +330
    assert _offset_fallbacks() == before + 1
    new.ingest(_stream(rng, range(10, 12), 330))
    assert_sessions_of_stored_events(new, ACCOUNT)
    assert _offset_fallbacks() == before + 1                     # incremental again


def test_sessions_an_older_replica_built_before_the_newest_are_rebuilt_too(tmp_path):
    """The older replica extended the session (UTC) and then started the next one: the
    first session is no longer the newest and keeps no state, yet it is rebuilt from its
    stored events when the current replica meets the newest's state without the key."""
    new, old = _mixed_mesh(tmp_path)
    rng = random.Random(29)
    new.ingest(_stream(rng, range(0, 4), -300))
    old.ingest(_stream(rng, range(4, 6), -300))                 # extends the first session (UTC)
    old.ingest(_stream(rng, range(100, 102), -300))             # starts the second, after a gap
    assert len(session_rows(new, ACCOUNT)) == 2
    new.ingest(_stream(rng, range(102, 104), -300))
    assert_sessions_of_stored_events(new, ACCOUNT)


def test_a_state_without_the_key_on_a_device_without_offsets_is_extended(tmp_path):
    """Most states written before session 24 lack the key because their device never
    sent an offset: those are right (UTC), extended as before and rewritten with the key,
    nothing rebuilt or counted."""
    new, old = _mixed_mesh(tmp_path)
    rng = random.Random(31)
    old.ingest(_stream(rng, range(0, 5), None))
    before = _offset_fallbacks()
    rebuilt = []
    new._rebuild_sessions = lambda *a: rebuilt.append(a)       # type: ignore[method-assign]
    new.ingest(_stream(rng, range(5, 7), None))
    assert rebuilt == [] and _offset_fallbacks() == before
    assert_sessions_of_stored_events(new, ACCOUNT)
    (stored,) = [r[14] for r in session_rows(new, ACCOUNT) if r[14] is not None]
    assert json.loads(stored)["utc_offset_minutes"] is None
