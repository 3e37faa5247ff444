"""The erasure contract: the ``DataHolder`` gRPC service (``Erase``, ``ExportAccount``,
``ExportAccountStream``, protos/hearth/common/v1/common.proto) that clustering, attribution and feedback serve
through the one servicer below, its scope and its result.

A scope (``ErasureScope``, the one scope type of the mesh) names an account and one
target, always within one household:

=============  ==========================================  =========================
kind           deletes                                     required fields
=============  ==========================================  =========================
device         all data of one device                      device_id
person         all data attributed to one person (p1, ..)  person_id
household      everything of the account (and shreds DEK)  —
window         all account data with start <= ts < end     start and/or end (UTC);
                                                           a missing bound is open
=============  ==========================================  =========================
 Each service erases what it holds for the scope and answers
with counts per record kind and a SHA-256 digest over the sorted ids it deleted, which
the privacy service puts into the signed receipt. Erase is idempotent: a repeat finds
nothing left and says so.

``account_id == "*"`` (``ALL_ACCOUNTS``) means every account and is accepted only for a
window scope and only from the privacy service's own principal (``svc:privacy``): the
scheduled retention purge erases everything older than the retention period through the
same Erase path. Every store's window branch must handle it (``scope.all_accounts``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from hearth.common.v1 import common_pb2, common_pb2_grpc
from services.common.ids import check_id, check_query_ts, format_ts, parse_ts
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.export_stream import bounded, chunks, json_pieces, materialised
from services.common.pbutil import float_to_ts, ts_to_float


ALL_ACCOUNTS = "*"
# The only principal that may erase across accounts (the retention purge).
ALL_ACCOUNTS_PRINCIPAL = "svc:privacy"


class ScopeKind(enum.StrEnum):
    DEVICE = "device"
    PERSON = "person"
    HOUSEHOLD = "household"
    TIME_WINDOW = "window"


_REQUIRED: dict[ScopeKind, str | None] = {
    ScopeKind.DEVICE: "device_id", ScopeKind.PERSON: "person_id",
    ScopeKind.HOUSEHOLD: None, ScopeKind.TIME_WINDOW: None,  # window: start and/or end, checked below
}
_TARGET_FIELDS = ("device_id", "person_id", "start", "end")


def _window_bound(value: object, name: str) -> float | None:
    """A window bound as epoch seconds: a number, a timezone-aware datetime or an
    ISO-8601 string with an offset (the receipt form); 1970-01-01 to 2100-01-01."""
    if value is None:
        return None
    if isinstance(value, (datetime, str)):
        try:
            value = parse_ts(value, name).timestamp()
        except ValueError as exc:
            raise InvalidArgument(str(exc).removeprefix(f"{name}: "), name) from None
    return check_query_ts(value, name)


def _text_bound(ts: float) -> str:
    return format_ts(datetime.fromtimestamp(ts, UTC))


@dataclass(frozen=True, slots=True)
class ErasureScope:
    """What one deletion covers: an account and one target (the table in the module
    docstring). The one scope type of the mesh: the gateway builds it from its JSON
    body, privacy stores it in jobs and receipts (``to_dict``), every data holder
    erases by it, and ``scope_to_pb``/``scope_from_pb`` are its wire form. Constructing
    one validates it (InvalidArgument naming the field, a ValueError): fields a kind
    does not use must be absent, so a scope never means two things."""

    account_id: str
    kind: ScopeKind
    device_id: str | None = None
    person_id: str | None = None
    start: float | None = None       # window: [start, end) in epoch seconds; None = open
    end: float | None = None

    def __post_init__(self) -> None:
        try:
            kind = ScopeKind(self.kind)
        except ValueError:
            raise InvalidArgument(f"{self.kind!r} is not one of {', '.join(k.value for k in ScopeKind)}",
                                  "kind") from None
        object.__setattr__(self, "kind", kind)
        if not (self.account_id == ALL_ACCOUNTS and kind is ScopeKind.TIME_WINDOW):
            check_id(self.account_id, "account_id")  # "*" only for the retention purge's window
        required = _REQUIRED[kind]
        for name in _TARGET_FIELDS:
            value = getattr(self, name)
            allowed = name == required or (kind is ScopeKind.TIME_WINDOW and name in ("start", "end"))
            if name == required and value is None:
                raise InvalidArgument(f"required for a {kind.value} scope", name)
            if not allowed and value is not None:
                raise InvalidArgument(f"not allowed in a {kind.value} scope", name)
        if required is not None:
            check_id(getattr(self, required), required)
        if kind is ScopeKind.TIME_WINDOW:
            if self.start is None and self.end is None:
                raise InvalidArgument("a window scope needs a start or an end (or both)", "start")
            start, end = _window_bound(self.start, "start"), _window_bound(self.end, "end")
            if start is not None and end is not None and not start < end:
                raise InvalidArgument(f"must be after start ({_text_bound(start)})", "end")
            object.__setattr__(self, "start", start)
            object.__setattr__(self, "end", end)

    @property
    def all_accounts(self) -> bool:
        """A window over every account (retention purge); see the module docstring."""
        return self.account_id == ALL_ACCOUNTS

    def in_window(self, ts: float) -> bool:
        return (self.start is None or ts >= self.start) and (self.end is None or ts < self.end)

    def covers(self, device_id: str, person_id: str | None, ts: float | datetime) -> bool:
        """Whether a record of this account with these attributes falls in the scope
        (reference semantics for the services' Erase implementations)."""
        if self.kind is ScopeKind.HOUSEHOLD:
            return True
        if self.kind is ScopeKind.DEVICE:
            return device_id == self.device_id
        if self.kind is ScopeKind.PERSON:
            return person_id == self.person_id
        return self.in_window(parse_ts(ts).timestamp() if isinstance(ts, datetime) else float(ts))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (only the fields the kind uses, bounds as UTC text); goes into
        deletion jobs and receipts verbatim."""
        out: dict[str, Any] = {"kind": self.kind.value, "account_id": self.account_id}
        for name in ("device_id", "person_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("start", "end"):
            if getattr(self, name) is not None:
                out[name] = _text_bound(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ErasureScope":
        if not isinstance(data, Mapping):
            raise InvalidArgument("expected an object", "scope")
        unknown = set(data) - {"kind", "account_id", *_TARGET_FIELDS}
        if unknown:
            raise InvalidArgument("unknown field", f"scope.{sorted(unknown)[0]}")
        for name in ("kind", "account_id"):
            if name not in data:
                raise InvalidArgument("missing", f"scope.{name}")
        return cls(**{k: data[k] for k in data})


@dataclass
class ErasureOutcome:
    deleted_counts: dict[str, int] = field(default_factory=dict)
    deleted_ids: list[str] = field(default_factory=list)
    # What was done to make the deletion physical, per store (Database.purge_erased):
    # {"store", "where", "action", "at", "complete"}.
    purges: list[dict] = field(default_factory=list)

    def add(self, kind: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        if not ids:
            return  # counts list only what was there to delete
        self.deleted_counts[kind] = self.deleted_counts.get(kind, 0) + len(ids)
        self.deleted_ids.extend(f"{kind}:{i}" for i in ids)

    def deleted_ids_of(self, kind: str) -> set[str]:
        prefix = f"{kind}:"
        return {i[len(prefix):] for i in self.deleted_ids if i.startswith(prefix)}

    @property
    def empty(self) -> bool:
        return not any(self.deleted_counts.values())


def ids_digest(ids: Iterable[str]) -> bytes:
    """SHA-256 over the sorted ids joined by newlines (the receipt's digest)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).digest()


_WIRE_FIELD = {"account_id": "account_id", "device_id": "device_id", "person_id": "person_id",
               "start": "window.start", "end": "window.end", "kind": "target"}


def scope_from_pb(scope: common_pb2.ErasureScope, path: str = "scope", *,
                  check_principal: bool = True) -> ErasureScope:
    """The scope a request carries, validated by ``ErasureScope`` (errors name the
    wire field under ``path``). ``"*"`` additionally needs the privacy principal
    (``check_principal=False`` only to display a stored job's scope)."""
    target = scope.WhichOneof("target")
    if scope.account_id == ALL_ACCOUNTS and check_principal:
        _check_all_accounts(target, path)
    kwargs: dict[str, Any] = {}
    if target == "household":
        if not scope.household:
            raise InvalidArgument("must be true when given", f"{path}.household")
        kind = "household"
    elif target == "device_id":
        kind, kwargs["device_id"] = "device", scope.device_id
    elif target == "person_id":
        kind, kwargs["person_id"] = "person", scope.person_id
    elif target == "window":
        kind = "window"
        kwargs["start"] = ts_to_float(scope.window, "start", f"{path}.window.start", required=False, window=True)
        kwargs["end"] = ts_to_float(scope.window, "end", f"{path}.window.end", required=False, window=True)
        if kwargs["start"] is None and kwargs["end"] is None:
            raise InvalidArgument("needs a start or an end", f"{path}.window")
    else:
        raise InvalidArgument("one of household, device_id, person_id or window is required", f"{path}.target")
    try:
        return ErasureScope(scope.account_id, kind, **kwargs)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message, f"{path}.{_WIRE_FIELD.get(exc.field, exc.field)}") from None


def _check_all_accounts(target: str | None, path: str) -> None:
    from services.common.identity import current_principal

    if target != "window":
        raise InvalidArgument(f"{ALL_ACCOUNTS!r} (every account) is allowed only with a window",
                              f"{path}.account_id")
    try:
        principal_id = current_principal().id
    except Exception:  # noqa: BLE001 - no principal: not the privacy service
        principal_id = ""
    if principal_id != ALL_ACCOUNTS_PRINCIPAL:
        raise PermissionDenied(f"only {ALL_ACCOUNTS_PRINCIPAL} may erase across every account",
                               f"{path}.account_id")


def _purge_to_pb(p: dict) -> common_pb2.PhysicalPurge:
    return common_pb2.PhysicalPurge(store=p["store"], location=p["where"], action=p["action"],
                                    at=float_to_ts(p["at"]), complete=bool(p["complete"]))


def result_to_pb(service: str, outcome: ErasureOutcome) -> common_pb2.ErasureResult:
    return common_pb2.ErasureResult(
        service=service, deleted_counts=outcome.deleted_counts,
        deleted_ids_sha256=ids_digest(outcome.deleted_ids), already_erased=outcome.empty,
        purges=[_purge_to_pb(p) for p in outcome.purges])


def scope_to_pb(scope: ErasureScope) -> common_pb2.ErasureScope:
    """The wire form of a scope (the inverse of ``scope_from_pb``)."""
    out = common_pb2.ErasureScope(account_id=scope.account_id)
    if scope.kind == "household":
        out.household = True
    elif scope.kind == "device":
        out.device_id = scope.device_id or ""
    elif scope.kind == "person":
        out.person_id = scope.person_id or ""
    else:
        window = common_pb2.TimeRange()
        if scope.start is not None:
            window.start.CopyFrom(float_to_ts(scope.start))
        if scope.end is not None:
            window.end.CopyFrom(float_to_ts(scope.end))
        out.window.CopyFrom(window)
    return out


DATA_HOLDER_SERVICE = "hearth.common.v1.DataHolder"
log = logging.getLogger("hearth.erasure")


class DataHolder(Protocol):
    """What a data-holding service's app offers the erasure contract. The servicer
    below validates the request (scope, account id) before calling either."""

    def erase(self, scope: ErasureScope, job_id: str = "") -> ErasureOutcome:
        """Delete what ``scope`` covers (idempotent); ``job_id`` names the deletion job."""
        ...

    def export_account(self, account_id: str) -> dict[str, Any]:
        """Everything held for the account, decrypted, as one JSON-able document. A list
        may be given as a lazy iterable (a generator paging a table): the streamed export
        writes it item by item, never holding it whole (services/common/export_stream.py)."""
        ...

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """Re-encrypt what is sealed of the account under its data key ``dek_version``
        (idempotent); (values re-encrypted, physical purge steps as for an erasure).
        ``defer_purge``: note the purge owed and leave it to a later call without it (a
        batch rotation purges each store once); no purge step is returned."""
        ...


class DataHolderServicer(common_pb2_grpc.DataHolderServicer):
    """The one implementation of the erasure contract over a service's ``DataHolder``.
    Validation (scope, account id), logging and the wire format (counts, digest,
    sorted-key JSON) are therefore identical in every service."""

    def __init__(self, service: str, holder: DataHolder) -> None:
        self._service = service
        self._holder = holder

    def Erase(self, request: common_pb2.EraseRequest, context) -> common_pb2.EraseResponse:
        if not request.HasField("scope"):
            raise InvalidArgument("is required", "scope")
        if request.job_id:
            check_id(request.job_id, "job_id")
        scope = scope_from_pb(request.scope)
        outcome = self._holder.erase(scope, request.job_id)
        log.info("erased", extra={"fields": {"service": self._service, "job_id": request.job_id,
                                             "kind": scope.kind.value, **outcome.deleted_counts}})
        return common_pb2.EraseResponse(result=result_to_pb(self._service, outcome))

    def Rekey(self, request: common_pb2.RekeyRequest, context) -> common_pb2.RekeyResponse:
        account_id = check_id(request.account_id, "account_id")
        if request.dek_version < 1:
            raise InvalidArgument("must be >= 1", "dek_version")
        count, purges = self._holder.rekey(account_id, int(request.dek_version), bool(request.defer_purge))
        log.info("rekeyed", extra={"fields": {"service": self._service, "dek_version": request.dek_version,
                                              "reencrypted": count, "defer_purge": request.defer_purge}})
        # This release keys erased-id digests with the household's digest key, never with
        # data key version 1 (field_crypto.FieldCipher.digests): the rotation may destroy it.
        return common_pb2.RekeyResponse(reencrypted=count, purges=[_purge_to_pb(p) for p in purges],
                                        digests_keyed_apart=True)

    def ExportAccount(self, request: common_pb2.ExportAccountRequest, context) -> common_pb2.ExportAccountResponse:
        """The part as one message (up to HEARTH_GRPC_MAX_RESPONSE_BYTES): what a privacy of
        a release before session 26 calls."""
        document = self._holder.export_account(check_id(request.account_id, "account_id"))
        return common_pb2.ExportAccountResponse(json=json.dumps(materialised(document), sort_keys=True,
                                                                ensure_ascii=False))

    def ExportAccountStream(self, request: common_pb2.ExportAccountRequest, context) -> Iterator[common_pb2.ExportChunk]:
        """The same JSON text, byte for byte, in chunks of HEARTH_EXPORT_CHUNK_BYTES, the last
        one marked complete (export_stream.chunks); a failure part-way (a store error, an
        undecryptable row) ends the stream with an error status, never with the marker.
        The account id is checked before the first message."""
        document = self._holder.export_account(check_id(request.account_id, "account_id"))
        return bounded(chunks(json_pieces(document)))


def data_holder(service: str, holder: DataHolder):
    """The ``(add_to_server, servicer, full service name)`` entry a service's ``build``
    returns to the bootstrap (services/common/server.py) to serve DataHolder."""
    return (common_pb2_grpc.add_DataHolderServicer_to_server, DataHolderServicer(service, holder),
            DATA_HOLDER_SERVICE)
