"""The erasure contract: the ``DataHolder`` gRPC service (``Erase``, ``ExportAccount``,
protos/hearth/common/v1/common.proto) that clustering, attribution and feedback serve
through the one servicer below, its scope and its result.

A scope names an account and one target: the whole household, one device, one resolved
person, or a time window. Each service erases what it holds for the scope and answers
with counts per record kind and a SHA-256 digest over the sorted ids it deleted, which
the privacy service puts into the signed receipt. Erase is idempotent: a repeat finds
nothing left and says so.

``account_id == "*"`` (``ALL_ACCOUNTS``) means every account and is accepted only for a
window scope and only from the privacy service's own principal (``svc:privacy``): the
scheduled retention purge erases everything older than the retention period through the
same Erase path. Every store's window branch must handle it (``scope.all_accounts``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hearth.common.v1 import common_pb2, common_pb2_grpc
from services.common.ids import check_id
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.pbutil import float_to_ts, ts_to_float


ALL_ACCOUNTS = "*"
# The only principal that may erase across accounts (the retention purge).
ALL_ACCOUNTS_PRINCIPAL = "svc:privacy"


@dataclass(frozen=True)
class ErasureScope:
    account_id: str
    kind: str                        # "household" | "device" | "person" | "window"
    device_id: str | None = None
    person_id: str | None = None
    start: float | None = None       # window: [start, end); None = open
    end: float | None = None

    @property
    def all_accounts(self) -> bool:
        """A window over every account (retention purge); see the module docstring."""
        return self.account_id == ALL_ACCOUNTS

    def in_window(self, ts: float) -> bool:
        return (self.start is None or ts >= self.start) and (self.end is None or ts < self.end)


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


def scope_from_pb(scope: common_pb2.ErasureScope, path: str = "scope") -> ErasureScope:
    target = scope.WhichOneof("target")
    if scope.account_id == ALL_ACCOUNTS:
        _check_all_accounts(target, path)
    else:
        check_id(scope.account_id, f"{path}.account_id")
    if target == "household":
        if not scope.household:
            raise InvalidArgument("must be true when given", f"{path}.household")
        return ErasureScope(scope.account_id, "household")
    if target == "device_id":
        return ErasureScope(scope.account_id, "device", device_id=check_id(scope.device_id, f"{path}.device_id"))
    if target == "person_id":
        return ErasureScope(scope.account_id, "person", person_id=check_id(scope.person_id, f"{path}.person_id"))
    if target == "window":
        start = ts_to_float(scope.window, "start", f"{path}.window.start", required=False, window=True)
        end = ts_to_float(scope.window, "end", f"{path}.window.end", required=False, window=True)
        if start is None and end is None:
            raise InvalidArgument("needs a start or an end", f"{path}.window")
        if start is not None and end is not None and end <= start:
            raise InvalidArgument("end must be after start", f"{path}.window.end")
        return ErasureScope(scope.account_id, "window", start=start, end=end)
    raise InvalidArgument("one of household, device_id, person_id or window is required", f"{path}.target")


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


def result_to_pb(service: str, outcome: ErasureOutcome) -> common_pb2.ErasureResult:
    return common_pb2.ErasureResult(
        service=service, deleted_counts=outcome.deleted_counts,
        deleted_ids_sha256=ids_digest(outcome.deleted_ids), already_erased=outcome.empty,
        purges=[common_pb2.PhysicalPurge(store=p["store"], location=p["where"], action=p["action"],
                                         at=float_to_ts(p["at"]), complete=bool(p["complete"]))
                for p in outcome.purges])


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
EraseFn = Callable[[ErasureScope, str], ErasureOutcome]   # (scope, job_id) -> what was erased
ExportFn = Callable[[str], dict[str, Any]]                # account_id -> JSON-able document


class DataHolderServicer(common_pb2_grpc.DataHolderServicer):
    """The one implementation of the erasure contract; a service passes its own erase
    and export functions. Validation (scope, account id) and the wire format (counts,
    digest, sorted-key JSON) are therefore identical in every service."""

    def __init__(self, service: str, erase: EraseFn, export: ExportFn) -> None:
        self._service = service
        self._erase = erase
        self._export = export

    def Erase(self, request: common_pb2.EraseRequest, context) -> common_pb2.EraseResponse:
        if not request.HasField("scope"):
            raise InvalidArgument("is required", "scope")
        if request.job_id:
            check_id(request.job_id, "job_id")
        outcome = self._erase(scope_from_pb(request.scope), request.job_id)
        return common_pb2.EraseResponse(result=result_to_pb(self._service, outcome))

    def ExportAccount(self, request: common_pb2.ExportAccountRequest, context) -> common_pb2.ExportAccountResponse:
        document = self._export(check_id(request.account_id, "account_id"))
        return common_pb2.ExportAccountResponse(json=json.dumps(document, sort_keys=True, ensure_ascii=False))


def data_holder(service: str, erase: EraseFn, export: ExportFn):
    """The ``(add_to_server, servicer, full service name)`` entry a service's ``build``
    returns to the bootstrap (services/common/server.py) to serve DataHolder."""
    return (common_pb2_grpc.add_DataHolderServicer_to_server, DataHolderServicer(service, erase, export),
            DATA_HOLDER_SERVICE)
