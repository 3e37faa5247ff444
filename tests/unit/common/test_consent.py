"""ConsentChecker: refusals name account_id, answers are cached for ttl_s, a stale
answer bridges a privacy outage up to stale_ttl_s, and otherwise consent fails closed."""

from __future__ import annotations

import grpc
import pytest

from services.common.consent import ConsentAnswer, ConsentChecker
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable


class Authority:
    def __init__(self) -> None:
        self.answers: dict[str, ConsentAnswer] = {}
        self.calls = 0
        self.down = False

    def __call__(self, account: str) -> ConsentAnswer:
        self.calls += 1
        if self.down:
            raise Unavailable("privacy down")
        return self.answers.get(account, ConsentAnswer(True, True))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_withdrawn_processing_is_refused_naming_account_id():
    authority = Authority()
    authority.answers["acct-2"] = ConsentAnswer(processing=False, attribution=True)
    checker = ConsentChecker(authority)
    checker.require(["acct-1", "acct-1"])
    with pytest.raises(FailedPrecondition) as err:
        checker.require(["acct-1", "acct-2"])
    assert err.value.field == "account_id"
    assert "acct-2" in str(err.value)


def test_attribution_purpose_checked_separately():
    authority = Authority()
    authority.answers["acct-1"] = ConsentAnswer(processing=True, attribution=False)
    checker = ConsentChecker(authority)
    checker.require(["acct-1"], ("processing",))
    with pytest.raises(FailedPrecondition):
        checker.require(["acct-1"], ("processing", "attribution"))
    with pytest.raises(InvalidArgument):
        checker.require(["acct-1"], ("marketing",))


def test_answers_cached_for_ttl_then_refreshed():
    authority, clock = Authority(), Clock()
    checker = ConsentChecker(authority, ttl_s=5.0, clock=clock)
    checker.require(["acct-1"])
    authority.answers["acct-1"] = ConsentAnswer(False, False)
    clock.t = 4.9
    checker.require(["acct-1"])            # within the staleness bound: old answer
    assert authority.calls == 1
    clock.t = 5.1
    with pytest.raises(FailedPrecondition):
        checker.require(["acct-1"])        # withdrawal visible after ttl
    checker.invalidate("acct-1")
    authority.answers["acct-1"] = ConsentAnswer(True, True)
    checker.require(["acct-1"])


def test_outage_uses_stale_answer_then_fails_closed():
    authority, clock = Authority(), Clock()
    checker = ConsentChecker(authority, ttl_s=5.0, stale_ttl_s=60.0, clock=clock)
    checker.require(["acct-1"])
    authority.down = True
    clock.t = 30.0
    checker.require(["acct-1"])
    clock.t = 61.0
    with pytest.raises(Unavailable):
        checker.require(["acct-1"])
    with pytest.raises(Unavailable):
        checker.require(["never-seen"])


def test_non_transient_rpc_errors_propagate():
    class Denied(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

    def fetch(_account):
        raise Denied()

    with pytest.raises(grpc.RpcError):
        ConsentChecker(fetch).require(["acct-1"])


def test_bad_configuration():
    with pytest.raises(ValueError, match="stale_ttl_s"):
        ConsentChecker(Authority(), ttl_s=10, stale_ttl_s=5)


class Listing:
    """The privacy service's list of accounts with a withdrawn purpose."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.calls = 0

    def __call__(self) -> dict[str, ConsentAnswer]:
        self.calls += 1
        if self.authority.down:
            raise Unavailable("privacy down")
        return {a: c for a, c in self.authority.answers.items() if not (c.processing and c.attribution)}


def test_withdrawn_lists_the_accounts_that_withdrew_any_of_the_purposes():
    authority = Authority()
    authority.answers.update({"acct-1": ConsentAnswer(True, True), "acct-2": ConsentAnswer(True, False),
                              "acct-3": ConsentAnswer(False, True)})
    checker = ConsentChecker(authority, fetch_withdrawn=Listing(authority))
    assert checker.withdrawn(("processing", "attribution")) == {"acct-2", "acct-3"}
    assert checker.withdrawn(("processing",)) == {"acct-3"}
    with pytest.raises(InvalidArgument):
        checker.withdrawn(("marketing",))


def test_withdrawn_list_cached_for_ttl_then_stale_then_fails_closed():
    authority, clock = Authority(), Clock()
    listing = Listing(authority)
    checker = ConsentChecker(authority, ttl_s=5.0, stale_ttl_s=60.0, clock=clock, fetch_withdrawn=listing)
    assert checker.withdrawn() == frozenset()
    authority.answers["acct-1"] = ConsentAnswer(False, False)
    clock.t = 4.9
    assert checker.withdrawn() == frozenset() and listing.calls == 1   # within the staleness bound
    clock.t = 5.1
    assert checker.withdrawn() == {"acct-1"}                           # the withdrawal, after ttl
    authority.down = True
    clock.t = 60.0
    assert checker.withdrawn() == {"acct-1"}                           # a stale list bridges an outage
    clock.t = 65.2
    with pytest.raises(Unavailable) as err:
        checker.withdrawn()                                            # then fails closed
    assert err.value.field == "account_ids"


def test_withdrawn_fails_closed_without_a_list():
    with pytest.raises(Unavailable):
        ConsentChecker(Authority()).withdrawn()
