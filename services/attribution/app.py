"""Use cases of the attribution service."""

from __future__ import annotations

import math
import time
import re
from dataclasses import dataclass, field

import numpy as np

from services.attribution.domain.api import METHODS, AttributionReport, attribute
from services.attribution.domain.bootstrap import BootstrapSpec
from services.attribution.domain.heuristics import HeuristicParams
from services.attribution.domain.sequences import parse_sequences
from services.attribution.domain.journeys import JourneySet, build_journeys
from services.attribution.domain.records import (
    Conversion, Touchpoint, validate_conversions, validate_touchpoints)
from services.attribution.resolver import NoResolver, PersonResolver
from services.attribution.store import AttributionStore
from services.common.client import check_serving_deadline
from services.common.ids import check_id
from services.common.text import check_text
from services.common.consent import ConsentChecker
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.errors import InvalidArgument, naming_the_item
from services.common.identity import Principal
from services.common.permissions import Permission, principal_allowed

DEFAULT_LOOKBACK_S = 30 * 86400
MAX_ACCOUNTS = 1000
MAX_PERSONA_CHARS = 64
MAX_PERSONAS = 10_000   # the gateway's bound (gateway/routes/attribution.py); until attack31 gRPC had none
MAX_PERSON_RESULTS = 5000
MAX_SERVICE_REPLICATES = 2000  # a request runs synchronously under the gateway's deadline
_PERSON_NUMBER = re.compile(r"^p(\d+)$")


@dataclass(frozen=True)
class AttributeQuery:
    account_ids: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    method: str = "hybrid"
    order: int = 1
    alpha: float = 0.5
    lookback_s: float = DEFAULT_LOOKBACK_S
    repeats: str = "collapse_states"
    include_nulls: bool = True
    horizon: int = 0
    levels: tuple[str, ...] = ("household", "person")
    auto_order: bool = False
    bootstrap_replicates: int = 0
    bootstrap_seed: int = 0
    confidence_level: float = 0.95
    half_life_days: float = 7.0
    position_weights: tuple[float, ...] = (0.4, 0.2, 0.4)
    sequences: tuple[str, ...] = ()
    persona_prior_strength: float = 0.0
    # (account_id, person_id) -> persona label; persons without one form persona "".
    personas: tuple[tuple[str, str, str], ...] = ()


@dataclass
class ScopedReport:
    scope: str                    # "household" | "person"
    account_id: str               # "" = the requested accounts pooled
    person_id: str
    report: AttributionReport
    journeys: float


@dataclass
class AttributionOutcome:
    results: list[ScopedReport] = field(default_factory=list)


def validate_query(q: AttributeQuery) -> AttributeQuery:
    if len(q.account_ids) > MAX_ACCOUNTS:
        raise InvalidArgument(f"at most {MAX_ACCOUNTS} accounts", "account_ids")
    for i, a in enumerate(q.account_ids):
        check_id(a, f"account_ids[{i}]")
    if q.method not in METHODS:
        raise InvalidArgument(f"must be one of {', '.join(METHODS)}", "method")
    if not q.levels or not set(q.levels) <= {"household", "person"}:
        # An enum value this server does not know came back as no level at all, and the
        # call answered OK with no results instead of naming the field.
        raise InvalidArgument("must be LEVEL_PERSON, LEVEL_HOUSEHOLD or LEVEL_BOTH (unspecified = both)", "level")
    if not 1 <= q.order <= 4:
        raise InvalidArgument("must be in 1..4", "markov_order")
    if not (math.isfinite(q.alpha) and 0.0 <= q.alpha <= 1.0):
        raise InvalidArgument("must be in [0, 1]", "hybrid_alpha")
    if not 0 < q.lookback_s <= 365 * 86400:
        raise InvalidArgument("must be in (0, 365 days]", "lookback_seconds")
    if q.repeats not in ("collapse_states", "collapse_channels", "keep"):
        raise InvalidArgument("must be collapse_states, collapse_channels or keep", "repeats")
    if not 0 <= q.horizon <= 1000:
        raise InvalidArgument("must be in 0..1000", "horizon")
    if q.start is not None and q.end is not None and q.end <= q.start:
        raise InvalidArgument("end must be after start", "window.end")
    if not 0 <= q.bootstrap_replicates <= MAX_SERVICE_REPLICATES or q.bootstrap_replicates == 1:
        raise InvalidArgument(f"must be 0 (none) or 2..{MAX_SERVICE_REPLICATES}", "bootstrap_replicates")
    if not (math.isfinite(q.persona_prior_strength) and 0 <= q.persona_prior_strength <= 1e6):
        raise InvalidArgument("must be in [0, 1e6]", "persona_prior_strength")
    if len(q.personas) > MAX_PERSONAS:
        raise InvalidArgument(f"at most {MAX_PERSONAS} personas, got {len(q.personas)}", "personas")
    for i, (account, person, persona) in enumerate(q.personas):
        check_id(account, f"personas[{i}].account_id")
        check_id(person, f"personas[{i}].person_id")
        check_text(persona, f"personas[{i}].persona", max_chars=MAX_PERSONA_CHARS)
    # Domain validation of the rest (named fields, INVALID_ARGUMENT): built once here.
    BootstrapSpec(q.bootstrap_replicates, q.bootstrap_seed, q.confidence_level)
    HeuristicParams(q.half_life_days, tuple(q.position_weights))
    parse_sequences(list(q.sequences))
    return q


def person_columns(probabilities: list[dict[str, float]]) -> list[str]:
    """Person ids in column order: p1, p2, ... by number, other labels after, sorted."""
    ids = {p for probs in probabilities for p in probs}

    def key(pid: str):
        m = _PERSON_NUMBER.fullmatch(pid)
        return (0, int(m.group(1)), "") if m else (1, 0, pid)

    return sorted(ids, key=key)


def probability_matrix(probabilities: list[dict[str, float]], columns: list[str]) -> np.ndarray:
    """Rows of person probabilities; a touch nobody could resolve is spread evenly over
    the known persons (it is evidence of the household, not of any one person)."""
    index = {p: j for j, p in enumerate(columns)}
    width = max(len(columns), 1)
    matrix = np.zeros((len(probabilities), width))
    for i, probs in enumerate(probabilities):
        if probs:
            for p, q in probs.items():
                matrix[i, index[p]] = q
            total = matrix[i].sum()
            matrix[i] /= total if total > 0 else 1.0
        else:
            matrix[i, :] = 1.0 / width
    return matrix


# Attribution uses an account's exposures and conversions only with both consents.
PURPOSES_NEEDED = ("processing", "attribution")


class AttributionApp:
    def __init__(self, store: AttributionStore, resolver: PersonResolver | None = None,
                 consent: ConsentChecker | None = None, *, retention_s: float | None = None) -> None:
        self.store = store
        # Touchpoints and conversions older than now - retention_s are refused at ingest
        # (rejected_expired): privacy's retention purge would erase them at its next check
        # (docs/privacy.md §7). None: nothing refused for its age (the purge off).
        self.retention_s = retention_s
        self.resolver = resolver or NoResolver()
        # Consent (privacy service): processing AND attribution must be given; None = not
        # enforced (unit tests). Checked after validation, before anything is stored.
        self.consent = consent

    def _require_consent(self, account_ids) -> None:
        if self.consent is not None:
            self.consent.require(account_ids, PURPOSES_NEEDED)

    def _unexpired(self, items: list) -> tuple[list, int]:
        if self.retention_s is None:
            return items, 0
        horizon = time.time() - self.retention_s
        kept = [x for x in items if x.ts >= horizon]
        return kept, len(items) - len(kept)

    def record_touchpoints(self, items: list[Touchpoint]) -> tuple[int, int, int]:
        """(accepted, duplicates, rejected_expired)."""
        items = validate_touchpoints(items)
        with naming_the_item([t.account_id for t in items], "touchpoints"):
            self._require_consent(t.account_id for t in items)
            kept, expired = self._unexpired(items)
            return (*self.store.record_touchpoints(kept), expired) if kept else (0, 0, expired)

    def record_conversions(self, items: list[Conversion]) -> tuple[int, int, int]:
        """(accepted, duplicates, rejected_expired)."""
        items = validate_conversions(items)
        with naming_the_item([c.account_id for c in items], "conversions"):
            self._require_consent(c.account_id for c in items)
            kept, expired = self._unexpired(items)
            return (*self.store.record_conversions(kept), expired) if kept else (0, 0, expired)

    def export_account(self, account_id: str) -> dict:
        """DataHolder.ExportAccount (services/common/erasure.py validates the id)."""
        return self.store.export_sections(account_id)   # lazy: streamed a page at a time

    def attribute(self, query: AttributeQuery, caller: Principal | None = None) -> AttributionOutcome:
        """``caller``: the principal who asked (None: in-process, e.g. tests and tools)."""
        q = validate_query(query)
        # Explicit accounts: each must have consented. A caller who may read consent
        # (read_consent: admin; in-process callers) gets a refusal naming a withdrawn
        # account; anyone else gets the withdrawn accounts left out, exactly as accounts
        # Hearth holds nothing for — else the 412 told an analyst, one request per
        # account, which households objected (docs/privacy.md, "Consent"). Every account
        # (no account_ids): the withdrawn ones are left out, before anything of theirs
        # reaches the model or the person resolver.
        accounts = list(q.account_ids)
        if self.consent is not None and accounts:
            if caller is None or principal_allowed(caller, Permission.READ_CONSENT):
                self.consent.require(accounts, PURPOSES_NEEDED)
            else:
                # "" matches no stored account (ids are never empty): the query keeps its
                # shape and costs what it costs for an account without data, whatever the
                # withdrawn household holds (and the list never becomes [] = every account).
                consenting = set(self.consent.consenting(accounts, PURPOSES_NEEDED))
                accounts = [a if a in consenting else "" for a in accounts]
        withdrawn = (self.consent.withdrawn(PURPOSES_NEEDED)
                     if self.consent is not None and not q.account_ids else frozenset())
        touches, conversions = self.store.load(accounts, q.start, q.end, q.lookback_s)
        if withdrawn:
            touches = [t for t in touches if t.account_id not in withdrawn]
            conversions = [c for c in conversions if c.account_id not in withdrawn]
        conventions = {"repeats": q.repeats, "include_nulls": q.include_nulls,
                       "horizon": q.horizon or None}
        outcome = AttributionOutcome()
        common = dict(
            touch_account=[t.account_id for t in touches], touch_ts=np.array([t.ts for t in touches]),
            touch_channel=[t.channel for t in touches], conv_account=[c.account_id for c in conversions],
            conv_ts=np.array([c.ts for c in conversions]), conv_value=np.array([c.value for c in conversions]),
            lookback=float(q.lookback_s))
        single = q.account_ids[0] if len(q.account_ids) == 1 else ""
        if "household" in q.levels:
            js = build_journeys(**common, level="account")
            outcome.results.append(self._scoped("household", single, "", js, q, conventions))
        if "person" in q.levels:
            touch_probs = self._touch_persons(touches)
            conv_probs = self._conversion_persons(conversions)
            columns = person_columns(touch_probs + [p for p in conv_probs if p])
            js = build_journeys(
                **common, level="person",
                touch_person_prob=probability_matrix(touch_probs, columns),
                conv_person_prob=(probability_matrix([p or {} for p in conv_probs], columns)
                                  if any(conv_probs) else None))
            if not columns and (single or q.persona_prior_strength > 0):
                # Nothing in the query resolved to a person (no session near any touch or
                # conversion, or no resolver): there is no person to credit. Naming one "p1"
                # (as until session 17) credited the household's real p1 with every journey.
                pass
            elif q.persona_prior_strength > 0:
                outcome.results.extend(self._persona_smoothed(js, columns, q, conventions))
            elif single:
                for j, pid in enumerate(columns):
                    sub = js.select(js.path_person == j)
                    if sub.paths.n_paths:
                        outcome.results.append(self._scoped("person", single, pid, sub, q, conventions))
            else:
                outcome.results.append(self._scoped("person", "", "", js, q, conventions))
        return outcome

    def _persona_smoothed(self, js: JourneySet, columns: list[str], q: AttributeQuery,
                          conventions: dict) -> list[ScopedReport]:
        """One report per (account, person), its Markov chain smoothed toward the pooled
        journeys of the OTHER persons of the same persona in this query (docs/attribution.md)."""
        labels = {(a, p): persona for a, p, persona in q.personas}
        entities = sorted(set(zip(js.path_account.tolist(), js.path_person.tolist())))
        if len(entities) > MAX_PERSON_RESULTS:
            raise InvalidArgument(f"persona priors give one result per person: at most {MAX_PERSON_RESULTS}",
                                  "account_ids")
        persona_names = sorted({labels.get((str(js.accounts[a]), columns[j]), "") for a, j in entities})
        persona_id = {(a, j): persona_names.index(labels.get((str(js.accounts[a]), columns[j]), ""))
                      for a, j in entities}
        path_persona = np.array([persona_id[e] for e in zip(js.path_account.tolist(), js.path_person.tolist())],
                                dtype=np.int64)
        out = []
        for a, j in entities:
            mine = (js.path_account == a) & (js.path_person == j)
            prior = js.paths.select((path_persona == persona_id[(a, j)]) & ~mine)
            out.append(self._scoped("person", str(js.accounts[a]), columns[j], js.select(mine), q, conventions,
                                    prior=prior if prior.n_paths else None))
        return out

    def _touch_persons(self, touches: list[Touchpoint]) -> list[dict[str, float]]:
        unresolved = [i for i, t in enumerate(touches) if not t.person_id]
        resolved = self.resolver.resolve([(touches[i].account_id, touches[i].device_id, touches[i].ts)
                                          for i in unresolved]) if unresolved else []
        out: list[dict[str, float]] = [{t.person_id: 1.0} if t.person_id else {} for t in touches]
        for i, probs in zip(unresolved, resolved):
            out[i] = probs
        return out

    def _conversion_persons(self, conversions: list[Conversion]) -> list[dict[str, float] | None]:
        """A conversion on a known device is split by who was on it; otherwise None (the
        journey builder then splits it in proportion to each person's touches)."""
        with_device = [i for i, c in enumerate(conversions) if c.device_id]
        resolved = self.resolver.resolve([(conversions[i].account_id, conversions[i].device_id, conversions[i].ts)
                                          for i in with_device]) if with_device else []
        out: list[dict[str, float] | None] = [None] * len(conversions)
        for i, probs in zip(with_device, resolved):
            out[i] = probs or None
        return out

    @staticmethod
    def _scoped(scope: str, account: str, person: str, js: JourneySet, q: AttributeQuery,
                conventions: dict, prior=None) -> ScopedReport:
        check_serving_deadline()  # one report per household/person: stop once nobody waits
        ages_days = None if js.touch_ages is None else js.touch_ages / 86400.0
        report = attribute(
            js.paths, method=q.method, order="auto" if q.auto_order else q.order, alpha=q.alpha,
            conventions=conventions, touch_ages=ages_days,
            heuristic_params=HeuristicParams(q.half_life_days, tuple(q.position_weights)),
            bootstrap=BootstrapSpec(q.bootstrap_replicates, q.bootstrap_seed, q.confidence_level),
            sequences=list(q.sequences) or None,
            prior_paths=prior, prior_strength=q.persona_prior_strength if prior is not None else 0.0,
            order_seed=q.bootstrap_seed,
        )
        journeys = float(js.paths.conversions.sum() + js.paths.nulls.sum())
        return ScopedReport(scope, account, person, report, journeys)

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """DataHolder.Rekey: the household's sealed campaigns under data key ``dek_version``."""
        return self.store.rekey(account_id, dek_version, defer_purge)

    def erase(self, scope: ErasureScope, job_id: str = "") -> ErasureOutcome:
        person_touchpoints: list[str] = []
        own_devices: list[str] = []
        if scope.kind == "person":
            touches, _ = self.store.load([scope.account_id], None, None, 0)
            unresolved = [t for t in touches if not t.person_id]
            resolved = self.resolver.resolve([(t.account_id, t.device_id, t.ts) for t in unresolved])
            person_touchpoints = [t.touchpoint_id for t, probs in zip(unresolved, resolved)
                                  if probs and max(probs, key=probs.get) == scope.person_id]
            # Asked here, like the persons above: clustering still holds the person's
            # sessions (privacy's STAGES erase attribution first). The shared devices are
            # not fenced as such, only where one of the person's erased touchpoints was
            # (the store finds those; docs/privacy.md §6).
            own_devices, _shared = self.resolver.person_devices(scope.account_id, scope.person_id)
        return self.store.erase(scope, person_touchpoints, own_devices)
