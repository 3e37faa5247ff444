"""gRPC adapter of the attribution service."""

from __future__ import annotations

from hearth.attribution.v1 import attribution_pb2 as pb
from hearth.attribution.v1 import attribution_pb2_grpc as pb_grpc
from services.attribution.app import AttributeQuery, AttributionApp, ScopedReport
from services.attribution.domain.records import Conversion, Touchpoint
from services.common.pbutil import ts_to_float

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name
_METHOD_NAMES = {pb.METHOD_UNSPECIFIED: "hybrid", pb.METHOD_MARKOV: "markov", pb.METHOD_SHAPLEY: "shapley",
                 pb.METHOD_HYBRID: "hybrid", pb.METHOD_FIRST_TOUCH: "first_touch",
                 pb.METHOD_LAST_TOUCH: "last_touch", pb.METHOD_LINEAR: "linear"}
_LEVELS = {pb.LEVEL_UNSPECIFIED: ("household", "person"), pb.LEVEL_BOTH: ("household", "person"),
           pb.LEVEL_PERSON: ("person",), pb.LEVEL_HOUSEHOLD: ("household",)}


def query_from_pb(r: pb.AttributeRequest) -> AttributeQuery:
    window = r.window if r.HasField("window") else None
    return AttributeQuery(
        account_ids=tuple(r.account_ids),
        start=ts_to_float(window, "start", "window.start", required=False, window=True) if window else None,
        end=ts_to_float(window, "end", "window.end", required=False, window=True) if window else None,
        method=_METHOD_NAMES.get(r.method, f"unknown({r.method})"),
        order=r.markov_order or 1,
        alpha=r.hybrid_alpha if r.hybrid_alpha_set else 0.5,
        lookback_s=float(r.lookback_seconds) if r.lookback_seconds else 30 * 86400.0,
        repeats=r.repeats or "collapse_states",
        include_nulls=r.include_nulls if r.HasField("include_nulls") else True,
        horizon=r.horizon,
        levels=_LEVELS.get(r.level, ()),
    )


def _table(method: str, names, conversions, revenue) -> pb.CreditTable:
    total = float(sum(conversions))
    return pb.CreditTable(method=method, channels=[
        pb.ChannelCredit(channel=n, share=float(c) / total if total > 0 else 0.0, conversions=float(c),
                         revenue=float(v)) for n, c, v in zip(names, conversions, revenue)])


def scoped_to_pb(s: ScopedReport) -> pb.AttributionResult:
    r = s.report
    return pb.AttributionResult(
        scope=s.scope, account_id=s.account_id, person_id=s.person_id,
        credit=_table(r.method, r.channel_names, r.conversions, r.revenue),
        baselines=[_table(name, r.channel_names, b["conversions"], b["revenue"])
                   for name, b in sorted(r.baselines.items())],
        journeys=s.journeys, total_conversions=r.total_conversions, total_revenue=r.total_value)


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

    def Attribute(self, request, context) -> pb.AttributeResponse:
        outcome = self.app.attribute(query_from_pb(request))
        return pb.AttributeResponse(results=[scoped_to_pb(s) for s in outcome.results])
