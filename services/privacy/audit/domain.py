"""The audit log: entries, canonical bytes, hash chain, Merkle tree, signed tree heads.

Every audited action becomes an ``AuditEntry`` with a dense sequence number ``seq``
(0, 1, 2, ...). Its **canonical bytes** are the UTF-8 JSON of

    {"details": {...}, "event_type": ..., "outcome": ..., "principal": ...,
     "resource": ..., "role": ..., "seq": n, "trace_id": ..., "ts": ..., "v": 1}

with keys sorted at every depth, no whitespace (``separators=(",", ":")``), non-ASCII
kept as UTF-8, NaN/Infinity rejected, and ``ts`` in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

Two independent integrity structures are built over those bytes:

* **hash chain** — ``chain_0 = SHA-256(0x02 || 0^32 || bytes_0)``,
  ``chain_i = SHA-256(0x02 || chain_{i-1} || bytes_i)``. Each stored row keeps its
  chain hash; re-checking the links locates the first edited row exactly.
* **Merkle tree** (RFC 9162, see ``merkle``) with ``bytes_i`` as leaf i. It gives
  O(log n) inclusion proofs for one entry and consistency proofs between two heads.

A **signed tree head** (STH) commits to both: Ed25519 over the canonical JSON of
``{"chain_head", "key_id", "root", "timestamp", "tree_size", "type": "hearth-audit-sth",
"v": 1}`` (hashes as lowercase hex). The 0x02 chain prefix keeps chain hashes apart
from the 0x00/0x01 Merkle hashes.

The writer's whole state is ``AuditState`` = (size, chain head, Merkle frontier), a few
hundred bytes serialisable with ``to_bytes``; ``append_batch`` is a pure function of
(state, entries). The service layer stores, per entry, the canonical bytes, the leaf
hash and the chain hash, plus the state and the STH of every batch.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from services.common.audit_events import EventType  # noqa: F401  (the one vocabulary)
from services.common.ids import Outcome, Role  # noqa: F401  (the one vocabulary)
from services.common.ids import _format_utc, format_ts, parse_ts  # noqa: F401  (the one UTC text form)
from services.common.strict_json import DuplicateKeyError, loads_unambiguous

from services.privacy.audit import merkle
from services.privacy.keys.signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, verify_signature

FORMAT_VERSION = 1
STH_TYPE = "hearth-audit-sth"
CHAIN_PREFIX = b"\x02"
GENESIS_CHAIN_HASH = bytes(32)
HASH_SIZE = merkle.HASH_SIZE
MAX_TEXT = 1024  # longest principal / resource / trace id we accept
_VERSION_TEXT = str(FORMAT_VERSION)


# --------------------------------------------------------------------------- helpers


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, NaN/Infinity rejected."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_text(value: object, argument: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{argument}: expected a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{argument}: must not be empty")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{argument}: longer than {MAX_TEXT} characters")
    return value


def _check_seq(seq: object) -> int:
    if type(seq) is not int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise ValueError(f"seq: expected an int, got {type(seq).__name__}")
        seq = int(seq)
    if seq < 0:
        raise ValueError(f"seq: must be >= 0, got {seq}")
    return seq


def _check_json_value(value: Any, path: str, depth: int = 0) -> None:
    """Reject what canonical JSON cannot represent unambiguously (exact-type fast paths
    first: this runs for every audit entry)."""
    if depth > MAX_DETAILS_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DETAILS_DEPTH} levels")
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return
    if t is float:
        if not math.isfinite(value):
            raise ValueError(f"{path}: non-finite number {value!r} is not allowed")
        return
    if t is dict or isinstance(value, Mapping):
        for k, v in value.items():
            if type(k) is not str:
                raise ValueError(f"{path}: keys must be strings, got {type(k).__name__}")
            tv = type(v)
            if tv is str or tv is int or tv is bool or v is None:
                continue  # common case: skip building the path string
            _check_json_value(v, f"{path}.{k}", depth + 1)
        return
    if t is list or t is tuple:
        for i, v in enumerate(value):
            _check_json_value(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, (str, int, float)):  # subclasses (e.g. enums) encode as their base
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}: non-finite number {value!r} is not allowed")
        return
    raise ValueError(f"{path}: {type(value).__name__} is not JSON-serialisable")


def _enum(enum_type: type[enum.StrEnum], value: object, argument: str) -> Any:
    if type(value) is enum_type:
        return value
    member = _ENUM_VALUES[enum_type].get(value) if isinstance(value, str) else None
    if member is None:
        allowed = ", ".join(m.value for m in enum_type)
        raise ValueError(f"{argument}: {value!r} is not one of {allowed}")
    return member


_ENUM_VALUES: dict[type, dict[str, Any]] = {
    t: {m.value: m for m in t} for t in (EventType, Role, Outcome)
}
_encode_str = json.encoder.encode_basestring  # the C encoder json.dumps uses (no ASCII escaping)
_DETAILS_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
MAX_DETAILS_DEPTH = 32


def _make_details_encoder() -> Any:
    """The C iterencoder that ``json.dumps`` builds on every call, built once.

    Same output as ``_DETAILS_ENCODER.encode``; it skips the circular-reference markers
    because ``_check_json_value`` has already bounded the nesting depth.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pure-Python json build
        return _DETAILS_ENCODER.encode

    def raise_unserialisable(obj: Any) -> Any:
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    iterencode = c_make_encoder(
        None, raise_unserialisable, json.encoder.encode_basestring, None, ":", ",",
        True, False, False,
    )
    return lambda obj: "".join(iterencode(obj, 0))


_encode_details = _make_details_encoder()


def chain_hash(prev_hash: bytes, entry_bytes: bytes) -> bytes:
    """SHA-256(0x02 || prev_hash || entry_bytes); ``prev_hash`` of entry 0 is 32 zero bytes."""
    if not isinstance(prev_hash, (bytes, bytearray)) or len(prev_hash) != HASH_SIZE:
        raise ValueError(f"prev_hash: expected {HASH_SIZE} bytes")
    if not isinstance(entry_bytes, (bytes, bytearray)):
        raise ValueError(f"entry_bytes: expected bytes, got {type(entry_bytes).__name__}")
    return hashlib.sha256(CHAIN_PREFIX + prev_hash + entry_bytes).digest()


# --------------------------------------------------------------------------- entries


_EVENT_TYPES: dict[str, EventType] = {m.value: m for m in EventType}
_ROLES: dict[str, Role] = {m.value: m for m in Role}
_OUTCOMES: dict[str, Outcome] = {m.value: m for m in Outcome}


def _entry_fields(
    seq: Any, ts: Any, event_type: Any, principal: Any, role: Any, resource: Any,
    outcome: Any, trace_id: Any, details: Any,
) -> dict[str, Any]:
    """Validated, normalised fields of an ``AuditEntry`` plus its canonical bytes (the
    instance ``__dict__``). Written for speed, since it runs for every audited action:
    exact-type checks first, the general checks (with their error messages) only when
    a fast check fails."""
    if type(seq) is not int or seq < 0:
        seq = _check_seq(seq)
    if type(ts) is not datetime or ts.tzinfo is not UTC:
        ts = parse_ts(ts)
    if type(event_type) is not EventType:
        event_type = _EVENT_TYPES.get(event_type) if type(event_type) is str else None  # type: ignore[arg-type]
        if event_type is None:
            event_type = _enum(EventType, event_type, "event_type")
    if type(role) is not Role:
        role = _ROLES.get(role) if type(role) is str else None  # type: ignore[arg-type]
        if role is None:
            role = _enum(Role, role, "role")
    if type(outcome) is not Outcome:
        outcome = _OUTCOMES.get(outcome) if type(outcome) is str else None  # type: ignore[arg-type]
        if outcome is None:
            outcome = _enum(Outcome, outcome, "outcome")
    if type(principal) is not str or not principal or len(principal) > MAX_TEXT:
        _check_text(principal, "principal")
    if type(resource) is not str or len(resource) > MAX_TEXT:
        _check_text(resource, "resource", allow_empty=True)
    if type(trace_id) is not str or len(trace_id) > MAX_TEXT:
        _check_text(trace_id, "trace_id", allow_empty=True)
    if type(details) is not dict and not isinstance(details, Mapping):
        raise ValueError(f"details: expected a mapping, got {type(details).__name__}")
    details = dict(details)  # a private copy: the canonical bytes must not go stale
    # _check_json_value(details, "details") with its first level inlined (the usual
    # details are flat: string keys, string/int/bool/null values).
    for key, value in details.items():
        if type(key) is not str:
            raise ValueError(f"details: keys must be strings, got {type(key).__name__}")
        kind = type(value)
        if kind is not str and kind is not int and kind is not bool and value is not None:
            _check_json_value(value, f"details.{key}", 1)
    # Canonical JSON assembled directly with keys in sorted order, several times
    # faster than building and sorting a dict; tests check it equals
    # canonical_json(entry.to_dict()). StrEnum members are their own values. The
    # timestamp is _format_utc inlined.
    text = "".join((
        '{"details":', _encode_details(details),
        ',"event_type":"', event_type,
        '","outcome":"', outcome,
        '","principal":', _encode_str(principal),
        ',"resource":', _encode_str(resource),
        ',"role":"', role,
        '","seq":', str(seq),
        ',"trace_id":', _encode_str(trace_id),
        ',"ts":"', "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
            ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second, ts.microsecond),
        '","v":', _VERSION_TEXT, "}",
    ))
    try:
        canonical = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("entry: text fields must be valid Unicode (lone surrogate)") from None
    return {"seq": seq, "ts": ts, "event_type": event_type, "principal": principal,
            "role": role, "resource": resource, "outcome": outcome, "trace_id": trace_id,
            "details": details, "_canonical": canonical}



@dataclass(frozen=True)
class AuditEntry:
    """One audited action. ``details`` is free-form JSON (string keys, finite numbers);
    treat it as immutable: the canonical bytes are computed once, at construction."""

    seq: int
    ts: datetime
    event_type: EventType
    principal: str
    role: Role
    resource: str
    outcome: Outcome = Outcome.SUCCESS
    trace_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    _canonical: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        object.__setattr__(self, "__dict__", _entry_fields(
            self.seq, self.ts, self.event_type, self.principal, self.role, self.resource,
            self.outcome, self.trace_id, self.details))

    @classmethod
    def build(
        cls, seq: int, ts: datetime | str, event_type: EventType | str, principal: str,
        role: Role | str, resource: str, outcome: Outcome | str = Outcome.SUCCESS,
        trace_id: str = "", details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """The same entry as ``AuditEntry(...)`` (same validation, same errors, same
        bytes) without the dataclass ``__init__``, which sets each field separately
        through the frozen-instance guard: the log's hot path builds one per record."""
        entry = object.__new__(cls)
        entry.__dict__.update(_entry_fields(
            seq, ts, event_type, principal, role, resource, outcome, trace_id,
            {} if details is None else details))
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The JSON object whose canonical encoding is the entry's leaf data."""
        return {
            "v": FORMAT_VERSION,
            "seq": self.seq,
            "ts": format_ts(self.ts),
            "event_type": self.event_type.value,
            "principal": self.principal,
            "role": self.role.value,
            "resource": self.resource,
            "outcome": self.outcome.value,
            "trace_id": self.trace_id,
            "details": self.details,
        }

    @property
    def canonical_bytes(self) -> bytes:
        """Canonical JSON of ``to_dict()`` — the Merkle leaf data and chain input."""
        return self._canonical

    def canonical_bytes_at(self, seq: int) -> bytes:
        """The canonical bytes this entry has at sequence number ``seq``.

        The log's writer validates and encodes an entry once, before it knows the seq
        (``seq=0`` as a placeholder), and stamps the real seq here: only the digits after
        the top-level ``"seq":`` change. That is the LAST occurrence of ``,"seq":`` in the
        bytes: only ``trace_id`` (a JSON string, whose quotes are escaped), ``ts`` and
        ``v`` follow it, while ``details`` (which may hold a "seq" key) comes first.
        Equal to ``AuditEntry(seq=seq, <other fields>).canonical_bytes`` (tests check it).
        """
        seq = _check_seq(seq)
        canonical = self._canonical
        start = canonical.rindex(b',"seq":') + 7
        return b"%b%d%b" % (canonical[:start], seq, canonical[start + len(str(self.seq)):])

    def seq_template(self) -> tuple[bytes, bytes]:
        """(head, tail): the canonical bytes before and after the seq digits, so that
        ``canonical_bytes_at(s) == head + b"%d" % s + tail`` for every seq ``s`` (a
        writer stamping many entries splits each once, before it holds the log)."""
        canonical = self._canonical
        start = canonical.rindex(b',"seq":') + 7
        return canonical[:start], canonical[start + len(str(self.seq)):]

    def with_seq(self, seq: int) -> AuditEntry:
        """This entry at sequence number ``seq`` without validating or encoding the other
        fields again (see ``canonical_bytes_at``); equal to building it anew."""
        canonical = self.canonical_bytes_at(seq)
        stamped = object.__new__(AuditEntry)
        object.__setattr__(stamped, "__dict__", {**self.__dict__, "seq": int(seq), "_canonical": canonical})
        return stamped

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, argument: str = "entry") -> AuditEntry:
        """Inverse of ``to_dict``; unknown keys or a different format version are errors,
        because they would change the canonical bytes silently."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{argument}: expected an object, got {type(data).__name__}")
        expected = {"v", "seq", "ts", "event_type", "principal", "role", "resource",
                    "outcome", "trace_id", "details"}
        missing = expected - data.keys()
        if missing:
            raise ValueError(f"{argument}.{sorted(missing)[0]}: missing")
        extra = data.keys() - expected
        if extra:
            raise ValueError(f"{argument}.{sorted(extra)[0]}: unknown field")
        if data["v"] != FORMAT_VERSION:
            raise ValueError(f"{argument}.v: unsupported format version {data['v']!r}")
        try:
            return cls(
                seq=data["seq"], ts=data["ts"], event_type=data["event_type"],
                principal=data["principal"], role=data["role"], resource=data["resource"],
                outcome=data["outcome"], trace_id=data["trace_id"], details=data["details"],
            )
        except ValueError as exc:
            raise ValueError(f"{argument}.{exc}") from None


# --------------------------------------------------------------------------- writer state


@dataclass(frozen=True, slots=True)
class AuditState:
    """Everything the writer needs to append: size, chain head, Merkle frontier."""

    size: int = 0
    chain_head: bytes = GENESIS_CHAIN_HASH
    frontier: merkle.Frontier = field(default_factory=merkle.Frontier)

    _MAGIC = b"HAS1"

    def __post_init__(self) -> None:
        if self.frontier.size != self.size:
            raise ValueError(f"frontier: size {self.frontier.size} != state size {self.size}")
        if not isinstance(self.chain_head, bytes) or len(self.chain_head) != HASH_SIZE:
            raise ValueError(f"chain_head: expected {HASH_SIZE} bytes")
        if self.size == 0 and self.chain_head != GENESIS_CHAIN_HASH:
            raise ValueError("chain_head: an empty log has the all-zero chain head")

    @property
    def root(self) -> bytes:
        return self.frontier.root()

    def to_bytes(self) -> bytes:
        """``b"HAS1" || chain_head(32) || frontier.to_bytes()`` (size is in the frontier)."""
        return self._MAGIC + self.chain_head + self.frontier.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditState:
        if not isinstance(data, (bytes, bytearray)) or data[:4] != cls._MAGIC:
            raise ValueError("data: not an audit state (bad magic)")
        if len(data) < 4 + HASH_SIZE + 8:
            raise ValueError("data: audit state truncated")
        frontier = merkle.Frontier.from_bytes(bytes(data[4 + HASH_SIZE :]))
        return cls(frontier.size, bytes(data[4 : 4 + HASH_SIZE]), frontier)


def _as_hash_array(raw: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(-1, HASH_SIZE)


def append_batch(
    state: AuditState, entries: Sequence[AuditEntry]
) -> tuple[AuditState, np.ndarray, np.ndarray]:
    """Append entries whose seqs continue ``state`` densely (state.size, state.size+1, ...).

    Returns (new state, leaf hashes (k, 32) uint8, chain hashes (k, 32) uint8). Pure:
    ``state`` is unchanged, so a failed SQL write simply discards the result.
    """
    if not isinstance(state, AuditState):
        raise ValueError(f"state: expected AuditState, got {type(state).__name__}")
    if isinstance(entries, (AuditEntry, str, bytes)) or not isinstance(entries, Sequence):
        raise ValueError("entries: expected a sequence of AuditEntry")
    expected_seq = state.size
    for i, entry in enumerate(entries):
        if type(entry) is not AuditEntry and not isinstance(entry, AuditEntry):
            raise ValueError(f"entries[{i}]: expected AuditEntry, got {type(entry).__name__}")
        if entry.seq != expected_seq + i:
            raise ValueError(f"entries[{i}].seq: expected {expected_seq + i}, got {entry.seq}")
    new_state, leaves, chains = append_canonical(state, [e._canonical for e in entries])
    return new_state, _as_hash_array(b"".join(leaves)), _as_hash_array(b"".join(chains))


def append_canonical(
    state: AuditState, canonical: Sequence[bytes]
) -> tuple[AuditState, list[bytes], list[bytes]]:
    """``append_batch`` for entries given by their canonical bytes, the i-th already at
    seq ``state.size + i`` (see ``AuditEntry.canonical_bytes_at``).

    Returns (new state, leaf hashes, chain hashes) as lists of 32-byte strings, one per
    entry. Pure, like ``append_batch``; the caller vouches that the bytes are canonical
    entries with those seqs (``verify_log`` would catch any that are not).
    """
    if not isinstance(state, AuditState):
        raise ValueError(f"state: expected AuditState, got {type(state).__name__}")
    leaves, chains = entry_hashes(state.chain_head, canonical)
    if not leaves:
        return state, leaves, chains
    frontier = state.frontier.extend(b"".join(leaves))
    return AuditState(state.size + len(leaves), chains[-1], frontier), leaves, chains


def entry_hashes(chain_head: bytes, canonical: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(leaf hashes ``SHA-256(0x00 || bytes_i)``, chain hashes ``chain_i``) of entries
    appended to a log whose chain head is ``chain_head``, one 32-byte string each.

    The state-free core of ``append_canonical``, for a writer that keeps the full
    ``merkle.MerkleTree`` anyway and reads the new frontier from it
    (``MerkleTree.frontier``) instead of hashing the same interior nodes twice.
    """
    if not isinstance(chain_head, bytes) or len(chain_head) != HASH_SIZE:
        raise ValueError(f"chain_head: expected {HASH_SIZE} bytes")
    sha256 = hashlib.sha256
    leaf_prefix, chain_prefix = merkle.LEAF_PREFIX, CHAIN_PREFIX
    leaves: list[bytes] = []
    chains: list[bytes] = []
    prev = chain_head
    for i, data in enumerate(canonical):
        if type(data) is not bytes:
            raise ValueError(f"canonical[{i}]: expected bytes, got {type(data).__name__}")
        leaves.append(sha256(leaf_prefix + data).digest())
        prev = sha256(chain_prefix + prev + data).digest()
        chains.append(prev)
    return leaves, chains


# --------------------------------------------------------------------------- tree heads


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A signed commitment to the first ``tree_size`` entries."""

    tree_size: int
    root: bytes
    chain_head: bytes
    timestamp: datetime
    key_id: str
    signature: bytes

    def signed_payload(self) -> bytes:
        """The exact bytes that are signed (canonical JSON, hashes as hex)."""
        return sth_payload(self.tree_size, self.root, self.chain_head, self.timestamp, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "type": STH_TYPE,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "chain_head": self.chain_head.hex(),
            "timestamp": format_ts(self.timestamp, "timestamp"),
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, argument: str = "sth") -> SignedTreeHead:
        if not isinstance(data, Mapping):
            raise ValueError(f"{argument}: expected an object")
        for name in ("tree_size", "root", "chain_head", "timestamp", "key_id", "signature"):
            if name not in data:
                raise ValueError(f"{argument}.{name}: missing")
        if data.get("type", STH_TYPE) != STH_TYPE or data.get("v", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"{argument}.type: not a version {FORMAT_VERSION} audit tree head")
        size = data["tree_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{argument}.tree_size: expected an int >= 0, got {size!r}")

        def hex_field(name: str, length: int | None) -> bytes:
            value = data[name]
            try:
                raw = bytes.fromhex(value)
            except (TypeError, ValueError):
                raise ValueError(f"{argument}.{name}: expected hex, got {value!r}") from None
            if length is not None and len(raw) != length:
                raise ValueError(f"{argument}.{name}: expected {length} bytes, got {len(raw)}")
            return raw

        key = data["key_id"]
        if not isinstance(key, str):
            raise ValueError(f"{argument}.key_id: expected a string")
        return cls(
            tree_size=size,
            root=hex_field("root", HASH_SIZE),
            chain_head=hex_field("chain_head", HASH_SIZE),
            timestamp=parse_ts(data["timestamp"], f"{argument}.timestamp"),
            key_id=key,
            signature=hex_field("signature", None),
        )


def sth_payload(
    tree_size: int, root: bytes, chain_head: bytes, timestamp: datetime, key_id_: str
) -> bytes:
    """Canonical JSON that an STH signature covers."""
    return canonical_json({
        "v": FORMAT_VERSION,
        "type": STH_TYPE,
        "tree_size": tree_size,
        "root": root.hex(),
        "chain_head": chain_head.hex(),
        "timestamp": format_ts(timestamp, "timestamp"),
        "key_id": key_id_,
    })


def sign_tree_head(
    state: AuditState, private_key: Ed25519PrivateKey, timestamp: datetime, kid: str = ""
) -> SignedTreeHead:
    """Sign (size, Merkle root, chain head, timestamp) of ``state`` with Ed25519.
    ``kid``: ``key_id(private_key)`` when the caller has it (the writer signs a head per
    committed batch, and deriving the public key to hash it cost as much as the rest)."""
    if not isinstance(state, AuditState):
        raise ValueError(f"state: expected AuditState, got {type(state).__name__}")
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("private_key: expected an Ed25519 private key")
    kid = kid or key_id(private_key)
    root = state.root
    payload = sth_payload(state.size, root, state.chain_head, timestamp, kid)
    return SignedTreeHead(
        tree_size=state.size, root=root, chain_head=state.chain_head,
        timestamp=parse_ts(timestamp, "timestamp"), key_id=kid,
        signature=private_key.sign(payload),
    )


def verify_tree_head(sth: SignedTreeHead, public_key: Ed25519PublicKey) -> bool:
    """True when the STH was signed by ``public_key`` and is unmodified."""
    if not isinstance(sth, SignedTreeHead):
        raise ValueError(f"sth: expected SignedTreeHead, got {type(sth).__name__}")
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("public_key: expected an Ed25519 public key")
    if sth.key_id != key_id(public_key):
        return False
    return verify_signature(public_key, sth.signature, sth.signed_payload())


# --------------------------------------------------------------------------- verification


class TamperReason(enum.StrEnum):
    """Why ``verify_log`` rejected a log. Precedence when several apply: the first
    listed that is detected (signature, then sequence shape, then content)."""

    BAD_SIGNATURE = "bad_signature"  # the tree head is forged or was signed by another key
    INSERTED = "inserted"  # a seq appears twice, or more entries than the signed size
    REMOVED = "removed"  # a seq below the last present one is missing
    TRUNCATED = "truncated"  # the log stops before the signed size
    REORDERED = "reordered"  # every seq present once, but out of order
    MODIFIED = "modified"  # shape intact, content differs from what was chained/signed


@dataclass(frozen=True, slots=True)
class LogVerification:
    """Result of ``verify_log``. ``first_bad_seq`` is the first seq at which the evidence
    breaks (None when only the signed root disagrees and no per-entry chain hashes
    were supplied to localise it)."""

    ok: bool
    reason: TamperReason | None = None
    first_bad_seq: int | None = None
    message: str = "ok"

    def __bool__(self) -> bool:
        return self.ok


def _fail(reason: TamperReason, seq: int | None, message: str) -> LogVerification:
    return LogVerification(False, reason, seq, message)


def _shape_problem(seqs: np.ndarray, signed_size: int) -> LogVerification | None:
    """Classify an entry sequence (the seqs in stored order, int64) that is not exactly
    0..signed_size-1. Vectorised: a few arrays of 8 bytes per entry, only ever built for a
    log whose seqs already strayed from their positions (``LogVerifier``)."""
    seqs = np.asarray(seqs, dtype=np.int64)
    n = len(seqs)
    if n > 1:
        order = np.argsort(seqs, kind="stable")   # equal seqs keep their stored order
        repeats = order[1:][seqs[order[1:]] == seqs[order[:-1]]]   # positions of second+ occurrences
        if repeats.size:
            position = int(repeats.min())
            s = int(seqs[position])
            return _fail(TamperReason.INSERTED, s, f"seq {s} appears twice (position {position})")
    if n and int(seqs.max()) >= signed_size:
        return None  # more entries than signed: handled with content checks (INSERTED)
    if n:
        present = np.zeros(int(seqs.max()) + 1, dtype=bool)   # at most the signed size
        present[seqs] = True
        missing = np.flatnonzero(~present)
        if missing.size:
            m = int(missing[0])
            return _fail(TamperReason.REMOVED, m, f"entry seq {m} is missing")
    misplaced = np.flatnonzero(seqs != np.arange(n, dtype=np.int64))
    if misplaced.size:
        position = int(misplaced[0])
        return _fail(
            TamperReason.REORDERED, position,
            f"position {position} holds seq {int(seqs[position])}: entries are out of order",
        )
    if n < signed_size:
        return _fail(
            TamperReason.TRUNCATED, n,
            f"log ends at {n} entries, the signed tree head covers {signed_size}",
        )
    return None


# Leaf hashes buffered before they are folded into the verifier's Merkle frontier: one
# ``Frontier.extend`` per this many entries (its per-call cost is paid rarely, its memory
# is this many hashes).
_FOLD_LEAVES = 4096


class LogVerifier:
    """``verify_log`` over a stream: entries are fed one at a time, in stored order, and
    nothing per entry is kept (the hash chain's last link, a Merkle frontier of at most 64
    hashes, a buffer of ``_FOLD_LEAVES`` leaf hashes). Until session 32 the whole log was
    held at once — every entry, its chain hash and leaf hash, then a second full copy of the
    leaf hashes and a whole Merkle tree for the stored heads — so ``VerifyAudit`` of a
    log of millions of entries took GBs (docs/benchmarks.md, "VerifyAudit streamed").

    The answer is ``verify_log``'s, reason and seq, with the same precedence. The sequence
    shape needs every seq only when a seq differs from its position: until then nothing is
    stored, and from the first such entry on its seq and every later one are kept (8 bytes
    each, a tampered log's cost) for ``_shape_problem``.

    ``tree_heads`` (optional): the stored signed tree heads as ``(tree_size column, STH
    JSON)`` in ascending size, read lazily as the stream reaches each size; when the log
    verifies, ``result()`` also gives ``the stored heads' check (``_TreeHeadHistory``).
    """

    def __init__(self, sth: SignedTreeHead, public_key: Ed25519PublicKey, *,
                 tree_heads: Iterable[tuple[int, str]] | None = None,
                 earlier_keys: Sequence[Ed25519PublicKey] = ()) -> None:
        if not isinstance(sth, SignedTreeHead):
            raise ValueError(f"sth: expected SignedTreeHead, got {type(sth).__name__}")
        self._sth = sth
        self._signature_ok = verify_tree_head(sth, public_key)   # checks the key's type too
        self._count = 0
        self._straying: array | None = None   # seqs from the first one off its position (int64)
        self._chain = GENESIS_CHAIN_HASH
        self._first_mismatch: int | None = None
        self._signed_chain_head = GENESIS_CHAIN_HASH
        self._signed_root: bytes | None = merkle.EMPTY_ROOT if sth.tree_size == 0 else None
        self._frontier = merkle.Frontier()
        self._pending = bytearray()   # leaf hashes not yet folded into the frontier
        self._history = _TreeHeadHistory(tree_heads, public_key, earlier_keys) if tree_heads is not None else None
        if self._history is not None:
            self._history.reach(0, None)

    @property
    def count(self) -> int:
        return self._count

    def _root_now(self) -> bytes:
        if self._pending:
            self._frontier = self._frontier.extend(bytes(self._pending))
            self._pending.clear()
        return self._frontier.root()

    def add(self, entry: AuditEntry, recorded_chain_hash: bytes | None = None) -> None:
        """The next entry in stored order, with the chain hash stored beside it (if any)."""
        position = self._count
        self._count += 1
        if self._straying is not None:
            self._straying.append(entry.seq)
        elif entry.seq != position:
            self._straying = array("q", [entry.seq])
        data = entry.canonical_bytes
        self._chain = hashlib.sha256(CHAIN_PREFIX + self._chain + data).digest()
        if recorded_chain_hash is not None and self._first_mismatch is None and recorded_chain_hash != self._chain:
            self._first_mismatch = position
        size = position + 1
        if position < self._sth.tree_size or self._history is not None:
            self._pending += hashlib.sha256(merkle.LEAF_PREFIX + data).digest()
            if len(self._pending) >= _FOLD_LEAVES * HASH_SIZE:
                self._root_now()
        if size == self._sth.tree_size:
            self._signed_chain_head = self._chain
            self._signed_root = self._root_now()
        if self._history is not None and self._history.wants(size):
            self._history.reach(size, (self._root_now(), self._chain))

    def log_result(self) -> LogVerification:
        """``verify_log``'s answer for the entries fed so far."""
        sth = self._sth
        if not self._signature_ok:
            return _fail(TamperReason.BAD_SIGNATURE, None,
                         "tree head signature does not verify with this public key")
        n = self._count
        if self._straying is not None:
            first = n - len(self._straying)
            seqs = np.concatenate([np.arange(first, dtype=np.int64), np.frombuffer(self._straying, dtype=np.int64)])
            problem = _shape_problem(seqs, sth.tree_size)
        elif n < sth.tree_size:   # seqs are exactly 0..n-1
            problem = _fail(TamperReason.TRUNCATED, n,
                            f"log ends at {n} entries, the signed tree head covers {sth.tree_size}")
        else:
            problem = None
        if problem is not None:
            return problem
        if n > sth.tree_size:
            at = self._first_mismatch if self._first_mismatch is not None else sth.tree_size
            return _fail(TamperReason.INSERTED, at,
                         f"{n} entries but the signed tree head covers {sth.tree_size}")
        if self._first_mismatch is not None:
            return _fail(TamperReason.MODIFIED, self._first_mismatch,
                         f"entry seq {self._first_mismatch} does not match its recorded chain hash")
        # Fewer entries than signed get here only when a seq beyond the signed size stood
        # in for a missing one: the chain head is then the genesis hash, as it always was.
        signed_root = self._signed_root if self._signed_root is not None else self._root_now()
        if self._signed_chain_head != sth.chain_head or signed_root != sth.root:
            return _fail(TamperReason.MODIFIED, None,
                         "entries do not match the signed root / chain head "
                         "(supply per-entry chain hashes to locate the change)")
        return LogVerification(True, None, None, f"ok: {n} entries verified")

    def result(self) -> LogVerification:
        """``log_result()``, then (when it is ok and ``tree_heads`` were given) the
        stored heads' check."""
        result = self.log_result()
        if result.ok and self._history is not None:
            forged = self._history.finish()
            if forged is not None:
                return forged
        return result


class _TreeHeadHistory:
    """Check every stored signed tree head ``(tree_size column, STH JSON)`` against the
    entries (``LogVerifier``'s stream, which has verified them): each must parse, sit in the row of its own size, carry
    a valid signature and commit to exactly the entries' root and chain head at its size.
    ``verify_log`` checks only the latest head; without this an altered or forged older
    (or same-size) row would go unnoticed. Each head is checked when the stream reaches its size (the root and chain head
    there), in ascending size, pulled from ``tree_heads`` one at a time; ``failure`` is the
    first that fails (None when all are genuine).

    A head that names another signing key (``key_id``: signed before the key was rotated)
    cannot have its signature checked with ``public_key``; its size, root and chain head
    still must be the entries' (which the latest head, signed by ``public_key``, covers).
    Until session 19 such a head was "forged", so every VerifyAudit after a rotation of
    the audit signing key reported ``bad_signature`` for a log nobody had touched.
    ``earlier_keys`` (``HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS``, session 20): the keys the log
    was signed with before; a head naming one of them has its signature checked with it
    (a restamped or made-up head is ``bad_signature``), as a head naming ``public_key``;
    and, with ``earlier_keys`` given, they and ``public_key`` are the log's signing keys: a
    head naming any other key is ``bad_signature`` too (review20: otherwise a restamped
    head re-signed with a key of the forger's own, its ``key_id`` naming that key, was
    checked for content only and passed)."""

    def __init__(self, tree_heads: Iterable[tuple[int, str]], public_key: Ed25519PublicKey,
                 earlier_keys: Sequence[Ed25519PublicKey]) -> None:
        self._heads = iter(tree_heads)
        self._keys = {key_id(k): k for k in earlier_keys}
        self._keys[key_id(public_key)] = public_key
        self._restricted = bool(earlier_keys)
        self._next = next(self._heads, None)
        self._previous_size: int | None = None
        self.failure: LogVerification | None = None

    def wants(self, size: int) -> bool:
        return self._next is not None and self._next[0] <= size

    def reach(self, size: int, at_size: tuple[bytes, bytes] | None) -> None:
        """Check every head of size <= ``size``; ``at_size``: (root, chain head) after
        exactly ``size`` entries (None: no entry stream reaches it)."""
        while self._next is not None and self._next[0] <= size:
            head_size, text = self._next
            if self._previous_size is not None and head_size < self._previous_size:
                raise ValueError("tree_heads: expected ascending tree sizes")
            self._previous_size = head_size
            if self.failure is None:
                self.failure = self._check(int(head_size), text, at_size if head_size == size else None)
            self._next = next(self._heads, None)

    def finish(self) -> LogVerification | None:
        self.reach(math.inf, None)   # heads beyond the entries: nothing at their size
        return self.failure

    def _check(self, size: int, text: str, at_size: tuple[bytes, bytes] | None) -> LogVerification | None:
        try:
            sth = SignedTreeHead.from_dict(json.loads(text))
        except (ValueError, TypeError, json.JSONDecodeError):
            return _fail(TamperReason.BAD_SIGNATURE, None, f"stored tree head of size {size} does not parse")
        signer = self._keys.get(sth.key_id)
        if signer is None and self._restricted:
            return _fail(TamperReason.BAD_SIGNATURE, None,
                         f"stored tree head of size {size} names signing key {sth.key_id}, neither the current "
                         "key nor one of HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS")
        if sth.tree_size != size or (signer is not None and not verify_tree_head(sth, signer)):
            return _fail(TamperReason.BAD_SIGNATURE, None,
                         f"stored tree head of size {size} is forged (signature or size)")
        if at_size != (sth.root, sth.chain_head):
            return _fail(TamperReason.MODIFIED, None,
                         f"stored tree head of size {size} does not match the log at that size")
        return None


def tree_heads_beyond_the_log(tree_heads: Iterable[tuple[int, str]], public_key: Ed25519PublicKey,
                              earlier_keys: Sequence[Ed25519PublicKey] = ()) -> LogVerification | None:
    """The answer for stored heads ``(tree_size column, STH JSON)`` of sizes no entry reaches
    (``_TreeHeadHistory``'s check with nothing at their size): the first's failure."""
    history = _TreeHeadHistory(tree_heads, public_key, earlier_keys)
    return history.finish()


def verify_log(
    entries: Sequence[AuditEntry],
    sth: SignedTreeHead,
    public_key: Ed25519PublicKey,
    *,
    chain_hashes: Sequence[bytes] | np.ndarray | None = None,
) -> LogVerification:
    """Check that ``entries`` are exactly the log the signed tree head commits to.

    ``chain_hashes`` (optional, one per entry, as stored at append time) lets the first
    modified entry be located precisely; without them a content change is still
    detected (root and chain head disagree with the STH) but not located. The entries
    already in memory (an export); ``LogVerifier`` takes them as a stream.
    """
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ValueError("entries: expected a sequence of AuditEntry")
    for i, e in enumerate(entries):
        if not isinstance(e, AuditEntry):
            raise ValueError(f"entries[{i}]: expected AuditEntry, got {type(e).__name__}")
    recorded: list[bytes] | None = None
    if chain_hashes is not None:
        raw = merkle.hashes_to_bytes(chain_hashes, "chain_hashes")
        recorded = [raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)]
        if len(recorded) != len(entries):
            raise ValueError(f"chain_hashes: {len(recorded)} given for {len(entries)} entries")
    verifier = LogVerifier(sth, public_key)
    for i, e in enumerate(entries):
        verifier.add(e, recorded[i] if recorded is not None else None)
    return verifier.log_result()


def verify_entry_inclusion(
    entry: AuditEntry, proof: Sequence[bytes], sth: SignedTreeHead, public_key: Ed25519PublicKey
) -> bool:
    """One entry is leaf ``entry.seq`` of the tree a valid STH signs (RFC 9162 §2.1.3.2)."""
    if not isinstance(entry, AuditEntry):
        raise ValueError(f"entry: expected AuditEntry, got {type(entry).__name__}")
    if not verify_tree_head(sth, public_key):
        return False
    leaf = merkle.leaf_hash(entry.canonical_bytes)
    return merkle.verify_inclusion(leaf, entry.seq, sth.tree_size, proof, sth.root)


def verify_tree_heads_consistent(
    old: SignedTreeHead, new: SignedTreeHead, proof: Sequence[bytes], public_key: Ed25519PublicKey
) -> bool:
    """Both heads are validly signed and ``new`` extends ``old`` append-only."""
    if not (verify_tree_head(old, public_key) and verify_tree_head(new, public_key)):
        return False
    return merkle.verify_consistency(old.tree_size, new.tree_size, old.root, new.root, proof)


# --------------------------------------------------------------------------- export format


class AlteredExportError(ValueError):
    """A line parses, but is not the canonical form of what it says (a value respelled:
    ``1.0`` for ``1``, another spelling of a timestamp): the hashes and the signature are
    recomputed from the parsed fields, so such a line would verify although its text is
    not what was signed. Tampered, not unreadable."""


@dataclass(frozen=True, slots=True)
class ExportedLog:
    entries: list[AuditEntry]
    chain_hashes: list[bytes]
    sth: SignedTreeHead


def export_lines(
    entries: Iterable[AuditEntry], chain_hashes: Iterable[bytes], sth: SignedTreeHead
) -> Iterator[str]:
    """JSON Lines export: one ``{"chain_hash": hex, "entry": {...}}`` per entry in seq
    order, then one ``{"sth": {...}}`` line. Each line is canonical JSON (no newline)."""
    for e, h in zip(entries, chain_hashes, strict=True):
        yield canonical_json({"entry": e.to_dict(), "chain_hash": bytes(h).hex()}).decode("utf-8")
    yield canonical_json({"sth": sth.to_dict()}).decode("utf-8")


def parse_export(lines: Iterable[str]) -> ExportedLog:
    """Inverse of ``export_lines``; blank lines are ignored; errors name the line."""
    entries: list[AuditEntry] = []
    hashes: list[bytes] = []
    sth: SignedTreeHead | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        if sth is not None:
            raise ValueError(f"{where}: content after the signed tree head")
        try:
            obj = loads_unambiguous(line)
        except DuplicateKeyError as exc:  # ambiguous: a tampered export, not a bad file
            raise DuplicateKeyError(f"{where}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if "sth" in obj:
            sth = SignedTreeHead.from_dict(obj["sth"], argument=f"{where}.sth")
            _check_canonical(obj["sth"], sth.to_dict(), f"{where}.sth")
            continue
        if "entry" not in obj or "chain_hash" not in obj:
            raise ValueError(f"{where}: expected 'entry' and 'chain_hash' (or 'sth')")
        entry = AuditEntry.from_dict(obj["entry"], argument=f"{where}.entry")
        _check_canonical(obj["entry"], entry.to_dict(), f"{where}.entry")
        entries.append(entry)
        try:
            h = bytes.fromhex(obj["chain_hash"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}.chain_hash: expected hex") from None
        if len(h) != HASH_SIZE:
            raise ValueError(f"{where}.chain_hash: expected {HASH_SIZE} bytes")
        hashes.append(h)
    if sth is None:
        raise ValueError("sth: the export has no signed tree head line")
    return ExportedLog(entries, hashes, sth)


def _check_canonical(given: Any, parsed: Mapping[str, Any], where: str) -> None:
    if canonical_json(given) != canonical_json(parsed):
        raise AlteredExportError(f"{where}: not the canonical form of its fields (a value was "
                                 "respelled): the export was altered")
