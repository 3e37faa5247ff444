"""The attribution service over real in-process servers: person-level journeys use the
clustering service's assignments, so each person's conversions credit that person's
channels; account-level journeys mix them."""

from __future__ import annotations

import time

import grpc
import pytest

from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.attribution.v1 import attribution_pb2_grpc as apb_grpc
from hearth.common.v1 import common_pb2_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import Principal, Role, service_principal
from services.common.pbutil import float_to_ts
from services.common.storage.sql import SqliteDatabase
from tests.conftest import ADMIN

T0 = time.time() - 10 * 86400
ACC = "acc-att"


def _watch(store: ClusteringStore, device: str, start: float, person: str) -> None:
    events = [ViewingEvent(f"{device}-{start}-{i}", ACC, device, "tv" if device == "tv" else "mobile",
                           start + i * 60, "heartbeat", f"t{i}", duration_s=60.0) for i in range(5)]
    store.ingest(events)
    session = next(s for s in store.household(ACC).sessions if s.device_id == device and s.start_ts == start)
    store.set_persons(ACC, {session.session_id: person}, {session.session_id: {person: 0.95,
                                                                                "p2" if person == "p1" else "p1": 0.05}})


@pytest.fixture
def stubs(start_service, tmp_path):
    clustering, _ = start_service("clustering")
    store = ClusteringStore(SqliteDatabase(tmp_path / "clustering" / "clustering.db"))
    # p1 watches on the TV in the evenings; p2 on the phone in the mornings.
    for day in range(5):
        _watch(store, "tv", T0 + day * 86400 + 20 * 3600, "p1")
        _watch(store, "phone", T0 + day * 86400 + 8 * 3600, "p2")
    privacy, privacy_channel = start_service("privacy")   # attribution checks consent with it
    attribution, channel = start_service("attribution", clustering_addr=f"127.0.0.1:{clustering.port}",
                                         privacy_addr=f"127.0.0.1:{privacy.port}")
    stubs = apb_grpc.AttributionServiceStub(channel)
    stubs.app = attribution.servicers[0].app
    stubs.data = common_pb2_grpc.DataHolderStub(channel)   # the erasure contract, same port
    stubs.consent = ppb_grpc.ConsentStub(privacy_channel)
    return stubs


def _tp(i, device, ts, channel):
    return apb.Touchpoint(touchpoint_id=f"tp{i}", account_id=ACC, device_id=device, ts=float_to_ts(ts),
                          channel=channel, campaign="c")


def test_person_level_credit_follows_each_persons_channels(stubs):
    touches, conversions = [], []
    for day in range(5):
        base = T0 + day * 86400
        touches.append(_tp(f"tv{day}", "tv", base + 20 * 3600 + 30, "tv_ad"))
        touches.append(_tp(f"ph{day}", "phone", base + 8 * 3600 + 30, "social"))
        conversions.append(apb.Conversion(conversion_id=f"c-tv-{day}", account_id=ACC,
                                          ts=float_to_ts(base + 20 * 3600 + 200), kind="subscribe",
                                          value=10.0, device_id="tv"))
    md = ADMIN.metadata("attribution")
    assert stubs.RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=touches), metadata=md).accepted == 10
    assert stubs.RecordConversions(apb.RecordConversionsRequest(conversions=conversions), metadata=md).accepted == 5
    response = stubs.Attribute(apb.AttributeRequest(account_ids=[ACC], method=apb.METHOD_MARKOV,
                                                    lookback_seconds=2 * 86400), metadata=md)
    by_scope = {(r.scope, r.person_id): r for r in response.results}
    household = {c.channel: c.conversions for c in by_scope[("household", "")].credit.channels}
    assert household["social"] > 0.5        # account level: phone ads of p2 get credit for p1's conversions
    p1 = {c.channel: c.conversions for c in by_scope[("person", "p1")].credit.channels}
    assert p1.get("tv_ad", 0) == pytest.approx(by_scope[("person", "p1")].total_conversions)
    assert p1.get("social", 0.0) == pytest.approx(0.0, abs=1e-9)
    assert sum(c.conversions for c in by_scope[("person", "p1")].credit.channels) == pytest.approx(4.75)
    baselines = {b.method for b in by_scope[("household", "")].baselines}
    assert baselines == {"first_touch", "last_touch", "linear", "time_decay", "position_based"}

    # Intervals, auto order, sequences and the persona prior through the same RPC.
    response = stubs.Attribute(apb.AttributeRequest(
        account_ids=[ACC], method=apb.METHOD_HYBRID, lookback_seconds=2 * 86400, markov_order_auto=True,
        bootstrap_replicates=50, bootstrap_seed=3, sequences=["social > tv_ad"], persona_prior_strength=5.0,
        personas=[apb.PersonPersona(account_id=ACC, person_id="p1", persona="evening"),
                  apb.PersonPersona(account_id=ACC, person_id="p2", persona="evening")]), metadata=md)
    by_scope = {(r.scope, r.person_id): r for r in response.results}
    hh = by_scope[("household", "")]
    assert hh.bootstrap_replicates == 50 and hh.confidence_level == pytest.approx(0.95)
    # Every journey here converts: nothing to predict, so auto falls back to order 1 and says so.
    assert hh.markov_order == hh.order_selection.chosen == 1 and "non-converting" in hh.order_selection.fallback
    assert not hh.order_selection.at_upper_bound
    for c in hh.credit.channels:
        assert c.conversions_interval.lower <= c.conversions + 1e-9 <= c.conversions_interval.upper + 2e-9
    assert all(ch.HasField("conversions_interval") for b in hh.baselines for ch in b.channels)
    assert hh.sequences[0].sequence == "social > tv_ad" and hh.sequences[0].removal_effect >= 0
    p1 = by_scope[("person", "p1")]
    assert p1.persona_prior_strength == 5.0 and p1.persona_prior_journeys > 0  # p2's journeys are the prior
    # The prior pulls p1's Markov credit toward p2's channel (social), within p1's conversions.
    social = {c.channel: c.conversions for c in p1.credit.channels}.get("social", 0.0)
    assert 0 < social < p1.total_conversions
    assert sum(c.conversions for c in p1.credit.channels) == pytest.approx(p1.total_conversions)


def test_attribute_over_all_accounts_leaves_out_withdrawn_accounts(stubs):
    """No account_ids: every account's journeys are pooled, except those of accounts whose
    processing or attribution consent is withdrawn (until session 18 they were counted)."""
    md = ADMIN.metadata("attribution")
    accounts = {"acc-att-in": 3, "acc-att-no-attr": 2, "acc-att-no-proc": 4}
    for account, n in accounts.items():
        stubs.RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
            touchpoint_id=f"{account}-tp{i}", account_id=account, device_id="tv", ts=float_to_ts(T0 + i * 3600),
            channel="search", campaign="c") for i in range(n)]), metadata=md)
        stubs.RecordConversions(apb.RecordConversionsRequest(conversions=[apb.Conversion(
            conversion_id=f"{account}-c{i}", account_id=account, ts=float_to_ts(T0 + i * 3600 + 60),
            kind="subscribe", value=1.0, device_id="tv") for i in range(n)]), metadata=md)
    stubs.consent.SetConsent(ppb.SetConsentRequest(account_id="acc-att-no-attr", processing=True,
                                                   attribution=False), metadata=ADMIN.metadata("privacy"))
    stubs.consent.SetConsent(ppb.SetConsentRequest(account_id="acc-att-no-proc", processing=False,
                                                   attribution=True), metadata=ADMIN.metadata("privacy"))
    response = stubs.Attribute(apb.AttributeRequest(method=apb.METHOD_MARKOV, level=apb.LEVEL_HOUSEHOLD,
                                                    lookback_seconds=86400), metadata=md)
    (household,) = response.results
    assert household.total_conversions == pytest.approx(3)   # acc-att-in's only


def test_for_a_caller_without_read_consent_a_withdrawn_account_is_an_account_never_seen(stubs):
    """Session 21's consent oracle: Attribute with explicit account_ids answered
    FAILED_PRECONDITION naming an account that withdrew, so an analyst (no read_consent)
    learnt, one call per account, which households objected. Now for such a caller a
    withdrawn account is left out exactly as an account Hearth holds nothing for — same
    status, same results, alone or pooled with others — while a caller holding
    read_consent (admin) still gets the refusal naming it."""
    admin = ADMIN.metadata("attribution")
    analyst = Principal("att-analyst", Role.ANALYST).metadata("attribution")
    for account in ("acc-oracle-kept", "acc-oracle-gone"):
        stubs.RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
            touchpoint_id=f"{account}-tp{i}", account_id=account, device_id="tv", ts=float_to_ts(T0 + i * 3600),
            channel=f"{account}-ch", campaign="c") for i in range(3)]), metadata=admin)
        stubs.RecordConversions(apb.RecordConversionsRequest(conversions=[apb.Conversion(
            conversion_id=f"{account}-c", account_id=account, ts=float_to_ts(T0 + 3 * 3600),
            kind="subscribe", value=2.0, device_id="tv")]), metadata=admin)
    stubs.consent.SetConsent(ppb.SetConsentRequest(account_id="acc-oracle-gone", processing=True,
                                                   attribution=False), metadata=ADMIN.metadata("privacy"))
    stubs.app.consent.invalidate()   # what the 5 s staleness bound does, at once

    def attribute(accounts, metadata):
        return stubs.Attribute(apb.AttributeRequest(account_ids=accounts, method=apb.METHOD_LINEAR,
                                                    lookback_seconds=30 * 86400), metadata=metadata)

    def same_but_the_id(gone: apb.AttributeResponse, never: apb.AttributeResponse) -> None:
        for result in never.results:
            if result.account_id == "acc-oracle-never":
                result.account_id = "acc-oracle-gone"
        assert gone == never

    same_but_the_id(attribute(["acc-oracle-gone"], analyst), attribute(["acc-oracle-never"], analyst))
    pooled = attribute(["acc-oracle-kept", "acc-oracle-gone"], analyst)
    same_but_the_id(pooled, attribute(["acc-oracle-kept", "acc-oracle-never"], analyst))
    assert pooled.results[0].total_conversions == pytest.approx(1)   # acc-oracle-kept's only
    with pytest.raises(grpc.RpcError) as refused:
        attribute(["acc-oracle-kept", "acc-oracle-gone"], admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "acc-oracle-gone" in refused.value.details()


def test_attribute_validates_fields(stubs):
    with pytest.raises(grpc.RpcError) as info:
        stubs.Attribute(apb.AttributeRequest(markov_order=7), metadata=ADMIN.metadata("attribution"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == "markov_order"
    with pytest.raises(grpc.RpcError) as info:
        stubs.Attribute(apb.AttributeRequest(repeats="squash"), metadata=ADMIN.metadata("attribution"))
    assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == "repeats"
    for request, field in [
        (apb.AttributeRequest(bootstrap_replicates=1), "bootstrap_replicates"),
        (apb.AttributeRequest(bootstrap_replicates=10, confidence_level=1.5), "confidence_level"),
        (apb.AttributeRequest(position_weights=[0.5, 0.5, 0.5]), "position_weights"),
        (apb.AttributeRequest(half_life_days=-1), "half_life_days"),
        (apb.AttributeRequest(sequences=["a > > b"]), "sequences[0]"),
        (apb.AttributeRequest(persona_prior_strength=float("nan")), "persona_prior_strength"),
        # An enum value the server does not know (a newer client, a typo'd int) named,
        # not answered OK with no results; likewise an unknown method.
        (apb.AttributeRequest(level=99), "level"),
        (apb.AttributeRequest(method=99), "method"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stubs.Attribute(request, metadata=ADMIN.metadata("attribution"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == field


def test_erase_person_removes_their_touchpoints(stubs):
    md = ADMIN.metadata("attribution")
    stubs.RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=[
        _tp("a", "tv", T0 + 20 * 3600 + 30, "tv_ad"), _tp("b", "phone", T0 + 8 * 3600 + 30, "social")]), metadata=md)
    from hearth.common.v1 import common_pb2

    privacy = service_principal("privacy").metadata("attribution")   # Erase is the deletion fan-out's only
    result = stubs.data.Erase(common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id=ACC, person_id="p2")),
                              metadata=privacy).result
    assert dict(result.deleted_counts) == {"touchpoints": 1}
    again = stubs.data.Erase(common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id=ACC, person_id="p2")),
                             metadata=privacy).result
    assert again.already_erased
