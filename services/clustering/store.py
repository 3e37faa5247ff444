"""The clustering service's repository: events, sessions, devices, household models and
drift events over SQLite or PostgreSQL, with household models cached hot in Redis when
configured.

Events are the source of truth; sessions are built from them (session builder: a batch
that appends to a device's newest session extends its kept running state, anything else
rebuilds the sessions it touches from their stored events — the same rows either way)
and models from sessions. Every write is one transaction: an ingest either stores its
events *and* the sessions they touch, or nothing. A household the store holds nothing of
has its rows built and sealed before that transaction opens (the transaction checks it is
still new and writes them), so that a batch of thousands of new households holds the write
lock (SQLite: every other write waits) only to write them.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import logging
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from prometheus_client import Counter

from services.clustering.domain.events import ViewingEvent
from services.clustering.domain.features import DEFAULT_VOCABULARY, GenreVocabulary
from services.clustering.domain.sessions import Session, SessionState, build_session_states, extend_sessions, sessions_of
from services.clustering.migrations import MIGRATIONS
from services.clustering.prediction_log import await_forwards, erase_pending, excluding_forwards, forget_cached_heads
from services.common.aging_map import AgingMap
from services.common.client import check_serving_deadline
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.erasure_fences import Fence, covered, read_fences, write_fences
from services.common.errors import Conflict, HearthError, InvalidArgument, NotFound
from services.common.ids import MAX_FUTURE_SKEW_S
from services.common.field_crypto import (FieldCipher, FieldDecryptionError, HouseholdSealer,
                                         drop_keys_of_erased_households, forget_household_rekeys,
                                         household_key_state, note_household_erased, note_household_rekeyed,
                                         warm_household_keys)
from services.common.feedback_to_clustering import UNPROMPTED_LABEL_SUFFIX
from services.common.storage.cache import Cache, MemoryCache, purge_persistence
from services.common.export_stream import materialised
from services.common.rekey_pages import reseal_in_pages
from services.common.storage.sql import EXPORT_PAGE_ROWS, Database, Tx, keyset_rows, migrate, record_erasure
from services.common.telemetry import pseudonym

log = logging.getLogger("hearth.clustering.store")
# Kept session states that did not open or parse; each batch met one took the full
# rebuild (ClusteringStore._kept_state). ``offset_unknown``: a state written before
# session 24 (no offset key) of a device whose stored events carry UTC offsets, rebuilt
# from its first such event on (ClusteringStore._update_sessions).
STATE_FALLBACKS = Counter("hearth_session_state_fallbacks_total",
                          "Kept session states unreadable, replaced by the full rebuild", ["reason"])
for _reason in ("undecryptable", "unparseable", "offset_unknown"):
    STATE_FALLBACKS.labels(_reason)

_EVENT_COLUMNS = ("event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, "
                  "genres, duration_s, maturity, country, vpn, profile_hint, utc_offset_minutes")
MODEL_CACHE_TTL_S = 3600.0
# How long a process serves a household model version it holds, without asking the
# database, while the cache says that version is current (ClusteringStore.get_model): the
# bound on a replayed genuine entry of that version (docs/security.md, session 29).
MODEL_CONFIRM_S = 60.0
MODEL_CONFIRMED_MAX = 100_000   # households whose confirmed version a process keeps (the oldest dropped past it)
# The erasure fence (HEARTH_ERASURE_FENCE_S, default 3 s; ClusteringStore.watch_erasure_fence,
# session 30): every Erase moves a counter in the database once its deletion and unlearning
# refit are committed, and waits the fence's time before it answers. A replica that watches
# the fence reads it every quarter of that, and trusts its confirmed versions (above) only
# while its last read of the fence began less than that time ago; when the fence moved it
# forgets them all. So once an Erase has answered, every watching replica has either seen it
# (and asks the database before it serves a version it held) or stopped trusting what it
# held: none answers with a model the erasure replaced or removed (before: for up to
# MODEL_CONFIRM_S after its last confirmation, from a genuine Redis entry of that version).
# A household this process has seen stored rows of is not looked up again as a possible new
# one for this long (``ClusteringStore._prepare_new_households``): review29 measured the
# lookup on every ingest, +9 % (SQLite) / +18 % (PostgreSQL) client CPU for a batch of known
# households. A stale note is harmless either way: a household noted as known takes the
# per-device path, which is always right, only slower for a big new batch.
KNOWN_HOUSEHOLD_S = 600.0
KNOWN_HOUSEHOLDS_MAX = 100_000
# A batch of at least this many devices of known households has their extended sessions
# computed before the write transaction (``ClusteringStore._prepare_known_devices``): one
# read more outside it, so that the transaction holds the write lock only to re-read and
# write. A smaller batch's work inside is a few milliseconds; it is not read twice.
PREPARE_KNOWN_DEVICES_FROM = 64
# Set in the cache while a rewrite of Redis's files that a Rekey started has not been seen
# to finish (``ClusteringStore.rekey``): every Rekey rewrites them again until one does.
_PERSISTENCE_PURGE_OWED = "purge-owed:persistence"
# Every table an erasure deletes from (purged physically after it: Database.purge_erased;
# kept out of PostgreSQL's planner statistics: migrate(personal_tables=...)).
_ERASED_TABLES = ("events", "sessions", "devices", "household_models", "drift_events",
                  "prediction_outbox", "prediction_chunks", "session_labels", "erased_events",
                  "erasure_fences",  # session 31: account ids and device digests
                  "refits_owed",   # its rows hold the account id too (review23)
                  "household_key_epochs")


@dataclass(frozen=True)
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected_late: int = 0
    sessions_touched: int = 0
    rejected_expired: int = 0


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
    # Paging (newest first): where the next page starts, or None after the last page.
    next_cursor: tuple[float, str] | None = None
    total_sessions: int = 0
    # person probability per session id of this page (0 until assigned)
    person_probability: dict[str, float] = field(default_factory=dict)
    # every device of the household (``devices`` holds only those of this page's sessions)
    total_devices: int = 0


class _StaleCachedModel(Exception):
    """A cached model older than the version the process holds."""


def _cache_field(version: int, variant: str) -> str:
    """The sealed field name of a cached model: its version and variant bound into the
    seal's associated data with the account (field_aad), so the entry opens only as the
    version and variant its header says (a cached copy cannot be written back under a
    higher version). The database's copy is sealed as "model": its version is the row's."""
    return json.dumps(["model-cache", version, variant], separators=(",", ":"))


def _query_in(tx: Tx, sql: str, account: str, values: Sequence) -> list:
    """The rows of ``sql`` (``... account_id = ? AND <column> IN ({})``) for every one of
    ``values``, asked 500 at a time: one statement for all would pass SQLite's limit on
    bound parameters with a large batch."""
    return _query_chunks(tx, sql, values, (account,))


def _query_chunks(tx: Tx, sql: str, values: Sequence, before: tuple = ()) -> list:
    """The rows of ``sql`` (``... IN ({})``, after the parameters ``before``) for every one
    of ``values``, asked 500 at a time (``_query_in``)."""
    rows: list = []
    for start in range(0, len(values), 500):
        chunk = values[start:start + 500]
        rows += tx.query(sql.format(", ".join("?" * len(chunk))), (*before, *chunk))
    return rows


def _query_values(tx: Tx, table: str, sql: str, values: Sequence[tuple]) -> list:
    """The rows of ``sql`` over a table of ``values`` (tuples of one width) named as
    ``table`` says (``v(a, i)``: a common table expression, SQLite's and PostgreSQL's
    ``WITH v(a, i) AS (VALUES ...)``), 500 tuples a statement: what a batch asks of many
    households' rows in one statement (an account and an event id, say) where ``IN``
    lists would pair every account with every id."""
    rows: list = []
    for start in range(0, len(values), 500):
        chunk = values[start:start + 500]
        marks = ", ".join(["(" + ", ".join("?" * len(chunk[0])) + ")"] * len(chunk))
        rows += tx.query(f"WITH {table} AS (VALUES {marks}) {sql}", tuple(x for value in chunk for x in value))
    return rows


def _first_unheld(events: list[ViewingEvent], held: Iterable[str]) -> list[ViewingEvent]:
    """``events`` without those whose id is in ``held`` and without an id's repeats (its
    first occurrence kept): ``ClusteringStore._new_events``' rule, shared by the set-wise
    reads that find ``held`` for many households at once."""
    seen, kept = set(held), []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            kept.append(e)
    return kept


def _held_ids(tx: Tx, events_of: dict[tuple[str, str], list[ViewingEvent]]) -> dict[str, set[str]]:
    """Household -> the ids among its devices' ``events_of`` it already stores: one
    statement per 500 (household, id) pairs (erased ones are not looked for here: their
    digests need each household's key, ``ClusteringStore._erased_ids``)."""
    held: dict[str, set[str]] = defaultdict(set)
    for account, event_id in _query_values(
            tx, "v(a, i)", "SELECT v.a, v.i FROM v JOIN events e ON e.account_id = v.a AND e.event_id = v.i",
            sorted({(key[0], e.event_id) for key, events in events_of.items() for e in events})):
        held[account].add(event_id)
    return held


def _insert_prepared_events(tx: Tx, rows: list[tuple], whose: str) -> None:
    """The events' rows prepared before the transaction, in one statement. Every one is new:
    the households are locked and their ids were read inside this transaction; were one
    stored meanwhile all the same, nothing of the batch is kept (Conflict) and a retry is
    safe."""
    if tx.executemany(f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
                      "ON CONFLICT (account_id, event_id) DO NOTHING", rows) != len(rows):
        raise Conflict(f"events of {whose} were written meanwhile; nothing of this batch was stored, retry it",
                       "events")


@dataclass(frozen=True)
class ClosedTail:
    """The household's closed sessions from position ``start`` on (``closed_sessions()
    [start:]``), with what tells whether the first ``start`` are the ones a model
    included: how many are closed, the first one's id and the id at position
    ``start - 1`` ("" when there is none)."""

    count: int
    first_id: str
    before_id: str
    sessions: list[StoredSession]
    # session id -> (person_id, person_probs) as stored: what set_persons last wrote
    recorded: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def recorded_as(self, session_id: str, person: str, probabilities: dict[str, float]) -> bool:
        """Whether the tail's session already holds this person and these probabilities
        (set_persons would write the same)."""
        return self.recorded.get(session_id) == (person, _encode_probabilities(probabilities))


@dataclass(frozen=True)
class StoredModel:
    version: int
    variant: str
    blob: bytes


class RefreshReads:
    """What a model refresh reads, all in the one transaction ``ClusteringStore.refresh_reads``
    opened (one snapshot of the database): the store's own reads, given that transaction."""

    def __init__(self, store: "ClusteringStore") -> None:
        self._store = store
        self.tx: Tx | None = None
        self.after: list[Callable[[], None]] = []   # run once the transaction has ended

    def feature_schema_stale(self, account_id: str) -> bool:
        return self._store.feature_schema_stale(account_id, self.tx)

    def model(self, account_id: str, decoded_version: int = 0) -> "StoredModel | None":
        return self._store._get_model(account_id, decoded_version, self.tx, self.after)

    def closed_tail(self, account_id: str, start: int) -> ClosedTail:
        return self._store.closed_tail(account_id, start, tx=self.tx)

    def labels(self, account_id: str) -> dict[str, str]:
        return self._store.labels(account_id, self.tx)

    def volunteered_label_sessions(self, account_id: str) -> set[str]:
        return self._store.volunteered_label_sessions(account_id, self.tx)


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


@dataclass
class _PreparedHousehold:
    """A new household's rows, built and sealed before the write transaction opens
    (``ClusteringStore._prepare_new_households``): what the transaction writes as they
    are if the household is still new there and its newest key is still ``key_version``."""
    sealer: HouseholdSealer | None   # the household's key the rows are sealed with (None: no cipher)
    events: list[tuple] = field(default_factory=list)
    devices: list[tuple] = field(default_factory=list)
    sessions: list[tuple] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    touched: int = 0

    @property
    def key_version(self) -> int | None:
        return self.sealer.version if self.sealer is not None else None


# The tables a household's rows are in; a household none of them holds a row of is "new"
# (``ClusteringStore._new_households``): its sessions follow from the batch alone.
_HOUSEHOLD_TABLES = ("devices", "events", "sessions", "erased_events", "erasure_fences")
# What a fence keeps of a device is the keyed digest of this prefix and its id (the prefix
# keeps a device's digest apart from an event's of the same text in ``erased_events``).
_FENCED_DEVICE = "device\x00"
# ``ClusteringStore._quiet_state``'s answer for a kept state that does not open.
_UNOPENED = object()
# A device's newest session row, whose kept state an ingest extends (_update_sessions).
_NEWEST_SESSION = ("SELECT session_id, start_ts, end_ts, feature_version, state FROM sessions "
                   "WHERE account_id = ? AND device_id = ? ORDER BY end_ts DESC LIMIT 1")


@dataclass
class _PreparedDevice:
    """A known device's writes for a batch (``ClusteringStore._prepare_known_devices``),
    computed before the write transaction from what one read found there: its watermark
    row, the batch's events it does not hold yet (``fresh``, in the order the transaction
    takes them) and its newest session row, whose kept state these events extend. The
    transaction writes them as they are only if it reads the same three and the household's
    newest key is still ``key_version``; else the device takes the per-device path."""
    key_version: int | None
    watermark: list                  # the devices row's query result as read ([] = no row)
    fresh: list[str]                 # the ids of the events to store, in order
    newest: list                     # the newest session's query result as read
    events: list[tuple]              # the fresh events' rows, sealed
    extension: "_Extension | None"   # its newest session extended; or
    rebuild: "_Rebuild | None" = None   # its events late: the full rebuild's rows (ingest31)


@dataclass
class _Rebuild:
    """The full rebuild's rows for a device whose batch comes late (``_rebuild_sessions``
    from ``earliest``), made before the write transaction from what a read found there:
    the sessions it replaces (``affected``, the query's result as read) and the stored
    events from ``since`` on, with the batch's fresh ones (``ids``). The transaction writes
    them only if it reads the same two (and the device's three, ``_PreparedDevice``)."""
    earliest: float
    affected: list
    since: float
    ids: frozenset[str]
    rows: list[tuple]
    touched: int


# A device's newest session row extended by a batch's events (_Extension.extended): the full
# rebuild deletes and re-inserts it with the same values, its person kept, its person
# probabilities dropped. Matched by its end as read: a row changed since is not overwritten.
_EXTEND_SESSION = ("UPDATE sessions SET device_type = ?, end_ts = ?, event_count = ?, watch_seconds = ?, "
                   "feature_version = ?, features = ?, label = ?, unknown_genres = ?, person_probs = NULL, "
                   "state = ? WHERE session_id = ? AND end_ts = ?")


# The full rebuild's two writes before it inserts its rows (_replace_sessions): the sessions
# it replaces, and the state an older session kept (the newest's until these events).
_DELETE_REPLACED = "DELETE FROM sessions WHERE account_id = ? AND device_id = ? AND end_ts >= ?"
_CLEAR_OLDER_STATES = ("UPDATE sessions SET state = NULL WHERE account_id = ? AND device_id = ? "
                       "AND state IS NOT NULL")


def _extended_row(extension: "_Extension") -> tuple:
    """``_EXTEND_SESSION``'s parameters for ``extension`` (its first row the extended session)."""
    (_, _, _, device_type, _, end_ts, count, watch, version, features, label, _, unknown, state) = extension.rows[0]
    return (device_type, end_ts, count, watch, version, features, label, unknown, state,
            extension.session_id, extension.last_end)


def _extended_read_back(extension: "_Extension") -> tuple:
    """What the extended session's row reads after ``_EXTEND_SESSION`` found it: end, count, state."""
    row = extension.rows[0]
    return (float(row[5]), int(row[6]), row[13])


@dataclass
class _Extension:
    """What the events of a batch make of a device's kept newest session state: its rows
    (sealed), whether the newest session is extended (its row updated: ``rows[0]``) or left
    (its state cleared) and how many sessions that touches."""
    session_id: str
    last_end: float
    extended: bool
    rows: list[tuple]
    touched: int


def _event_row(e: ViewingEvent) -> tuple:
    # The UTC offset is kept as text (migration 11), so that it is sealed like country.
    return (e.event_id, e.account_id, e.device_id, e.device_type, e.ts, e.kind, e.title_id,
            e.series_id, json.dumps(list(e.genres)), e.duration_s, e.maturity, e.country,
            int(e.vpn), e.profile_hint, None if e.utc_offset_minutes is None else str(e.utc_offset_minutes))


def _event_from_row(r: Sequence) -> ViewingEvent:
    """An event from its row: ``_EVENT_COLUMNS``' values (a row of the first 14, without
    the UTC offset, reads as an event without one)."""
    offset = r[14] if len(r) > 14 else None
    return ViewingEvent(event_id=r[0], account_id=r[1], device_id=r[2], device_type=r[3],
                        ts=float(r[4]), kind=r[5], title_id=r[6], series_id=r[7],
                        genres=tuple(json.loads(r[8])), duration_s=float(r[9]), maturity=r[10],
                        country=r[11], vpn=bool(r[12]), profile_hint=r[13],
                        utc_offset_minutes=None if offset is None else int(offset))


# person -> probability maps the service built itself: sorted keys, no cycle check.
_encode_probabilities = json.JSONEncoder(sort_keys=True, check_circular=False).encode
_SET_PERSON = "UPDATE sessions SET person_id = ?, person_probs = ? WHERE account_id = ? AND session_id = ?"

# A refresh's answers (ClusteringStore.set_persons' arguments after the account): session id
# -> person, session id -> the probability of every person, and what a read found each
# session holding (ClosedTail.recorded; None: write every one).
Answers = tuple[dict[str, str], "dict[str, dict[str, float]] | None",
                "dict[str, tuple[str | None, str | None]] | None"]


def _person_rows(account_id: str, persons: dict[str, str], probabilities: dict[str, dict[str, float]] | None,
                 unless_recorded: dict[str, tuple[str | None, str | None]] | None) -> list[tuple]:
    """``_SET_PERSON``'s rows of ``set_persons``' arguments: a session found holding this
    person and these probabilities (``unless_recorded``) is not written again."""
    probabilities = probabilities or {}
    rows = []
    for s, p in persons.items():
        probs = probabilities.get(s)
        encoded = _encode_probabilities(probs) if probs is not None else None
        if unless_recorded is not None and unless_recorded.get(s) == (p, encoded):
            continue
        rows.append((p, encoded, account_id, s))
    return rows


# The least margin a window erasure allows between its end and the earliest session start
# of an outbox chunk it does not read (``erase``; prediction_log.erase_pending).
SKIP_MARGIN_FLOOR_S = 7 * 86400.0


def _recorded_rule(scope: ErasureScope) -> Callable[[Any], bool]:
    """The predictions (feedback_pb2.Prediction) a device, person or window erasure takes by
    what they record, the rules feedback's own erasure applies: device, those made on it
    (or on a device not recorded); person, those that predicted the person; window, those
    about a session the window overlaps (end >= its start, start < its end) and, without
    session times, those made within it."""
    lo = scope.start if scope.start is not None else float("-inf")
    hi = scope.end if scope.end is not None else float("inf")

    def seconds(ts) -> float:
        return ts.seconds + ts.nanos / 1e9

    def about(p) -> bool:
        if not (scope.all_accounts or p.account_id == scope.account_id):
            return False
        if scope.kind == "device":
            return p.device_id in (scope.device_id, "")
        if scope.kind == "person":
            return p.person_id == scope.person_id
        if p.HasField("session_end") and p.HasField("session_start"):
            return seconds(p.session_end) >= lo and seconds(p.session_start) < hi
        return lo <= seconds(p.ts) < hi
    return about


class ClusteringStore:
    def __init__(self, db: Database, cache: Cache | None = None, *, gap_s: float = 1800.0,
                 lateness_tolerance_s: float = 6 * 3600.0, cipher: FieldCipher | None = None,
                 vocabulary: GenreVocabulary | None = None, retention_s: float | None = None,
                 max_devices_per_household: int | None = None) -> None:
        self.db = db
        # A batch that would give a household more distinct devices than this is refused
        # whole (HEARTH_MAX_DEVICES_PER_HOUSEHOLD); None = no bound (unit tests).
        self.max_devices = max_devices_per_household
        # Events older than now - retention_s are refused at ingest (rejected_expired):
        # privacy's retention purge would erase them at its next check (docs/privacy.md
        # §7). None: no refusal (retention purge off).
        self.retention_s = retention_s
        self.vocabulary = vocabulary or DEFAULT_VOCABULARY
        self.cache = cache or MemoryCache("clustering")
        self.gap_s = gap_s
        self.tolerance_s = lateness_tolerance_s
        # Encryption at rest (docs/privacy.md §3) of the sensitive event fields (title_id,
        # series_id, genres, country, profile_hint, utc_offset_minutes) and of session feature vectors and
        # labels, under the household's data key; None = plaintext (unit tests).
        self.cipher = cipher
        # account -> the model version the database said is stored, for MODEL_CONFIRM_S after
        # it said so (get_model); dropped with an erased household.
        self._confirmed_versions: AgingMap[str, int] = AgingMap(MODEL_CONFIRM_S, MODEL_CONFIRMED_MAX)
        # Accounts this process saw hold stored rows, for KNOWN_HOUSEHOLD_S (ingest does not
        # look them up as possibly new); dropped with an erasure here.
        self._known_households: AgingMap[str, None] = AgingMap(KNOWN_HOUSEHOLD_S, KNOWN_HOUSEHOLDS_MAX)
        # The erasure fence as this process last read it (None: never, or not watching), when
        # that read began (time.monotonic()), and the generation of its confirmed versions: a
        # move of the fence forgets them and starts a new generation, and a read of the
        # database that began in an older one notes nothing (it may predate the erasure).
        # The lock makes "check the generation, note" and "new generation, forget" atomic.
        self._fence_s: float | None = None
        self._fence_epoch: int | None = None
        self._fence_read_at = float("-inf")
        self._fence_generation = 0
        self._fence_lock = threading.Lock()

    # ---- encryption at rest (no-ops without a cipher) ------------------------------

    def _seal(self, account: str, field: str, data: bytes) -> bytes:
        return self.cipher.encrypt(account, field, data) if self.cipher else data

    def _seal_text(self, account: str, field: str, text: str | None) -> str | None:
        return self.cipher.encrypt_text(account, field, text) if self.cipher else text

    def _open_blob(self, account: str, field: str, stored) -> bytes:
        return self.cipher.decrypt(account, field, bytes(stored)) if self.cipher else bytes(stored)

    def _open_vector(self, account: str, field: str, stored) -> bytes:
        return self.cipher.decrypt_vector(account, field, stored) if self.cipher else bytes(stored)

    def _open_model(self, account: str, stored) -> bytes:
        """A sealed model blob starts with the cipher's format byte (0x01); a model
        written before encryption was enabled is a zip archive ("PK")."""
        stored = bytes(stored)
        if self.cipher is None or stored[:2] == b"PK":
            return stored
        return self.cipher.decrypt(account, "model", stored)

    def _open_text(self, account: str, field: str, stored: str | None) -> str | None:
        return self.cipher.decrypt_text(account, field, stored) if self.cipher else stored

    def _event_row(self, e: ViewingEvent, sealer: HouseholdSealer | None = None) -> tuple:
        """The stored row of ``e``, its sensitive fields sealed (with ``sealer``, the
        household's key taken once, when given)."""
        row = _event_row(e)
        if self.cipher is None:
            return row
        seal = sealer.encrypt_text if sealer is not None else partial(self._seal_text, e.account_id)
        return (*row[:6], seal("title_id", row[6]), seal("series_id", row[7]), seal("genres", row[8]),
                row[9], row[10], seal("country", row[11]), row[12], seal("profile_hint", row[13]),
                seal("utc_offset_minutes", row[14]))

    def _event_from_row(self, r: Sequence) -> ViewingEvent:
        if self.cipher is None:
            return _event_from_row(r)
        a, open_ = r[1], self._open_text
        return _event_from_row((*r[:6], open_(a, "title_id", r[6]), open_(a, "series_id", r[7]),
                                open_(a, "genres", r[8]), r[9], r[10], open_(a, "country", r[11]), r[12],
                                open_(a, "profile_hint", r[13]),
                                *((open_(a, "utc_offset_minutes", r[14]),) if len(r) > 14 else ())))

    def migrate(self) -> list[int]:
        return migrate(self.db, MIGRATIONS, personal_tables=_ERASED_TABLES)

    # ---- ingest ---------------------------------------------------------------------

    def ingest(self, events: Iterable[ViewingEvent]) -> IngestResult:
        """Store validated events and rebuild the sessions they touch, atomically."""
        by_device: dict[tuple[str, str], _DeviceBatch] = defaultdict(_DeviceBatch)
        events = list(events)
        first_index: dict[tuple[str, str], int] = {}
        for i, e in enumerate(events):
            first_index.setdefault((e.account_id, e.device_id), i)
        expired = 0
        if self.retention_s is not None:
            # Refused before anything else: an expired event is not stored and moves no
            # watermark (it would be erased by the next retention purge).
            horizon = time.time() - self.retention_s
            kept = [e for e in events if e.ts >= horizon]
            expired, events = len(events) - len(kept), kept
        for e in events:
            batch = by_device[(e.account_id, e.device_id)]
            batch.events.append(e)
        accepted = duplicates = late = touched = 0
        # The households' keys before the write lock is taken (FieldCipher.warm).
        warm_household_keys(self.db, self.cipher, {account for account, _ in by_device})
        # New households' rows built and sealed before the write lock is taken, so that the
        # transaction only writes them (ingest29: 5,000 new households held SQLite's write
        # lock for their feature vectors, session states and seals, and every other write
        # of the service waited).
        prepared = self._prepare_new_households(by_device)
        # And, for a big batch, known devices' extended sessions (ingest30: beside 5,000 known
        # households a small write waited 5.7–8.0 s for this work inside the transaction).
        ready = self._prepare_known_devices(by_device, prepared)
        with self.db.transaction() as tx:
            accounts = sorted({account for account, _ in by_device})
            tx.lock_households(accounts)
            drop_keys_of_erased_households(tx, self.cipher, accounts)
            if self.max_devices is not None:
                self._refuse_devices_past_bound(tx, list(by_device), first_index)
            written = self._write_prepared(tx, prepared)
            for household in written.values():
                accepted += household.accepted
                duplicates += household.duplicates
                touched += household.touched
            fences = read_fences(tx, [a for a in accounts if a not in written])
            taken, counts = self._write_prepared_devices(tx, by_device, ready, set(fences))
            accepted += counts.accepted
            duplicates += counts.duplicates
            late += counts.rejected_late
            touched += counts.sessions_touched
            for (account, device), batch in sorted(by_device.items()):
                if account in written or (account, device) in taken:
                    continue
                # Past the caller's deadline nobody waits for this write: stop, rolled back
                # whole, rather than hold the write lock (SQLite: every other write waits) for
                # the rest of a batch of thousands of households (keys28).
                check_serving_deadline()
                row = tx.query("SELECT last_ts FROM devices WHERE account_id = ? AND device_id = ?",
                               (account, device))
                watermark = float(row[0][0]) if row else float("-inf")
                on_time = [e for e in batch.events if e.ts >= watermark - self.tolerance_s]
                behind = [e for e in batch.events if e.ts < watermark - self.tolerance_s]
                if behind:
                    # An id the household holds (or held: erased) is a duplicate however far
                    # behind: a stored batch sent again is counted as duplicates, as
                    # docs/features.md says and POST /v1/events/status answers (until session
                    # 36 its older events came back as rejected_late, "not stored").
                    unheld = len(self._new_events(tx, account, behind))
                    duplicates += len(behind) - unheld
                    late += unheld
                if account in fences:
                    # What an erasure of this device, person or window fenced off (recorded
                    # before it, arriving after it: a batch in flight during it) is erased
                    # data, refused as a replay of erased events is (a duplicate).
                    unfenced = self._unfenced(account, device, on_time, fences[account])
                    duplicates += len(on_time) - len(unfenced)
                    on_time = unfenced
                if not on_time:
                    continue
                # A duplicate (an id this household already stored, or one repeated in the
                # batch) changes nothing: not stored, and its timestamp moves no watermark.
                # Ids are scoped per household: another household's event with the same id
                # is a different event.
                fresh = self._new_events(tx, account, on_time)
                duplicates += len(on_time) - len(fresh)
                if not fresh:
                    continue
                device_ready = ready.get((account, device))
                if device_ready is not None and not (
                        device_ready.watermark == row and device_ready.fresh == [e.event_id for e in fresh]
                        and (self.cipher is None or self.cipher.cached_newest_version(account) == device_ready.key_version)):
                    device_ready = None   # read otherwise here, or its key changed: the rows are made again
                inserted = tx.executemany(
                    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
                    "ON CONFLICT (account_id, event_id) DO NOTHING",
                    device_ready.events if device_ready is not None else [self._event_row(e) for e in fresh])
                accepted += inserted
                duplicates += len(fresh) - inserted  # a concurrent writer got there first
                on_time = fresh
                newest = max(fresh, key=lambda e: (e.ts, e.event_id))
                if row:
                    if newest.ts >= watermark:
                        tx.execute("UPDATE devices SET last_ts = ?, device_type = ? "
                                   "WHERE account_id = ? AND device_id = ?",
                                   (newest.ts, newest.device_type, account, device))
                else:
                    tx.execute("INSERT INTO devices (account_id, device_id, device_type, last_ts) "
                               "VALUES (?, ?, ?, ?)", (account, device, newest.device_type, newest.ts))
                if inserted:
                    touched += self._update_sessions(tx, account, device, on_time, device_ready)
            # Once more before the commit: a caller whose deadline passed during the writes
            # (new households' are written in one go) has its 504, and is not to be left
            # with a batch stored that it was told nothing of — rolled back whole. What
            # remains is the commit itself; a caller that resends (idempotent event ids)
            # or asks POST /v1/events/status learns which it was.
            check_serving_deadline()
        if accepted:
            self._note_known_households({account for account, _ in by_device})
        return IngestResult(accepted, duplicates, late, touched, rejected_expired=expired)

    def _not_known_households(self, accounts: set[str]) -> list[str]:
        """Those of ``accounts`` this process has not seen hold stored rows within
        KNOWN_HOUSEHOLD_S (sorted): the ones an ingest looks up as possibly new."""
        return self._known_households.missing(sorted(accounts))

    def _note_known_households(self, accounts: set[str]) -> None:
        self._known_households.note_many(accounts)

    def _new_households(self, tx: Tx, accounts: Sequence[str]) -> set[str]:
        """Those of ``accounts`` the store holds no row of (no device, event, session or
        erased event's digest)."""
        known: set[str] = set()
        for start in range(0, len(accounts), 500):
            chunk = tuple(accounts[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            for table in _HOUSEHOLD_TABLES:
                known.update(r[0] for r in tx.query(
                    f"SELECT DISTINCT account_id FROM {table} WHERE account_id IN ({marks})", chunk))
        return {a for a in accounts if a not in known}

    def _prepare_new_households(self, by_device: dict[tuple[str, str], _DeviceBatch]
                                ) -> dict[str, _PreparedHousehold]:
        """The rows ``ingest`` would write for each household of the batch that is new —
        its events sealed, its devices, its sessions built from the batch's events alone
        (as ``_rebuild_sessions`` builds them from the stored ones: the same rows) and
        sealed — computed before the write transaction; it writes them only if the
        household is still new there (``_write_prepared``). Devices in sorted order and
        each device's events in batch order, as the transaction takes them, so that an id
        repeated in the batch is kept where the transaction would keep it."""
        accounts = self._not_known_households({account for account, _ in by_device})
        if not accounts:
            return {}   # the usual batch: households this process has seen rows of, no read
        # Past the caller's deadline nothing has been written yet: stop before reading (on
        # PostgreSQL the read itself would be cancelled by the deadline's statement timeout
        # and answer UNAVAILABLE instead).
        check_serving_deadline()
        with self.db.transaction(readonly=True) as tx:
            new = self._new_households(tx, accounts)
        self._note_known_households(set(accounts) - new)
        prepared: dict[str, _PreparedHousehold] = {}
        seen: dict[str, set[str]] = defaultdict(set)
        devices: list[tuple[_PreparedHousehold, list[SessionState]]] = []
        for (account, device), batch in sorted(by_device.items()):
            if account not in new:
                continue
            # Past the caller's deadline nothing has been written yet: stop here.
            check_serving_deadline()
            household = prepared.get(account)
            if household is None:
                try:
                    sealer = self.cipher.sealer(account) if self.cipher is not None else None
                except HearthError:
                    # No key for it (erased; privacy not answering): the transaction's own
                    # path meets the same and answers as it always did, after the checks
                    # it makes first.
                    new.discard(account)
                    continue
                household = prepared[account] = _PreparedHousehold(sealer)
            ids = seen[account]
            fresh = []
            for e in batch.events:
                if e.event_id not in ids:
                    ids.add(e.event_id)
                    fresh.append(e)
            household.duplicates += len(batch.events) - len(fresh)
            if not fresh:
                continue
            household.accepted += len(fresh)
            household.events += [self._event_row(e, household.sealer) for e in fresh]
            newest = max(fresh, key=lambda e: (e.ts, e.event_id))
            household.devices.append((account, device, newest.device_type, newest.ts))
            # The events as a row read back gives them (what _rebuild_sessions builds from).
            states = build_session_states([_event_from_row(_event_row(e)) for e in fresh], self.gap_s,
                                           self.vocabulary)
            devices.append((household, states))
            household.touched += len(states)
        # Every new household's sessions in one feature computation (sessions_of), then sealed.
        sessions = iter(sessions_of([s for _, states in devices for s in states], self.vocabulary))
        for household, states in devices:
            check_serving_deadline()
            household.sessions += self._session_rows(states, {}, household.sealer,
                                                     [next(sessions) for _ in states])
        return prepared

    def _prepare_known_devices(self, by_device: dict[tuple[str, str], _DeviceBatch],
                               new: dict[str, _PreparedHousehold]) -> dict[tuple[str, str], _PreparedDevice]:
        """For a batch of at least PREPARE_KNOWN_DEVICES_FROM devices of households not in
        ``new``: each device's rows as ``ingest``'s per-device path would write them when
        its events extend the newest session's kept state — the events sealed, the state
        opened, extended, its sessions' features (one computation for the batch) and seals —
        from one read before the write transaction. The transaction reads the device's
        watermark, the batch's ids it does not hold and its newest session row again, as it
        always does, and writes these rows only if all three are as read here and the key
        is the same (``_PreparedDevice``); anything else (a write or erasure meanwhile, a
        state that does not open or is not extended: the full rebuild) is left to it.
        Fewer devices: nothing read twice (the usual small batch's cost unchanged)."""
        devices = [key for key in sorted(by_device) if key[0] not in new]
        if len(devices) < PREPARE_KNOWN_DEVICES_FROM:
            return {}
        check_serving_deadline()
        with self.db.transaction(readonly=True) as tx:
            reads = self._known_device_reads(tx, devices, by_device)
        sealers: dict[str, HouseholdSealer | None] = {}
        plans = []
        late: list[tuple[str, str, list, list[ViewingEvent], list, float]] = []
        for account, device, row, fresh, newest in reads:
            check_serving_deadline()
            ordered = sorted(fresh, key=lambda e: (e.ts, e.event_id))
            try:
                if account not in sealers:
                    sealers[account] = self.cipher.sealer(account) if self.cipher is not None else None
                # The kept state parsed once here (ingest32: a late device's was parsed a
                # second time to tell "does not open" from "not extendable").
                kept = self._quiet_state(account, newest)
                last = self._extendable_state(account, device, newest, ordered, quiet=True, kept=kept)
            except HearthError:
                continue   # as above: the transaction's own path meets it and answers as always
            if last is None and kept is not _UNOPENED:
                late.append((account, device, row, fresh, newest, ordered[0].ts))
            if last is None or not last.offset_known:
                continue   # the full rebuild (prepared below), or a state of before session 24: read there
            plans.append((account, device, row, fresh, newest, *self._extended_states(last, ordered)))
        sessions = iter(sessions_of([s for *_, states in plans for s in states], self.vocabulary))
        out: dict[tuple[str, str], _PreparedDevice] = {}
        for account, device, row, fresh, newest, extended, last_end, states in plans:
            sealer = sealers[account]
            extension = self._extension(newest, extended, last_end, states, sealer, [next(sessions) for _ in states])
            out[(account, device)] = _PreparedDevice(
                sealer.version if sealer is not None else None, row, [e.event_id for e in fresh], newest,
                [self._event_row(e, sealer) for e in fresh], extension)
        if late:
            out.update(self._prepare_rebuilds(late, sealers))
        return out

    def _known_device_reads(self, tx: Tx, devices: list[tuple[str, str]], by_device: dict[tuple[str, str], _DeviceBatch]
                            ) -> list[tuple[str, str, list, list[ViewingEvent], list]]:
        """(account, device, watermark row, fresh events, newest session row) of each of
        ``devices`` (sorted) that the store knows and that has fresh events: the per-device
        path's three reads (``ingest``, ``_new_events``, ``_NEWEST_SESSION``), for all of them
        in one statement a table per 500 (ingest32: four statements a device, ~17 s of a batch
        of 1,000 late devices on PostgreSQL at load 17, before the transaction). A household
        holding erased events' digests too (ingest33: read a device at a time until then,
        five statements a device — 100 such households of 1,000 took the batch's reads from
        0.4 to 4.6 s on PostgreSQL at load 15): the digests of its ids not stored are made
        with its key here and looked for in one statement per 500 (``_erased_ids``); a
        household whose key is not to be had is not prepared. A device whose newest end
        two sessions share is not prepared (which one ``LIMIT 1`` reads is the database's
        choice: the transaction's own path reads it)."""
        accounts = sorted({account for account, _ in devices})
        erased = {r[0] for r in _query_chunks(
            tx, "SELECT DISTINCT account_id FROM erased_events WHERE account_id IN ({})", accounts)}
        marks: dict[tuple[str, str], list] = defaultdict(list)
        for account, device, last_ts in _query_chunks(
                tx, "SELECT account_id, device_id, last_ts FROM devices WHERE account_id IN ({})", accounts):
            marks[(account, device)].append((last_ts,))
        on_time: dict[tuple[str, str], list[ViewingEvent]] = {}
        for key in devices:
            if key in marks:   # else: a device new to it
                watermark = float(marks[key][0][0])
                events = [e for e in by_device[key].events if e.ts >= watermark - self.tolerance_s]
                if events:
                    on_time[key] = events
        held = _held_ids(tx, on_time)
        gone, unkeyed = self._erased_ids(tx, {key: events for key, events in on_time.items() if key[0] in erased},
                                         held)
        fresh = {key: kept for key, events in on_time.items() if key[0] not in unkeyed
                 and (kept := _first_unheld(events, held.get(key[0], set()) | gone.get(key[0], set())))}
        newest: dict[tuple[str, str], list] = defaultdict(list)
        for r in _query_values(
                tx, "v(a, d)", "SELECT v.a, v.d, s.session_id, s.start_ts, s.end_ts, s.feature_version, s.state "
                "FROM v JOIN sessions s ON s.account_id = v.a AND s.device_id = v.d AND s.end_ts = "
                "(SELECT MAX(m.end_ts) FROM sessions m WHERE m.account_id = v.a AND m.device_id = v.d)",
                sorted(fresh)):
            newest[(r[0], r[1])].append(tuple(r[2:]))
        return [(*key, marks[key], fresh[key], newest.get(key, [])) for key in sorted(fresh)
                if len(newest.get(key, [])) <= 1]

    def _erased_ids(self, tx: Tx, events_of: dict[tuple[str, str], list[ViewingEvent]],
                    held: dict[str, set[str]]) -> tuple[dict[str, set[str]], set[str]]:
        """(household -> the ids among its devices' ``events_of`` not in ``held`` that an
        erasure deleted, the households whose key is not to be had): ``_new_events``' erased
        check (``_erased``) for many households, their digests made with each one's key and
        looked for in one statement per 500 (ingest33)."""
        unheld: dict[str, set[str]] = defaultdict(set)
        for (account, _device), events in events_of.items():
            unheld[account].update(e.event_id for e in events if e.event_id not in held.get(account, ()))
        ids_of: dict[tuple[str, bytes], str] = {}
        unkeyed: set[str] = set()
        for account, ids in sorted(unheld.items()):
            check_serving_deadline()
            try:
                digests = self._digests(account, sorted(ids))
            except HearthError:
                unkeyed.add(account)   # its key not to be had (erased, privacy not answering)
                continue
            ids_of.update({(account, digest): event_id for event_id, digest in digests.items()})
        gone: dict[str, set[str]] = defaultdict(set)
        for account, digest in _query_values(
                tx, "v(a, d)", "SELECT v.a, v.d FROM v JOIN erased_events x ON x.account_id = v.a AND x.digest = v.d",
                sorted(ids_of)):
            gone[account].add(ids_of[(account, bytes(digest))])
        return gone, unkeyed

    def _prepare_rebuilds(self, late: list[tuple[str, str, list, list[ViewingEvent], list, float]],
                          sealers: dict[str, HouseholdSealer | None]) -> dict[tuple[str, str], _PreparedDevice]:
        """For devices whose batch comes late (inside or before the newest session, or a
        newest session without a state to extend): the full rebuild's rows
        (``_rebuild_sessions``), read and built before the write transaction — the sessions
        it replaces, the stored events from where they start and the batch's fresh ones,
        their sessions built and sealed (ingest31: a batch of late events did this inside
        the transaction, one device at a time)."""
        check_serving_deadline()
        # _rebuild_reads of every device in one statement a table per 500 (ingest32: two a device).
        replaced: dict[tuple[str, str], list[tuple]] = defaultdict(list)
        stored: dict[tuple[str, str], list[tuple]] = defaultdict(list)
        columns = ", ".join("e." + c.strip() for c in _EVENT_COLUMNS.split(","))
        with self.db.transaction(readonly=True) as tx:
            for r in _query_values(
                    tx, "v(a, d, e)", "SELECT v.a, v.d, s.session_id, s.start_ts, s.person_id "
                    "FROM v JOIN sessions s ON s.account_id = v.a AND s.device_id = v.d AND s.end_ts >= v.e",
                    [(account, device, earliest - self.gap_s) for account, device, *_, earliest in late]):
                replaced[(r[0], r[1])].append(tuple(r[2:]))
            since = {(account, device): min([earliest, *(float(r[1]) for r in replaced[(account, device)])])
                     for account, device, *_, earliest in late}
            for r in _query_values(
                    tx, "v(a, d, s)", f"SELECT v.a, v.d, {columns} FROM v JOIN events e "
                    "ON e.account_id = v.a AND e.device_id = v.d AND e.ts >= v.s ORDER BY v.a, v.d, e.ts, e.event_id",
                    [(*key, start) for key, start in since.items()]):
                stored[(r[0], r[1])].append(tuple(r[2:]))
        reads = [(account, device, row, fresh, newest, earliest, replaced[(account, device)],
                  since[(account, device)], stored[(account, device)])
                 for account, device, row, fresh, newest, earliest in late]
        out: dict[tuple[str, str], _PreparedDevice] = {}
        for account, device, row, fresh, newest, earliest, affected, since, stored in reads:
            check_serving_deadline()
            sealer = sealers[account]
            try:
                events = [self._event_from_row(r) for r in stored]
            except HearthError:
                continue   # the transaction's own path meets it and answers as always
            # The fresh events as a row read back gives them (what the rebuild inside reads).
            events += [_event_from_row(_event_row(e)) for e in fresh]
            states = build_session_states(events, self.gap_s, self.vocabulary)
            rows = self._session_rows(states, {r[0]: r[2] for r in affected}, sealer)
            out[(account, device)] = _PreparedDevice(
                sealer.version if sealer is not None else None, row, [e.event_id for e in fresh], newest,
                [self._event_row(e, sealer) for e in fresh], None,
                _Rebuild(earliest, affected, since, frozenset(e.event_id for e in events), rows, len(states)))
        return out

    def _quiet_state(self, account: str, newest: list) -> "SessionState | None | object":
        """The newest session row's kept state opened, None when it has none to open (none,
        or of another feature version), ``_UNOPENED`` when it does not open — not counted
        nor logged: a rebuild is prepared only for a row whose state opens or is absent, so
        that it counts no fallback the transaction's own path would have counted
        (``_kept_state``)."""
        if not newest or newest[0][4] is None or int(newest[0][3]) != self.vocabulary.feature_version:
            return None
        try:
            return SessionState.from_bytes(self._open_blob(account, "session_state", newest[0][4]))
        except (FieldDecryptionError, NotFound, ValueError):
            return _UNOPENED

    def _write_prepared(self, tx: Tx, prepared: dict[str, _PreparedHousehold]) -> dict[str, _PreparedHousehold]:
        """In ``ingest``'s transaction, the households locked and their keys checked
        (``drop_keys_of_erased_households``): the prepared households still new and whose
        rows are sealed under the key the cipher now holds as their newest, written with
        one statement a table. Any other (a write or an erasure reached it since, or a re-key
        or erasure dropped its key) is left to the per-device path, which reads and seals
        again inside the transaction."""
        if not prepared:
            return {}
        still_new = self._new_households(tx, sorted(prepared))
        usable = {a: h for a, h in prepared.items() if a in still_new and (
            self.cipher is None or self.cipher.cached_newest_version(a) == h.key_version)}
        if not usable:
            return {}
        check_serving_deadline()
        _insert_prepared_events(tx, [row for h in usable.values() for row in h.events], "a new household")
        tx.executemany("INSERT INTO devices (account_id, device_id, device_type, last_ts) VALUES (?, ?, ?, ?)",
                       [row for h in usable.values() for row in h.devices])
        self._insert_sessions(tx, [row for h in usable.values() for row in h.sessions])
        return usable

    def _write_prepared_devices(self, tx: Tx, by_device: dict[tuple[str, str], _DeviceBatch],
                                ready: dict[tuple[str, str], _PreparedDevice], fenced: set[str]
                                ) -> tuple[set[tuple[str, str]], IngestResult]:
        """In ``ingest``'s transaction, the households locked and their keys checked: the
        prepared known devices (``_prepare_known_devices``) whose watermark, stored and
        erased ids among the batch's and newest session row read here are still as read
        before, and whose household's newest key is the one they were sealed with, written
        with one statement a table (ingest31: one device at a time, about eight statements
        each, kept a small write beside 5,000 known households waiting ~1 s). The same
        three reads as the per-device path's, set-wise (one statement a table per 500
        devices), so the rows are the ones it writes. Left to the per-device path (which reads and checks one device at a time, as always): a device
        read otherwise, every device of a household that holds erased events' digests (its
        check needs the household's key; rare) or erasure fences (``fenced``, session 31) or whose batch repeats an event id across
        its devices (the per-device path stores it with the first device in sorted order,
        which this order of writes would not). Returns the devices written and their
        counts."""
        if not ready:
            return set(), IngestResult()
        check_serving_deadline()
        devices_of: dict[str, list[str]] = defaultdict(list)
        for account, device in by_device:
            devices_of[account].append(device)
        shared: set[str] = set()
        for account, devices in devices_of.items():
            if len(devices) > 1:
                owner: dict[str, str] = {}
                for device in devices:
                    for e in by_device[(account, device)].events:
                        if owner.setdefault(e.event_id, device) != device:
                            shared.add(account)
        # A household an erasure fenced (``_erasure_fences``) goes to the per-device path,
        # which checks each device's events against its fences (session 31).
        accounts = sorted({account for account, _ in ready} - shared - fenced)
        erased = {r[0] for r in _query_chunks(
            tx, "SELECT DISTINCT account_id FROM erased_events WHERE account_id IN ({})", accounts)}
        left = shared | fenced | erased
        # A device without a session row (its rebuild prepared all the same) is left too:
        # the newest row's check below reads from the one read before.
        candidates = [key for key in sorted(ready) if ready[key].newest and key[0] not in left and (
            self.cipher is None or self.cipher.cached_newest_version(key[0]) == ready[key].key_version)]
        if not candidates:
            return set(), IngestResult()
        # The watermarks: every device row of these households (a household's devices are
        # bounded: HEARTH_MAX_DEVICES_PER_HOUSEHOLD).
        marks: dict[tuple[str, str], list] = defaultdict(list)
        for account, device, last_ts in _query_chunks(
                tx, "SELECT account_id, device_id, last_ts FROM devices WHERE account_id IN ({})",
                sorted({account for account, _ in candidates})):
            marks[(account, device)].append((last_ts,))
        on_time: dict[tuple[str, str], list[ViewingEvent]] = {}
        for key in candidates:
            if marks.get(key, []) == ready[key].watermark:
                watermark = float(ready[key].watermark[0][0])
                on_time[key] = [e for e in by_device[key].events if e.ts >= watermark - self.tolerance_s]
        # The batch's ids the households already hold (erased ones: none, above).
        held = _held_ids(tx, on_time)
        fresh: dict[tuple[str, str], list[ViewingEvent]] = {}
        for key, events in on_time.items():
            kept = _first_unheld(events, held.get(key[0], ()))
            if [e.event_id for e in kept] == ready[key].fresh:
                fresh[key] = kept
        # The newest session rows: every session of the device ending at or after the one
        # read before; the same newest exactly when that is its one row, unchanged.
        newest: dict[tuple[str, str], list] = defaultdict(list)
        for r in _query_values(
                tx, "v(a, d, e)", "SELECT v.a, v.d, s.session_id, s.start_ts, s.end_ts, s.feature_version, s.state "
                "FROM v JOIN sessions s ON s.account_id = v.a AND s.device_id = v.d AND s.end_ts >= v.e",
                [(*key, ready[key].newest[0][2]) for key in sorted(fresh)]):
            newest[(r[0], r[1])].append(tuple(r[2:]))
        taken = [key for key in sorted(fresh) if newest.get(key) == [tuple(r) for r in ready[key].newest]]
        # The late devices' full rebuilds: also the sessions they replace and the stored events
        # they build from, as read before (ingest32).
        rebuilds = self._rebuilds_as_read(tx, {key: ready[key] for key in taken if ready[key].rebuild is not None})
        taken = [key for key in taken if ready[key].rebuild is None or key in rebuilds]
        if not taken:
            return set(), IngestResult()
        check_serving_deadline()
        events = [row for key in taken for row in ready[key].events]
        _insert_prepared_events(tx, events, "a known household")
        moved = []
        for key in taken:
            last = max(fresh[key], key=lambda e: (e.ts, e.event_id))
            if last.ts >= float(ready[key].watermark[0][0]):
                moved.append((last.ts, last.device_type, *key))
        tx.executemany("UPDATE devices SET last_ts = ?, device_type = ? WHERE account_id = ? AND device_id = ?", moved)
        # The rebuilds' writes as _replace_sessions makes them, a statement a table (executemany:
        # PostgreSQL's pipeline, no round trip a device). Other devices' rows are not touched.
        tx.executemany(_DELETE_REPLACED, [(*key, rebuilds[key].earliest - self.gap_s)
                                          for key in sorted(rebuilds) if rebuilds[key].affected])
        tx.executemany(_CLEAR_OLDER_STATES, sorted(rebuilds))
        self._insert_sessions(tx, [row for key in sorted(rebuilds) for row in rebuilds[key].rows])
        taken_extensions = [key for key in taken if key not in rebuilds]
        extended = [key for key in taken_extensions if ready[key].extension.extended]
        updated = tx.executemany(_EXTEND_SESSION, [_extended_row(ready[key].extension) for key in extended])
        rebuilt: set[tuple[str, str]] = set()
        if updated != len(extended):
            # A row read above is gone or changed since: a writer that takes no household
            # lock (the retention purge, an Erase of every account) deleted or rebuilt it
            # meanwhile (PostgreSQL, read committed). Those devices take the full rebuild,
            # as the per-device path's _write_extension does (review22).
            # Told by the row read back: the update sets its end, count and state, so a row
            # without those is one it missed. Not by the state alone: an extended session
            # that the batch follows with a new one keeps none (NULL), as a deleted row reads
            # (review31: that device was not rebuilt, its events left in no session).
            found = {r[0]: (float(r[1]), int(r[2]), r[3]) for r in _query_chunks(
                tx, "SELECT session_id, end_ts, event_count, state FROM sessions WHERE session_id IN ({})",
                [ready[key].extension.session_id for key in extended])}
            rebuilt = {key for key in extended if found.get(ready[key].extension.session_id)
                       != _extended_read_back(ready[key].extension)}
        tx.executemany("UPDATE sessions SET state = NULL WHERE session_id = ?",
                       [(ready[key].extension.session_id,) for key in taken_extensions
                        if not ready[key].extension.extended])
        self._insert_sessions(tx, [row for key in taken_extensions if key not in rebuilt
                                   for row in ready[key].extension.rows[1 if ready[key].extension.extended else 0:]])
        touched = sum(ready[key].extension.touched for key in taken_extensions if key not in rebuilt)
        touched += sum(rebuild.touched for rebuild in rebuilds.values())
        for account, device in sorted(rebuilt):
            touched += self._rebuild_sessions(tx, account, device, min(e.ts for e in fresh[(account, device)]))
        # Events behind the watermark's tolerance whose id the household holds are
        # duplicates, as in the per-device path (these households hold no erased ids: above).
        timely = {key: {id(e) for e in on_time[key]} for key in taken}
        behind = {key: [e for e in by_device[key].events if id(e) not in timely[key]] for key in taken}
        held_behind = _held_ids(tx, {key: events for key, events in behind.items() if events})
        late = sum(len(_first_unheld(behind[key], held_behind.get(key[0], ()))) for key in taken)
        duplicates = sum(len(by_device[key].events) - len(fresh[key]) for key in taken) - late
        return set(taken), IngestResult(len(events), duplicates, late, touched)

    def _rebuilds_as_read(self, tx: Tx, late: dict[tuple[str, str], _PreparedDevice]
                          ) -> dict[tuple[str, str], _Rebuild]:
        """Of ``late`` (devices whose prepared rows are a full rebuild, their watermark, fresh
        ids and newest session row already found as read before), those whose rebuild reads
        here what ``_prepare_rebuilds`` read — the sessions it replaces (id, start, person)
        and the ids of the stored events it builds from — in one statement each per 500
        devices: the per-device path's check (``_update_sessions``, about twelve round trips
        a device on PostgreSQL: ~10 s at 1,000 late devices, ingest31). Read before this
        batch's events are inserted, so the stored ids are the rebuild's without the
        device's fresh ones (all at or after its ``since``: it is at most their earliest)."""
        if not late:
            return {}
        check_serving_deadline()
        affected: dict[tuple[str, str], list[tuple]] = defaultdict(list)
        for r in _query_values(
                tx, "v(a, d, e)", "SELECT v.a, v.d, s.session_id, s.start_ts, s.person_id "
                "FROM v JOIN sessions s ON s.account_id = v.a AND s.device_id = v.d AND s.end_ts >= v.e",
                [(*key, late[key].rebuild.earliest - self.gap_s) for key in sorted(late)]):
            affected[(r[0], r[1])].append(tuple(r[2:]))
        # Compared as sets (sorted): neither read orders its rows, and the rebuild's rows
        # depend on them only as a set (the persons kept, the earliest start).
        same = [key for key in sorted(late)
                if sorted(affected.get(key, [])) == sorted(tuple(r) for r in late[key].rebuild.affected)]
        stored: dict[tuple[str, str], set[str]] = defaultdict(set)
        for a, d, event_id in _query_values(
                tx, "v(a, d, s)", "SELECT v.a, v.d, e.event_id "
                "FROM v JOIN events e ON e.account_id = v.a AND e.device_id = v.d AND e.ts >= v.s",
                [(*key, late[key].rebuild.since) for key in same]):
            stored[(a, d)].add(event_id)
        return {key: late[key].rebuild for key in same
                if stored.get(key, set()) | set(late[key].fresh) == late[key].rebuild.ids}

    def _refuse_devices_past_bound(self, tx: Tx, devices: list[tuple[str, str]],
                                   first_index: dict[tuple[str, str], int]) -> None:
        """InvalidArgument naming the first event (``events[i].device_id``) whose device
        would take its household past ``max_devices``, before anything is written: the
        batch is one transaction, refused whole. Unbounded, 5,000 devices in one request
        made every read of the household answer all of them (attack25, docs/security.md).
        Called with the households locked, so concurrent batches cannot both squeeze in."""
        by_account: dict[str, list[str]] = defaultdict(list)
        for account, device in devices:
            by_account[account].append(device)
        # Every household's count in one statement per 500 (one a household kept 5,000
        # statements inside the transaction for a batch of 5,000 households: ingest31).
        counts = {r[0]: int(r[1]) for r in _query_chunks(
            tx, "SELECT account_id, COUNT(*) FROM devices WHERE account_id IN ({}) GROUP BY account_id",
            sorted(by_account))}
        for account, batch_devices in sorted(by_account.items()):
            have = counts.get(account, 0)
            if have + len(batch_devices) <= self.max_devices:
                continue  # the common case: no need to tell new devices from known ones
            known = {r[0] for r in _query_in(
                tx, "SELECT device_id FROM devices WHERE account_id = ? AND device_id IN ({})", account, batch_devices)}
            new = sorted((d for d in batch_devices if d not in known), key=lambda d: first_index[(account, d)])
            room = max(self.max_devices - have, 0)
            if len(new) > room:
                index = first_index[(account, new[room])]
                raise InvalidArgument(
                    f"a new device would take household {account!r} past {self.max_devices} devices "
                    f"(it has {have}; HEARTH_MAX_DEVICES_PER_HOUSEHOLD); nothing of this batch was stored",
                    f"events[{index}].device_id")

    def _digests(self, account: str, event_ids: Iterable[str]) -> dict[str, bytes]:
        """Event id -> the digest ``erased_events`` keeps of it (keyed with the household's
        data key; a plain SHA-256 without a cipher, the unit tests')."""
        if self.cipher is not None:
            return self.cipher.digests(account, event_ids)
        return {i: hashlib.sha256(f"{account}\x00{i}".encode("utf-8")).digest() for i in event_ids}

    def _device_digest(self, account: str, device: str) -> bytes:
        return self._digests(account, [_FENCED_DEVICE + device])[_FENCED_DEVICE + device]

    def _unfenced(self, account: str, device: str, events: list[ViewingEvent],
                  fences: list[Fence]) -> list[ViewingEvent]:
        """``events`` (of one device) without those an erasure's fence covers."""
        subjects = {self._device_digest(account, device)} if any(f[0] is not None for f in fences) else set()
        return [e for e in events if not covered(fences, subjects, e.ts)]

    def _fence(self, tx: Tx, account: str, devices: Iterable[str], lo: float | None, hi: float) -> None:
        """Fence off, for later writes, what ``devices`` (None among them: every device) of
        the household recorded from ``lo`` to ``hi``."""
        devices = list(devices)
        digests = self._digests(account, [_FENCED_DEVICE + d for d in devices if d is not None])
        write_fences(tx, account, [None if d is None else digests[_FENCED_DEVICE + d] for d in devices], lo, hi)

    def _erased(self, tx: Tx, account: str, event_ids: list[str]) -> set[str]:
        """The ids among ``event_ids`` of events an erasure of the household deleted."""
        if not tx.query("SELECT 1 FROM erased_events WHERE account_id = ? LIMIT 1", (account,)):
            return set()
        by_digest = {d: i for i, d in self._digests(account, event_ids).items()}
        return {by_digest[bytes(r[0])] for r in _query_in(
            tx, "SELECT digest FROM erased_events WHERE account_id = ? AND digest IN ({})", account, sorted(by_digest))}

    def _new_events(self, tx: Tx, account: str, events: list[ViewingEvent]) -> list[ViewingEvent]:
        """``events`` without those whose id ``account`` already stored, or stored and an
        erasure deleted since (a replay must not bring erased data back), or that repeat
        an earlier id of the batch (the first occurrence wins)."""
        ids = sorted({e.event_id for e in events})
        seen = {r[0] for r in _query_in(
            tx, "SELECT event_id FROM events WHERE account_id = ? AND event_id IN ({})", account, ids)}
        unseen = [i for i in ids if i not in seen]
        if unseen:
            seen.update(self._erased(tx, account, unseen))
        return _first_unheld(events, seen)

    def event_status(self, account: str, event_ids: Sequence[str]) -> tuple[set[str], set[str]]:
        """(ids of ``event_ids`` the household holds, ids it stored and an erasure deleted
        since): what a caller whose ingest got no answer (a 504) asks before resending.
        The same tests as ingest's duplicate check (``_new_events``), in a read transaction:
        it is asked after a 504, which comes of a write holding the database, and a write
        transaction (SQLite: BEGIN IMMEDIATE) queued behind it (review27)."""
        ids = sorted(set(event_ids))
        with self.db.transaction(readonly=True) as tx:
            stored = {r[0] for r in _query_in(
                tx, "SELECT event_id FROM events WHERE account_id = ? AND event_id IN ({})", account, ids)}
            erased = self._erased(tx, account, [i for i in ids if i not in stored])
        return stored, erased

    def _update_sessions(self, tx: Tx, account: str, device: str, fresh: list[ViewingEvent],
                         prepared: _PreparedDevice | None = None) -> int:
        """Bring the device's sessions up to date with ``fresh`` (just stored, ids new).
        When they all sort after the device's newest session's last event (time, then
        event id: a stream's next batch), that session's kept running state is extended
        by them and the sessions they start are added — the cost of the batch, not of the
        session. Anything else (a late event inside or before the newest session, a
        session without a state: written before migration 10, or its state cleared; a
        state kept under another vocabulary or gap) takes the full rebuild. Both give the
        same rows (tests/unit/test_incremental_sessions.py). ``prepared``: the extension
        computed before the transaction (``_prepare_known_devices``), taken when the newest
        session row read here is the one it was computed from."""
        ordered = sorted(fresh, key=lambda e: (e.ts, e.event_id))
        newest = tx.query(_NEWEST_SESSION, (account, device))
        if prepared is not None and newest == prepared.newest:
            if prepared.extension is not None:
                return self._write_extension(tx, account, device, ordered, prepared.extension)
            rebuild = prepared.rebuild
            affected, since, stored = self._rebuild_reads(tx, account, device, rebuild.earliest, ids_only=True)
            if affected == rebuild.affected and since == rebuild.since and {r[0] for r in stored} == rebuild.ids:
                self._replace_sessions(tx, account, device, rebuild.earliest, affected, rebuild.rows)
                return rebuild.touched
        last = self._extendable_state(account, device, newest, ordered)
        if last is None:
            return self._rebuild_sessions(tx, account, device, ordered[0].ts)
        if not last.offset_known:
            # Written before session 24: by a replica older than session 23 in a rolling
            # upgrade, it may have dropped its first event's offset (and built the device's
            # sessions since in UTC). If any stored event up to it carries an offset, the
            # sessions from the first such event on are rebuilt from the stored events;
            # else the state is right (UTC) and extended, and rewritten with the key: once
            # a device (docs/clustering.md "Local time", rolling upgrades).
            (since,), = tx.query("SELECT MIN(ts) FROM events WHERE account_id = ? AND device_id = ? "
                                 "AND ts <= ? AND utc_offset_minutes IS NOT NULL", (account, device, last.end_ts))
            if since is not None:
                STATE_FALLBACKS.labels("offset_unknown").inc()
                return self._rebuild_sessions(tx, account, device, min(float(since), ordered[0].ts))
        return self._write_extension(tx, account, device, ordered,
                                     self._extension(newest, *self._extended_states(last, ordered)))

    def _extendable_state(self, account: str, device: str, newest: list, ordered: list[ViewingEvent],
                          quiet: bool = False, kept: "SessionState | None | object" = None) -> SessionState | None:
        """The newest session's kept state (``newest``: its row) if ``ordered`` can extend
        it: it opens, is of this vocabulary and gap, is that row's, and they all sort after
        its events; else None (the full rebuild). ``quiet``: a state that does not open is
        not counted nor logged (the transaction's own path meets it and does); ``kept``:
        with ``quiet``, the state ``_quiet_state`` already opened from this row."""
        if not newest or newest[0][4] is None or int(newest[0][3]) != self.vocabulary.feature_version:
            return None
        if quiet:
            last = kept if kept is not None else self._quiet_state(account, newest)
            if last is _UNOPENED:
                return None
        else:
            last = self._kept_state(account, newest[0][4])
        if last is not None and not (last.vocabulary == self.vocabulary.signature and last.gap_s == self.gap_s
                and (last.account_id, last.device_id) == (account, device)
                and (last.start_ts, last.end_ts) == (float(newest[0][1]), float(newest[0][2]))
                and last.after(ordered[0])):
            return None
        return last

    def _extended_states(self, last: SessionState, ordered: list[ViewingEvent]
                         ) -> tuple[bool, float, list[SessionState]]:
        """(whether the first event joins the newest session, its end before them, the
        states whose rows are written): ``last`` extended by ``ordered`` (``last`` is
        modified) and the sessions they start; ``last`` itself only when the first event
        joins it (if not, the full rebuild would not touch it: it ends more than a gap
        before every new event)."""
        joins, last_end = not ordered[0].ts - last.end_ts > self.gap_s, last.end_ts
        states = extend_sessions(last, ordered, self.gap_s, self.vocabulary)
        return joins, last_end, states if joins else states[1:]

    def _extension(self, newest: list, extended: bool, last_end: float, states: list[SessionState],
                   sealer: HouseholdSealer | None = None, sessions: list[Session] | None = None) -> _Extension:
        """The rows of ``_extended_states``' answer (``newest``: the newest session's row).
        ``sealer``, ``sessions``: as ``_session_rows`` takes them."""
        rows = self._session_rows(states, {newest[0][0]: None}, sealer, sessions)
        return _Extension(newest[0][0], last_end, extended, rows, len(states))

    def _write_extension(self, tx: Tx, account: str, device: str, ordered: list[ViewingEvent],
                         extension: _Extension) -> int:
        rows = extension.rows
        if extension.extended:
            # The full rebuild deletes and re-inserts it: the same values, its person kept,
            # its person probabilities dropped.
            updated = tx.execute(_EXTEND_SESSION, _extended_row(extension))
            if updated != 1:
                # The row read above is gone or changed: a writer that takes no household
                # lock (the retention purge, an Erase of every account) deleted or rebuilt
                # it meanwhile (PostgreSQL, read committed). The full rebuild reads what it
                # committed; extending the state read before would leave these events in
                # no session (review22).
                return self._rebuild_sessions(tx, account, device, ordered[0].ts)
            rows = rows[1:]
        else:
            tx.execute("UPDATE sessions SET state = NULL WHERE session_id = ?", (extension.session_id,))
        self._insert_sessions(tx, rows)
        return extension.touched

    def _kept_state(self, account: str, stored) -> SessionState | None:
        """The newest session's kept running state, or None when it does not open (altered
        bytes, a data key version the household does not have) or is not a state
        ``to_bytes`` wrote: a cache of the stored events must not block the household's
        ingest, the batch takes the full rebuild, which writes a good state (counted,
        logged). A data key service that does not answer is not a bad state: raised."""
        try:
            return SessionState.from_bytes(self._open_blob(account, "session_state", stored))
        except (FieldDecryptionError, NotFound) as exc:
            reason, error = "undecryptable", exc
        except ValueError as exc:
            reason, error = "unparseable", exc
        STATE_FALLBACKS.labels(reason).inc()
        log.warning("session state of %s %s (%s): the full rebuild from the stored events replaces it",
                    pseudonym(account), reason, str(error).replace(account, pseudonym(account))[:200])
        return None

    def _session_rows(self, states: list[SessionState], persons: dict[str, str | None],
                      sealer: HouseholdSealer | None = None, sessions: list[Session] | None = None) -> list[tuple]:
        """Session rows of ``states`` (a device's, oldest first, the last its newest), the
        newest keeping its sealed running state; ``persons``: person ids kept by session id;
        ``sealer``: the household's key taken once, ``sessions``: the states' sessions
        already built (``_prepare_new_households``)."""
        rows = []
        if sessions is None:
            sessions = sessions_of(states, self.vocabulary)
        for i, (state, s) in enumerate(zip(states, sessions, strict=True)):
            a = s.account_id
            if sealer is not None:
                seal, seal_text = sealer.encrypt, sealer.encrypt_text
            else:
                seal, seal_text = partial(self._seal, a), partial(self._seal_text, a)
            rows.append((s.session_id, a, s.device_id, s.device_type, s.start_ts, s.end_ts, state.event_count,
                         s.watch_seconds, s.feature_version, seal("features", s.features.astype("<f4").tobytes()),
                         seal_text("label", s.label), persons.get(s.session_id),
                         seal_text("unknown_genres", json.dumps(s.unknown_genres)) if s.unknown_genres else None,
                         seal("session_state", state.to_bytes()) if i == len(states) - 1 else None))
        return rows

    @staticmethod
    def _insert_sessions(tx: Tx, rows: list[tuple]) -> None:
        tx.executemany(
            "INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, "
            "event_count, watch_seconds, feature_version, features, label, person_id, unknown_genres, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def _rebuild_sessions(self, tx: Tx, account: str, device: str, earliest_new_ts: float) -> int:
        """Replace the sessions that events at or after ``earliest_new_ts`` can affect:
        those ending within one gap before it, and everything after (the device's newest
        session among them, with its running state)."""
        affected, _, rows = self._rebuild_reads(tx, account, device, earliest_new_ts)
        persons = {r[0]: r[2] for r in affected}
        states = build_session_states([self._event_from_row(r) for r in rows], self.gap_s, self.vocabulary)
        self._replace_sessions(tx, account, device, earliest_new_ts, affected, self._session_rows(states, persons))
        return len(states)

    def _rebuild_reads(self, tx: Tx, account: str, device: str, earliest_new_ts: float,
                       ids_only: bool = False) -> tuple[list, float, list]:
        """What the full rebuild from ``earliest_new_ts`` reads: the sessions it replaces
        (id, start, person), where its events start, and those events' rows (``ids_only``:
        their ids, what a prepared rebuild is checked against)."""
        affected = tx.query(
            "SELECT session_id, start_ts, person_id FROM sessions "
            "WHERE account_id = ? AND device_id = ? AND end_ts >= ?",
            (account, device, earliest_new_ts - self.gap_s))
        since = min([earliest_new_ts, *(float(r[1]) for r in affected)])
        rows = tx.query(f"SELECT {'event_id' if ids_only else _EVENT_COLUMNS} FROM events WHERE account_id = ? "
                        "AND device_id = ? AND ts >= ? ORDER BY ts, event_id", (account, device, since))
        return affected, since, rows

    def _replace_sessions(self, tx: Tx, account: str, device: str, earliest_new_ts: float, affected: list,
                          rows: list[tuple]) -> None:
        """The full rebuild's writes: ``affected`` deleted, ``rows`` in their place."""
        if affected:
            tx.execute(_DELETE_REPLACED, (account, device, earliest_new_ts - self.gap_s))
        # Only the newest session keeps a state: an older one's (its newest until these
        # events started a later one) goes.
        tx.execute(_CLEAR_OLDER_STATES, (account, device))
        self._insert_sessions(tx, rows)

    def upgrade_feature_vectors(self, account_id: str) -> int:
        """Rebuild from the stored events the account's sessions whose vectors were built
        under another feature schema than this store's vocabulary builds (schema 1
        pooled every unknown genre name in ``other``; schema 2 hashes each into a slot).
        Only an unknown name makes the two differ, but sessions stored before unknown
        names were recorded per session cannot tell, so every stale device is rebuilt
        from its oldest stale session on (same events, same session ids: persons are
        kept). Idempotent, so replicas racing or a crash midway do no harm. Under the
        household's lock, as every writer of it: an ingest of the household on another
        replica would otherwise have its sessions replaced by ones built without its
        events, or re-insert the same session ids (a primary-key violation; PostgreSQL,
        tests/integration/test_feature_schema_upgrade.py), and an erasure's deleted
        sessions could come back. Returns how many rebuilt sessions carry an unknown
        name: their vectors changed, and a model fitted on the old ones should be
        refitted."""
        version = self.vocabulary.feature_version
        check = ("SELECT device_id, MIN(start_ts) FROM sessions WHERE account_id = ? AND feature_version <> ? "
                 "GROUP BY device_id")
        if not self.feature_schema_stale(account_id):
            return 0
        changed = 0
        with self.db.transaction() as tx:
            tx.lock_household(account_id)
            drop_keys_of_erased_households(tx, self.cipher, (account_id,))
            for device, since in tx.query(check, (account_id, version)):
                self._rebuild_sessions(tx, account_id, device, float(since))
                changed += int(tx.query("SELECT COUNT(*) FROM sessions WHERE account_id = ? AND device_id = ? "
                                        "AND start_ts >= ? AND unknown_genres IS NOT NULL",
                                        (account_id, device, float(since)))[0][0])
        return changed

    def feature_schema_stale(self, account_id: str, tx: Tx | None = None) -> bool:
        """Whether some session of the account was built under another feature schema
        (``upgrade_feature_vectors`` has work to do). ``tx``: read in that transaction."""
        with self._reading(tx) as tx:
            return bool(tx.query("SELECT 1 FROM sessions WHERE account_id = ? AND feature_version <> ? LIMIT 1",
                                 (account_id, self.vocabulary.feature_version)))

    # ---- reads ----------------------------------------------------------------------

    @contextmanager
    def _reading(self, tx: Tx | None) -> Iterator[Tx]:
        """``tx`` (a caller's transaction: ``refresh_reads``), or a read transaction of its own."""
        if tx is not None:
            yield tx
            return
        with self.db.transaction(readonly=True) as own:
            yield own

    @contextmanager
    def refresh_reads(self) -> Iterator["RefreshReads"]:
        """A model refresh's reads (``ModelKeeper.refresh``) in ONE read transaction that sees
        one snapshot of the database (``Database.transaction(snapshot=True)``: PostgreSQL
        REPEATABLE READ, READ ONLY): the feature schema's check, the model, the closed
        sessions and their labels. Until session 34 each was a transaction of its own —
        four ahead of a new household's save, each a BEGIN/COMMIT and, on PostgreSQL, a
        pool check — and a write committed between two of them gave the refresh a view
        no state of the database held (a prompted label read before a correction, the
        correction's volunteered mark after it). The model cache's fill after a model read
        from the database runs once the transaction has ended (it reads the household's
        erasures again, after the cache write: ``_cache_model``)."""
        reads = RefreshReads(self)
        with self.db.transaction(readonly=True, snapshot=True) as tx:
            reads.tx = tx
            yield reads
        for fill in reads.after:
            fill()

    def unknown_genres(self, account_id: str) -> dict[str, int]:
        """Genre names outside the vocabulary in the household's stored sessions, with
        how many events carry each."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT unknown_genres FROM sessions WHERE account_id = ? "
                            "AND unknown_genres IS NOT NULL", (account_id,))
        counts: dict[str, int] = defaultdict(int)
        for (sealed,) in rows:
            for name, events in json.loads(self._open_text(account_id, "unknown_genres", sealed) or "[]"):
                counts[name] += int(events)
        return dict(sorted(counts.items()))

    def household(self, account_id: str, max_sessions: int = 500, now: float | None = None,
                  cursor: tuple[float, str] | None = None) -> HouseholdView:
        """One page of the household's sessions, newest first (start time, then session
        id). ``cursor`` is the ``next_cursor`` of the previous page: keyset paging, so
        sessions added meanwhile never shift or repeat a page. The devices listed are those
        of the page's sessions (with their whole-household session counts), not every
        device: a household with thousands of devices answered every page, ``limit=1``
        too, with all of them (470 KB for 5,000 devices, attack25, docs/security.md);
        ``total_devices`` counts them all."""
        now = time.time() if now is None else now
        with self.db.transaction(readonly=True) as tx:
            total_devices = tx.query("SELECT COUNT(*) FROM devices WHERE account_id = ?", (account_id,))[0][0]
            if not total_devices:
                raise NotFound(f"unknown account {account_id!r}", "account_id")
            after, params = "", [account_id]
            if cursor is not None:
                after = " AND (start_ts < ? OR (start_ts = ? AND session_id > ?))"
                params += [cursor[0], cursor[0], cursor[1]]
            rows = tx.query(
                "SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                "watch_seconds, feature_version, features, label, person_id, person_probs FROM sessions "
                f"WHERE account_id = ?{after} ORDER BY start_ts DESC, session_id LIMIT ?",
                (*params, max_sessions + 1))
            more = len(rows) > max_sessions
            rows = rows[:max_sessions]
            devices = sorted(_query_in(
                tx, "SELECT d.device_id, d.device_type, d.last_ts, "
                "(SELECT COUNT(*) FROM sessions s WHERE s.account_id = d.account_id AND s.device_id = d.device_id) "
                "FROM devices d WHERE d.account_id = ? AND d.device_id IN ({})", account_id, sorted({r[2] for r in rows})),
                key=lambda d: d[0])
            total = tx.query("SELECT COUNT(*) FROM sessions WHERE account_id = ?", (account_id,))[0][0]
        watermarks = {d[0]: float(d[2]) for d in devices}
        sessions = [self._session_from_row(r, watermarks.get(r[2], 0.0), now) for r in rows]
        probability = {}
        for r in rows:
            probs = json.loads(r[12]) if r[12] else {}
            probability[r[0]] = float(probs.get(r[11], 0.0)) if r[11] else 0.0
        last = sessions[-1] if sessions else None
        return HouseholdView(
            account_id,
            [DeviceRow(d[0], d[1], float(d[2]), int(d[3])) for d in devices],
            sessions,
            (last.start_ts, last.session_id) if more and last is not None else None,
            int(total), probability, total_devices=int(total_devices),
        )

    def _session_from_row(self, r: Sequence, watermark: float, now: float) -> StoredSession:
        end = float(r[5])
        return StoredSession(
            session_id=r[0], account_id=r[1], device_id=r[2], device_type=r[3], start_ts=float(r[4]),
            end_ts=end, event_count=int(r[6]), watch_seconds=float(r[7]), feature_version=int(r[8]),
            features=np.frombuffer(self._open_vector(r[1], "features", r[9]), dtype="<f4"),
            label=self._open_text(r[1], "label", r[10]), person_id=r[11],
            closed=max(watermark, now) - end > self.gap_s)

    def closed_sessions(self, account_id: str, now: float | None = None, tx: Tx | None = None) -> list[StoredSession]:
        """All closed sessions of an account, oldest first (what models are fitted on).
        ``tx``: read in that transaction."""
        now = time.time() if now is None else now
        with self._reading(tx) as tx:
            marks = dict(tx.query("SELECT device_id, last_ts FROM devices WHERE account_id = ?",
                                  (account_id,)))
            rows = tx.query(
                "SELECT session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
                "watch_seconds, feature_version, features, label, person_id FROM sessions "
                "WHERE account_id = ? ORDER BY start_ts, session_id", (account_id,))
        sessions = [self._session_from_row(r, float(marks.get(r[2], 0.0)), now) for r in rows]
        return [s for s in sessions if s.closed]

    # A session is closed one gap after its end by the later of its device's watermark and
    # the clock: closed_sessions' test (``max(watermark, now) - end > gap``, a missing
    # device row a watermark of 0), in SQL over the same doubles.
    _CLOSED = ("FROM sessions s LEFT JOIN devices d ON d.account_id = s.account_id AND d.device_id = s.device_id "
               "WHERE s.account_id = ? AND (CASE WHEN COALESCE(d.last_ts, 0) > ? THEN COALESCE(d.last_ts, 0) "
               "ELSE ? END) - s.end_ts > ? ")

    def closed_tail(self, account_id: str, start: int, now: float | None = None, tx: Tx | None = None) -> ClosedTail:
        """``closed_sessions(account_id)[start:]`` and what a model refresh checks before
        trusting that the first ``start`` did not move (ModelKeeper.refresh), in one read
        transaction; only the tail's vectors are decrypted. Why: a refresh whose model
        already includes the first ``start`` sessions needs nothing else of them, and
        reading and opening every closed session at every ingest batch grew with the
        household's history (docs/clustering.md "The model refresh reads what changed").
        ``tx``: read in that transaction (``refresh_reads``)."""
        now = time.time() if now is None else now
        closed = (account_id, now, now, self.gap_s)
        order = "ORDER BY s.start_ts, s.session_id "
        columns = ("SELECT s.session_id, s.account_id, s.device_id, s.device_type, s.start_ts, s.end_ts, "
                   "s.event_count, s.watch_seconds, s.feature_version, s.features, s.label, s.person_id, "
                   "COALESCE(d.last_ts, 0), s.person_probs ")
        before = ""
        with self._reading(tx) as tx:
            first = tx.query("SELECT s.session_id " + self._CLOSED + order + "LIMIT 1", closed)
            if start == 0:
                rows = tx.query(columns + self._CLOSED + order, closed)
                count = len(rows)
            elif at := tx.query("SELECT s.session_id, s.start_ts " + self._CLOSED + order + "LIMIT 1 OFFSET ?",
                                (*closed, start - 1)):
                # The rest: the closed sessions after the one at start - 1 in the same
                # order (start, then id), read through the start index's range.
                before, since = at[0][0], at[0][1]
                rows = tx.query(columns + self._CLOSED + "AND s.start_ts >= ? AND (s.start_ts > ? OR s.session_id > ?) "
                                + order, (*closed, since, since, before))
                count = start + len(rows)
            else:   # fewer than start closed sessions
                rows = []
                count = int(tx.query("SELECT COUNT(*) " + self._CLOSED, closed)[0][0])
        sessions = [self._session_from_row(r[:12], float(r[12]), now) for r in rows]
        return ClosedTail(count, first[0][0] if first else "", before, sessions, {r[0]: (r[11], r[13]) for r in rows})

    def closed_session_count(self, account_id: str, now: float | None = None,
                             before: StoredSession | None = None) -> int:
        """How many of the account's sessions are closed (a session is closed one
        inactivity gap after its last event, by the later of the device watermark and
        the clock) — without decrypting any vector. ``before``: only those before that
        session in the order models are fitted on (closed_sessions: start time, then
        id), i.e. its position in a model's sessions."""
        now = time.time() if now is None else now
        earlier, args = "", ()
        if before is not None:
            earlier = "AND (s.start_ts < ? OR (s.start_ts = ? AND s.session_id < ?)) "
            args = (before.start_ts, before.start_ts, before.session_id)
        with self.db.transaction() as tx:
            rows = tx.query(
                "SELECT COUNT(*) FROM sessions s JOIN devices d ON d.account_id = s.account_id "
                "AND d.device_id = s.device_id WHERE s.account_id = ? " + earlier +
                "AND (CASE WHEN d.last_ts > ? THEN d.last_ts ELSE ? END) - s.end_ts > ?",
                (account_id, *args, now, now, self.gap_s))
        return int(rows[0][0])

    def session(self, account_id: str, session_id: str) -> StoredSession:
        return self.labelled_session(account_id, session_id)[0]

    def labelled_session(self, account_id: str, session_id: str) -> tuple[StoredSession, str | None]:
        """The session and its feedback label (None = none), in one read transaction:
        what an assignment by session id reads."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query(
                "SELECT s.session_id, s.account_id, s.device_id, s.device_type, s.start_ts, s.end_ts, "
                "s.event_count, s.watch_seconds, s.feature_version, s.features, s.label, s.person_id, "
                "d.last_ts, l.person_id FROM sessions s "
                "LEFT JOIN devices d ON d.account_id = s.account_id AND d.device_id = s.device_id "
                "LEFT JOIN session_labels l ON l.account_id = s.account_id AND l.session_id = s.session_id "
                "WHERE s.account_id = ? AND s.session_id = ?", (account_id, session_id))
        if not rows:
            raise NotFound(f"unknown session {session_id!r} for this account", "session_id")
        row = rows[0]
        mark = row[12]
        return (self._session_from_row(row[:12], float(mark) if mark is not None else 0.0, time.time()),
                row[13])

    def set_persons(self, account_id: str, persons: dict[str, str],
                    probabilities: dict[str, dict[str, float]] | None = None,
                    unless_recorded: dict[str, tuple[str | None, str | None]] | None = None) -> int:
        """Record each session's assigned person (and the probability of every person).
        ``unless_recorded`` (ClosedTail.recorded: session id -> (person, probabilities) as
        a read found them): a session found holding this person and these probabilities
        is not written again (a fold re-answers every session; a quarter or so answer as
        stored). Returns how many rows were written."""
        rows = _person_rows(account_id, persons, probabilities, unless_recorded)
        if rows:
            with self.db.transaction() as tx:
                tx.executemany(_SET_PERSON, rows)
        return len(rows)

    def write_persons(self, tx: Tx, rows: Sequence[tuple[str, str, str, dict[str, float] | None]]) -> None:
        """``set_persons`` inside the caller's transaction: (account, session, person,
        probabilities) rows. The assign path writes them in the prediction log's group
        commit, so one fsync covers a batch of assignments and their predictions."""
        tx.executemany(_SET_PERSON, [(p, _encode_probabilities(probs) if probs is not None else None, a, s)
                                     for a, s, p, probs in rows])

    def accounts_with_sessions(self, min_sessions: int, limit: int | None) -> list[str]:
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT account_id FROM sessions GROUP BY account_id HAVING COUNT(*) >= ? "
                            "ORDER BY account_id" + (" LIMIT ?" if limit else ""),
                            (min_sessions, limit) if limit else (min_sessions,))
        return [r[0] for r in rows]

    def accounts_with_models(self) -> list[str]:
        with self.db.transaction(readonly=True) as tx:
            return [r[0] for r in tx.query("SELECT account_id FROM household_models ORDER BY account_id")]

    def record_labels(self, labels: Sequence[tuple[str, str, str, str]]) -> tuple[int, int]:
        """Store (account, session, person, source) labels; the latest label of a session
        wins. Returns (accepted, unknown_sessions)."""
        accepted = unknown = 0
        now = time.time()
        with self.db.transaction() as tx:
            for account in sorted({label[0] for label in labels}):
                tx.lock_household(account)   # the session check below must see an erasure in flight
            for account, session_id, person, source in labels:
                if not tx.query("SELECT 1 FROM sessions WHERE account_id = ? AND session_id = ?",
                                (account, session_id)):
                    unknown += 1
                    continue
                tx.execute("DELETE FROM session_labels WHERE account_id = ? AND session_id = ?",
                           (account, session_id))
                tx.execute("INSERT INTO session_labels (account_id, session_id, person_id, source, recorded_at) "
                           "VALUES (?, ?, ?, ?, ?)", (account, session_id, person, source, now))
                accepted += 1
        return accepted, unknown

    def person_session_counts(self, account_id: str, person_ids: Sequence[str]) -> dict[str, int]:
        """Closed or open sessions whose recorded person is one of ``person_ids``."""
        if not person_ids:
            return {}
        marks = ", ".join("?" * len(person_ids))
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query(f"SELECT person_id, COUNT(*) FROM sessions WHERE account_id = ? AND person_id IN ({marks}) "
                            "GROUP BY person_id", (account_id, *person_ids))
        counts = {str(p): int(n) for p, n in rows}
        return {pid: counts.get(pid, 0) for pid in person_ids}

    def volunteered_label_sessions(self, account_id: str, tx: Tx | None = None) -> set[str]:
        """Sessions whose label the user volunteered (RecordLabels source ending in
        ``:unprompted``, as feedback forwards an unprompted correction)."""
        with self._reading(tx) as tx:
            rows = tx.query("SELECT session_id FROM session_labels WHERE account_id = ? AND source LIKE ?",
                            (account_id, "%" + UNPROMPTED_LABEL_SUFFIX))
        return {r[0] for r in rows}

    def labels(self, account_id: str, tx: Tx | None = None) -> dict[str, str]:
        """Session id -> known person (feedback labels)."""
        with self._reading(tx) as tx:
            return dict(tx.query("SELECT session_id, person_id FROM session_labels WHERE account_id = ?",
                                 (account_id,)))

    def resolve_persons(self, instants: Sequence[tuple[str, str, float]]
                        ) -> list[tuple[str, dict[str, float]]]:
        """For each (account, device, ts): the session covering ts or nearest to it
        within one gap, and its person probabilities ({} when unassigned or none)."""
        by_device: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (account, device, _) in enumerate(instants):
            by_device[(account, device)].append(i)
        out: list[tuple[str, dict[str, float]]] = [("", {})] * len(instants)
        with self.db.transaction(readonly=True) as tx:
            for (account, device), idx in by_device.items():
                ts = np.array([instants[i][2] for i in idx])
                rows = tx.query(
                    "SELECT session_id, start_ts, end_ts, person_id, person_probs FROM sessions "
                    "WHERE account_id = ? AND device_id = ? AND end_ts >= ? AND start_ts <= ? ORDER BY start_ts",
                    (account, device, float(ts.min()) - self.gap_s, float(ts.max()) + self.gap_s))
                if not rows:
                    continue
                starts = np.array([float(r[1]) for r in rows])
                ends = np.array([float(r[2]) for r in rows])
                # distance from each instant to each session interval (0 inside it)
                dist = np.maximum(np.maximum(starts[None, :] - ts[:, None], ts[:, None] - ends[None, :]), 0.0)
                best = dist.argmin(axis=1)
                for j, i in enumerate(idx):
                    if dist[j, best[j]] > self.gap_s:
                        continue
                    r = rows[best[j]]
                    probs = json.loads(r[4]) if r[4] else ({r[3]: 1.0} if r[3] else {})
                    out[i] = (r[0], probs)
        return out

    def person_device_sessions(self, account: str, person: str) -> list[tuple[str, str, str, int]]:
        """(device id, device type, assigned person or "", sessions) of the stored sessions
        of each device ``person``'s sessions are on (GetPersonDevices)."""
        with self.db.transaction(readonly=True) as tx:
            return [(r[0], r[1], r[2] or "", int(r[3])) for r in tx.query(
                "SELECT device_id, device_type, person_id, COUNT(*) FROM sessions WHERE account_id = ? "
                "AND device_id IN (SELECT DISTINCT device_id FROM sessions WHERE account_id = ? AND person_id = ?) "
                "GROUP BY device_id, device_type, person_id", (account, account, person))]

    # ---- household models (compare-and-swap, cached) -------------------------------

    def get_model(self, account_id: str, decoded_version: int = 0) -> StoredModel | None:
        """The stored model. ``decoded_version``: the version the caller holds decoded
        already; when the stored one is that version its blob is not decrypted (every
        assignment checks the version; only a new version needs the blob) and comes back
        as ``b""``.

        The cache (Redis: bytes any holder of its URL may write, the gateway's included)
        answers only for a version the database has said is current: a cached entry of
        another version than the one this process holds and confirmed within
        ``MODEL_CONFIRM_S`` is taken only once one read of the database says it is the
        stored one (the model column read only when it is not), and an entry older than
        the held version is dropped. Until session 29 a genuine entry copied before a
        device erasure and written back under a higher version was served again: the
        erased device's person came back (docs/security.md, attack28 "Left")."""
        # The blob is sealed under the household's data key in the SQL store and in the
        # cache alike (it holds feature statistics and profile hints): crypto-shredded
        # with the household, and no plaintext copy in Redis.
        return self._get_model(account_id, decoded_version, None, None)

    def _get_model(self, account_id: str, decoded_version: int, tx: Tx | None,
                   after: list[Callable[[], None]] | None) -> StoredModel | None:
        """``get_model``; with ``tx`` (``refresh_reads``) the database is read in it, even for
        a version the cache's entry confirms (the refresh's view is one snapshot), and the
        cache's fill is appended to ``after`` (it opens a transaction of its own)."""
        cached = self.cache.get(f"model:{account_id}")
        entry = None if cached is None else self._cached_model(account_id, cached, decoded_version)
        if tx is None and entry is not None and entry.version == decoded_version \
                and self._confirmed(account_id, decoded_version):
            return entry
        known = entry.version if entry is not None else -1
        generation = self._fence_generation
        with self._reading(tx) as tx:
            # The model column only when the cache's entry is not the stored version, and
            # the erasure counts only then (the model is cached again: _cache_model).
            rows = tx.query("SELECT version, variant, CASE WHEN version = ? THEN NULL ELSE model END "
                            "FROM household_models WHERE account_id = ?", (known, account_id))
            erasures = household_key_state(tx, account_id) if rows and int(rows[0][0]) != known else (0, 0)
        if not rows:
            if entry is not None:
                self.cache.delete(f"model:{account_id}")
            return None
        version, variant = int(rows[0][0]), rows[0][1]
        self._note_confirmed(account_id, version, generation)
        if entry is not None and entry.version == version:
            return entry
        if entry is not None:
            log.warning("the cached model of %s is version %d, the stored one %d: dropped, read from the database",
                        pseudonym(account_id), entry.version, version)
        held = bool(decoded_version) and version == decoded_version
        if held and self.cache.health():
            # Redis down: nothing to cache again, and the held version needs no blob — not
            # opened (the cache's entry is sealed anew from the plaintext: a decryption and
            # an encryption of the model at every read while Redis is down otherwise).
            return StoredModel(version, variant, b"")
        model = self._open_model(account_id, bytes(rows[0][2]))
        fill = partial(self._cache_model, account_id, version, variant, model, erasures, sealed_in_store=rows[0][2])
        if after is None:
            fill()
        else:
            after.append(fill)
        return StoredModel(version, variant, b"" if held else model)

    def confirm_model_versions(self, account_ids: Iterable[str]) -> None:
        """Ask the database once for the stored model version of each of ``account_ids``
        not confirmed within MODEL_CONFIRM_S (a message of many households: AssignSessions),
        so that each household's ``get_model`` after it need not (one read transaction for
        the message instead of one per household). Those confirmed more than half
        MODEL_CONFIRM_S ago are asked again too: the message's households then stay
        confirmed for the next 30 s of messages at least."""
        ages = {a: self._confirmed_versions.age(a) for a in account_ids}
        due = sorted(a for a, age in ages.items() if age is None or age >= self._confirmed_versions.max_age_s / 2)
        if not due:
            return
        generation = self._fence_generation
        for account_id, version in self.stored_model_versions(due).items():
            self._note_confirmed(account_id, version, generation)

    def stored_model_versions(self, account_ids: Iterable[str]) -> dict[str, int]:
        """The stored model version of each of ``account_ids`` that has a model, in one read
        transaction."""
        accounts = sorted(set(account_ids))
        stored: dict[str, int] = {}
        with self.db.transaction(readonly=True) as tx:
            for start in range(0, len(accounts), 500):   # SQLite's bound-parameter limit, as _query_in
                chunk = accounts[start:start + 500]
                stored.update((a, int(v)) for a, v in tx.query(
                    f"SELECT account_id, version FROM household_models WHERE account_id IN "
                    f"({', '.join('?' * len(chunk))})", chunk))
        return stored

    def _confirmed(self, account_id: str, version: int) -> bool:
        """Whether the database said ``version`` is the household's stored one within the
        last ``MODEL_CONFIRM_S``: how long a replica keeps serving a version a replayed
        cache entry says is still current (a genuine entry of the version it holds, copied
        before the erasure that replaced it)."""
        return (self._confirmed_versions.get(account_id) == version
                and (self._fence_s is None or time.monotonic() - self._fence_read_at < self._fence_s))

    def _note_confirmed(self, account_id: str, version: int, generation: int | None = None) -> None:
        """``generation``: the erasure fence's generation when the read that says so began
        (nothing noted when the fence moved since; None: no such read)."""
        with self._fence_lock:
            if generation is not None and generation != self._fence_generation:
                return
            self._confirmed_versions.note(account_id, version)

    def _cached_model(self, account_id: str, cached: bytes, decoded_version: int) -> StoredModel | None:
        """The cache's copy (``b""`` as its blob when it is ``decoded_version``, not opened:
        get_model decides with the database whether the held version is current), or None
        — the entry dropped, the database read instead — when it is older than the held
        version or does not open as a model this store sealed for this household, version
        and variant (``_cache_field``). Any Redis client may write these bytes. Until
        attack28 bytes that do not open made the household unreadable until the entry's
        TTL (502 on every read for an hour), and a plaintext one ("PK") was taken as the
        household's model; until session 29 the version in clear was trusted (replay)."""
        try:
            version, vlen = struct.unpack_from("<qH", cached)
            variant, sealed = cached[10:10 + vlen].decode(), cached[10 + vlen:]
            if version < decoded_version:
                raise _StaleCachedModel(f"version {version}, older than the held {decoded_version}")
            if version == decoded_version:
                return StoredModel(version, variant, b"")
            return StoredModel(version, variant, self._open_cached(account_id, version, variant, sealed))
        except (struct.error, UnicodeDecodeError, FieldDecryptionError, _StaleCachedModel) as exc:
            log.warning("the cached model of %s is not taken (%s: %s): dropped, read from the database",
                        pseudonym(account_id), type(exc).__name__, exc)
            self.cache.delete(f"model:{account_id}")
            return None

    def _open_cached(self, account_id: str, version: int, variant: str, sealed: bytes) -> bytes:
        if self.cipher is None:
            return sealed
        try:
            return self.cipher.decrypt(account_id, _cache_field(version, variant), sealed)
        except FieldDecryptionError:
            if sealed[:1] == b"\x01" and self._opens_as_stored(account_id, sealed):
                raise FieldDecryptionError("an entry of the format before session 29 (the version not sealed): "
                                           "a miss", "model") from None
            raise
        except HearthError:
            # Bytes naming a data-key version the key service does not give (any Redis client
            # can write them; random bytes do once in 256: the drill's CI, session 33) are a
            # miss like bytes that do not open — else every read of the household failed until
            # the entry's TTL. The database's model is then read with the household's own key,
            # and that read reports the key service's own failure if it has one. The message
            # names the household by its pseudonym only (it is logged).
            raise FieldDecryptionError(f"the cached model of {pseudonym(account_id)} names a data key "
                                       "that is not to be had", "model") from None

    def _opens_as_stored(self, account_id: str, sealed: bytes) -> bool:
        try:
            self.cipher.decrypt(account_id, "model", sealed)
            return True
        except FieldDecryptionError:
            return False

    def save_model(self, account_id: str, expected_version: int, variant: str, blob: bytes, *,
                   drift: Sequence[DriftRow] = (), answers: Answers | None = None) -> int:
        """Store a new model version if the stored one is still ``expected_version``
        (0 = none yet); else raise Conflict so the caller re-reads and retries. This is
        what keeps two replicas from losing each other's update.

        ``drift`` (drift events) and ``answers`` (the sessions' persons the new model
        gives, as ``set_persons`` writes them) are written in the same transaction, only
        when the compare-and-swap wins: a refresh's save is one write transaction, not
        one for the model and another for its answers (session 33: two BEGIN/COMMITs and
        two pool checks a household on PostgreSQL), and a model is never stored without
        its answers (a failure between the two left them stale until the next fold)."""
        new_version = expected_version + 1
        sealed = self._seal(account_id, "model", blob)
        person_rows = _person_rows(account_id, *answers) if answers is not None else []
        generation = self._fence_generation
        with self.db.transaction() as tx:
            tx.lock_household(account_id)   # the EXISTS below must see an erasure in flight
            if expected_version == 0:
                # Only while the household still has sessions: a model computed just
                # before an erasure must not come back after it (no remnant).
                changed = tx.execute(
                    "INSERT INTO household_models (account_id, version, variant, model, updated_at) "
                    "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM sessions WHERE account_id = ?) "
                    "ON CONFLICT (account_id) DO NOTHING",
                    (account_id, new_version, variant, sealed, time.time(), account_id))
            else:
                changed = tx.execute(
                    "UPDATE household_models SET version = ?, variant = ?, model = ?, updated_at = ? "
                    "WHERE account_id = ? AND version = ?",
                    (new_version, variant, sealed, time.time(), account_id, expected_version))
            if changed == 1:
                for row in drift:
                    self._insert_drift_event(tx, account_id, row)
                if person_rows:
                    tx.executemany(_SET_PERSON, person_rows)
            erasures = household_key_state(tx, account_id)
        if changed != 1:
            self.cache.delete(f"model:{account_id}")
            raise Conflict(f"household model of {account_id!r} changed since version {expected_version}",
                           "model_version")
        self._note_confirmed(account_id, new_version, generation)
        self._cache_model(account_id, new_version, variant, blob, erasures)
        return new_version

    def _cache_model(self, account_id: str, version: int, variant: str, model: bytes,
                     erasures: tuple[int, int], sealed_in_store: bytes | None = None) -> None:
        """Cache ``model`` (plaintext), read or saved in a transaction that saw ``erasures``
        (``household_key_state``: household erasures, the household's re-keys), sealed
        under the household's data key with its account, version and variant bound in
        (``_cache_field``): an entry cannot be written back under another version. A
        household Erase that commits after that transaction drops the cached model after
        its commit, but this write to the cache may come later still (another replica, a
        slow thread): so the counts are read again once the model is cached, and if an
        erasure happened meanwhile the entry is dropped. Otherwise a sealed model stayed in
        Redis under a key naming the erased account until its TTL ran out. Likewise a Rekey
        (the copy is sealed under the version a rotation destroys next)."""
        if self.cipher is not None and sealed_in_store is not None and bytes(sealed_in_store[:2]) == b"PK":
            return   # stored before encryption: never cached, as the cache takes sealed models only
        sealed = self._seal(account_id, _cache_field(version, variant), model)
        name = variant.encode()
        key = f"model:{account_id}"
        self.cache.set(key, struct.pack("<qH", version, len(name)) + name + sealed, MODEL_CACHE_TTL_S)
        with self.db.transaction(readonly=True) as tx:
            if household_key_state(tx, account_id) != erasures:
                self.cache.delete(key)

    # ---- the erasure fence (HEARTH_ERASURE_FENCE_S) ------------------------------------

    def move_erasure_fence(self) -> None:
        """After an Erase's deletion and unlearning refit are committed (ClusteringApp.erase
        then waits HEARTH_ERASURE_FENCE_S): every replica watching the fence forgets the versions
        it confirmed before this."""
        with self.db.transaction() as tx:
            tx.execute("UPDATE erasure_fence SET epoch = epoch + 1 WHERE id = 1")

    @property
    def erasure_fence_epoch(self) -> int | None:
        """The fence's counter as this process last read it (None: never read)."""
        return self._fence_epoch

    def erasure_fence_read_age_s(self) -> float:
        """Seconds since the last successful read of the fence began (+Inf before the
        first): past the fence's time this process trusts no held version
        (hearth_erasure_fence_read_age_seconds)."""
        return time.monotonic() - self._fence_read_at

    def watch_erasure_fence(self, fence_s: float) -> bool:
        """One read of the erasure fence by a replica that watches it (ClusteringApp's
        thread, every quarter of ``fence_s``): from the first one on, a confirmed version is
        trusted only while the last read began less than ``fence_s`` ago. True when the
        fence moved since the last read (or this is the first: an erasure may have come
        before it): the confirmed versions are forgotten, and the caller drops the models it
        decoded of a version no longer stored."""
        self._fence_s = fence_s   # from now on, even when this read fails (the database down)
        began = time.monotonic()
        with self.db.transaction(readonly=True) as tx:
            epoch = int(tx.query("SELECT epoch FROM erasure_fence WHERE id = 1")[0][0])
        with self._fence_lock:
            moved = epoch != self._fence_epoch
            if moved:
                self._fence_generation += 1
                self._confirmed_versions.clear()
                self._fence_epoch = epoch
            self._fence_read_at = max(self._fence_read_at, began)
        return moved

    # ---- erasure -------------------------------------------------------------------

    def _erase_pending(self, tx: Tx, scope: ErasureScope, sessions: set[str], before: float | None) -> list[str]:
        """Take the scope's predictions out of the outbox (in ``tx``, the household locked)."""
        account = scope.account_id
        if scope.kind == "household":
            return erase_pending(tx, lambda acct, _session: acct == account, account, self.db.dialect)
        # Only predictions about the sessions deleted here go (none: nothing to read).
        # A window deletes sessions that started before its end, and a session starts
        # at most the lateness tolerance before its start when a prediction was made
        # about it (a later event is refused if older than the device's newest one
        # minus the tolerance; the gap added as a margin): chunks whose sessions all
        # started after that are not read (the retention purge parsed every chunk).
        # The tolerance in force now, not when the events came: a floor of a week
        # keeps a chunk whose session was stretched back under a larger tolerance
        # of before (the setting lowered since, or another replica's) from being
        # skipped — a wrong skip would outlive the erasure; the retention purge's
        # cut-off is ~90 days back, so the floor costs it nothing.
        # Also the predictions the scope covers by what they record (feedback's rules:
        # the session as the prediction saw it, its device, its person): a late event
        # that moved a session's start, or joined it to the one before, replaced its
        # id, so a prediction made before carries an id no session has any more
        # (until session 21 it was left in the outbox, and forwarded after the erasure).
        about = _recorded_rule(scope)
        return erase_pending(tx, lambda acct, session: (scope.all_accounts or acct == account)
                             and session in sessions, None if scope.all_accounts else account,
                             self.db.dialect, before, about)

    def _sessions_before(self, scope: ErasureScope) -> float | None:
        """A window erasure reads only the outbox chunks that can hold its sessions (those
        that started before this; ``_erase_pending``)."""
        return scope.end + max(self.tolerance_s, SKIP_MARGIN_FLOOR_S) + self.gap_s \
            if scope.kind == "window" and scope.end is not None else None

    def erase_logged_predictions(self, scope: ErasureScope, sessions: Iterable[str]) -> list[str]:
        """Take once more the scope's predictions out of the outbox (``sessions``: the ids
        its erasure deleted): those another replica logged after the erasure committed,
        answering from a model it held while the erasure fence's wait ran (ClusteringApp.erase
        calls this after the wait). Until session 31 they stayed, and were forwarded to
        feedback after its own erase had run if they were still in the outbox then."""
        account = scope.account_id
        before = self._sessions_before(scope)
        await_forwards(self.db, None if scope.all_accounts else account, before)
        with excluding_forwards(self.db), self.db.transaction() as tx:
            if not scope.all_accounts:
                tx.lock_household(account)
            return self._erase_pending(tx, scope, set(sessions), before)

    def erase(self, scope: ErasureScope) -> ErasureOutcome:
        """Delete the scope's events and sessions (and, for a household, its devices,
        model and drift history) in one transaction. Sessions that only partly fall in
        a time window are rebuilt from their remaining events. The caller refits the
        household model from what remains (exact unlearning by refit)."""
        out = ErasureOutcome()
        account = scope.account_id
        # Before deleting anything: an erasure must not complete while Redis may keep a
        # copy it cannot remove (Unavailable: the deletion job retries).
        self._drop_cached_models(scope, strict=True)
        # A window erasure reads only the outbox chunks that can hold its sessions (below).
        before = self._sessions_before(scope)
        # A forward in flight that carries the scope's predictions is waited for before
        # the transaction takes anything (PostgreSQL; prediction_log.await_forwards), and
        # no forward of this process is in flight while it runs (SQLite; PostgreSQL locks
        # the rows: erase_pending).
        await_forwards(self.db, None if scope.all_accounts else account, before)
        with excluding_forwards(self.db), self.db.transaction() as tx:
            if not scope.all_accounts:
                tx.lock_household(account)
            if self.cipher is not None and scope.kind == "household":
                # Drop the cached data key under the write lock: a write that comes
                # after this transaction must fetch the key, which a household deletion
                # has shredded first (privacy's HOUSEHOLD_STAGES), so it is refused;
                # one before it is deleted here.
                self.cipher.forget(account)
            # An erasure of a device, person or window fences off what the scope recorded up
            # to now and the store does not hold yet (below). A household the store holds no
            # row of is not fenced: digesting its device would make it a data key.
            fenced_at = time.time()
            fencing = scope.kind != "household" and not scope.all_accounts and \
                not self._new_households(tx, [account])
            if scope.kind == "household":
                self._confirmed_versions.discard(account)
                self._known_households.discard(account)
                note_household_erased(tx)
                forget_household_rekeys(tx, account)
                for table, key in (("events", "event_id"), ("sessions", "session_id")):
                    ids = [r[0] for r in tx.query(f"SELECT {key} FROM {table} WHERE account_id = ?", (account,))]
                    tx.execute(f"DELETE FROM {table} WHERE account_id = ?", (account,))
                    out.add(table, ids)
                devices = [r[0] for r in tx.query("SELECT device_id FROM devices WHERE account_id = ?", (account,))]
                tx.execute("DELETE FROM devices WHERE account_id = ?", (account,))
                out.add("devices", devices)
                models = [r[0] for r in tx.query("SELECT account_id FROM household_models WHERE account_id = ?",
                                                 (account,))]
                tx.execute("DELETE FROM household_models WHERE account_id = ?", (account,))
                out.add("household_models", models)
                drift = [str(r[0]) for r in tx.query("SELECT id FROM drift_events WHERE account_id = ?", (account,))]
                tx.execute("DELETE FROM drift_events WHERE account_id = ?", (account,))
                out.add("drift_events", drift)
            elif scope.kind == "device":
                for table, key in (("events", "event_id"), ("sessions", "session_id")):
                    ids = [r[0] for r in tx.query(f"SELECT {key} FROM {table} WHERE account_id = ? AND device_id = ?",
                                                  (account, scope.device_id))]
                    tx.execute(f"DELETE FROM {table} WHERE account_id = ? AND device_id = ?", (account, scope.device_id))
                    out.add(table, ids)
                tx.execute("DELETE FROM devices WHERE account_id = ? AND device_id = ?", (account, scope.device_id))
                out.add("devices", [scope.device_id] if out.deleted_counts.get("events") else [])
                if fencing:
                    # Everything the device recorded before its erasure; what it records
                    # after is new data (an erasure is not a ban: docs/privacy.md).
                    self._fence(tx, account, [scope.device_id], None, fenced_at)
            elif scope.kind == "person":
                sessions = tx.query("SELECT session_id, device_id, start_ts, end_ts FROM sessions "
                                    "WHERE account_id = ? AND person_id = ?", (account, scope.person_id))
                for session_id, device, start, end in sessions:
                    ids = [r[0] for r in tx.query("SELECT event_id FROM events WHERE account_id = ? AND device_id = ? "
                                                  "AND ts >= ? AND ts <= ?", (account, device, start, end))]
                    tx.execute("DELETE FROM events WHERE account_id = ? AND device_id = ? AND ts >= ? AND ts <= ?",
                               (account, device, start, end))
                    tx.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
                    out.add("events", ids)
                    out.add("sessions", [session_id])
                for device in sorted({r[1] for r in sessions}):
                    self._refresh_device(tx, account, device)
                if fencing:
                    # Events not stored yet carry no person: everything the devices the
                    # person's erased sessions were on recorded before the erasure (other
                    # members' events of those devices in flight with them included).
                    self._fence(tx, account, sorted({r[1] for r in sessions}), None, fenced_at)
            else:  # window
                lo = scope.start if scope.start is not None else float("-inf")
                hi = scope.end if scope.end is not None else float("inf")
                # account "*" (retention purge, privacy service only): every account.
                where, params = ("ts >= ? AND ts < ?", [lo, hi]) if scope.all_accounts else \
                    ("account_id = ? AND ts >= ? AND ts < ?", [account, lo, hi])
                rows = tx.query(f"SELECT event_id, account_id, device_id, ts FROM events WHERE {where}", params)
                tx.execute(f"DELETE FROM events WHERE {where}", params)
                out.add("events", [r[0] for r in rows])
                for acct, device in sorted({(r[1], r[2]) for r in rows}):
                    doomed = tx.query("SELECT session_id, start_ts FROM sessions WHERE account_id = ? AND device_id = ? "
                                      "AND end_ts >= ? AND start_ts < ?", (acct, device, lo, hi))
                    tx.execute("DELETE FROM sessions WHERE account_id = ? AND device_id = ? AND end_ts >= ? "
                               "AND start_ts < ?", (acct, device, lo, hi))
                    out.add("sessions", [r[0] for r in doomed])
                    if doomed:
                        # Rebuild what remains of partly covered sessions from surviving events.
                        self._rebuild_sessions(tx, acct, device, min(float(r[1]) for r in doomed))
                    self._refresh_device(tx, acct, device)
                if fencing and lo < min(hi, fenced_at):
                    self._fence(tx, account, [None], None if lo == float("-inf") else lo, min(hi, fenced_at))
            # Predictions not yet delivered to the feedback service are data too.
            sessions = out.deleted_ids_of("sessions")
            if scope.kind != "household":
                where, params = ("1 = 1", []) if scope.all_accounts else ("account_id = ?", [account])
            out.add("pending_predictions", self._erase_pending(tx, scope, sessions, before))
            if scope.kind == "household":
                # Its key is shredded: every later write of the household is refused.
                tx.execute("DELETE FROM erased_events WHERE account_id = ?", (account,))
                tx.execute("DELETE FROM erasure_fences WHERE account_id = ?", (account,))
            elif scope.all_accounts:
                # The retention purge: a replay of an event erased before its window is
                # refused as expired at ingest (its time is at most MAX_FUTURE_SKEW_S after
                # its erasure), so its digest is no longer needed.
                if scope.end is not None:
                    tx.execute("DELETE FROM erased_events WHERE erased_at < ?", (scope.end - MAX_FUTURE_SKEW_S,))
                    # A fence whose span ended before the window: what it covers is expired.
                    tx.execute("DELETE FROM erasure_fences WHERE hi < ?", (scope.end - MAX_FUTURE_SKEW_S,))
            elif erased_ids := out.deleted_ids_of("events"):
                erased_at = time.time()
                tx.executemany("INSERT INTO erased_events (account_id, digest, erased_at) VALUES (?, ?, ?) "
                               "ON CONFLICT (account_id, digest) DO NOTHING",
                               [(account, d, erased_at) for d in self._digests(account, sorted(erased_ids)).values()])
            if scope.kind == "household":
                labelled = [r[0] for r in tx.query("SELECT session_id FROM session_labels WHERE account_id = ?",
                                                   (account,))]
            else:
                labelled = [r[0] for r in tx.query(f"SELECT session_id FROM session_labels WHERE {where}", params)
                            if r[0] in sessions]
            tx.executemany("DELETE FROM session_labels WHERE session_id = ?", [(x,) for x in labelled])
            out.add("session_labels", labelled)
            if scope.kind == "household":
                tx.execute("DELETE FROM refits_owed WHERE account_id = ?", (account,))
            elif not scope.all_accounts and not out.empty:
                # The unlearning refit is owed until it has replaced the model (refit_owed).
                tx.execute("INSERT INTO refits_owed (account_id, noted_at) VALUES (?, ?) ON CONFLICT (account_id) "
                           "DO UPDATE SET noted_at = excluded.noted_at", (account, time.time()))
            if not out.empty:
                record_erasure(tx)
        out.purges.append(self.purge_erased())
        self._drop_cached_models(scope)
        # A Redis that persists keeps the dropped models in its snapshot and AOF until
        # they are rewritten: rewrite them now. Listed before the SQL step, which the
        # app replaces with the purge after its unlearning refit (app.erase).
        out.purges[-1:-1] = purge_persistence(self.cache)
        if self.cipher is not None and scope.kind == "household":
            self.cipher.forget(account)  # and any a read fetched meanwhile (the key is shredded)
        # The outbox encoder's cache of shared fields (ids, session spans) goes too.
        forget_cached_heads()
        return out

    # ---- data key rotation ---------------------------------------------------------

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """Re-encrypt every sealed value of the household (events' five text fields and
        offset, sessions' features, label, unknown genres and running state, the model)
        under data key version ``dek_version`` (DataHolder.Rekey, a rotation of the
        household's key: docs/privacy.md "Data key rotation"). Idempotent: a value already
        under it (or a newer one) is left alone. Returns (values re-encrypted, purge
        steps): when something changed, the old ciphertexts are purged physically as after
        an erasure (their key is destroyed next, but a copy of the key taken before, the
        reason to rotate, must not still open them in the WAL or free pages), and the
        cached model (sealed under the old version) leaves Redis and its files.

        A page of rows at a time, each page its own transaction in the household's write
        lock (``services/common/rekey_pages.py``: why a crash between pages is safe); the
        household's re-key count moves with the first, so every
        replica drops the keys it has cached of the household (of that one only, since
        session 27) at its next write of it and fetches the newest
        (``drop_keys_of_erased_households``).

        ``defer_purge`` (a batch rotation, session 28): no purge now — the batch calls once
        more without it after its last household, and that call's purge covers every
        household before it (PostgreSQL: the notes ``record_erasure`` left; Redis: the
        persistence rewrite noted owed here). On PostgreSQL the purge rewrites whole
        tables, so a batch of n households costs one rewrite instead of n."""
        if self.cipher is None:
            return 0, []
        cipher = self.cipher
        cipher.forget(account_id)
        text = ("title_id", "series_id", "genres", "country", "profile_hint", "utc_offset_minutes")

        def event(tx: Tx, row: tuple) -> int:
            new = [cipher.reseal_text(account_id, f, v, dek_version) for f, v in zip(text, row[1:])]
            if all(n is None for n in new):
                return 0
            tx.execute(f"UPDATE events SET {', '.join(f'{f} = ?' for f in text)} "
                       "WHERE account_id = ? AND event_id = ?",
                       (*(n if n is not None else v for n, v in zip(new, row[1:])), account_id, row[0]))
            return sum(n is not None for n in new)

        def session(tx: Tx, row: tuple) -> int:
            _, sid, features, label, unknown, state = row
            # plain float32 (a multiple of 4 bytes) was written before encryption: left alone
            new = (cipher.reseal(account_id, "features", features, dek_version) if len(bytes(features)) % 4 else None,
                   cipher.reseal_text(account_id, "label", label, dek_version),
                   cipher.reseal_text(account_id, "unknown_genres", unknown, dek_version),
                   cipher.reseal(account_id, "session_state", state, dek_version) if state is not None else None)
            if all(n is None for n in new):
                return 0
            tx.execute("UPDATE sessions SET features = ?, label = ?, unknown_genres = ?, state = ? "
                       "WHERE session_id = ?",
                       (*(n if n is not None else v for n, v in zip(new, (features, label, unknown, state))), sid))
            return sum(n is not None for n in new)

        def model(tx: Tx, row: tuple) -> int:
            sealed = cipher.reseal(account_id, "model", row[1], dek_version)
            if sealed is None:
                return 0
            tx.execute("UPDATE household_models SET model = ? WHERE account_id = ?", (sealed, account_id))
            return 1

        # A page at a time, each its own transaction (services/common/rekey_pages.py: until
        # session 28 one transaction held SQLite's write lock for the whole household).
        changed = reseal_in_pages(self.db, account_id,
                                  f"SELECT event_id, {', '.join(text)} FROM events WHERE account_id = ?",
                                  ("event_id",), event, first=lambda tx: note_household_rekeyed(tx, account_id))
        changed += reseal_in_pages(self.db, account_id,
                                   "SELECT start_ts, session_id, features, label, unknown_genres, state FROM sessions "
                                   "WHERE account_id = ?", ("start_ts", "session_id"), session)
        changed += reseal_in_pages(self.db, account_id,
                                   "SELECT account_id, model FROM household_models WHERE account_id = ?",
                                   ("account_id",), model)
        # Purged on every call, as a retried Erase is (review26): a call that found nothing
        # left to re-encrypt may follow one whose purge never ran (killed after its commit,
        # Redis unreachable for the step before it), and the rotation destroys the old
        # version next. Cheap when nothing is owed (SQLite: a checkpoint; PostgreSQL: only
        # a purge noted by record_erasure). Redis's files are rewritten only when a model
        # was dropped from it now.
        # Or when the last rewrite did not finish (review27): a Rekey that finds nothing to
        # re-seal and no model to drop still rewrites them, and reports it, until one does
        # (the rotation completes either way and names the purge: docs/privacy.md §10).
        dropped = self.cache.delete(f"model:{account_id}")
        if defer_purge:
            if changed or dropped:   # the batch's last call rewrites Redis's files (owed below)
                self.cache.set(_PERSISTENCE_PURGE_OWED, b"1")
            return changed, []
        owed = self.cache.get(_PERSISTENCE_PURGE_OWED) is not None
        persistence = purge_persistence(self.cache) if changed or dropped or owed else []
        if any(not step["complete"] for step in persistence):
            self.cache.set(_PERSISTENCE_PURGE_OWED, b"1")
        elif owed:   # rewritten, or a Redis that keeps no files (no step): nothing owed (session 30 soak)
            self.cache.delete(_PERSISTENCE_PURGE_OWED)
        return changed, [*persistence, self.db.purge_erased(("events", "sessions", "household_models"))]

    def _drop_cached_models(self, scope: ErasureScope, strict: bool = False) -> None:
        if scope.all_accounts:
            self.cache.delete_prefix("model:", strict=strict)
        else:
            self.cache.delete(f"model:{scope.account_id}", strict=strict)

    def refit_owed(self, account_id: str) -> float | None:
        """When an erasure of the household noted its unlearning refit and no refit has
        cleared the note since: the note's time; else None."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT noted_at FROM refits_owed WHERE account_id = ?", (account_id,))
        return float(rows[0][0]) if rows else None

    def refit_done(self, account_id: str, noted_at: float) -> None:
        """Clear the note ``refit_owed`` read before the refit (not a later erasure's)."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM refits_owed WHERE account_id = ? AND noted_at <= ?", (account_id, noted_at))

    def purge_erased(self, model_replaced: bool = False) -> dict:
        """Make what erasures deleted physically unreadable (Database.purge_erased); the
        app calls it again (``model_replaced``) after the unlearning refit rewrote the
        household model, whose old row still holds what the erased sessions taught it."""
        if model_replaced:
            with self.db.transaction() as tx:
                record_erasure(tx)
        return self.db.purge_erased(_ERASED_TABLES)

    def export_account(self, account_id: str) -> dict:
        """``export_sections`` read whole (the tests' and tools' form)."""
        return materialised(self.export_sections(account_id))

    def export_sections(self, account_id: str) -> dict:
        """Everything held for the account, decrypted (privacy's household export):
        devices, events, sessions (feature vectors, labels, persons), the household
        model (metadata and base64 blob), drift events and the persons feedback named
        for sessions (``session_labels``). Events and sessions, a household's bulk, are
        lazy: read and decrypted a page at a time as the stream is written
        (services/common/export_stream.py), so no export holds them all."""
        with self.db.transaction(readonly=True) as tx:
            devices = tx.query("SELECT device_id, device_type, last_ts FROM devices WHERE account_id = ? "
                               "ORDER BY device_id", (account_id,))
            models = tx.query("SELECT version, variant, model, updated_at FROM household_models "
                              "WHERE account_id = ?", (account_id,))
            drift = tx.query("SELECT drift_type, severity, statistic, detected_at, refit_triggered "
                             "FROM drift_events WHERE account_id = ? ORDER BY detected_at, id", (account_id,))
            labels = tx.query("SELECT session_id, person_id, source, recorded_at FROM session_labels "
                              "WHERE account_id = ? ORDER BY recorded_at, session_id", (account_id,))
            event_devices = [r[0] for r in tx.query("SELECT DISTINCT device_id FROM events WHERE account_id = ?",
                                                    (account_id,))]
        # Events are indexed by (account, device, ts), not (account, ts): paged per device
        # (each page an index range) and merged back into the household's (ts, event_id)
        # order. A page per device is held at a time: at most ~20,000 rows in all.
        page = max(20, EXPORT_PAGE_ROWS * 20 // max(1, len(event_devices)))
        events = heapq.merge(*(keyset_rows(self.db, f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? "
                                           "AND device_id = ?", (account_id, device), ("ts", "event_id"), (4, 0),
                                           page_rows=min(page, EXPORT_PAGE_ROWS))
                               for device in event_devices), key=lambda r: (float(r[4]), r[0]))
        sessions = keyset_rows(
            self.db, "SELECT session_id, device_id, device_type, start_ts, end_ts, event_count, watch_seconds, "
            "feature_version, features, label, person_id, person_probs FROM sessions WHERE account_id = ?",
            (account_id,), ("start_ts", "session_id"), (3, 0))
        return {
            "devices": [{"device_id": r[0], "device_type": r[1], "last_ts": float(r[2])} for r in devices],
            "events": ({"event_id": e.event_id, "device_id": e.device_id, "device_type": e.device_type, "ts": e.ts,
                        "kind": e.kind, "title_id": e.title_id, "series_id": e.series_id, "genres": list(e.genres),
                        "duration_s": e.duration_s, "maturity": e.maturity, "country": e.country, "vpn": e.vpn,
                        "profile_hint": e.profile_hint, "utc_offset_minutes": e.utc_offset_minutes}
                       for e in map(self._event_from_row, events)),
            "sessions": ({"session_id": r[0], "device_id": r[1], "device_type": r[2], "start_ts": float(r[3]),
                          "end_ts": float(r[4]), "event_count": int(r[5]), "watch_seconds": float(r[6]),
                          "feature_version": int(r[7]),
                          "features": np.frombuffer(self._open_vector(account_id, "features", r[8]),
                                                    dtype="<f4").astype(float).tolist(),
                          "label": self._open_text(account_id, "label", r[9]), "person_id": r[10],
                          "person_probabilities": json.loads(r[11]) if r[11] else None} for r in sessions),
            "household_model": ({"version": int(models[0][0]), "variant": models[0][1],
                                 "model_base64": base64.b64encode(
                                     self._open_model(account_id, models[0][2])).decode("ascii"),
                                 "updated_at": float(models[0][3])} if models else None),
            "drift_events": [{"drift_type": r[0], "severity": float(r[1]), "statistic": float(r[2]),
                              "detected_at": float(r[3]), "refit_triggered": bool(r[4])} for r in drift],
            # Who a session's viewer was, as feedback (RecordLabels) named them: held, so
            # exported (until session 19 it was not).
            "labels": [{"session_id": r[0], "person_id": r[1], "source": r[2], "recorded_at": float(r[3])}
                       for r in labels],
        }

    @staticmethod
    def _refresh_device(tx: Tx, account: str, device: str) -> None:
        """After a partial erase the device's watermark must not reveal a deleted
        event's time: reset it to the newest surviving event, or drop the device."""
        newest = tx.query("SELECT MAX(ts) FROM events WHERE account_id = ? AND device_id = ?", (account, device))
        if newest[0][0] is None:
            tx.execute("DELETE FROM devices WHERE account_id = ? AND device_id = ?", (account, device))
        else:
            tx.execute("UPDATE devices SET last_ts = ? WHERE account_id = ? AND device_id = ?",
                       (float(newest[0][0]), account, device))

    # ---- drift ---------------------------------------------------------------------

    def add_drift_event(self, account_id: str, drift: DriftRow) -> None:
        with self.db.transaction() as tx:
            self._insert_drift_event(tx, account_id, drift)

    @staticmethod
    def _insert_drift_event(tx: Tx, account_id: str, drift: DriftRow) -> None:
        tx.execute("INSERT INTO drift_events (account_id, drift_type, severity, statistic, "
                   "detected_at, refit_triggered) VALUES (?, ?, ?, ?, ?, ?)",
                   (account_id, drift.drift_type, drift.severity, drift.statistic,
                    drift.detected_at, int(drift.refit_triggered)))

    def drift_events(self, account_id: str, limit: int = 100) -> list[DriftRow]:
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT drift_type, severity, statistic, detected_at, refit_triggered "
                            "FROM drift_events WHERE account_id = ? ORDER BY detected_at DESC, id DESC "
                            "LIMIT ?", (account_id, limit))
        return [DriftRow(r[0], float(r[1]), float(r[2]), float(r[3]), bool(r[4])) for r in rows]


def sessions_matrix(sessions: Sequence[StoredSession]) -> np.ndarray:
    if not sessions:
        return np.zeros((0, 0), dtype=np.float32)
    return np.vstack([s.features for s in sessions])
