"""gRPC adapter of the privacy service."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.privacy.consent.app import PrivacyApp
from services.privacy.audit.servicer import AuditRpcs
from services.privacy.deletion.servicer import DeletionServicerMixin

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrivacyService"].full_name


class PrivacyServicer(AuditRpcs, DeletionServicerMixin, pb_grpc.PrivacyServiceServicer):
    # AuditRpcs: AppendAudit/QueryAudit/GetAuditProof/VerifyAudit over ``self.audit``
    # (an AuditApp, set by __main__; None answers FAILED_PRECONDITION).
    # DeletionServicerMixin: RequestDeletion/GetDeletion/VerifyReceipt/ExportHousehold/
    # GetDataKey/RotateKeys over ``self.deletion`` and ``self.keys`` (set by __main__).

    def __init__(self, app: PrivacyApp) -> None:
        self.app = app

    def SetConsent(self, request, context) -> pb.SetConsentResponse:
        version = self.app.set_consent(request.account_id, request.processing, request.attribution)
        return pb.SetConsentResponse(version=version)

    def GetConsent(self, request, context) -> pb.GetConsentResponse:
        c = self.app.consent(request.account_id)
        return pb.GetConsentResponse(account_id=c.account_id, processing=c.processing,
                                     attribution=c.attribution, known=c.known)
