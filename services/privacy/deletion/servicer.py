"""gRPC adapter of the deletion room: RequestDeletion, GetDeletion, VerifyReceipt,
ExportHousehold, ExportHouseholdStream. Thin: validate -> convert -> one call -> convert back."""

from __future__ import annotations

from collections.abc import Iterator

from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common.ids import check_id
from services.common.erasure import scope_from_pb, scope_to_pb
from services.common.errors import InvalidArgument
from services.common.export_stream import bounded, chunks
from services.common.pbutil import float_to_ts
from services.common.text import MAX_JOB_ID_CHARS, check_text
from services.privacy.consent.app import ConsentApp
from services.privacy.deletion.app import DeletionCoordinator, export_household, stages_for
from services.privacy.deletion.domain import JobState, ServiceStatus
from services.privacy.deletion.store import StoredJob
from services.privacy.keys.app import KeyService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Deletion"].full_name

_STATE = {JobState.PENDING: pb.JOB_STATE_PENDING, JobState.RUNNING: pb.JOB_STATE_RUNNING,
          JobState.COMPLETED: pb.JOB_STATE_COMPLETED, JobState.FAILED: pb.JOB_STATE_FAILED}


def job_to_pb(stored: StoredJob) -> pb.GetDeletionResponse:
    job = stored.job
    out = pb.GetDeletionResponse(job_id=job.job_id, state=_STATE[job.state], scope=scope_to_pb(job.scope),
                                 requested_at=float_to_ts(job.requested_at.timestamp()),
                                 receipt_json=stored.receipt_json or "")
    if job.completed_at is not None:
        out.completed_at.CopyFrom(float_to_ts(job.completed_at.timestamp()))
    # The services in the order the job erases them (a household's key is shredded first).
    order = [s for stage in stages_for(job.scope) for s in stage]
    for name in sorted(job.services, key=lambda s: order.index(s) if s in order else len(order)):
        progress = job.services[name]
        confirmation = pb.ServiceConfirmation(service=name, confirmed=progress.status is ServiceStatus.CONFIRMED,
                                              attempts=progress.attempts, last_error=progress.last_error)
        if progress.result is not None:
            extra = stored.erasures.get(name, {})
            confirmation.result.CopyFrom(common_pb2.ErasureResult(
                service=name, deleted_counts=extra.get("deleted_counts", {}),
                deleted_ids_sha256=bytes.fromhex(progress.result.ids_digest),
                already_erased=bool(extra.get("already_erased", False))))
        out.services.append(confirmation)
    return out


class DeletionServicer(pb_grpc.DeletionServicer):
    """``ExportHousehold`` also reads the household's consent and data-key history, so the
    consent and keys rooms' apps are given too."""

    def __init__(self, deletion: DeletionCoordinator, consent: ConsentApp, keys: KeyService) -> None:
        self.deletion = deletion
        self.consent = consent
        self.keys = keys

    def RequestDeletion(self, request, context) -> pb.RequestDeletionResponse:
        if not request.HasField("scope"):
            raise InvalidArgument("is required", "scope")
        stored = self.deletion.request(scope_from_pb(request.scope), request.request_id, request.reason)
        return pb.RequestDeletionResponse(job_id=stored.job.job_id, state=_STATE[stored.job.state])

    def GetDeletion(self, request, context) -> pb.GetDeletionResponse:
        check_text(request.job_id, "job_id", max_chars=MAX_JOB_ID_CHARS, required=True)
        return job_to_pb(self.deletion.get(request.job_id))

    def VerifyReceipt(self, request, context) -> pb.VerifyReceiptResponse:
        if not request.receipt_json:
            raise InvalidArgument("is required", "receipt_json")
        valid, reason = self.deletion.verify(request.receipt_json)
        return pb.VerifyReceiptResponse(valid=valid, reason=reason)

    def ExportHousehold(self, request, context) -> pb.ExportHouseholdResponse:
        """The document as one message (up to HEARTH_GRPC_MAX_RESPONSE_BYTES): what a gateway
        of a release before session 26 calls. Joined from the same pieces as the stream."""
        account_id = check_id(request.account_id, "account_id")
        text = b"".join(p.encode("utf-8") if isinstance(p, str) else p for p in self._export(account_id))
        return pb.ExportHouseholdResponse(account_id=account_id, export_json=text.decode("utf-8"))

    def ExportHouseholdStream(self, request, context) -> Iterator[common_pb2.ExportChunk]:
        """The document in chunks of HEARTH_EXPORT_CHUNK_BYTES, the last marked complete;
        a part that fails ends the stream with an error status (deletion/app.py,
        ``export_household``). The account id is checked before the first message."""
        return bounded(chunks(self._export(check_id(request.account_id, "account_id"))))

    def _export(self, account_id: str) -> Iterator[bytes | str]:
        c = self.consent.consent(account_id)
        consent = {"processing": c.processing, "attribution": c.attribution, "version": c.version,
                   "explicit": c.known}
        return export_household(account_id, self.deletion.peers, self.deletion.jobs, self.keys, consent)
