"""gRPC adapter of the consent room: SetConsent, GetConsent(s), ListWithdrawnConsent."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.privacy.consent.app import ConsentApp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Consent"].full_name


class ConsentServicer(pb_grpc.ConsentServicer):
    def __init__(self, app: ConsentApp) -> None:
        self._app = app

    def SetConsent(self, request, context) -> pb.SetConsentResponse:
        version = self._app.set_consent(request.account_id, request.processing, request.attribution)
        return pb.SetConsentResponse(version=version)

    def GetConsent(self, request, context) -> pb.GetConsentResponse:
        return _consent_pb(self._app.consent(request.account_id))

    def GetConsents(self, request, context) -> pb.GetConsentsResponse:
        return pb.GetConsentsResponse(accounts=[_consent_pb(c) for c in self._app.consents(list(request.account_ids))])

    def ListWithdrawnConsent(self, request, context) -> pb.ListWithdrawnConsentResponse:
        accounts, has_more = self._app.withdrawn(request.after_account_id, request.limit)
        return pb.ListWithdrawnConsentResponse(accounts=[_consent_pb(c) for c in accounts], has_more=has_more)


def _consent_pb(c) -> pb.GetConsentResponse:
    return pb.GetConsentResponse(account_id=c.account_id, processing=c.processing,
                                 attribution=c.attribution, known=c.known, version=c.version)
