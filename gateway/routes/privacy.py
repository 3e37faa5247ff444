"""Routes backed by the privacy service: deletion requests and their receipts, the
household export, consent.

* ``POST /v1/delete`` — 202 with a job id; the job runs durably across every service.
* ``GET /v1/delete/{job_id}`` — state, per-service confirmations and, once completed,
  the signed receipt (verify offline with ``hearth verify-receipt``).
* ``GET /v1/household/{account_id}/export`` — everything Hearth holds about the
  household (schema ``hearth-household-export`` v1, docs/privacy.md).
* ``PUT /v1/consent/{account_id}`` — the account's consent flags.
"""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from gateway import models
from gateway.models import Id, Strict
from gateway.routes import ACCOUNT_PATH, ERROR_RESPONSES, ID_PATTERN
from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common.identity import Principal
from services.common.pbutil import float_to_ts

_STATES = {ppb.JOB_STATE_PENDING: "pending", ppb.JOB_STATE_RUNNING: "running",
           ppb.JOB_STATE_COMPLETED: "completed", ppb.JOB_STATE_FAILED: "failed",
           ppb.JOB_STATE_UNSPECIFIED: "unknown"}
ScopeKind = Literal["household", "device", "person", "window"]
# Its own Path object: FastAPI binds a parameter's alias onto the FieldInfo it is given.
JOB_PATH = PathParam(..., min_length=1, max_length=128, pattern=ID_PATTERN)
NOT_FOUND = {404: {"model": models.ErrorOut, "description": "unknown job"}}


class ScopeIn(Strict):
    kind: ScopeKind
    account_id: Id
    device_id: Id | None = Field(None, description="required for kind=device")
    person_id: Id | None = Field(None, description="required for kind=person (p1, p2, ...)")
    start: models.WindowBound | None = Field(None, description="kind=window: records with start <= ts < end "
                                                               "(RFC 3339, 1970-01-01 to 2100-01-01)")
    end: models.WindowBound | None = Field(None, description="kind=window; a missing bound is open")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "ScopeIn":
        needed = {"device": "device_id", "person": "person_id"}.get(self.kind)
        for name in ("device_id", "person_id", "start", "end"):
            value = getattr(self, name)
            if name == needed and value is None:
                raise ValueError(f"{name} is required for a {self.kind} scope")
            if value is not None and name != needed and not (self.kind == "window" and name in ("start", "end")):
                raise ValueError(f"{name} is not allowed in a {self.kind} scope")
        if self.kind == "window":
            if self.start is None and self.end is None:
                raise ValueError("a window scope needs a start or an end")
            if self.start is not None and self.end is not None and self.end <= self.start:
                raise ValueError("end must be after start")
        return self


class DeleteIn(Strict):
    scope: ScopeIn
    request_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[\x21-\x7E]+$",
                                   description="idempotency key: the same id returns the same job")
    reason: str | None = Field(None, max_length=200, pattern=r"^[^\x00-\x1F\x7F]*$",
                               description="e.g. gdpr_art17, ccpa")


class DeleteAcceptedOut(BaseModel):
    job_id: str
    state: str


class ServiceConfirmationOut(BaseModel):
    service: str
    confirmed: bool
    attempts: int = Field(description="failed attempts so far")
    last_error: str
    deleted_counts: dict[str, int]
    deleted_ids_sha256: str | None
    already_erased: bool


class DeletionOut(BaseModel):
    job_id: str
    state: str
    scope: dict[str, Any]
    requested_at: str
    completed_at: str | None
    services: list[ServiceConfirmationOut]
    receipt: dict[str, Any] | None = Field(description="signed receipt (docs/privacy.md §2) once completed")


class ConsentIn(Strict):
    processing: bool
    attribution: bool


class ConsentOut(BaseModel):
    account_id: str
    processing: bool
    attribution: bool
    version: int


def _scope_to_pb(s: ScopeIn) -> common_pb2.ErasureScope:
    out = common_pb2.ErasureScope(account_id=s.account_id)
    if s.kind == "household":
        out.household = True
    elif s.kind == "device":
        out.device_id = s.device_id
    elif s.kind == "person":
        out.person_id = s.person_id
    else:
        window = common_pb2.TimeRange()
        if s.start is not None:
            window.start.CopyFrom(float_to_ts(s.start.timestamp()))
        if s.end is not None:
            window.end.CopyFrom(float_to_ts(s.end.timestamp()))
        out.window.CopyFrom(window)
    return out


def _iso(ts) -> str:
    return ts.ToDatetime(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def _scope_to_json(s: common_pb2.ErasureScope) -> dict[str, Any]:
    target = s.WhichOneof("target")
    out: dict[str, Any] = {"account_id": s.account_id}
    if target == "household":
        out["kind"] = "household"
    elif target == "device_id":
        out.update(kind="device", device_id=s.device_id)
    elif target == "person_id":
        out.update(kind="person", person_id=s.person_id)
    else:
        out["kind"] = "window"
        if s.window.HasField("start"):
            out["start"] = _iso(s.window.start)
        if s.window.HasField("end"):
            out["end"] = _iso(s.window.end)
    return out


def deletion_to_json(r: ppb.GetDeletionResponse) -> DeletionOut:
    return DeletionOut(
        job_id=r.job_id, state=_STATES.get(r.state, "unknown"), scope=_scope_to_json(r.scope),
        requested_at=_iso(r.requested_at),
        completed_at=_iso(r.completed_at) if r.HasField("completed_at") else None,
        services=[ServiceConfirmationOut(
            service=c.service, confirmed=c.confirmed, attempts=c.attempts, last_error=c.last_error,
            deleted_counts=dict(c.result.deleted_counts) if c.HasField("result") else {},
            deleted_ids_sha256=c.result.deleted_ids_sha256.hex() if c.HasField("result") else None,
            already_erased=c.result.already_erased if c.HasField("result") else False)
            for c in r.services],
        receipt=json.loads(r.receipt_json) if r.receipt_json else None)


def router(clients, access) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/delete", status_code=202, response_model=DeleteAcceptedOut, responses=ERROR_RESPONSES,
              summary="Request the deletion of a device, person, household or time window (durable job)")
    async def post_delete(body: DeleteIn, who: Principal = Depends(access("POST /v1/delete"))):
        r = await clients.call("privacy", "RequestDeletion", ppb.RequestDeletionRequest(
            scope=_scope_to_pb(body.scope), request_id=body.request_id or "", reason=body.reason or ""), who)
        return JSONResponse(DeleteAcceptedOut(job_id=r.job_id, state=_STATES.get(r.state, "unknown")).model_dump(),
                            status_code=202, headers={"Location": f"/v1/delete/{r.job_id}"})

    @api.get("/v1/delete/{job_id}", response_model=DeletionOut, responses={**ERROR_RESPONSES, **NOT_FOUND},
             summary="State of a deletion job and, once completed, its signed receipt")
    async def get_delete(job_id: str = JOB_PATH, who: Principal = Depends(access("GET /v1/delete/{job_id}"))):
        r = await clients.call("privacy", "GetDeletion", ppb.GetDeletionRequest(job_id=job_id), who)
        return deletion_to_json(r)

    @api.get("/v1/household/{account_id}/export", responses=ERROR_RESPONSES,
             summary="Everything Hearth holds about a household (schema hearth-household-export v1)")
    async def get_export(account_id: str = ACCOUNT_PATH,
                         who: Principal = Depends(access("GET /v1/household/{account_id}/export"))):
        r = await clients.call("privacy", "ExportHousehold", ppb.ExportHouseholdRequest(account_id=account_id),
                               who, timeout_s=60.0)
        return JSONResponse(json.loads(r.export_json))

    @api.put("/v1/consent/{account_id}", response_model=ConsentOut, responses=ERROR_RESPONSES,
             summary="Set the account's consent flags (processing, attribution)")
    async def put_consent(body: ConsentIn, account_id: str = ACCOUNT_PATH,
                          who: Principal = Depends(access("PUT /v1/consent/{account_id}"))):
        r = await clients.call("privacy", "SetConsent", ppb.SetConsentRequest(
            account_id=account_id, processing=body.processing, attribution=body.attribution), who)
        return ConsentOut(account_id=account_id, processing=body.processing, attribution=body.attribution,
                          version=r.version)

    return api
