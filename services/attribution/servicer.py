"""gRPC adapter of the attribution service."""

from __future__ import annotations

from hearth.attribution.v1 import attribution_pb2 as pb
from hearth.attribution.v1 import attribution_pb2_grpc as pb_grpc
from services.attribution.app import AttributionApp
from services.attribution.domain.records import Conversion, Touchpoint
from services.common.pbutil import ts_to_float

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    def __init__(self, app: AttributionApp) -> None:
        self.app = app

    def RecordTouchpoints(self, request, context) -> pb.RecordTouchpointsResponse:
        items = [Touchpoint(t.touchpoint_id, t.account_id, t.device_id,
                            ts_to_float(t, "ts", f"touchpoints[{i}].ts"), t.channel, t.campaign,
                            t.person_id or None)
                 for i, t in enumerate(request.touchpoints)]
        accepted, duplicates = self.app.record_touchpoints(items)
        return pb.RecordTouchpointsResponse(accepted=accepted, duplicates=duplicates)

    def RecordConversions(self, request, context) -> pb.RecordConversionsResponse:
        items = [Conversion(c.conversion_id, c.account_id,
                            ts_to_float(c, "ts", f"conversions[{i}].ts"), c.kind, c.value,
                            c.device_id or None)
                 for i, c in enumerate(request.conversions)]
        accepted, duplicates = self.app.record_conversions(items)
        return pb.RecordConversionsResponse(accepted=accepted, duplicates=duplicates)
