"""Consent enforcement for data-holding services: ``ConsentChecker``.

The privacy service owns the per-account consent flags (``SetConsent`` /
``GetConsent``): ``processing`` (may Hearth process this household's viewing data at
all) and ``attribution`` (may its marketing exposures and conversions be used for
attribution). Clustering refuses ``IngestEvents`` / ``AssignSession`` for an account
whose ``processing`` consent is withdrawn; attribution refuses ``RecordTouchpoints`` /
``RecordConversions`` / ``Attribute`` unless both ``processing`` and ``attribution``
are given. A refusal is ``FailedPrecondition`` naming the field ``account_id``
(gRPC FAILED_PRECONDITION, HTTP 412) and happens before anything is stored.

Caching and staleness (the bound documented in docs/privacy.md):

* an answer is reused for ``ttl_s`` (default 5 s) per account, so a withdrawal takes
  effect in every replica at most ``ttl_s`` after ``SetConsent`` returned (the privacy
  service's answer is authoritative; this cache only bounds the lag);
* when the privacy service cannot be reached, an answer younger than ``stale_ttl_s``
  (default 300 s) is still used, otherwise the request is refused with UNAVAILABLE —
  consent fails closed.

An account with no explicit record is allowed (privacy's documented default).

``withdrawn(purposes)`` answers the other way round, for a call over *all* accounts
(attribution's ``Attribute`` without ``account_ids``): the ids whose consent to any of
``purposes`` is withdrawn, from the privacy service's ``ListWithdrawnConsent`` (held by
``svc:attribution`` only). The list is one cache entry with the same ``ttl_s`` /
``stale_ttl_s`` bounds and the same fail-closed rule as a per-account answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable, about_account

log = logging.getLogger("hearth.consent")

PURPOSES = ("processing", "attribution")
DEFAULT_TTL_S = 5.0
DEFAULT_STALE_TTL_S = 300.0


@dataclass(frozen=True)
class ConsentAnswer:
    processing: bool
    attribution: bool

    def allows(self, purpose: str) -> bool:
        return bool(getattr(self, purpose))


ConsentFetcher = Callable[[str], ConsentAnswer]
# Many accounts' answers in one call (privacy's GetConsents, session 28); None from an
# authority without that call (a privacy before session 28: one GetConsent an account).
BatchConsentFetcher = Callable[[list[str]], "dict[str, ConsentAnswer] | None"]
# Accounts per GetConsents call (a privacy that refuses it: client.BatchCall).
CONSENT_BATCH = 1000
# Every account with a withdrawn purpose -> its answer (the privacy service's list).
WithdrawnFetcher = Callable[[], dict[str, ConsentAnswer]]
_WITHDRAWN_KEY = ("withdrawn",)   # the list's cache entry (never an account id: those are str)


class ConsentChecker:
    """Per-account consent look-ups with a short cache (see module docstring).

    ``fetch(account_id) -> ConsentAnswer`` asks the authority; ``fetch_withdrawn()`` lists
    the accounts with a withdrawn purpose (None: this checker cannot list them, and
    ``withdrawn`` fails closed). Either may raise ``grpc.RpcError`` or ``Unavailable``
    when the privacy service is unreachable."""

    def __init__(self, fetch: ConsentFetcher, *, ttl_s: float = DEFAULT_TTL_S,
                 stale_ttl_s: float = DEFAULT_STALE_TTL_S,
                 clock: Callable[[], float] = time.monotonic, close: Callable[[], None] | None = None,
                 fetch_withdrawn: WithdrawnFetcher | None = None,
                 fetch_many: BatchConsentFetcher | None = None) -> None:
        if not ttl_s >= 0:
            raise ValueError("ttl_s: must be >= 0")
        if not stale_ttl_s >= ttl_s:
            raise ValueError("stale_ttl_s: must be >= ttl_s")
        self._fetch = fetch
        self._fetch_withdrawn = fetch_withdrawn
        self._fetch_many = fetch_many
        self._ttl = float(ttl_s)
        self._stale_ttl = float(stale_ttl_s)
        self._clock = clock
        self._close = close
        self._answers: dict = {}   # account id (or _WITHDRAWN_KEY) -> (fetched at, answer)
        self._lock = threading.Lock()

    @classmethod
    def remote(cls, privacy_addr: str, calling_service: str, *, timeout_s: float = 2.0,
               ttl_s: float = DEFAULT_TTL_S, stale_ttl_s: float = DEFAULT_STALE_TTL_S) -> "ConsentChecker":
        """A checker asking the privacy service's ``GetConsent`` as ``svc:<calling_service>``
        (service principals hold read_consent; the human behind the request may not)."""
        from hearth.privacy.v1 import privacy_pb2, privacy_pb2_grpc
        from services.common.client import BatchCall, Peer

        peer = Peer(privacy_addr, calling_service, privacy_pb2_grpc.ConsentStub, timeout_s)

        def fetch(account_id: str) -> ConsentAnswer:
            r = peer.call("GetConsent", privacy_pb2.GetConsentRequest(account_id=account_id),
                          idempotent=True, attempts=2)
            return ConsentAnswer(processing=r.processing, attribution=r.attribution)

        def fetch_withdrawn() -> dict[str, ConsentAnswer]:
            listed: dict[str, ConsentAnswer] = {}
            after = ""
            while True:
                r = peer.call("ListWithdrawnConsent", privacy_pb2.ListWithdrawnConsentRequest(
                    after_account_id=after), idempotent=True, attempts=2)
                for c in r.accounts:
                    listed[c.account_id] = ConsentAnswer(processing=c.processing, attribution=c.attribution)
                if not r.has_more or not r.accounts:
                    return listed
                after = r.accounts[-1].account_id

        batch = BatchCall()   # a privacy before session 28: one GetConsent an account meanwhile

        def fetch_many(account_ids: list[str]) -> dict[str, ConsentAnswer] | None:
            r = batch.call(lambda: peer.call("GetConsents", privacy_pb2.GetConsentsRequest(account_ids=account_ids),
                                             idempotent=True, attempts=2))
            if r is None:
                return None
            return {c.account_id: ConsentAnswer(processing=c.processing, attribution=c.attribution)
                    for c in r.accounts}

        return cls(fetch, ttl_s=ttl_s, stale_ttl_s=stale_ttl_s, close=peer.close,
                   fetch_withdrawn=fetch_withdrawn, fetch_many=fetch_many)

    def answer(self, account_id: str) -> ConsentAnswer:
        return self._cached(account_id, lambda: self._fetch(account_id))

    def withdrawn(self, purposes: Iterable[str] = ("processing",)) -> frozenset[str]:
        """The accounts whose consent to any of ``purposes`` is withdrawn (for a call over
        every account: leave these out). Cached and failing closed like ``answer``."""
        purposes = self._purposes(purposes)
        if self._fetch_withdrawn is None:
            raise Unavailable("consent cannot be checked: no list of withdrawn accounts", "account_ids")
        listed = self._cached(_WITHDRAWN_KEY, self._fetch_withdrawn, field="account_ids")
        return frozenset(a for a, answer in listed.items() if not all(answer.allows(p) for p in purposes))

    def _cached(self, key, fetch: Callable[[], object], field: str = "account_id"):
        """The cached answer under ``key`` while younger than ttl_s, else ``fetch()``'s;
        when the authority is unreachable, one younger than stale_ttl_s, else Unavailable."""
        now = self._clock()
        with self._lock:
            cached = self._answers.get(key)
        if cached is not None and now - cached[0] <= self._ttl:
            return cached[1]
        try:
            fresh = fetch()
        except (grpc.RpcError, Unavailable) as exc:
            if isinstance(exc, grpc.RpcError) and exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if cached is not None and now - cached[0] <= self._stale_ttl:
                log.warning("privacy service unreachable: using a consent answer %.0fs old", now - cached[0])
                return cached[1]
            raise Unavailable("consent cannot be checked: privacy service unavailable", field) from None
        with self._lock:
            if len(self._answers) > 100_000:  # bounded memory; answers are cheap to re-fetch
                self._answers.clear()
            self._answers[key] = (now, fresh)
        return fresh

    def _prefetch(self, account_ids: list[str]) -> None:
        """The answers ``require`` / ``consenting`` will ask for that are not cached, fetched
        ``CONSENT_BATCH`` accounts a call (GetConsents) and cached as ``answer`` caches them:
        until session 28 one GetConsent round trip an account, one after the other (2,000
        new households filled the gateway's 10 s). Only a cache fill: an account it did not
        get (no batch call, or a failed one) is asked alone by ``answer``, with its
        stale-answer and fail-closed rules."""
        if self._fetch_many is None:
            return
        now = self._clock()
        with self._lock:
            missing = [a for a in account_ids
                       if (cached := self._answers.get(a)) is None or now - cached[0] > self._ttl]
        if len(missing) < 2:
            return
        for start in range(0, len(missing), CONSENT_BATCH):
            try:
                got = self._fetch_many(missing[start:start + CONSENT_BATCH])
            except (grpc.RpcError, Unavailable):
                return
            if got is None:
                return
            with self._lock:
                if len(self._answers) + len(got) > 100_000:  # bounded memory, as in _cached
                    self._answers.clear()
                self._answers.update((a, (now, answer)) for a, answer in got.items())

    @staticmethod
    def _purposes(purposes: Iterable[str]) -> tuple[str, ...]:
        purposes = tuple(purposes)
        for purpose in purposes:
            if purpose not in PURPOSES:
                raise InvalidArgument(f"unknown consent purpose {purpose!r}", "purpose")
        return purposes

    def require(self, account_ids: Iterable[str], purposes: Iterable[str] = ("processing",)) -> None:
        """Raise FailedPrecondition (field ``account_id``) unless every account has
        consented to every purpose. Each distinct account is looked up once."""
        purposes = self._purposes(purposes)
        accounts = list(dict.fromkeys(account_ids))
        self._prefetch(accounts)
        for account_id in accounts:
            answer = self.answer(account_id)
            for purpose in purposes:
                if not answer.allows(purpose):
                    # Says that nothing was stored and why (consent), not which purpose was
                    # withdrawn: the writer needs the first, and a service-role key, refused
                    # the consent read itself, would learn the household's flags from the
                    # second (session 35; docs/privacy.md §8, "What a writer learns").
                    raise about_account(FailedPrecondition(
                        f"account {account_id!r}: its consent does not allow this; nothing was stored",
                        "account_id"), account_id)

    def consenting(self, account_ids: Iterable[str], purposes: Iterable[str] = ("processing",)) -> tuple[str, ...]:
        """The accounts (in order, each once) that consented to every purpose: the same
        look-ups as ``require``, the withdrawn ones left out instead of named."""
        purposes = self._purposes(purposes)
        accounts = list(dict.fromkeys(account_ids))
        self._prefetch(accounts)
        return tuple(a for a in accounts if all(self.answer(a).allows(p) for p in purposes))

    def invalidate(self, account_id: str | None = None) -> None:
        with self._lock:
            if account_id is None:
                self._answers.clear()
            else:
                self._answers.pop(account_id, None)
                self._answers.pop(_WITHDRAWN_KEY, None)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def allow_all() -> ConsentChecker:
    """A checker that allows everything (tools and tests that run without privacy)."""
    return ConsentChecker(lambda _a: ConsentAnswer(True, True), ttl_s=3600.0, stale_ttl_s=3600.0,
                          fetch_withdrawn=dict)


__all__ = ["PURPOSES", "ConsentAnswer", "ConsentChecker", "allow_all"]
