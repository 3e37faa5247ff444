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


class BatchAuthority(Authority):
    """GetConsents beside GetConsent: each call's accounts recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.refuses = False   # a privacy before session 28: no batch call

    def many(self, accounts: list[str]):
        self.batches.append(list(accounts))
        if self.refuses:
            return None
        if self.down:
            raise Unavailable("privacy down")
        return {a: self.answers.get(a, ConsentAnswer(True, True)) for a in accounts}


def test_a_writes_accounts_are_checked_in_batches_not_one_call_each(monkeypatch):
    """Session 28: ``require`` / ``consenting`` fetch the uncached accounts with GetConsents,
    CONSENT_BATCH a call; before, one GetConsent each (2,000 new households filled the
    gateway's 10 s). A withdrawn account is still refused, and cached answers are reused."""
    import services.common.consent as consent

    monkeypatch.setattr(consent, "CONSENT_BATCH", 3)
    authority = BatchAuthority()
    authority.answers["acct-4"] = ConsentAnswer(processing=False, attribution=True)
    checker = ConsentChecker(authority, fetch_many=authority.many)
    checker.require(["acct-0"])
    accounts = [f"acct-{i}" for i in range(7)]
    assert checker.consenting(accounts) == tuple(a for a in accounts if a != "acct-4")
    assert authority.batches == [accounts[1:4], accounts[4:7]]   # acct-0 was cached
    assert authority.calls == 1                                    # acct-0's, before
    with pytest.raises(FailedPrecondition) as err:
        checker.require(accounts)
    assert "acct-4" in str(err.value) and authority.calls == 1 and len(authority.batches) == 2


def test_without_the_batch_call_or_with_privacy_down_each_account_is_asked_as_before():
    authority, clock = BatchAuthority(), Clock()
    authority.refuses = True
    checker = ConsentChecker(authority, fetch_many=authority.many, clock=clock, ttl_s=5.0)
    checker.require(["acct-1", "acct-2"])
    assert authority.calls == 2
    authority.refuses, authority.down = False, True   # privacy down: stale answers bridge it ...
    clock.t = 10.0
    checker.require(["acct-1", "acct-2"])
    clock.t = 400.0                                   # ... until stale_ttl_s: fails closed
    with pytest.raises(Unavailable):
        checker.require(["acct-1", "acct-2"])
