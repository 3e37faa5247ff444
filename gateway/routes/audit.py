"""Routes backed by the privacy service's audit log: query it, and export it as the
JSON Lines file that ``hearth audit verify EXPORT.jsonl --public-key FILE`` checks
offline (docs/privacy.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from gateway.models import WindowBound, check_window
from gateway.routes import api_router
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common.identity import Principal
from services.common.ids import PRINCIPAL_ID_CHARS
from services.common.pbutil import float_to_ts
from services.common.text import TEXT_PATTERN

EXPORT_PAGE = 10_000
EventTypeName = Annotated[str, Field(max_length=64, pattern=r"^[a-z_]+$")]
OutcomeName = Literal["", "success", "failure", "denied", "error"]


class AuditRecordOut(BaseModel):
    seq: int
    ts: str = Field(description="UTC, RFC 3339 with microseconds")
    event_type: str
    principal: str
    role: str
    resource: str
    outcome: str
    trace_id: str
    details: dict[str, Any]
    entry_hash: str = Field(description="hash-chain value of this entry (hex)")


class AuditPageOut(BaseModel):
    records: list[AuditRecordOut]
    has_more: bool
    next_after_seq: int | None = Field(description="pass as after_seq for the next page; null on the last")


_ROLE_NAME = {1: "admin", 2: "analyst", 3: "data_scientist", 4: "privacy_officer", 5: "service"}


def _record_out(r: ppb.AuditRecord) -> AuditRecordOut:
    entry = json.loads(r.canonical) if r.canonical else {}
    return AuditRecordOut(
        seq=r.seq, ts=entry.get("ts", ""), event_type=r.event_type, principal=r.principal.id,
        role=_ROLE_NAME.get(r.principal.role, ""), resource=r.resource, outcome=r.outcome,
        trace_id=r.trace_id, details=json.loads(r.details_json) if r.details_json else dict(r.details),
        entry_hash=r.entry_hash.hex())


def router(clients, access) -> APIRouter:
    api = api_router()

    @api.get("/v1/audit", response_model=AuditPageOut,
             summary="Query the audit log (filters combine with AND; pages by seq)")
    async def get_audit(
            # any principal id (an e-mail as a JWT subject too: '@'); until session 19 the
            # account-id pattern here refused those with 422
            principal_id: str | None = Query(None, max_length=128, pattern=rf"^{PRINCIPAL_ID_CHARS}$"),
            resource_prefix: str | None = Query(None, max_length=256, pattern=TEXT_PATTERN),
            event_type: EventTypeName | None = Query(None),
            trace_id: str | None = Query(None, max_length=64, pattern=r"^[0-9a-f]{1,64}$"),
            outcome: OutcomeName = Query(""),
            start: WindowBound | None = Query(None, description="ts >= start (RFC 3339, 1970-01-01 to 2100-01-01)"),
            end: WindowBound | None = Query(None, description="ts < end (RFC 3339, 1970-01-01 to 2100-01-01)"),
            after_seq: int | None = Query(None, ge=-1, le=2**63 - 1, description="entries with seq > after_seq"),
            limit: int = Query(100, ge=1, le=10_000),
            who: Principal = Depends(access("GET /v1/audit"))):
        request = ppb.QueryAuditRequest(
            principal_id=principal_id or "", resource_prefix=resource_prefix or "",
            event_type=event_type or "", trace_id=trace_id or "", outcome=outcome, limit=limit)
        if after_seq is not None:
            request.after_seq = after_seq
        check_window(start, end)
        if start is not None:
            request.window.start.CopyFrom(float_to_ts(start.timestamp()))
        if end is not None:
            request.window.end.CopyFrom(float_to_ts(end.timestamp()))
        r = await clients.call("privacy", "QueryAudit", request, who)
        records = [_record_out(x) for x in r.records]
        return AuditPageOut(records=records, has_more=r.has_more,
                            next_after_seq=records[-1].seq if r.has_more and records else None)

    @api.get("/v1/audit/export", responses={200: {
                 "content": {"application/x-ndjson": {}},
                 "description": "one {\"chain_hash\", \"entry\"} object per line in seq order, then "
                                "one {\"sth\": ...} line; verify with `hearth audit verify`"}},
             response_class=StreamingResponse,
             summary="Export the whole audit log up to its latest signed tree head (JSON Lines)")
    async def export_audit(who: Principal = Depends(access("GET /v1/audit/export"))):
        # The first page (and the head) is fetched before answering, so a refusal or an
        # empty log is a proper HTTP error rather than a broken stream.
        first = await clients.call("privacy", "QueryAudit", ppb.QueryAuditRequest(
            limit=EXPORT_PAGE, with_tree_head=True), who)
        if not first.HasField("tree_head") or not first.tree_head.json:
            from gateway.errors import error_response

            return error_response(412, "failed_precondition", "the audit log is empty: nothing to export")
        size = first.tree_head.tree_size

        async def lines():
            page = first
            while True:
                last = -1
                for r in page.records:
                    if r.seq >= size:
                        break
                    last = r.seq
                    yield '{"chain_hash":"%s","entry":%s}\n' % (r.entry_hash.hex(), r.canonical.decode())
                if not page.has_more or last < 0 or last + 1 >= size:
                    break
                page = await clients.call("privacy", "QueryAudit", ppb.QueryAuditRequest(
                    limit=EXPORT_PAGE, after_seq=last), who)
            yield '{"sth":%s}\n' % first.tree_head.json

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
            "Content-Disposition": 'attachment; filename="hearth-audit.jsonl"',
            "X-Hearth-Audit-Tree-Size": str(size),
            "X-Hearth-Audit-Key-Id": first.tree_head.key_id})

    return api
