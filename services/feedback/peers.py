"""Outbound calls of the feedback service: Refit on clustering, AppendAudit on privacy.

Both act as the service principal ``svc:feedback`` (the permission matrix gives
service principals ``refit_model`` and ``append_audit``); the human who caused a flag
change is recorded *inside* the audit record. Neither call may fail the request that
caused it: each returns the gRPC status code name ("OK", "UNIMPLEMENTED",
"UNAVAILABLE", ...), which the caller stores next to the trigger or flag version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common import identity
from services.common.client import Peer
from services.common.pbutil import float_to_ts
from services.common.telemetry import pseudonym

log = logging.getLogger("hearth.feedback.peers")
SERVICE = "feedback"


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc.code(), grpc.StatusCode):
        return exc.code().name
    return "UNKNOWN"


class RefitRequester(Protocol):
    def refit(self, account_id: str, reason: str) -> str: ...

    def close(self) -> None: ...


class ClusteringRefitClient:
    """Refit(account_id, reason) on the clustering service. Refit is idempotent (it
    rebuilds the household model from stored sessions and labels), so UNAVAILABLE and
    DEADLINE_EXCEEDED are retried with backoff (``call_idempotent``)."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self._peer = Peer(address, SERVICE, cpb_grpc.ClusteringServiceStub, timeout_s)

    def refit(self, account_id: str, reason: str) -> str:
        request = cpb.RefitRequest(account_id=account_id, reason=reason)
        try:
            self._peer.call("Refit", request, idempotent=True)
        except Exception as exc:  # noqa: BLE001 - the result is recorded, never raised
            name = _status_name(exc)
            log.warning("Refit of %s failed: %s", pseudonym(account_id), name)
            return name
        return "OK"

    def record_label(self, account_id: str, session_id: str, person_id: str, source: str) -> str:
        """Tell clustering the known person of a session (explicit feedback); it stores
        the label and refits with it. Idempotent (the latest label of a session wins)."""
        request = cpb.RecordLabelsRequest(labels=[cpb.SessionLabel(
            account_id=account_id, session_id=session_id, person_id=person_id, source=source)])
        try:
            self._peer.call("RecordLabels", request, idempotent=True)
        except Exception as exc:  # noqa: BLE001 - recorded in the log; the feedback is stored
            name = _status_name(exc)
            log.warning("RecordLabels for %s failed: %s", pseudonym(account_id), name)
            return name
        return "OK"

    def close(self) -> None:
        self._peer.close()


@dataclass(frozen=True)
class FlagChange:
    """What an auditor needs about one flag change."""

    experiment: str
    version: int
    previous_version: int
    flags_json: str
    previous_json: str
    reason: str
    principal: identity.Principal
    ts: float


class FlagAuditor(Protocol):
    def audit_flag_change(self, change: FlagChange) -> str: ...

    def close(self) -> None: ...


def audit_flag_change(auditor: FlagAuditor | None, change: FlagChange) -> str:
    """The audit hook of every flag change (experiment flags, calibrator choices): the
    privacy audit log when configured (PrivacyFlagAuditor), else only the local ``flags``
    history ("LOCAL_ONLY"). Never raises: the change is stored; the result says what
    happened to its audit record."""
    if auditor is None:
        return "LOCAL_ONLY"
    try:
        return auditor.audit_flag_change(change)
    except Exception:  # noqa: BLE001 - the change is stored; the audit outcome says what happened
        log.exception("audit hook failed for flags version %d", change.version)
        return "UNKNOWN"


_ROLE_PB = {role: common_pb2.Role.Value(f"ROLE_{role.name}") for role in identity.Role}


def flag_change_record(change: FlagChange, trace_id: str = "") -> ppb.AuditRecord:
    """The audit record of a flag change (event type ``flag_change``, docs/privacy.md)."""
    return ppb.AuditRecord(
        ts=float_to_ts(change.ts), event_type="flag_change",
        principal=common_pb2.Principal(id=change.principal.id, role=_ROLE_PB[change.principal.role]),
        resource=f"experiment/{change.experiment}", outcome="ok", trace_id=trace_id,
        details={"version": str(change.version), "previous_version": str(change.previous_version),
                 "flags": change.flags_json, "previous_flags": change.previous_json,
                 "reason": change.reason})


class PrivacyFlagAuditor:
    """``audit_flag_change``: the hook every flag change goes through.

    Appends a ``flag_change`` record to the privacy service's audit log. AppendAudit is
    not idempotent (the log assigns sequence numbers), so it is called once, without
    retries; a failure (including UNIMPLEMENTED while privacy does not serve it yet)
    is logged and returned, and the flag change itself stays recorded with principal
    and reason in the feedback service's own ``flags`` history."""

    def __init__(self, address: str, timeout_s: float = 2.0) -> None:
        self._peer = Peer(address, SERVICE, ppb_grpc.AuditLogStub, timeout_s)

    def audit_flag_change(self, change: FlagChange) -> str:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        request = ppb.AppendAuditRequest(records=[flag_change_record(change, trace_id)])
        try:
            self._peer.call("AppendAudit", request)
        except Exception as exc:  # noqa: BLE001 - recorded next to the flag version
            name = _status_name(exc)
            log.warning("flag change %s v%d not audited by privacy: %s", change.experiment, change.version, name)
            return name
        return "OK"

    def close(self) -> None:
        self._peer.close()


class RecordingRefits:
    """In-memory RefitRequester for tests and the benchmark: records calls, answers ``result``."""

    def __init__(self, result: str = "OK") -> None:
        self.calls: list[tuple[str, str, float]] = []
        self.result = result

    def refit(self, account_id: str, reason: str) -> str:
        self.calls.append((account_id, reason, time.time()))
        return self.result

    def close(self) -> None:
        pass


class RecordingAuditor:
    """In-memory FlagAuditor for tests."""

    def __init__(self, result: str = "OK") -> None:
        self.changes: list[FlagChange] = []
        self.result = result

    def audit_flag_change(self, change: FlagChange) -> str:
        self.changes.append(change)
        return self.result

    def close(self) -> None:
        pass
