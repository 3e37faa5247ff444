"""gRPC adapter of the privacy service."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.privacy.app import PrivacyApp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrivacyService"].full_name


class PrivacyServicer(pb_grpc.PrivacyServiceServicer):
    def __init__(self, app: PrivacyApp) -> None:
        self.app = app

    def SetConsent(self, request, context) -> pb.SetConsentResponse:
        version = self.app.set_consent(request.account_id, request.processing, request.attribution)
        return pb.SetConsentResponse(version=version)

    def GetConsent(self, request, context) -> pb.GetConsentResponse:
        c = self.app.consent(request.account_id)
        return pb.GetConsentResponse(account_id=c.account_id, processing=c.processing,
                                     attribution=c.attribution, known=c.known)
