"""The privacy process's Consent service over gRPC: ListWithdrawnConsent lists every
account whose processing or attribution consent is withdrawn, paged in account-id
order, for the attribution service's principal only (docs/privacy.md, "Consent")."""

from __future__ import annotations

import grpc
import pytest

from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import Principal, Role, service_principal

from .conftest import ADMIN

ATTRIBUTION = service_principal("attribution")


@pytest.fixture
def consent(start_service):
    _, channel = start_service("privacy")
    return ppb_grpc.ConsentStub(channel)


def _error(call, who) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(who)
    return info.value.code(), dict(info.value.trailing_metadata()).get(ERROR_FIELD_KEY, "")


def test_lists_withdrawn_accounts_in_pages(consent):
    for account, processing, attribution in [("acc-c", False, True), ("acc-a", True, False), ("acc-b", True, True),
                                             ("acc-d", False, False), ("acc-e", True, True)]:
        consent.SetConsent(ppb.SetConsentRequest(account_id=account, processing=processing, attribution=attribution),
                           metadata=ADMIN.metadata("privacy"), timeout=10)
    consent.SetConsent(ppb.SetConsentRequest(account_id="acc-e", processing=True, attribution=False),
                       metadata=ADMIN.metadata("privacy"), timeout=10)   # withdrawn after giving it
    first = consent.ListWithdrawnConsent(ppb.ListWithdrawnConsentRequest(limit=2), metadata=ATTRIBUTION.metadata("privacy"),
                                         timeout=10)
    assert [(a.account_id, a.processing, a.attribution, a.known) for a in first.accounts] == [
        ("acc-a", True, False, True), ("acc-c", False, True, True)]
    assert first.has_more
    rest = consent.ListWithdrawnConsent(ppb.ListWithdrawnConsentRequest(after_account_id="acc-c"),
                                        metadata=ATTRIBUTION.metadata("privacy"), timeout=10)
    assert [a.account_id for a in rest.accounts] == ["acc-d", "acc-e"] and not rest.has_more


def test_only_the_attribution_service_may_list(consent):
    call = (lambda who: consent.ListWithdrawnConsent(ppb.ListWithdrawnConsentRequest(),
                                                     metadata=who.metadata("privacy"), timeout=10))
    for who in (ADMIN, Principal("test-officer", Role.PRIVACY_OFFICER), service_principal("clustering"),
                service_principal("feedback")):
        assert _error(call, who)[0] == grpc.StatusCode.PERMISSION_DENIED, who


@pytest.mark.parametrize("request_, field", [
    (ppb.ListWithdrawnConsentRequest(limit=-1), "limit"),
    (ppb.ListWithdrawnConsentRequest(limit=10_001), "limit"),
    (ppb.ListWithdrawnConsentRequest(after_account_id="bad id\n"), "after_account_id"),
])
def test_bad_paging_is_invalid_argument_naming_the_field(consent, request_, field):
    call = (lambda who: consent.ListWithdrawnConsent(request_, metadata=who.metadata("privacy"), timeout=10))
    assert _error(call, ATTRIBUTION) == (grpc.StatusCode.INVALID_ARGUMENT, field)


def test_getconsents_answers_each_account_and_refuses_bad_input_naming_the_field(consent):
    """GetConsents (session 28): a data holder checks a write's accounts in one call."""
    clustering = service_principal("clustering")
    consent.SetConsent(ppb.SetConsentRequest(account_id="acc-c2", processing=False, attribution=True),
                       metadata=ADMIN.metadata("privacy"), timeout=10)

    def ask(ids):
        return lambda who: consent.GetConsents(ppb.GetConsentsRequest(account_ids=ids),
                                               metadata=who.metadata("privacy"), timeout=10)

    r = ask(["acc-c1", "acc-c2", "acc-c1"])(clustering)
    assert [(c.account_id, c.processing, c.attribution, c.known) for c in r.accounts] == [
        ("acc-c1", True, True, False), ("acc-c2", False, True, True)]
    assert _error(ask([]), clustering) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids")
    assert _error(ask([f"a{i}" for i in range(1001)]), clustering) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids")
    assert _error(ask(["acc-ok", "a b"]), clustering) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids[1]")
