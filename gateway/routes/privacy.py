"""Routes backed by the privacy service: deletion requests and their receipts, the
household export, consent.

* ``POST /v1/delete`` — 202 with a job id; the job runs durably across every service.
* ``GET /v1/delete/{job_id}`` — state, per-service confirmations and, once completed,
  the signed receipt (verify offline with ``hearth verify-receipt``).
* ``GET /v1/household/{account_id}/export`` — everything Hearth holds about the
  household (schema ``hearth-household-export`` v1, docs/privacy.md); a household it holds
  nothing about is 200 with every section empty (the Art. 15 "nothing held"), not 404.
* ``PUT /v1/consent/{account_id}`` — the account's consent flags; ``GET`` reads them back
  (404 for an account that never set any: the defaults, both allowed, apply).
* ``POST /v1/keys/rotate`` — make another configured KEK active and re-wrap every data
  key under it (privacy's ``RotateKeys``, admin only; ``hearth keys rotate``).
* ``POST /v1/household/{account_id}/rotate-key`` — rotate one household's data key: a new
  version, the household's data re-encrypted under it in every store, the old version
  destroyed (privacy's ``RotateDataKey``, privacy officer or admin;
  ``hearth keys rotate-household``).
* ``POST /v1/keys/rotate-households`` — the same for up to ``limit`` households whose
  newest data key is older than ``older_than_days``, as a durable job: 202 with the job,
  its state at ``GET /v1/keys/rotate-households/{job_id}`` (``hearth keys rotate-households``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import timezone
from typing import Any, Literal

import grpc
from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator

from gateway import models
from gateway.models import Id, Strict
from gateway.routes import ACCOUNT_PATH, ID_PATTERN, api_router
from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common.erasure import ErasureScope, scope_from_pb, scope_to_pb
from services.common.errors import NotFound, Unavailable
from services.common.export_stream import IncompleteExport, Verifier
from services.common.identity import Principal
from services.common.pbutil import float_to_ts
from services.common.text import MAX_REASON_CHARS, TEXT_PATTERN

_STATES = {ppb.JOB_STATE_PENDING: "pending", ppb.JOB_STATE_RUNNING: "running",
           ppb.JOB_STATE_COMPLETED: "completed", ppb.JOB_STATE_FAILED: "failed",
           ppb.JOB_STATE_UNSPECIFIED: "unknown"}
ScopeKind = Literal["household", "device", "person", "window"]
# Its own Path object: FastAPI binds a parameter's alias onto the FieldInfo it is given.
JOB_PATH = PathParam(..., pattern=ID_PATTERN, json_schema_extra=models.ID_LENGTH_SCHEMA)
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
    def _one_scope(self) -> "ScopeIn":
        self.to_scope()   # the one scope validator (ErasureScope); its error names the field
        return self

    def to_scope(self) -> ErasureScope:
        """The gateway's one scope converter: the body's scope as the mesh's scope type."""
        return ErasureScope(self.account_id, self.kind, device_id=self.device_id, person_id=self.person_id,
                            start=self.start.timestamp() if self.start is not None else None,
                            end=self.end.timestamp() if self.end is not None else None)


class DeleteIn(Strict):
    scope: ScopeIn
    request_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[\x21-\x7E]+$",
                                   description="idempotency key: the same id returns the same job")
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS, pattern=TEXT_PATTERN,
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
    version: int = Field(description="1 for the first PUT of the account, then one more per PUT")


# An account with no consent record is processed under the service contract's defaults
# (docs/privacy.md §8): GetConsent answers known=false with both flags true. Over HTTP that
# is a 404 rather than a 200 with flags nobody set, so a client can tell "allowed by
# default" from "allowed by a PUT" (and a mistyped id from a real account).
CONSENT_NEVER_SET = ("no consent was ever set for this account (PUT /v1/consent/{account_id}); "
                     "the defaults apply: processing and attribution allowed")


def _iso(ts) -> str:
    return ts.ToDatetime(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def _scope_to_json(s: common_pb2.ErasureScope) -> dict[str, Any]:
    """A job's scope as the API shows it: ``ErasureScope.to_dict`` with RFC 3339 bounds
    in the gateway's form (no trailing zero microseconds)."""
    scope = scope_from_pb(s, check_principal=False)  # a retention job's "*" is shown, not acted on
    out = scope.to_dict()
    for name in ("start", "end"):
        if getattr(scope, name) is not None:
            out[name] = _iso(float_to_ts(getattr(scope, name)))
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


class RotateKeysIn(Strict):
    new_active_kek_id: str = Field(..., min_length=1, max_length=128, pattern=r"^[\x21-\x7E]+$",
                                   description="a KEK id of the privacy service's HEARTH_KEKS")


class RotateKeysOut(BaseModel):
    rewrapped: int = Field(description="data keys re-wrapped under the new KEK")
    active_kek_id: str
    kek_ids_in_use: list[str] = Field(description="KEKs still wrapping a live data key; remove an old KEK "
                                                  "from HEARTH_KEKS once it is not listed here")


# The streamed export's deadline: paced by the HTTP client reading it, so far longer than
# one answer's; the unary one a privacy before session 26 serves keeps its 60 s.
EXPORT_TIMEOUT_S = 1800.0
UNARY_EXPORT_TIMEOUT_S = 60.0
EXPORT_DESCRIPTION = (
    "The document is streamed as privacy gathers it from each data holder (never held whole). "
    "A failure before the first byte is an ordinary error status. A failure after it (a data holder "
    "failing part-way) cannot change the 200 already sent: the connection is then closed before the "
    "end of the chunked body, so the client sees an incomplete transfer, and the document is left "
    'unclosed (not valid JSON). A whole export is valid JSON whose last key is "complete": true. '
    # Decided and stated in session 33 (docs/privacy.md §9 gives the reasons); the answer is older.
    "A household Hearth holds nothing about (never held) is answered 200 with the same document, every list "
    "empty, no household model and consent the defaults (explicit: false): the confirmation that no personal "
    "data is held which an access request (GDPR Art. 15) asks for, not a 404. An erased household's data "
    "holders' sections are empty too, but privacy keeps its consent record (as last set, explicit: true, if "
    "it was ever set), its deletion jobs with their receipts and its destroyed data keys, and lists them.")
log = logging.getLogger("hearth.gateway.export")
upgrade_log = logging.getLogger("hearth.gateway.upgrade")
# How a privacy of an older release answers an RPC it does not serve: UNIMPLEMENTED as
# shipped (no handler), PERMISSION_DENIED when run on newer protos (2caf617d). The routes
# then call the older RPC, as that release served it (docs/operations.md, "Rolling upgrades").
OLDER_PRIVACY_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED})


# The fallbacks' log lines, coalesced (review35 R3): with a privacy whose matrix refuses the
# gateway's caller (the misconfiguration the line reveals) every export / rotation request
# fell back and logged a line. Now the first fallback of an (rpc, code) is logged at once,
# later ones within this window of that line are only counted, and the first one after it is
# logged with that count (field ``repeats``), as the security lines are coalesced
# (identity.SecurityEventLog). The keys are bounded: two RPCs, two codes.
FALLBACK_LOG_WINDOW_S = 60.0


class FallbackLog:
    """``note(rpc, code, fallback)``: one fallback, logged as described above (thread-safe).
    A window's count is written with the next line of its key: a flood that stops leaves
    its last window's count unwritten (no thread of its own; the requests stopped)."""

    def __init__(self, logger: logging.Logger, window_s: float = FALLBACK_LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._window, self._clock = logger, window_s, clock
        self._held: dict[tuple[str, str], list[float]] = {}   # key -> [last line's time, repeats since]
        self._lock = threading.Lock()

    def note(self, rpc: str, code: grpc.StatusCode, fallback: str) -> None:
        key, now = (rpc, code.name), self._clock()
        with self._lock:
            held = self._held.get(key)
            if held is not None and now - held[0] < self._window:
                held[1] += 1
                return
            repeats = int(held[1]) if held is not None else 0
            self._held[key] = [now, 0]
        fields: dict[str, object] = {"rpc": rpc, "code": code.name, "fallback": fallback,
                                     "coalesced_s": self._window}
        more = ""
        if repeats:
            fields["repeats"] = repeats
            more = f"; {repeats} more since the last such line"
        self._log.warning("privacy refused %s (%s: a release before it, or a misconfiguration if not upgrading): "
                          "calling %s instead%s", rpc, code.name, fallback, more, extra={"fields": fields})


_FALLBACKS = FallbackLog(upgrade_log)


def falls_back(exc: grpc.aio.AioRpcError, rpc: str, fallback: str, fallbacks: FallbackLog = _FALLBACKS) -> bool:
    """Whether privacy refused ``rpc`` as an older release does (``OLDER_PRIVACY_CODES``), so
    the route calls ``fallback`` instead; the fallback is logged with the code privacy
    answered (fields rpc, code, fallback: until session 35 the rotation's was not logged, so
    a PERMISSION_DENIED of a misconfigured privacy passed for an upgrade unseen), coalesced
    (``FallbackLog``: until session 36 one line per request)."""
    code = exc.code()
    if code not in OLDER_PRIVACY_CODES:
        return False
    fallbacks.note(rpc, code, fallback)
    return True


async def _export_body(call, first) -> AsyncIterator[bytes]:
    """The streamed document's bytes, checked as services/common/export_stream.verified
    checks a part (``Verifier``): the completion marker must come, with the digest and
    length of every byte before it. Anything else raises, and the server then drops the
    connection before the chunked body's end (no terminating chunk), so no client takes a
    cut document for a whole one."""
    check, message = Verifier("privacy"), first
    try:
        while message is not grpc.aio.EOF and not check.done:
            data = check.take(message)
            if data:
                yield data
            if not check.done:
                message = await call.read()
        check.finish()
    except (grpc.aio.AioRpcError, IncompleteExport) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        log.warning("the export of a household failed after %d bytes were sent (%s): closing the connection "
                    "before the body's end", check.total, detail)
        raise
    finally:
        call.cancel()   # a no-op once the call has ended; frees it when the client went away


# RotateKeys re-wraps every household's data key in one call: its deadline is the
# largest of the gateway's routes.
ROTATE_KEYS_TIMEOUT_S = 300.0


class IncompletePurgeOut(BaseModel):
    service: str
    store: str
    location: str
    action: str = Field(description="what was run and why it did not finish")


INCOMPLETE_PURGES = ("each store's purge of the old ciphertexts that did not finish: the rotation completed all the "
                     "same (older versions destroyed), so remnants that may remain there are under a destroyed "
                     "version and open under no key Hearth holds; if the old version leaked, fix the store's "
                     "configuration (docs/privacy.md §11) and purge")


def _incomplete(steps) -> list[IncompletePurgeOut]:
    return [IncompletePurgeOut(service=p.service, store=p.store, location=p.location, action=p.action)
            for p in steps]


class RotateDataKeyOut(BaseModel):
    account_id: str
    dek_version: int = Field(description="the household's data key version now: its data is encrypted under it")
    reencrypted: dict[str, int] = Field(description="per service, values re-encrypted under it by this call")
    destroyed_versions: list[int] = Field(description="data key versions destroyed by this call")
    kept_versions: list[int] = Field(description="older versions kept live: 1 only while a data holder of a "
                                                 "release before session 27 keys erased-id digests with it (no data "
                                                 "is encrypted under it any more); empty otherwise")
    resumed: bool = Field(description="true: this call finished a rotation begun before (no new version)")
    incomplete_purges: list[IncompletePurgeOut] = Field(default_factory=list, description=INCOMPLETE_PURGES)


class RotateDataKeysIn(Strict):
    older_than_days: float = Field(..., gt=0, le=36500, description="rotate households whose newest data key "
                                                                     "is older than this many days")
    limit: int = Field(100, ge=1, le=1000, description="at most this many households, oldest key first")
    request_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[\x21-\x7E]+$",
                                   description="idempotency key: the same id returns the same job")


class RotateDataKeysOut(BaseModel):
    """The whole batch's answer of a privacy before session 27 (rolling upgrade only)."""
    rotated: list[RotateDataKeyOut]


class HouseholdRotationOut(BaseModel):
    account_id: str
    outcome: str = Field(description="pending, begun, completed (incomplete_purges lists any purge that did not "
                                     "finish), erased, skipped, retrying (a store failed: retried), failed "
                                     "(retried too often; the privacy sweep keeps finishing it)")
    dek_version: int = Field(description="the version its rotation re-encrypts to (0 until begun)")
    resumed: bool
    attempts: int
    detail: str = Field(description="why it is retrying, failed, erased or skipped; once completed, the purges "
                                    "that did not finish")
    reencrypted: dict[str, int]
    destroyed_versions: list[int]
    incomplete_purges: list[IncompletePurgeOut] = Field(default_factory=list, description=INCOMPLETE_PURGES)


class RotationJobOut(BaseModel):
    job_id: str
    state: str = Field(description="running until every household has a final outcome; then completed, or "
                                   "failed when one failed")
    older_than_days: float
    limit: int
    requested_at: str
    completed_at: str | None
    counts: dict[str, int] = Field(description="households per outcome")
    households: list[HouseholdRotationOut]
    key_table_purges: dict[str, int] = Field(
        default_factory=dict, description="privacy's own key-table purge (the retired wrapped keys' physical purge, "
                                          "once per pass that retired households) by result: complete, incomplete "
                                          "(the database said it did not finish), failed (the rotation sweep runs it "
                                          "again); empty until a pass ran one")
    key_table_purge_detail: str = Field("", description="the last key-table purge that was not complete: what it said")


def rotation_job_to_json(r: ppb.DataKeyRotationJob) -> RotationJobOut:
    return RotationJobOut(
        job_id=r.job_id, state=_STATES.get(r.state, "unknown"), older_than_days=r.older_than_days, limit=r.limit,
        requested_at=_iso(r.requested_at), completed_at=_iso(r.completed_at) if r.HasField("completed_at") else None,
        counts=dict(r.counts), key_table_purges=dict(r.key_table_purges),
        key_table_purge_detail=r.key_table_purge_detail,
        households=[HouseholdRotationOut(account_id=h.account_id, outcome=h.outcome, dek_version=h.dek_version,
                                         resumed=h.resumed, attempts=h.attempts, detail=h.detail,
                                         reencrypted=dict(h.reencrypted), destroyed_versions=list(h.destroyed_versions),
                                         incomplete_purges=_incomplete(h.incomplete_purges))
                    for h in r.households])


def _rotated(r) -> RotateDataKeyOut:
    return RotateDataKeyOut(account_id=r.account_id, dek_version=r.dek_version, reencrypted=dict(r.reencrypted),
                            destroyed_versions=list(r.destroyed_versions), kept_versions=list(r.kept_versions),
                            resumed=r.resumed, incomplete_purges=_incomplete(r.incomplete_purges))


def router(clients, access) -> APIRouter:
    api = api_router()

    @api.post("/v1/delete", status_code=202, response_model=DeleteAcceptedOut,
              responses={409: {"model": models.ErrorOut,
                                                  "description": "request_id already used for another scope"}},
              summary="Request the deletion of a device, person, household or time window (durable job)")
    async def post_delete(body: DeleteIn, who: Principal = Depends(access("POST /v1/delete"))):
        r = await clients.call("privacy", "RequestDeletion", ppb.RequestDeletionRequest(
            scope=scope_to_pb(body.scope.to_scope()), request_id=body.request_id or "", reason=body.reason or ""), who)
        return JSONResponse(DeleteAcceptedOut(job_id=r.job_id, state=_STATES.get(r.state, "unknown")).model_dump(),
                            status_code=202, headers={"Location": f"/v1/delete/{r.job_id}"})

    @api.get("/v1/delete/{job_id}", response_model=DeletionOut, responses={**NOT_FOUND},
             summary="State of a deletion job and, once completed, its signed receipt")
    async def get_delete(job_id: str = JOB_PATH, who: Principal = Depends(access("GET /v1/delete/{job_id}"))):
        r = await clients.call("privacy", "GetDeletion", ppb.GetDeletionRequest(job_id=job_id), who)
        return deletion_to_json(r)

    @api.get("/v1/household/{account_id}/export",
             summary="Everything Hearth holds about a household (schema hearth-household-export v1), streamed",
             description=EXPORT_DESCRIPTION,
             responses={200: {"content": {"application/json": {}},
                              "description": "the document, streamed; whole only if it parses and ends with "
                                             '"complete": true (docs/privacy.md §9)'}})
    async def get_export(account_id: str = ACCOUNT_PATH,
                         who: Principal = Depends(access("GET /v1/household/{account_id}/export"))):
        request = ppb.ExportHouseholdRequest(account_id=account_id)
        call = clients.unary_stream("privacy", "ExportHouseholdStream", request, who, timeout_s=EXPORT_TIMEOUT_S)
        try:
            # Before any byte of the answer: a failure here (a holder down, a deletion in
            # progress, a bad id) is an ordinary error status with its JSON body.
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            if not falls_back(exc, "ExportHouseholdStream", "ExportHousehold"):
                raise
            # A privacy of a release before session 26 (it serves no such stream:
            # UNIMPLEMENTED; the caller passed the gateway's own check of the same
            # permission): the document in one message, as then, judged again by privacy
            # (docs/operations.md, "Rolling upgrades").
            r = await clients.call("privacy", "ExportHousehold", request, who, timeout_s=UNARY_EXPORT_TIMEOUT_S)
            return Response(r.export_json.encode("utf-8"), media_type="application/json")
        if first is grpc.aio.EOF:
            raise Unavailable("privacy ended the export without sending it; no export is given", "account_id")
        return StreamingResponse(_export_body(call, first), media_type="application/json")

    @api.put("/v1/consent/{account_id}", response_model=ConsentOut,
             summary="Set the account's consent flags (processing, attribution)")
    async def put_consent(body: ConsentIn, account_id: str = ACCOUNT_PATH,
                          who: Principal = Depends(access("PUT /v1/consent/{account_id}"))):
        r = await clients.call("privacy", "SetConsent", ppb.SetConsentRequest(
            account_id=account_id, processing=body.processing, attribution=body.attribution), who)
        return ConsentOut(account_id=account_id, processing=body.processing, attribution=body.attribution,
                          version=r.version)

    @api.get("/v1/consent/{account_id}", response_model=ConsentOut,
             responses={404: {"model": models.ErrorOut,
                              "description": "consent was never set for the account: the defaults apply "
                                             "(processing and attribution allowed)"}},
             summary="The account's consent flags as last set, with their version")
    async def get_consent(account_id: str = ACCOUNT_PATH,
                          who: Principal = Depends(access("GET /v1/consent/{account_id}"))):
        r = await clients.call("privacy", "GetConsent", ppb.GetConsentRequest(account_id=account_id), who)
        if not r.known:
            raise NotFound(CONSENT_NEVER_SET, "account_id")
        return ConsentOut(account_id=account_id, processing=r.processing, attribution=r.attribution,
                          version=r.version)

    @api.post("/v1/keys/rotate", response_model=RotateKeysOut,
              summary="Rotate the master key: re-wrap every household data key under another configured KEK")
    async def rotate_keys(body: RotateKeysIn, who: Principal = Depends(access("POST /v1/keys/rotate"))):
        r = await clients.call("privacy", "RotateKeys", ppb.RotateKeysRequest(new_active_kek_id=body.new_active_kek_id),
                               who, timeout_s=ROTATE_KEYS_TIMEOUT_S)
        return RotateKeysOut(rewrapped=r.rewrapped, active_kek_id=r.active_kek_id,
                             kek_ids_in_use=list(r.kek_ids_in_use))

    @api.post("/v1/household/{account_id}/rotate-key", response_model=RotateDataKeyOut,
              responses={404: {"model": models.ErrorOut, "description": "the household has no data key"},
                         412: {"model": models.ErrorOut, "description": "the household was erased (its key destroyed)"}},
              summary="Rotate a household's data key: new version, its data re-encrypted, the old version destroyed")
    async def rotate_data_key(account_id: str = ACCOUNT_PATH,
                              who: Principal = Depends(access("POST /v1/household/{account_id}/rotate-key"))):
        # Waits ~70 s (HEARTH_DEK_ROTATION_SETTLE_S) before the re-encryption: the deadline of RotateKeys.
        r = await clients.call("privacy", "RotateDataKey", ppb.RotateDataKeyRequest(account_id=account_id), who,
                               timeout_s=ROTATE_KEYS_TIMEOUT_S)
        return _rotated(r)

    @api.post("/v1/keys/rotate-households", status_code=202, response_model=RotationJobOut,
              responses={200: {"model": RotateDataKeysOut,
                               "description": "a privacy before session 27 (rolling upgrade): the batch ran "
                                              "inside the call"},
                         409: {"model": models.ErrorOut, "description": "request_id already used for another batch"}},
              summary="Rotate the data key of every household whose key is older than N days (a durable job)")
    async def rotate_data_keys(body: RotateDataKeysIn,
                               who: Principal = Depends(access("POST /v1/keys/rotate-households"))):
        try:
            r = await clients.call("privacy", "RequestDataKeyRotations", ppb.RequestDataKeyRotationsRequest(
                older_than_days=body.older_than_days, limit=body.limit, request_id=body.request_id or ""), who)
        except grpc.aio.AioRpcError as exc:
            if not falls_back(exc, "RequestDataKeyRotations", "RotateDataKeys"):
                raise
            # A privacy of a release before session 27 (it serves no such RPC:
            # UNIMPLEMENTED; the caller passed the gateway's own check of the same
            # permission): the batch inside one call, as then, judged again by privacy
            # (docs/operations.md, "Rolling upgrades").
            old = await clients.call("privacy", "RotateDataKeys", ppb.RotateDataKeysRequest(
                older_than_days=body.older_than_days, limit=body.limit), who, timeout_s=ROTATE_KEYS_TIMEOUT_S)
            # Its own body, past the route's response model (the job's): a 500 until the
            # rolling-upgrade test ran it through an older privacy.
            return JSONResponse(RotateDataKeysOut(rotated=[_rotated(x) for x in old.rotated]).model_dump(),
                                status_code=200)
        return JSONResponse(rotation_job_to_json(r).model_dump(), status_code=202,
                            headers={"Location": f"/v1/keys/rotate-households/{r.job_id}"})

    @api.get("/v1/keys/rotate-households/{job_id}", response_model=RotationJobOut, responses={**NOT_FOUND},
             summary="State of a batch data key rotation and each household's outcome")
    async def get_rotation_job(job_id: str = JOB_PATH,
                               who: Principal = Depends(access("GET /v1/keys/rotate-households/{job_id}"))):
        return rotation_job_to_json(await clients.call(
            "privacy", "GetDataKeyRotations", ppb.GetDataKeyRotationsRequest(job_id=job_id), who))

    return api
