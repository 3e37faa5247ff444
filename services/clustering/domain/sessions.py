"""The session builder: events of one (account, device) with no gap longer than the
inactivity window form a session.

Pure and deterministic: sessions are a function of the *set* of events (sorted by
time, then event id), never of the order they arrived in, so replays, retries and
late events give the same sessions. The store calls ``build_sessions`` on the events of
the affected time range of a device and replaces the sessions there.

Lateness: an event older than the device's watermark (newest event time seen) minus
the tolerance is refused by the store — by then its session may have been assigned and
used downstream. Within the tolerance a late event joins (or bridges, or starts) the
session it belongs to and that session's features are recomputed.

A session is *closed* once nothing can extend it: the later of the device watermark and
the wall clock is more than one gap past its last event.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.clustering.domain.events import ViewingEvent
from services.clustering.domain.features import DEFAULT_VOCABULARY, GenreVocabulary, WatchItem, session_features

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


def build_sessions(events: Sequence[ViewingEvent], gap_s: float = DEFAULT_GAP_S,
                   vocabulary: GenreVocabulary | None = None) -> list[Session]:
    """Sessions of events from ONE (account, device); duplicates by event_id ignored.
    ``vocabulary``: how genre names reach the feature slots (default: the slot names)."""
    vocabulary = vocabulary or DEFAULT_VOCABULARY
    if gap_s <= 0:
        raise ValueError("gap_s must be > 0")
    unique = {e.event_id: e for e in events}
    ordered = sorted(unique.values(), key=lambda e: (e.ts, e.event_id))
    if not ordered:
        return []
    if len({(e.account_id, e.device_id) for e in ordered}) != 1:
        raise ValueError("events must all belong to one (account_id, device_id)")
    ts = np.fromiter((e.ts for e in ordered), dtype=np.float64, count=len(ordered))
    starts = split_by_gap(ts, gap_s)
    ends = np.append(starts[1:], len(ordered))
    sessions = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        group = ordered[a:b]
        first = group[0]
        # The device type of the latest event wins: a device is re-typed rarely, and
        # the newest report is the most likely to be right.
        device_type = group[-1].device_type
        items = [WatchItem(e.ts, e.title_id, e.series_id, e.genres, e.duration_s, e.maturity, e.vpn)
                 for e in group]
        hints = Counter(e.profile_hint for e in group if e.profile_hint)
        unknown = Counter(g for e in group for g in set(vocabulary.unknown(e.genres)))
        sessions.append(Session(
            session_id=session_id_for(first.account_id, first.device_id, first.ts),
            account_id=first.account_id,
            device_id=first.device_id,
            device_type=device_type,
            start_ts=first.ts,
            end_ts=group[-1].ts,
            event_ids=tuple(e.event_id for e in group),
            watch_seconds=float(sum(e.duration_s for e in group)),
            features=session_features(first.ts, device_type, items, vocabulary),
            feature_version=vocabulary.feature_version,
            label=min(hints, key=lambda h: (-hints[h], h)) if hints else None,
            unknown_genres=tuple(sorted(unknown.items())),
        ))
    return sessions
