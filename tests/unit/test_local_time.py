"""Local time (issue #10, session 23): an event's optional ``utc_offset_minutes`` moves the
session's hour and weekday features to the device's local time; absent, they are UTC's,
to the bit. The session keeps its first event's offset; the offset is stored sealed with
its event, exported, and erased with it."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.clustering.domain import features as F
from services.clustering.domain.events import ViewingEvent, validate_batch
from services.clustering.domain.gmm import rhythm_cells
from services.clustering.domain.sessions import SessionState, build_session_states, build_sessions
from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.errors import InvalidArgument
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek
from tests.helpers.incremental_sessions import GAP_S, random_event
from tests.helpers.keys import ring_fetcher

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a Thursday
ACCOUNT = "acc-tz"


def ev(i, ts, **kw):
    base = dict(event_id=f"e{i}", account_id=ACCOUNT, device_id="tv-1", device_type="tv", ts=ts,
                kind="heartbeat", title_id=f"t{i}", genres=("drama",), duration_s=60.0)
    base.update(kw)
    return ViewingEvent(**base)


def hour_of(features: np.ndarray) -> float:
    return float(np.mod(math.atan2(features[F.HOUR.start], features[F.HOUR.start + 1]) * 24 / (2 * math.pi), 24))


def weekday_of(features: np.ndarray) -> int:
    """Monday = 0 (features.py: the day on the circle, plus the fraction of the day)."""
    return int(np.floor(np.mod(math.atan2(features[F.DOW.start], features[F.DOW.start + 1]) * 7 / (2 * math.pi), 7)))


def test_the_hour_and_weekday_are_local_to_the_offset():
    """Thursday 01:30 UTC is Wednesday 20:30 in New York (UTC-5) and Thursday 12:30 in
    Sydney (UTC+11): the hour and weekday features say so; the session's times stay UTC."""
    at = T0 + 1.5 * 3600
    (utc,) = build_sessions([ev(0, at)])
    (new_york,) = build_sessions([ev(0, at, utc_offset_minutes=-300)])
    (sydney,) = build_sessions([ev(0, at, utc_offset_minutes=660)])
    assert hour_of(utc.features) == pytest.approx(1.5, abs=1e-4) and weekday_of(utc.features) == 3
    assert hour_of(new_york.features) == pytest.approx(20.5, abs=1e-4) and weekday_of(new_york.features) == 2
    assert hour_of(sydney.features) == pytest.approx(12.5, abs=1e-4) and weekday_of(sydney.features) == 3
    assert new_york.start_ts == utc.start_ts == at and new_york.session_id == utc.session_id
    assert (new_york.utc_offset_minutes, utc.utc_offset_minutes) == (-300, None)
    # Only the time block moves.
    assert np.array_equal(new_york.features[F.DEVICE.start:], utc.features[F.DEVICE.start:])


def test_no_offset_is_utc_to_the_bit():
    """Absent (every event stored before session 23): the features of the UTC start, as
    features_matrix computes them, to the bit; an offset of 0 gives the same bits."""
    events = [ev(i, T0 + 20 * 3600 + 37.25 * i) for i in range(5)]
    (s,) = build_sessions(events)
    (zero,) = build_sessions([ViewingEvent(**{**_fields(e), "utc_offset_minutes": 0}) for e in events])
    (direct,) = F.features_matrix(np.array([events[0].ts]), np.array([0]),
                                  np.array([[300.0 if g == "drama" else 0.0 for g in F.GENRES]]),
                                  np.array([0.0]), np.array([0.0]), np.array([300.0]), np.array([0.0]),
                                  np.array([5]), np.array([0.0]))
    assert s.features.tobytes() == direct.tobytes() == zero.features.tobytes()


def _fields(e: ViewingEvent) -> dict:
    return {name: getattr(e, name) for name in ViewingEvent.__slots__}


@settings(max_examples=80, deadline=None)
@given(local=st.lists(st.integers(0, 6 * 3600), min_size=1, max_size=12),
       day=st.integers(0, 400), offset=st.integers(-840, 840))
def test_features_do_not_move_with_the_offset_when_the_offset_is_sent(local, day, offset):
    """A household's evening is its evening wherever it lives: the same local times sent
    from any UTC offset, with that offset, give the features (and the rhythm cells the
    model reads) of the local times sent as UTC, to the bit."""
    base = T0 + 86400.0 * day
    as_utc = build_sessions([ev(i, base + t) for i, t in enumerate(local)])
    moved = build_sessions([ev(i, base + t - 60.0 * offset, utc_offset_minutes=offset) for i, t in enumerate(local)])
    assert len(as_utc) == len(moved)
    for a, b in zip(as_utc, moved):
        assert a.features.tobytes() == b.features.tobytes()
    X, Y = np.vstack([s.features for s in as_utc]), np.vstack([s.features for s in moved])
    assert np.array_equal(rhythm_cells(X), rhythm_cells(Y))


def test_a_session_keeps_its_first_events_offset():
    """A daylight saving change (or a journey) within a session: the session's offset is
    its first event's, in time order; a late event that becomes the first brings its own."""
    events = [ev(0, T0, utc_offset_minutes=60), ev(1, T0 + 600, utc_offset_minutes=120),
              ev(2, T0 + 1200, utc_offset_minutes=120)]
    (s,) = build_sessions(events)
    assert s.utc_offset_minutes == 60 and hour_of(s.features) == pytest.approx(1.0, abs=1e-4)
    (late,) = build_sessions(events + [ev(3, T0 - 300, utc_offset_minutes=-480)])
    assert late.utc_offset_minutes == -480 and hour_of(late.features) == pytest.approx(16.0 - 5 / 60, abs=1e-4)
    # Events at one instant: the event id orders them, as it orders the session.
    (tie,) = build_sessions([ev(5, T0, utc_offset_minutes=0), ev(4, T0, utc_offset_minutes=330)])
    assert tie.utc_offset_minutes == 330


def test_the_running_state_keeps_the_offset_and_an_old_state_reads_as_utc():
    events = [ev(i, T0 + 60.0 * i, utc_offset_minutes=-210) for i in range(4)]
    (state,) = build_session_states(events)
    data = state.to_bytes()
    assert json.loads(data)["utc_offset_minutes"] == -210
    again = SessionState.from_bytes(data)
    assert again.to_bytes() == data
    assert again.session(F.DEFAULT_VOCABULARY).features.tobytes() == build_sessions(events)[0].features.tobytes()
    assert again.offset_known
    # A state without an offset says so (null, since session 24) and reads as UTC.
    (plain,) = build_session_states([ev(i, T0 + 60.0 * i) for i in range(4)])
    assert json.loads(plain.to_bytes())["utc_offset_minutes"] is None
    again = SessionState.from_bytes(plain.to_bytes())
    assert again.utc_offset_minutes is None and again.offset_known and again.to_bytes() == plain.to_bytes()
    # The form written before session 24 (no key) reads as UTC, flagged: a replica older
    # than session 23 may have dropped the first event's offset (the store rebuilds).
    old = {k: v for k, v in json.loads(plain.to_bytes()).items() if k != "utc_offset_minutes"}
    legacy = SessionState.from_bytes(json.dumps(old).encode())
    assert legacy.utc_offset_minutes is None and not legacy.offset_known


@pytest.mark.parametrize("value", [841, -841, 100_000, True, 60.0, "60"])
def test_an_offset_out_of_range_or_not_whole_minutes_is_refused_naming_it(value):
    with pytest.raises(InvalidArgument) as info:
        validate_batch([ev(0, T0, utc_offset_minutes=value)], now=T0 + 10)
    assert info.value.field == "events[0].utc_offset_minutes"


@pytest.mark.parametrize("value", [-840, -300, 0, 345, 840])
def test_offsets_within_fourteen_hours_are_accepted(value):
    assert validate_batch([ev(0, T0, utc_offset_minutes=value)], now=T0 + 10)[0].utc_offset_minutes == value


def _store(path) -> ClusteringStore:
    ring = KeyRing([generate_kek("k1")], "k1")
    store = ClusteringStore(SqliteDatabase(path), gap_s=GAP_S, cipher=FieldCipher(ring_fetcher(ring, [])))
    store.migrate()
    return store


def test_the_offset_is_stored_sealed_rebuilt_from_and_exported(tmp_path):
    """Stored with its event, sealed under the household key like country; a full rebuild
    from the stored events (a late event) gives the local-time features; the export
    returns it."""
    store = _store(tmp_path / "c.db")
    rng = random.Random(1)
    events = [random_event(rng, ACCOUNT, i, T0 + 20 * 3600 + 60.0 * i, utc_offset_minutes=-300) for i in range(5)]
    store.ingest(events[1:])
    store.ingest(events[:1])   # before the session's start: the full rebuild, from the stored rows
    with store.db.transaction(readonly=True) as tx:
        stored = [r[0] for r in tx.query("SELECT utc_offset_minutes FROM events WHERE account_id = ?", (ACCOUNT,))]
    assert len(stored) == 5 and all(v.startswith("enc1:") for v in stored)
    (session,) = store.closed_sessions(ACCOUNT, now=T0 + 86400)
    assert hour_of(session.features) == pytest.approx(15.0, abs=1e-4)
    assert session.features.tobytes() == build_sessions(events)[0].features.tobytes()
    exported = store.export_account(ACCOUNT)["events"]
    assert [e["utc_offset_minutes"] for e in exported] == [-300] * 5


def test_the_offset_goes_with_its_events_on_erasure(tmp_path):
    store = _store(tmp_path / "c.db")
    rng = random.Random(2)
    store.ingest([random_event(rng, ACCOUNT, i, T0 + 600.0 * i, device=("tv-1", "ph-1")[i % 2],
                               utc_offset_minutes=60) for i in range(6)])
    store.erase(ErasureScope(ACCOUNT, "device", device_id="ph-1"))
    with store.db.transaction(readonly=True) as tx:
        left = tx.query("SELECT device_id, utc_offset_minutes FROM events WHERE account_id = ?", (ACCOUNT,))
    assert sorted({r[0] for r in left}) == ["tv-1"] and len(left) == 3
    store.erase(ErasureScope(ACCOUNT, "household"))
    with store.db.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM events WHERE utc_offset_minutes IS NOT NULL")[0][0] == 0
    store.db.close()
