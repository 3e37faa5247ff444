"""How an audit entry is laid out in its table row (``audit_entries``, see store.py):
the canonical bytes (the signed truth) beside plain copies of the columns queries filter
on, the multi-row INSERT the writer uses, and the way back from stored bytes to entries
and export lines. Shared by the writer (writer.py), the reads (store.py) and the
verification (proofs.py)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.common import strict_json
from services.common.audit import AuditRecord
from services.privacy.audit.domain import AuditEntry, EventType, Outcome, Role

ENTRY_COLUMNS = "seq, canonical, chain_hash"
_INSERT_INTO = ("INSERT INTO audit_entries (seq, ts, event_type, principal, role, resource, outcome, "
                "trace_id, record_id, canonical, leaf_hash, chain_hash) VALUES ")
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_COLUMNS_PER_ROW = 12
# Rows per INSERT statement (multi-row VALUES). SQLite: the driver releases the GIL
# around every statement execution, and with callers' threads busy each release can
# cost the single writer a whole switch interval (5 ms) before it gets the GIL back,
# so one execution per row stalled it; 256 rows are 3072 parameters, below SQLite's
# limit (32766 since 3.32; 999 before, hence 64). PostgreSQL: psycopg's per-statement
# work dominates, but it re-parses any statement longer than 4 KiB or with more than 50
# parameters on every execution, so 4 rows (48 parameters) per statement, pipelined.
_ROWS_PER_INSERT = {"sqlite": 256 if sqlite3.sqlite_version_info >= (3, 32) else 64, "postgres": 4}


@functools.lru_cache(maxsize=None)
def _insert_sql(rows: int) -> str:
    return _INSERT_INTO + ", ".join([_ROW_MARKS] * rows)


def insert_rows(tx, rows: list[tuple], dialect: str) -> None:
    """Insert rows with ``executemany`` of full statements of ``_ROWS_PER_INSERT``
    rows, and the remainder split into powers of two, so only a handful of distinct
    statements are ever prepared (and cached)."""
    per_statement = _ROWS_PER_INSERT.get(dialect, 1)
    flat = list(itertools.chain.from_iterable(rows))
    width = per_statement * _COLUMNS_PER_ROW
    full = len(rows) // per_statement
    if full:
        tx.executemany(_insert_sql(per_statement),
                       [flat[i * width:(i + 1) * width] for i in range(full)])
    start, rest = full * per_statement, len(rows) % per_statement
    size = per_statement
    while rest:
        size >>= 1
        if rest >= size:
            tx.execute(_insert_sql(size),
                       flat[start * _COLUMNS_PER_ROW:(start + size) * _COLUMNS_PER_ROW])
            start += size
            rest -= size


@dataclass(slots=True)
class Chunk:
    """One caller's records, validated and encoded on the caller's thread: entries at a
    placeholder seq 0 with their canonical bytes split around the seq digits
    (``AuditEntry.seq_template``) and the plain values of the query columns. The writer
    fills ``seqs``. ``errors[i]`` is set instead when record i was invalid (then
    ``entries[i]``, ``columns[i]``, ``heads[i]`` and ``tails[i]`` are None)."""

    entries: list[AuditEntry | None]
    columns: list[tuple | None]
    record_ids: list[str | None]
    heads: list[bytes | None]
    tails: list[bytes | None]
    errors: list[str | None] | None = None
    seqs: list[int | None] = field(default_factory=list)
    min_ts: float = math.inf
    max_ts: float = -math.inf

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def of(cls, entries: Sequence[AuditEntry | None], record_ids: list[str | None],
           errors: list[str | None] | None = None) -> Chunk:
        """The chunk of these entries (None where ``errors`` says why)."""
        plain = PLAIN
        columns: list[tuple | None] = []
        heads: list[bytes | None] = []
        tails: list[bytes | None] = []
        min_ts, max_ts = math.inf, -math.inf
        for entry, rid in zip(entries, record_ids):
            if entry is None:
                columns.append(None)
                heads.append(None)
                tails.append(None)
                continue
            ts = entry.ts.timestamp()
            if ts < min_ts:
                min_ts = ts
            if ts > max_ts:
                max_ts = ts
            columns.append((ts, plain[entry.event_type], entry.principal, plain[entry.role],
                            entry.resource, plain[entry.outcome], entry.trace_id, rid))
            head, tail = entry.seq_template()
            heads.append(head)
            tails.append(tail)
        return cls(list(entries), columns, record_ids, heads, tails, errors, min_ts=min_ts, max_ts=max_ts)


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as stored: the parsed entry, its canonical bytes and chain hash."""

    entry: AuditEntry
    canonical: bytes
    chain_hash: bytes


def record_to_entry(record: AuditRecord, seq: int, reporter: str | None = None) -> AuditEntry:
    """The domain entry for a validated record at ``seq`` (ValueError naming the field).
    ``reporter``: who sent the record; noted as ``details.reported_by`` when the record
    is about someone else. A ``reported_by`` the record brings must be the caller
    (attack34: it was kept whatever it said, so any service-role client appended records
    about a person "reported by svc:gateway", leaving no trace of who wrote them)."""
    try:
        ts = datetime.fromtimestamp(record.ts, UTC)
    except (OverflowError, OSError, TypeError, ValueError):
        raise ValueError(f"ts: not a representable Unix time: {record.ts!r}") from None
    details = _decode_details(record.details_json)
    if reporter is not None:
        claimed = details.get("reported_by", reporter)
        if claimed != reporter:
            raise ValueError(f"details.reported_by: {claimed!r} is not the caller {reporter!r} "
                             "(the log notes who reported a record itself)")
        if reporter != record.principal:
            details["reported_by"] = reporter  # a dict decoded just now: nobody else holds it
    return AuditEntry.build(
        seq, ts, record.event_type, record.principal, record.role, record.resource,
        record.outcome, record.trace_id, details)


def _make_scanner() -> Callable[[str, int], tuple[object, int]] | None:
    try:
        from json.scanner import c_make_scanner
    except ImportError:  # pragma: no cover - pure-Python json build
        return None
    return c_make_scanner(json.JSONDecoder()) if c_make_scanner is not None else None


# The C scanner behind json.loads, called directly: json.loads adds three Python frames
# and two regex matches for whitespace, more than the scan itself of a small object.
_scan_json = _make_scanner()


def _decode_details(text: str) -> dict:
    """``details_json`` as a dict, exactly as ``json.loads`` would parse it."""
    if not text:
        return {}
    obj: object = None
    parsed = False
    if _scan_json is not None:
        try:
            obj, end = _scan_json(text, 0)
            parsed = end == len(text)
        except (StopIteration, ValueError, RecursionError):
            # leading whitespace, invalid, or nested too deeply (RecursionError: until
            # attack30 AppendAudit answered INTERNAL for the whole call): decided below
            parsed = False
    if not parsed:
        try:
            obj = strict_json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise ValueError("details_json: not valid JSON") from None
    if type(obj) is not dict:
        raise ValueError("details_json: must be a JSON object")
    return obj


# Enum members as plain str values for the query columns (drivers bind exact types
# fastest, and psycopg would not bind a str enum as its value).
PLAIN = {member: member.value for enum_type in (EventType, Role, Outcome) for member in enum_type}


def entry_from_canonical(canonical: bytes) -> AuditEntry:
    """Parse stored canonical bytes back into an entry (ValueError when not parseable)."""
    try:
        data = json.loads(canonical)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("canonical: not valid JSON") from None
    return AuditEntry.from_dict(data)


def export_line(canonical: bytes, chain_hash: bytes) -> str:
    """One export line from stored bytes, without re-encoding the entry: the canonical
    bytes are already canonical JSON, and ``chain_hash`` sorts before ``entry``."""
    return '{"chain_hash":"%s","entry":%s}' % (chain_hash.hex(), canonical.decode("utf-8"))


def columns_match(entry: AuditEntry, row: tuple) -> bool:
    return (row[3] == entry.ts.timestamp() and row[4] == entry.event_type.value
            and row[5] == entry.principal and row[6] == entry.role.value
            and row[7] == entry.resource and row[8] == entry.outcome.value
            and row[9] == entry.trace_id)
