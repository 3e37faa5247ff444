"""The clustering service's repository: events, sessions, devices, household models and
drift events over SQLite or PostgreSQL, with household models cached hot in Redis when
configured.

Events are the source of truth; sessions are rebuilt from them (session builder) and
models from sessions. Every write is one transaction: an ingest either stores its
events *and* the sessions they touch, or nothing.
"""

from __future__ import annotations

import json
import struct
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.clustering.domain.events import ViewingEvent
from services.clustering.domain.sessions import Session, build_sessions
from services.clustering.migrations import MIGRATIONS
from services.common.errors import Conflict, NotFound
from services.common.storage.cache import Cache, MemoryCache
from services.common.storage.sql import Database, Tx, migrate

_EVENT_COLUMNS = ("event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, "
                  "genres, duration_s, maturity, country, vpn, profile_hint")
MODEL_CACHE_TTL_S = 3600.0


@dataclass(frozen=True)
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected_late: int = 0
    sessions_touched: int = 0


@dataclass(frozen=True)
class StoredSession:
    session_id: str
    account_id: str
    device_id: str
    device_type: str
    start_ts: float
    end_ts: float
    event_count: int
    watch_seconds: float
    feature_version: int
    features: np.ndarray
    label: str | None
    person_id: str | None
    closed: bool


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    device_type: str
    last_ts: float
    session_count: int


@dataclass(frozen=True)
class HouseholdView:
    account_id: str
    devices: list[DeviceRow]
    sessions: list[StoredSession]


@dataclass(frozen=True)
class StoredModel:
    version: int
    variant: str
    blob: bytes


@dataclass(frozen=True)
class DriftRow:
    drift_type: str
    severity: float
    statistic: float
    detected_at: float
    refit_triggered: bool


@dataclass
class _DeviceBatch:
    device_type: str = "other"
    events: list[ViewingEvent] = field(default_factory=list)


def _event_row(e: ViewingEvent) -> tuple:
    return (e.event_id, e.account_id, e.device_id, e.device_type, e.ts, e.kind, e.title_id,
            e.series_id, json.dumps(list(e.genres)), e.duration_s, e.maturity, e.country,
            int(e.vpn), e.profile_hint)


def _event_from_row(r: Sequence) -> ViewingEvent:
    return ViewingEvent(event_id=r[0], account_id=r[1], device_id=r[2], device_type=r[3],
                        ts=float(r[4]), kind=r[5], title_id=r[6], series_id=r[7],
                        genres=tuple(json.loads(r[8])), duration_s=float(r[9]), maturity=r[10],
                        country=r[11], vpn=bool(r[12]), profile_hint=r[13])


class ClusteringStore:
    def __init__(self, db: Database, cache: Cache | None = None, *, gap_s: float = 1800.0,
                 lateness_tolerance_s: float = 6 * 3600.0) -> None:
        self.db = db
        self.cache = cache or MemoryCache("clustering")
        self.gap_s = gap_s
        self.tolerance_s = lateness_tolerance_s

    def migrate(self) -> list[int]:
        return migrate(self.db, MIGRATIONS)

    # ---- ingest ---------------------------------------------------------------------

    def ingest(self, events: Iterable[ViewingEvent]) -> IngestResult:
        """Store validated events and rebuild the sessions they touch, atomically."""
        by_device: dict[tuple[str, str], _DeviceBatch] = defaultdict(_DeviceBatch)
        for e in events:
            batch = by_device[(e.account_id, e.device_id)]
            batch.events.append(e)
        accepted = duplicates = late = touched = 0
        with self.db.transaction() as tx:
            for (account, device), batch in sorted(by_device.items()):
                row = tx.query("SELECT last_ts FROM devices WHERE account_id = ? AND device_id = ?",
                               (account, device))
                watermark = float(row[0][0]) if row else float("-inf")
                on_time = [e for e in batch.events if e.ts >= watermark - self.tolerance_s]
                late += len(batch.events) - len(on_time)
                if not on_time:
                    continue
                inserted = tx.executemany(
                    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({', '.join('?' * 14)}) "
                    "ON CONFLICT (event_id) DO NOTHING", [_event_row(e) for e in on_time])
                accepted += inserted
                duplicates += len(on_time) - inserted
                newest = max(on_time, key=lambda e: (e.ts, e.event_id))
                if row:
                    if newest.ts >= watermark:
                        tx.execute("UPDATE devices SET last_ts = ?, device_type = ? "
                                   "WHERE account_id = ? AND device_id = ?",
                                   (newest.ts, newest.device_type, account, device))
                else:
                    tx.execute("INSERT INTO devices (account_id, device_id, device_type, last_ts) "
                               "VALUES (?, ?, ?, ?)", (account, device, newest.device_type, newest.ts))
                if inserted:
                    touched += self._rebuild_sessions(tx, account, device, min(e.ts for e in on_time))
        return IngestResult(accepted, duplicates, late, touched)

    def _rebuild_sessions(self, tx: Tx, account: str, device: str, earliest_new_ts: float) -> int:
        """Replace the sessions that events at or after ``earliest_new_ts`` can affect:
        those ending within one gap before it, and everything after."""
        affected = tx.query(
            "SELECT session_id, start_ts, person_id FROM sessions "
            "WHERE account_id = ? AND device_id = ? AND end_ts >= ?",
            (account, device, earliest_new_ts - self.gap_s))
        since = min([earliest_new_ts, *(float(r[1]) for r in affected)])
        persons = {r[0]: r[2] for r in affected}
        rows = tx.query(f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? AND device_id = ? "
                        "AND ts >= ? ORDER BY ts, event_id", (account, device, since))
        sessions = build_sessions([_event_from_row(r) for r in rows], self.gap_s)
        if affected:
            tx.execute("DELETE FROM sessions WHERE account_id = ? AND device_id = ? AND end_ts >= ?",
                       (account, device, earliest_new_ts - self.gap_s))
        tx.executemany(
            "INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, "
            "event_count, watch_seconds, feature_version, features, label, person_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(s.session_id, s.account_id, s.device_id, s.device_type, s.start_ts, s.end_ts,
              len(s.event_ids), s.watch_seconds, s.feature_version, s.features.astype("<f4").tobytes(),
              s.label, persons.get(s.session_id)) for s in sessions])
        return len(sessions)

    # ---- reads ----------------------------------------------------------------------

    def household(self, account_id: str, max_sessions: int = 500, now: float | None = None) -> HouseholdView:
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            devices = tx.query(
                "SELECT d.device_id, d.device_type, d.last_ts, "
                "(SELECT COUNT(*) FROM sessions s WHERE s.account_id = d.account_id "
                " AND s.device_id = d.device_id) "
                "FROM devices d WHERE d.account_id = ? ORDER BY d.device_id", (account_id,))
            if not devices:
                raise NotFound(f"unknown account {account_id!r}", "account_id")
            rows = tx.query(
                "SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                "watch_seconds, feature_version, features, label, person_id FROM sessions "
                "WHERE account_id = ? ORDER BY start_ts DESC, session_id LIMIT ?",
                (account_id, max_sessions))
        watermarks = {d[0]: float(d[2]) for d in devices}
        return HouseholdView(
            account_id,
            [DeviceRow(d[0], d[1], float(d[2]), int(d[3])) for d in devices],
            [self._session_from_row(r, watermarks.get(r[2], 0.0), now) for r in rows],
        )

    def _session_from_row(self, r: Sequence, watermark: float, now: float) -> StoredSession:
        end = float(r[5])
        return StoredSession(
            session_id=r[0], account_id=r[1], device_id=r[2], device_type=r[3], start_ts=float(r[4]),
            end_ts=end, event_count=int(r[6]), watch_seconds=float(r[7]), feature_version=int(r[8]),
            features=np.frombuffer(bytes(r[9]), dtype="<f4"), label=r[10], person_id=r[11],
            closed=max(watermark, now) - end > self.gap_s)

    def closed_sessions(self, account_id: str, now: float | None = None) -> list[StoredSession]:
        """All closed sessions of an account, oldest first (what models are fitted on)."""
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            marks = dict(tx.query("SELECT device_id, last_ts FROM devices WHERE account_id = ?",
                                  (account_id,)))
            rows = tx.query(
                "SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                "watch_seconds, feature_version, features, label, person_id FROM sessions "
                "WHERE account_id = ? ORDER BY start_ts, session_id", (account_id,))
        sessions = [self._session_from_row(r, float(marks.get(r[2], 0.0)), now) for r in rows]
        return [s for s in sessions if s.closed]

    def session(self, account_id: str, session_id: str) -> StoredSession:
        with self.db.transaction() as tx:
            rows = tx.query(
                "SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                "watch_seconds, feature_version, features, label, person_id FROM sessions "
                "WHERE account_id = ? AND session_id = ?", (account_id, session_id))
            if not rows:
                raise NotFound(f"unknown session {session_id!r} for this account", "session_id")
            mark = tx.query("SELECT last_ts FROM devices WHERE account_id = ? AND device_id = ?",
                            (account_id, rows[0][2]))
        return self._session_from_row(rows[0], float(mark[0][0]) if mark else 0.0, time.time())

    def set_persons(self, account_id: str, persons: dict[str, str]) -> None:
        with self.db.transaction() as tx:
            tx.executemany("UPDATE sessions SET person_id = ? WHERE account_id = ? AND session_id = ?",
                           [(p, account_id, s) for s, p in persons.items()])

    # ---- household models (compare-and-swap, cached) -------------------------------

    def get_model(self, account_id: str) -> StoredModel | None:
        cached = self.cache.get(f"model:{account_id}")
        if cached is not None:
            version, vlen = struct.unpack_from("<qH", cached)
            return StoredModel(version, cached[10:10 + vlen].decode(), cached[10 + vlen:])
        with self.db.transaction() as tx:
            rows = tx.query("SELECT version, variant, model FROM household_models WHERE account_id = ?",
                            (account_id,))
        if not rows:
            return None
        model = StoredModel(int(rows[0][0]), rows[0][1], bytes(rows[0][2]))
        self._cache_model(account_id, model)
        return model

    def save_model(self, account_id: str, expected_version: int, variant: str, blob: bytes) -> int:
        """Store a new model version if the stored one is still ``expected_version``
        (0 = none yet); else raise Conflict so the caller re-reads and retries. This is
        what keeps two replicas from losing each other's update."""
        new_version = expected_version + 1
        with self.db.transaction() as tx:
            if expected_version == 0:
                changed = tx.execute(
                    "INSERT INTO household_models (account_id, version, variant, model, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id) DO NOTHING",
                    (account_id, new_version, variant, blob, time.time()))
            else:
                changed = tx.execute(
                    "UPDATE household_models SET version = ?, variant = ?, model = ?, updated_at = ? "
                    "WHERE account_id = ? AND version = ?",
                    (new_version, variant, blob, time.time(), account_id, expected_version))
        if changed != 1:
            self.cache.delete(f"model:{account_id}")
            raise Conflict(f"household model of {account_id!r} changed since version {expected_version}",
                           "model_version")
        self._cache_model(account_id, StoredModel(new_version, variant, blob))
        return new_version

    def _cache_model(self, account_id: str, model: StoredModel) -> None:
        variant = model.variant.encode()
        self.cache.set(f"model:{account_id}",
                       struct.pack("<qH", model.version, len(variant)) + variant + model.blob,
                       MODEL_CACHE_TTL_S)

    # ---- drift ---------------------------------------------------------------------

    def add_drift_event(self, account_id: str, drift: DriftRow) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO drift_events (account_id, drift_type, severity, statistic, "
                       "detected_at, refit_triggered) VALUES (?, ?, ?, ?, ?, ?)",
                       (account_id, drift.drift_type, drift.severity, drift.statistic,
                        drift.detected_at, int(drift.refit_triggered)))

    def drift_events(self, account_id: str, limit: int = 100) -> list[DriftRow]:
        with self.db.transaction() as tx:
            rows = tx.query("SELECT drift_type, severity, statistic, detected_at, refit_triggered "
                            "FROM drift_events WHERE account_id = ? ORDER BY detected_at DESC, id DESC "
                            "LIMIT ?", (account_id, limit))
        return [DriftRow(r[0], float(r[1]), float(r[2]), float(r[3]), bool(r[4])) for r in rows]


def sessions_matrix(sessions: Sequence[StoredSession]) -> np.ndarray:
    if not sessions:
        return np.zeros((0, 0), dtype=np.float32)
    return np.vstack([s.features for s in sessions])
