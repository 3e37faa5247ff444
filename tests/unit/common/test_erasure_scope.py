"""The one scope type (services/common/erasure.ErasureScope): the gateway's body, the
wire form and privacy's stored form all go through it, so they accept and refuse the
same scopes and name the same fields."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from gateway.routes.privacy import ScopeIn, _scope_to_json
from hearth.common.v1 import common_pb2
from services.common.erasure import ErasureScope, ScopeKind, scope_from_pb, scope_to_pb
from services.common.errors import InvalidArgument, PermissionDenied

T0 = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize("scope", [
    ErasureScope("acct-1", "household"),
    ErasureScope("acct-1", "device", device_id="tv-1"),
    ErasureScope("acct-1", "person", person_id="p2"),
    ErasureScope("acct-1", "window", start=T0.timestamp()),
    ErasureScope("acct-1", "window", end=T0.timestamp()),
    ErasureScope("acct-1", "window", start=T0.timestamp(), end=T0.timestamp() + 3600),
])
def test_every_form_round_trips(scope):
    assert scope_from_pb(scope_to_pb(scope)) == scope
    assert ErasureScope.from_dict(scope.to_dict()) == scope
    body = {k: v for k, v in scope.to_dict().items()}
    assert ScopeIn.model_validate(body).to_scope() == scope


def test_bounds_accept_numbers_datetimes_and_receipt_text_alike():
    as_number = ErasureScope("a", "window", start=T0.timestamp())
    assert ErasureScope("a", "window", start=T0) == as_number
    assert ErasureScope("a", "window", start="2026-03-01T12:00:00.250000Z") == as_number
    assert as_number.kind is ScopeKind.TIME_WINDOW and as_number.kind == "window"


@pytest.mark.parametrize(("body", "field"), [
    ({"kind": "device", "account_id": "a"}, "device_id"),
    ({"kind": "household", "account_id": "a", "person_id": "p1"}, "person_id"),
    ({"kind": "window", "account_id": "a"}, "start"),
    ({"kind": "window", "account_id": "a", "start": "2026-03-02T00:00:00Z", "end": "2026-03-01T00:00:00Z"},
     "end"),
])
def test_the_gateway_and_the_scope_type_refuse_the_same_bodies_naming_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        ScopeIn.model_validate(body)
    assert f"{field}:" in str(err.value)
    kwargs = {k: v for k, v in body.items() if k not in ("kind", "account_id")}
    with pytest.raises(InvalidArgument) as direct:
        ErasureScope(body["account_id"], body["kind"], **kwargs)
    assert direct.value.field == field


def test_wire_errors_name_the_wire_field():
    with pytest.raises(InvalidArgument) as err:
        scope_from_pb(common_pb2.ErasureScope(account_id="a b", household=True))
    assert err.value.field == "scope.account_id"
    with pytest.raises(InvalidArgument) as err:
        scope_from_pb(common_pb2.ErasureScope(account_id="a", device_id="tv\n"))
    assert err.value.field == "scope.device_id"
    with pytest.raises(InvalidArgument) as err:
        scope_from_pb(common_pb2.ErasureScope(account_id="a"))
    assert err.value.field == "scope.target"
    # Every account ("*") only from the privacy service's own principal.
    everyone = common_pb2.ErasureScope(account_id="*", window=common_pb2.TimeRange(end={"seconds": 10**9}))
    with pytest.raises(PermissionDenied):
        scope_from_pb(everyone)
    assert scope_from_pb(everyone, check_principal=False).all_accounts


def test_the_api_shows_a_jobs_scope_in_its_own_time_form():
    scope = ErasureScope("acct-1", "window", start=datetime(2026, 3, 1, tzinfo=UTC), end=T0)
    assert _scope_to_json(scope_to_pb(scope)) == {
        "kind": "window", "account_id": "acct-1",
        "start": "2026-03-01T00:00:00Z", "end": "2026-03-01T12:00:00.250000Z"}
    assert _scope_to_json(scope_to_pb(ErasureScope("acct-1", "device", device_id="tv"))) == {
        "kind": "device", "account_id": "acct-1", "device_id": "tv"}
