"""The session builder: events of one (account, device) with no gap longer than the
inactivity window form a session.

Pure and deterministic: sessions are a function of the *set* of events (sorted by
time, then event id), never of the order they arrived in, so replays, retries and
late events give the same sessions. The store rebuilds the sessions of the affected time
range of a device from its stored events (``build_session_states``) and replaces them
there, or, when a batch only appends to the device's newest session, extends that
session's kept ``SessionState`` (``extend_sessions``): both add the same events in the
same order, so they give the same sessions to the bit.

Lateness: an event older than the device's watermark (newest event time seen) minus
the tolerance is refused by the store — by then its session may have been assigned and
used downstream. Within the tolerance a late event joins (or bridges, or starts) the
session it belongs to and that session's features are recomputed.

A session is *closed* once nothing can extend it: the later of the device watermark and
the wall clock is more than one gap past its last event.

Local time: the hour and weekday features are those of the session's start in the
device's local time when its first event (time, then event id) carries
``utc_offset_minutes`` (start + 60 * offset), and of its UTC start when it does not —
today's vectors, to the bit. A session whose events carry different offsets (a daylight
saving change or a journey within it) keeps its first event's: its start is when and
where the viewer sat down, and one rule keeps the full rebuild and the incremental path
identical (docs/clustering.md "Local time").
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.clustering.domain.events import MAX_UTC_OFFSET_MINUTES, ViewingEvent
from services.clustering.domain.features import (DEFAULT_VOCABULARY, FeatureSums, GenreVocabulary, WatchItem, checked,
                                                sums_features)

DEFAULT_GAP_S = 1800.0


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    account_id: str
    device_id: str
    device_type: str
    start_ts: float
    end_ts: float
    event_ids: tuple[str, ...]
    watch_seconds: float
    features: np.ndarray            # FEATURE_DIM float32
    feature_version: int
    label: str | None               # the most frequent profile_hint, if any
    # Genre names outside the vocabulary, with how many of the session's events carry
    # each (sorted by name); counted in their hashed genre slots (or `other`, see
    # GenreVocabulary) in the features, reported by the service.
    unknown_genres: tuple[tuple[str, int], ...] = ()
    # The first event's UTC offset (minutes), which its time features are local to; None: UTC.
    utc_offset_minutes: int | None = None

    def is_closed(self, watermark: float, now: float, gap_s: float = DEFAULT_GAP_S) -> bool:
        return max(watermark, now) - self.end_ts > gap_s


def session_id_for(account_id: str, device_id: str, start_ts: float) -> str:
    """Stable id from what identifies a session: its device and its first instant
    (millisecond resolution). A late event that moves the start gives a new id, and the
    store replaces the old session."""
    digest = hashlib.sha256(f"{account_id}\x1f{device_id}\x1f{round(start_ts * 1000)}".encode()).hexdigest()
    return "s-" + digest[:24]


def split_by_gap(ts_sorted: np.ndarray, gap_s: float) -> np.ndarray:
    """Start index of each session in sorted timestamps (vectorised)."""
    if ts_sorted.size == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ts_sorted) > gap_s) + 1
    return np.concatenate(([0], breaks))


class SessionState:
    """A session as events are added to it in time order (then event id): what its
    ``Session`` is computed from, and nothing more. ``build_sessions`` folds a device's
    events into these; the store keeps the newest one of a device (sealed, ``to_bytes``)
    so that events appended after it are added to it (``extend_sessions``) instead of
    the whole session being rebuilt from its stored events. Both add the same events in
    the same order, so the sessions are the same to the bit (tests/unit/test_incremental_sessions.py)."""

    __slots__ = ("account_id", "device_id", "start_ts", "end_ts", "last_event_id", "device_type",
                 "event_count", "watch_seconds", "hints", "unknown", "sums", "vocabulary", "gap_s",
                 "utc_offset_minutes", "offset_known")

    def __init__(self, first: ViewingEvent, vocabulary: GenreVocabulary, gap_s: float) -> None:
        self.account_id, self.device_id, self.start_ts = first.account_id, first.device_id, first.ts
        # The first event's offset is the session's (the module's docstring, "Local time").
        self.utc_offset_minutes = first.utc_offset_minutes
        # Whether the state says what its first event's offset was: always, but for one
        # read from bytes written before session 24 (``from_bytes``).
        self.offset_known = True
        self.vocabulary, self.gap_s = vocabulary.signature, float(gap_s)
        self.end_ts, self.last_event_id, self.device_type = first.ts, first.event_id, first.device_type
        self.event_count, self.watch_seconds = 0, 0.0
        self.hints: Counter = Counter()
        self.unknown: Counter = Counter()
        self.sums = FeatureSums()
        self.add(first, vocabulary)

    def add(self, e: ViewingEvent, vocabulary: GenreVocabulary) -> None:
        """Count ``e``, which comes after every event counted so far."""
        self.end_ts, self.last_event_id = e.ts, e.event_id
        # The device type of the latest event wins: a device is re-typed rarely, and
        # the newest report is the most likely to be right.
        self.device_type = e.device_type
        self.event_count += 1
        self.watch_seconds += e.duration_s
        if e.profile_hint:
            self.hints[e.profile_hint] += 1
        if e.genres:
            self.unknown.update(set(vocabulary.unknown(e.genres)))
        self.sums.add(WatchItem(e.ts, e.title_id, e.series_id, e.genres, e.duration_s, e.maturity, e.vpn),
                      vocabulary.placements)

    def after(self, e: ViewingEvent) -> bool:
        """Whether ``e`` sorts after every event counted (time, then event id)."""
        return (e.ts, e.event_id) > (self.end_ts, self.last_event_id)

    def local_start_ts(self) -> float:
        """The start the time features are computed from: the UTC start moved by the
        first event's offset, or the UTC start itself when it has none."""
        if self.utc_offset_minutes is None:
            return self.start_ts
        return self.start_ts + 60.0 * self.utc_offset_minutes

    def session(self, vocabulary: GenreVocabulary, event_ids: tuple[str, ...] = (),
                features: np.ndarray | None = None) -> Session:
        """The session's row; ``features``: its feature vector when already computed
        (``sessions_of``, many sessions in one call)."""
        hints = self.hints
        return Session(
            session_id=session_id_for(self.account_id, self.device_id, self.start_ts),
            account_id=self.account_id,
            device_id=self.device_id,
            device_type=self.device_type,
            start_ts=self.start_ts,
            end_ts=self.end_ts,
            event_ids=event_ids,
            watch_seconds=float(self.watch_seconds),
            features=self.sums.features(self.local_start_ts(), self.device_type) if features is None else features,
            feature_version=vocabulary.feature_version,
            label=min(hints, key=lambda h: (-hints[h], h)) if hints else None,
            unknown_genres=tuple(sorted(self.unknown.items())),
            utc_offset_minutes=self.utc_offset_minutes,
        )

    def to_bytes(self) -> bytes:
        # The offset is always written, null when the first event carried none (since
        # session 24): a state without the key was written by an older replica, which may
        # have dropped the first event's offset (``from_bytes``).
        return json.dumps({
            "account_id": self.account_id, "device_id": self.device_id, "start_ts": self.start_ts,
            "end_ts": self.end_ts, "last_event_id": self.last_event_id, "device_type": self.device_type,
            "event_count": self.event_count, "watch_seconds": self.watch_seconds,
            "hints": dict(sorted(self.hints.items())), "unknown": dict(sorted(self.unknown.items())),
            "sums": self.sums.to_dict(), "vocabulary": self.vocabulary, "gap_s": self.gap_s,
            "utc_offset_minutes": self.utc_offset_minutes,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SessionState":
        """The state ``to_bytes`` wrote. ValueError for anything else — not JSON, a field
        missing, extra or of another type, a number not finite — so that what parses can
        be extended: the store then rebuilds the session from its stored events (a kept
        state is a cache of them; docs/clustering.md "Incremental sessions").

        A state without ``utc_offset_minutes`` is the form written before session 24 —
        before session 23 (no offsets), or by session 23 when the first event carried
        none. It reads as UTC with ``offset_known`` False: a replica older than session
        23 in a mixed-version mesh rewrote a device's state without the offset its first
        event carried, so the store must not extend it blindly (``ClusteringStore.
        _update_sessions``; docs/clustering.md "Local time")."""
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"session state: not JSON ({exc})") from None
        if not isinstance(d, dict) or d.keys() - {"utc_offset_minutes"} != _STATE_FIELDS:
            raise ValueError("session state: not the fields to_bytes writes")
        state = cls.__new__(cls)
        state.account_id, state.device_id = checked(d, "account_id", str), checked(d, "device_id", str)
        state.start_ts, state.end_ts = checked(d, "start_ts", float), checked(d, "end_ts", float)
        state.last_event_id, state.device_type = checked(d, "last_event_id", str), checked(d, "device_type", str)
        state.event_count, state.watch_seconds = checked(d, "event_count", int), checked(d, "watch_seconds", float)
        state.hints, state.unknown = Counter(checked(d, "hints", {str: int})), Counter(checked(d, "unknown", {str: int}))
        state.sums = FeatureSums.from_dict(checked(d, "sums", dict))
        state.vocabulary, state.gap_s = checked(d, "vocabulary", str), checked(d, "gap_s", float)
        state.offset_known = "utc_offset_minutes" in d
        state.utc_offset_minutes = (checked(d, "utc_offset_minutes", int)
                                    if state.offset_known and d["utc_offset_minutes"] is not None else None)
        if state.event_count < 1 or not state.start_ts <= state.end_ts:
            raise ValueError("session state: no events, or its end before its start")
        if state.utc_offset_minutes is not None and not (-MAX_UTC_OFFSET_MINUTES <= state.utc_offset_minutes
                                                         <= MAX_UTC_OFFSET_MINUTES):
            raise ValueError("session state: utc_offset_minutes out of range")
        return state


_STATE_FIELDS = frozenset(("account_id", "device_id", "start_ts", "end_ts", "last_event_id", "device_type",
                           "event_count", "watch_seconds", "hints", "unknown", "sums", "vocabulary", "gap_s"))


def sessions_of(states: Sequence[SessionState], vocabulary: GenreVocabulary) -> list[Session]:
    """``state.session(vocabulary)`` of each state, their feature vectors computed in one
    call (``sums_features``: the same rows, to the bit)."""
    if not states:
        return []
    matrix = sums_features([s.sums for s in states], [s.local_start_ts() for s in states],
                           [s.device_type for s in states])
    return [s.session(vocabulary, features=row) for s, row in zip(states, matrix)]


def extend_sessions(last: SessionState | None, ordered: Sequence[ViewingEvent], gap_s: float,
                    vocabulary: GenreVocabulary) -> list[SessionState]:
    """The sessions ``ordered`` (sorted by time, then event id, ids unique, all after
    ``last``'s events) make after ``last``: ``last`` extended (it is modified, and is
    the first element) when the first event is within one gap of its end, then every
    session they start. A gap longer than ``gap_s`` between consecutive events starts a
    new session."""
    states = [last] if last is not None else []
    current = last
    for e in ordered:
        if current is None or e.ts - current.end_ts > gap_s:
            current = SessionState(e, vocabulary, gap_s)
            states.append(current)
        else:
            current.add(e, vocabulary)
    return states


def build_session_states(events: Sequence[ViewingEvent], gap_s: float = DEFAULT_GAP_S,
                         vocabulary: GenreVocabulary | None = None) -> list[SessionState]:
    """``build_sessions``' sessions as their running states (oldest first)."""
    vocabulary = vocabulary or DEFAULT_VOCABULARY
    if gap_s <= 0:
        raise ValueError("gap_s must be > 0")
    unique = {e.event_id: e for e in events}
    ordered = sorted(unique.values(), key=lambda e: (e.ts, e.event_id))
    if len({(e.account_id, e.device_id) for e in ordered}) > 1:
        raise ValueError("events must all belong to one (account_id, device_id)")
    return extend_sessions(None, ordered, gap_s, vocabulary)


def build_sessions(events: Sequence[ViewingEvent], gap_s: float = DEFAULT_GAP_S,
                   vocabulary: GenreVocabulary | None = None) -> list[Session]:
    """Sessions of events from ONE (account, device); duplicates by event_id ignored.
    ``vocabulary``: how genre names reach the feature slots (default: the slot names)."""
    vocabulary = vocabulary or DEFAULT_VOCABULARY
    states = build_session_states(events, gap_s, vocabulary)
    ids = sorted(({e.event_id: e for e in events}).values(), key=lambda e: (e.ts, e.event_id))
    sessions, at = [], 0
    for state in states:
        sessions.append(state.session(vocabulary, tuple(e.event_id for e in ids[at:at + state.event_count])))
        at += state.event_count
    return sessions
