"""gRPC adapter of the attribution service."""

from __future__ import annotations

from hearth.attribution.v1 import attribution_pb2 as pb
from hearth.attribution.v1 import attribution_pb2_grpc as pb_grpc
from services.attribution.app import AttributeQuery, AttributionApp, ScopedReport
from services.attribution.domain.records import Conversion, Touchpoint
from services.common import identity
from services.common.pbutil import ts_to_float

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name
_METHOD_NAMES = {pb.METHOD_UNSPECIFIED: "hybrid", pb.METHOD_MARKOV: "markov", pb.METHOD_SHAPLEY: "shapley",
                 pb.METHOD_HYBRID: "hybrid", pb.METHOD_FIRST_TOUCH: "first_touch",
                 pb.METHOD_LAST_TOUCH: "last_touch", pb.METHOD_LINEAR: "linear",
                 pb.METHOD_TIME_DECAY: "time_decay", pb.METHOD_POSITION_BASED: "position_based"}
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
        auto_order=r.markov_order_auto,
        bootstrap_replicates=r.bootstrap_replicates,
        bootstrap_seed=r.bootstrap_seed,
        confidence_level=r.confidence_level or 0.95,
        half_life_days=r.half_life_days or 7.0,
        position_weights=tuple(r.position_weights) or (0.4, 0.2, 0.4),
        sequences=tuple(r.sequences),
        persona_prior_strength=r.persona_prior_strength,
        personas=tuple((x.account_id, x.person_id, x.persona) for x in r.personas),
    )


def _table(method: str, names, conversions, revenue, interval=None) -> pb.CreditTable:
    total = float(sum(conversions))
    rows = []
    for i, (n, c, v) in enumerate(zip(names, conversions, revenue)):
        row = pb.ChannelCredit(channel=n, share=float(c) / total if total > 0 else 0.0, conversions=float(c),
                               revenue=float(v))
        if interval is not None:
            row.conversions_interval.CopyFrom(pb.Interval(lower=float(interval.conversions_lower[i]),
                                                          upper=float(interval.conversions_upper[i])))
            row.revenue_interval.CopyFrom(pb.Interval(lower=float(interval.revenue_lower[i]),
                                                      upper=float(interval.revenue_upper[i])))
            row.share_interval.CopyFrom(pb.Interval(lower=float(interval.share_lower[i]),
                                                    upper=float(interval.share_upper[i])))
            row.conversions_se = float(interval.conversions_se[i])
        rows.append(row)
    return pb.CreditTable(method=method, channels=rows)


def _order_selection(d: dict) -> pb.OrderSelection:
    return pb.OrderSelection(
        chosen=int(d["chosen"]),
        log_loss={int(k): float(v) for k, v in d.get("log_loss", {}).items()},
        log_loss_se={int(k): float(v) for k, v in d.get("log_loss_se", {}).items()},
        margin=float(d.get("margin", 0.0)), margin_se=float(d.get("margin_se", 0.0)),
        margin_vs_order1=float(d.get("margin_vs_order1", 0.0)),
        margin_vs_order1_se=float(d.get("margin_vs_order1_se", 0.0)),
        fallback=d.get("fallback", ""), at_upper_bound=bool(d.get("at_upper_bound", False)))


def scoped_to_pb(s: ScopedReport) -> pb.AttributionResult:
    r = s.report
    own = r.intervals.get(r.method)
    out = pb.AttributionResult(
        scope=s.scope, account_id=s.account_id, person_id=s.person_id,
        credit=_table(r.method, r.channel_names, r.conversions, r.revenue, own),
        baselines=[_table(name, r.channel_names, b["conversions"], b["revenue"], r.intervals.get(name))
                   for name, b in sorted(r.baselines.items())],
        journeys=s.journeys, total_conversions=r.total_conversions, total_revenue=r.total_value,
        markov_order=int(r.details.get("order", 0)),
        sequences=[pb.SequenceEffect(**e) for e in r.details.get("sequences", [])],
        bootstrap_replicates=own.replicates if own is not None else 0,
        confidence_level=own.level if own is not None else 0.0)
    if "order_selection" in r.details:
        out.order_selection.CopyFrom(_order_selection(r.details["order_selection"]))
    prior = r.details.get("persona_prior")
    if prior:
        out.persona_prior_strength = prior["strength"]
        out.persona_prior_journeys = prior["prior_journeys"]
    return out


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    def __init__(self, app: AttributionApp) -> None:
        self.app = app

    def RecordTouchpoints(self, request, context) -> pb.RecordTouchpointsResponse:
        items = [Touchpoint(t.touchpoint_id, t.account_id, t.device_id,
                            ts_to_float(t, "ts", f"touchpoints[{i}].ts"), t.channel, t.campaign,
                            t.person_id or None)
                 for i, t in enumerate(request.touchpoints)]
        accepted, duplicates, expired = self.app.record_touchpoints(items)
        return pb.RecordTouchpointsResponse(accepted=accepted, duplicates=duplicates, rejected_expired=expired)

    def RecordConversions(self, request, context) -> pb.RecordConversionsResponse:
        items = [Conversion(c.conversion_id, c.account_id,
                            ts_to_float(c, "ts", f"conversions[{i}].ts"), c.kind, c.value,
                            c.device_id or None)
                 for i, c in enumerate(request.conversions)]
        accepted, duplicates, expired = self.app.record_conversions(items)
        return pb.RecordConversionsResponse(accepted=accepted, duplicates=duplicates, rejected_expired=expired)

    def Attribute(self, request, context) -> pb.AttributeResponse:
        outcome = self.app.attribute(query_from_pb(request), caller=identity.current_principal())
        return pb.AttributeResponse(results=[scoped_to_pb(s) for s in outcome.results])
