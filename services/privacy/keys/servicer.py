"""gRPC adapter of the keys room: GetDataKey(s), RotateKeys, RotateDataKey(s), and the batch
rotation jobs (RequestDataKeyRotations, GetDataKeyRotations: keys/batch.py)."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common import identity
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.ids import check_id
from services.common.text import MAX_JOB_ID_CHARS, check_text
from services.privacy.keys.app import ERASED, MAX_DATA_KEYS, UNAVAILABLE, KeyService
from services.common.pbutil import float_to_ts
from services.privacy.deletion.domain import JobState
from services.privacy.deletion.store import StoredJob
from services.privacy.keys.batch import BatchRotations, RotationBatch
from services.privacy.keys.rotation import DataKeyRotation, RotationOutcome

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Keys"].full_name
_KEY_OUTCOME = {ERASED: pb.DATA_KEY_OUTCOME_ERASED, UNAVAILABLE: pb.DATA_KEY_OUTCOME_UNAVAILABLE}


class KeysServicer(pb_grpc.KeysServicer):
    def __init__(self, keys: KeyService, rotation: DataKeyRotation | None = None,
                 batches: BatchRotations | None = None) -> None:
        self._keys = keys
        self._rotation = rotation
        self._batches = batches

    def GetDataKey(self, request, context) -> pb.GetDataKeyResponse:
        # The matrix (permissions.ROLE_PERMISSIONS) already gives use_data_key to service
        # principals only; checked again here because key material goes to stores only.
        if identity.current_principal().role is not identity.Role.SERVICE:
            raise PermissionDenied("data keys are given to service principals only", "")
        account_id = check_id(request.account_id, "account_id")
        version, dek = self._keys.data_key(account_id, int(request.dek_version))
        digest_key = self._keys.digest_key(account_id) if request.with_digest_key else b""
        return pb.GetDataKeyResponse(dek_version=version, dek=dek, digest_key=digest_key)

    def GetDataKeys(self, request, context) -> pb.GetDataKeysResponse:
        if identity.current_principal().role is not identity.Role.SERVICE:
            raise PermissionDenied("data keys are given to service principals only", "")
        if not 0 < len(request.account_ids) <= MAX_DATA_KEYS:
            raise InvalidArgument(f"must hold 1..{MAX_DATA_KEYS} account ids, got {len(request.account_ids)}",
                                  "account_ids")
        accounts = list(dict.fromkeys(check_id(a, f"account_ids[{i}]") for i, a in enumerate(request.account_ids)))
        out = pb.GetDataKeysResponse()
        for account_id, answer in self._keys.data_keys(accounts).items():
            if isinstance(answer, tuple):
                out.keys.add(account_id=account_id, outcome=pb.DATA_KEY_OUTCOME_KEY, dek_version=answer[0],
                             dek=answer[1])
            else:
                out.keys.add(account_id=account_id, outcome=_KEY_OUTCOME[answer])
        return out

    def RotateKeys(self, request, context) -> pb.RotateKeysResponse:
        if not request.new_active_kek_id:
            raise InvalidArgument("is required", "new_active_kek_id")
        count, active, in_use = self._keys.rotate(request.new_active_kek_id)
        return pb.RotateKeysResponse(rewrapped=count, active_kek_id=active, kek_ids_in_use=in_use)

    def RotateDataKey(self, request, context) -> pb.RotateDataKeyResponse:
        account_id = check_id(request.account_id, "account_id")
        if self._rotation is None:
            raise FailedPrecondition("this privacy service reaches no data-holding service", "account_id")
        return _outcome_to_pb(self._rotation.rotate(account_id))

    def RequestDataKeyRotations(self, request, context) -> pb.DataKeyRotationJob:
        if self._batches is None:
            raise FailedPrecondition("this privacy service reaches no data-holding service", "older_than_days")
        return batch_to_pb(self._batches.request(float(request.older_than_days), int(request.limit),
                                                 request.request_id))

    def GetDataKeyRotations(self, request, context) -> pb.DataKeyRotationJob:
        check_text(request.job_id, "job_id", max_chars=MAX_JOB_ID_CHARS, required=True)
        if self._batches is None:
            raise FailedPrecondition("this privacy service reaches no data-holding service", "job_id")
        return batch_to_pb(self._batches.get(request.job_id))

    def RotateDataKeys(self, request, context) -> pb.RotateDataKeysResponse:
        """The batch inside this call (a release before session 27's gateway, during a
        rolling upgrade); RequestDataKeyRotations is the job."""
        if self._rotation is None:
            raise FailedPrecondition("this privacy service reaches no data-holding service", "older_than_days")
        done = self._rotation.rotate_older_than(float(request.older_than_days), int(request.limit))
        return pb.RotateDataKeysResponse(rotated=[_outcome_to_pb(d) for d in done])


def _purges_to_pb(steps) -> list[pb.IncompletePurge]:
    return [pb.IncompletePurge(service=p["service"], store=p["store"], location=p["where"], action=p["action"])
            for p in steps]


def _outcome_to_pb(done: RotationOutcome) -> pb.RotateDataKeyResponse:
    return pb.RotateDataKeyResponse(account_id=done.account_id, dek_version=done.dek_version,
                                    reencrypted=done.reencrypted, destroyed_versions=done.destroyed,
                                    kept_versions=done.kept, resumed=done.resumed,
                                    incomplete_purges=_purges_to_pb(done.incomplete_purges))


_STATE = {JobState.PENDING: pb.JOB_STATE_PENDING, JobState.RUNNING: pb.JOB_STATE_RUNNING,
          JobState.COMPLETED: pb.JOB_STATE_COMPLETED, JobState.FAILED: pb.JOB_STATE_FAILED}


def batch_to_pb(stored: StoredJob) -> pb.DataKeyRotationJob:
    job: RotationBatch = stored.job
    out = pb.DataKeyRotationJob(job_id=job.job_id, state=_STATE[job.state], older_than_days=job.scope.older_than_days,
                                limit=job.scope.limit, requested_at=float_to_ts(job.requested_at),
                                counts=job.counts(), key_table_purges=dict(job.key_table_purges),
                                key_table_purge_detail=job.key_table_purge_detail)
    if job.completed_at is not None:
        out.completed_at.CopyFrom(float_to_ts(job.completed_at))
    for account, h in sorted(job.households.items()):
        out.households.append(pb.HouseholdRotation(
            account_id=account, outcome=h.outcome.value, dek_version=h.dek_version, resumed=h.resumed,
            attempts=h.attempts, detail=h.detail, reencrypted=dict(h.reencrypted),
            destroyed_versions=list(h.destroyed), incomplete_purges=_purges_to_pb(h.incomplete_purges)))
    return out
