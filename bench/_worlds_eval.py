"""Evaluation on the randomized world families (bench/worlds.py), beside baselines.

Methods get a household's sessions exactly as the service has them (feature vectors
from the real session builder plus the device id of each session) and return a label
per session and, when they have them, probabilities. Every method runs on the same
sessions. Metrics are those of bench/accuracy.py plus ``single_person_kept`` and
``gap_closed`` (the share of the majority -> supervised-oracle gap a method closes).

Two ways of feeding Hearth:

* ``batch``: one fit on all of a household's sessions, then every session assigned;
* ``streaming``: sessions in time order, a few at a time, folded in the way the
  service folds them (``HouseholdModel.update``); each session keeps the person id it
  got when it arrived (ids are strings and must stay stable for this to score well).

Composition change (members joining or leaving, bench/worlds.py) is scored on the
streaming run: a change is detected when the model raises a composition event
(a person born or retired) within ``DETECTION_WINDOW`` sessions after it; an event in a
household without a change, after the warm-up, is a false alarm; false alarms are
reported per household per quarter (91 days) of monitored time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import StratifiedKFold

from bench._clustering_eval import ece, ece_floor, household_bootstrap, match, matched_correct, probability_figures
from bench.worlds import PERSONAL_TYPES, WorldHousehold
from services.clustering.domain import features as F
from services.clustering.domain.model import (CHANGE_LOOKBACK, CHANGE_MIN_HISTORY, MIN_SESSIONS, HouseholdModel,
                                             PopulationPrior, feedback_calibrator_rows, population_prior)
from services.clustering.household import MICRO_BATCH, Envelope
from services.clustering.modeling import ModelKeeper, Snapshot
from services.clustering.settings import ClusteringSettings
from services.clustering.store import StoredSession

# Sessions per arrival in the streaming run, each arrival one refresh of the service: 1,
# as a household's sessions close one at a time and every ingest that touches a session
# queues a refresh (ClusteringApp.ingest); the keeper folds them in by MICRO_BATCH.
# (5 until session 12, when the harness folded every arrival in itself.)
STREAM_BATCH = 1
DETECTION_WINDOW = 30     # sessions after a change within which detection counts
# Composition events from the first session the share test can fire at (a change point
# with CHANGE_MIN_HISTORY sessions before it and the nearest lookback after it) count as
# false alarms in a stable household; 40 while that was later than 40.
WARMUP_SESSIONS = min(40, CHANGE_MIN_HISTORY + min(CHANGE_LOOKBACK) - 1)
QUARTER_S = 91 * 86_400.0
DAY_S = 86_400.0


def daily_ends(start_ts: np.ndarray) -> list[int]:
    """The arrivals of a client that posts a UTC day of events per request
    (bench.api_accuracy.daily_requests, midnight cuts): after each day's request, the
    sessions started by its end (the sessions started before the next midnight), for
    ``ServiceStream.arrivals(ends=...)``. (A session going on at midnight is split by the
    API's cut; here it stays whole, as with the quiet cuts.)"""
    days = np.unique(np.floor(np.asarray(start_ts, dtype=np.float64) / DAY_S))
    return [int(e) for e in np.searchsorted(start_ts, (days + 1.0) * DAY_S, side="left")]


# ---- the cold start's population prior -----------------------------------------------

# A world's established households: the accounts its service already holds when the
# scored households arrive. The scored households are the newcomers: each is answered
# from its first session, when it has fewer than MIN_SESSIONS sessions stored and so is
# never in the prior (model.population_prior takes households with MIN_SESSIONS), and
# the prior the service answers its cold start with is learnt from the others. 40: twice
# the service's PRIOR_MIN_HOUSEHOLDS, ~5,000 sessions for the prior's 12 personas;
# the service's 200 cost 4 extra minutes of generation per REPORTING run.
WORLD_POPULATION = 40
# Whether the service's default cold start (HEARTH_COLD_START) answers from a population
# prior: the benchmarks' cold starts follow the default (bench.accuracy, bench.label_feedback;
# --population-prior / --no-population-prior choose).
SERVICE_COLD_START_PRIOR = ClusteringSettings.model_fields["cold_start"].default == "population_prior"


def world_priors(scored: list[WorldHousehold], generate) -> dict[str, PopulationPrior | None]:
    """Per world of ``scored``: the population prior its service would answer cold starts
    with (model.population_prior, the service's rule) over the world's established
    households in household-id order. ``generate(households_per_world)`` is the call that
    made ``scored`` with more households per world: every generator gives a prefix of the
    same households for fewer, so the households past the scored ones are the same
    world's others, never a scored one (and never a label: only their features)."""
    per_world: dict[str, int] = {}
    for h in scored:
        per_world[h.world_id] = per_world.get(h.world_id, 0) + 1
    scored_ids = {h.household_id for h in scored}
    stored: dict[str, list[WorldHousehold]] = {w: [] for w in per_world}
    for h in generate(max(per_world.values()) + WORLD_POPULATION):
        if h.world_id in stored and h.household_id not in scored_ids:
            stored[h.world_id].append(h)
    return {w: population_prior([h.features for h in sorted(hh, key=lambda h: h.household_id)])
            for w, hh in stored.items()}


# ---- methods ---------------------------------------------------------------------------

def hearth_batch(h: WorldHousehold, population_prior: PopulationPrior | None = None, **kw):
    m = HouseholdModel(population_prior=population_prior, **kw).fit(h.features, device_ids=h.device_id)
    b = m.assign_batch(h.features, device_ids=h.device_id, included=True)   # every session is in the fit
    return b.person_index, b.probabilities


class ServiceStream:
    """One household streamed through the clustering service's own refresh decision
    (``ModelKeeper.advance``, services/clustering/modeling.py), without its store: each
    arrival of ``batch`` sessions is one refresh, so sessions are folded in by
    micro-batches of MICRO_BATCH (household.py), a smaller arrival is answered by the
    current model, the drift detector runs on every fold once its reference has
    MIN_DRIFT_REFERENCE sessions (never in a stream followed from its first session:
    its reference is 20; an import's is its first fit) and each of its alarms refits the
    household in full, feedback labels bind to a stream or refit it (``record_labels``
    = RecordLabels -> refresh(force="labels")) and a Refit request refits it (``refit``).

    Why the keeper's decision and not the keeper on a real store: the keeper's
    decision does not touch the store (reading sessions, saving the envelope and
    recording persons do), and the store would add writes of every session's persons
    per arrival to a benchmark of thousands of households; ``advance`` is the one
    copy of "what a refresh does" both call. Until session 12 this loop called
    HouseholdModel.update every 5 sessions itself: no micro-batches, no drift refits,
    no answers by a model that had not folded the arrival in (docs/benchmarks.md,
    "the streams are the service's").

    The answers it gives are the keeper's: at arrival, a session's first recorded
    answer (the model after that refresh; through the at-arrival map unless that
    refresh was a full fit that includes it); ``settled()``: what the
    household's sessions are recorded as now (the last saved model, the sessions it had
    included before its last save through the "settled" map). Labels are not applied to
    the answers (persons_for answers a labelled session as its label; the benchmarks
    score the sessions without feedback and every first answer comes before its
    session's feedback)."""

    def __init__(self, h: WorldHousehold, population_prior: PopulationPrior | None = None,
                 **model_options) -> None:
        self.h = h
        # population_prior: the service's cold start (its default strategy) answers from
        # the prior of the households it holds (world_priors); None: the account strategy,
        # as the service answers until it has PRIOR_MIN_HOUSEHOLDS to learn one from
        self.keeper = ModelKeeper(None, lambda _account: "gmm", population_prior=population_prior,
                                  model_options=model_options)
        n = h.n_sessions
        self.X = h.features.astype(np.float64)   # as ModelKeeper.snapshot reads them
        self.sessions = [StoredSession(f"s{i:05d}", h.household_id, str(h.device_id[i]), str(h.device_type[i]),
                                       float(h.start_ts[i]), float(h.start_ts[i]), 1, float(h.watch_seconds[i]),
                                       0, self.X[i], None, None, True) for i in range(n)]
        self.labels: list[str | None] = [None] * n
        self.envelope: Envelope | None = None
        self.included = 0            # the last saved refresh's Step.included
        self.included_now = 0       # the last refresh's
        self.drift: list[tuple[int, str]] = []   # (sessions so far, drift type) of every drift event stored
        self.refits: list[tuple[int, str]] = []  # (sessions so far, reason) of every full refit

    def _snapshot(self, b: int) -> Snapshot:
        return Snapshot(self.sessions[:b], self.X[:b], self.labels[:b], self.h.start_ts[:b])

    def _refresh(self, b: int, force: str = "") -> HouseholdModel:
        step = self.keeper.advance(self.envelope, self._snapshot(b), "gmm", force=force)
        self.included_now = step.included
        if step.save:
            self.envelope, self.included = step.envelope, step.included
            self.drift += [(b, d.drift_type) for d in step.drift if d.drift_type != "composition"]
            if step.refit:
                self.refits.append((b, step.refit))
        return step.envelope.model

    def arrivals(self, batch: int = STREAM_BATCH, first: int = 0, ends: list[int] | None = None):
        """Per arrival: (first session, end, the model that answered it, its answers,
        the composition events raised since the previous arrival). ``first`` > 0: the
        first arrival is that many sessions (a household imported with its history, then
        followed; its first full fit is the drift reference). ``ends``: the arrivals'
        ends instead (increasing session counts, e.g. the sessions a client's requests had
        closed: bench.api_accuracy).

        The events raised since the previous arrival are those of a later session count
        than the model had then (as the service's drift rows, modeling._composition_rows):
        not the list's new tail by index, since the model keeps only its newest
        composition events and a list at that cap stays as long as new events arrive (by
        index, every event of a stream past its 50th was lost; session 36)."""
        seen_upto = 0
        n = self.h.n_sessions
        if ends is not None:
            starts = [0, *ends[:-1]]
        else:
            starts = [0, *range(first, n, batch)] if 0 < first < n else range(0, n, batch)
        for i, a in enumerate(starts):
            b = min(starts[i + 1] if i + 1 < len(starts) else (ends[-1] if ends is not None else a + batch), n)
            m = self._refresh(b)
            # the keeper records the arrival with the sessions its model includes (a
            # full fit's, e.g. an import's) through the "settled" map, the rest at arrival
            out = m.assign_batch(self.X[a:b], device_ids=self.h.device_id[a:b],
                                 included=np.arange(a, b) < self.included_now)
            yield a, b, m, out, [ev for ev in m.composition_events if int(ev["session_count"]) > seen_upto]
            seen_upto = max(seen_upto, int(m.n_sessions))

    def record_labels(self, labels: list[str | None], b: int) -> None:
        """Feedback reaches clustering as labels of the first ``b`` sessions
        (RecordLabels -> ModelKeeper.refresh(force="labels"))."""
        self.labels[:b] = labels[:b]
        self._refresh(b, force="labels")

    def refit(self, b: int, reason: str) -> None:
        """A Refit request (e.g. the feedback service's household trigger) on the first
        ``b`` sessions: ModelKeeper.refresh(force=reason) — a full refit with every
        label, except a feedback trigger's on a stream, which binds its labels."""
        self._refresh(b, force=reason)

    def settled(self, end: int | None = None):
        """What the service has recorded for the first ``end`` sessions (all: None) now."""
        end = self.h.n_sessions if end is None else end
        return self.envelope.model.assign_batch(self.X[:end], device_ids=self.h.device_id[:end],
                                                included=np.arange(end) < self.included)


def stream_steps(h: WorldHousehold, batch: int = STREAM_BATCH, **kw):
    """The time-ordered stream the service sees (ServiceStream: arrivals of ``batch``
    sessions, each one refresh of the clustering service). Yields, per arrival, (first
    session, end, the model that answered it, its answers, the composition events
    since the previous arrival) — the one loop behind ``hearth_stream`` and
    bench/_confidence.stream_answers."""
    yield from ServiceStream(h, **kw).arrivals(batch)


def columns(probs: list[dict[str, float]], names: list[str] | None = None) -> np.ndarray:
    """Per-session {person id: probability} -> (n, persons) with a column per id (sorted
    ``names`` when not given), 0 where an answer did not know that person."""
    names = sorted({k for p in probs for k in p}) if names is None else names
    col = {n: i for i, n in enumerate(names)}
    P = np.zeros((len(probs), len(names)))
    for r, p in enumerate(probs):
        for k, v in p.items():
            P[r, col[k]] = v
    return P


def hearth_stream(h: WorldHousehold, batch: int = STREAM_BATCH, settled: bool = False, **kw):
    """Sessions arrive ``batch`` at a time; returns (labels at arrival, probabilities at
    arrival padded to a common width, composition events [(session index, kind)]).

    ``settled=True`` adds a fourth item: (labels, probabilities) of every session from the
    model as it stands after the last arrival — what ``GET /v1/household`` serves once the
    stream has settled, since the service re-records every session's person with the
    current model after each update (``ModelKeeper._record_persons``; the sessions it
    had included through the "settled" confidence map). The at-arrival
    answers are the stricter figure (an early session is answered by a young model);
    the settled ones are what a caller reading the household back sees."""
    ids: list[str] = []
    probs: list[dict[str, float]] = []
    events: list[tuple[int, str]] = []
    stream = ServiceStream(h, **kw)
    for a, b, m, out, new_events in stream.arrivals(batch):
        events += [(b, ev["kind"]) for ev in new_events]
        for r in range(b - a):
            ids.append(out.person_ids[int(out.person_index[r])])
            probs.append({pid: float(p) for pid, p in zip(out.person_ids, out.probabilities[r])})
    names = sorted(set(ids) | {k for p in probs for k in p})
    col = {n: i for i, n in enumerate(names)}
    at_arrival = (np.array([col[i] for i in ids]), columns(probs, names), events)
    if not settled:
        return at_arrival
    # what the keeper has recorded once the stream ends: the sessions its last saved
    # model had included before that save through the "settled" map, the rest at arrival
    final = stream.settled()
    return (*at_arrival, (final.person_index, final.probabilities))


def feedback_labels(h: WorldHousehold, fed: np.ndarray, upto: int | None = None) -> list[str | None]:
    """The labels explicit feedback gives (the true person of each ``fed`` session),
    None elsewhere; the first ``upto`` sessions (all by default)."""
    upto = h.n_sessions if upto is None else upto
    return [f"m{p}" if f else None for p, f in zip(h.person[:upto], fed[:upto])]


class FedAnswers(NamedTuple):
    """A household's answers once feedback reached clustering (hearth_batch_fed,
    hearth_stream_fed), with what ClusteringApp._answer decides for each through
    feedback_calibrator_rows: whether the feedback calibrator applies and the
    calibration group clustering stamps on it (the prediction record's)."""
    probs: np.ndarray        # (n, persons)
    calibrated: np.ndarray   # (n,) bool
    groups: np.ndarray       # (n,) str


def hearth_batch_fed(h: WorldHousehold, fed: np.ndarray, **kw) -> FedAnswers:
    """Every session's answer once feedback on the ``fed`` sessions has reached
    clustering: the household refitted with their true persons as labels
    (feedback -> forward_label -> RecordLabels -> a full refit with every label), with
    the calibrator's rows and group (feedback_calibrator_rows, as ClusteringApp._answer)."""
    m = HouseholdModel(**kw).fit(h.features, labels=feedback_labels(h, fed), device_ids=h.device_id)
    out = m.assign_batch(h.features, device_ids=h.device_id, included=True)
    rows, group = feedback_calibrator_rows(m, out)
    return FedAnswers(out.probabilities, rows, np.full(h.n_sessions, group, dtype=object))


NEW_MEMBER_ID = 1000   # hearth_stream_fed: a labelled member without an id gets p1000 + member


def member_id(answered: list[str], member: int) -> str:
    """The id feedback gives ``member`` (hearth_stream_fed): the id the household's
    answers have given them most often (``answered``, in arrival order); a tie goes to
    the id answered first; none: a fresh id (p1000 + member). The tie-break used to be
    ``max(set(answered), ...)``: a set of strings iterates in the order of Python's
    per-process salted ``hash``, so two runs of the same code (another PYTHONHASHSEED)
    could label a member with different ids and refit them differently: the streaming
    after-feedback whole-loop ECE moved by up to 0.002 between identical runs."""
    if not answered:
        return f"p{NEW_MEMBER_ID + member}"
    return max(dict.fromkeys(answered), key=answered.count)


def hearth_stream_fed(h: WorldHousehold, fed: np.ndarray, batch: int = STREAM_BATCH, **kw) -> FedAnswers:
    """The time-ordered stream with feedback as the mesh runs it: each session is answered
    at its arrival; a ``fed`` session's feedback follows its answer and reaches
    clustering as a label before the next arrival is folded in
    (ModelKeeper.refresh(force="labels")): a stream binds the labels to its persons
    (HouseholdModel.binds_labels); a model not streaming yet (a cold start, a model
    fitted just now) is refitted on every session so far with every label so far.
    Returns the at-arrival answers (n, persons), columns as hearth_stream's, with whether
    the service applies the feedback calibrator to each and the group it stamps on it
    (feedback_calibrator_rows of the model that answered it: not a cold start's answer
    over several persons; group ``persons_from_labels`` for a model whose persons labels
    added).

    The label is a person id, as the feedback service forwards it (the predicted id when
    confirmed, the caller's id of the true person when corrected): a member keeps the
    id the household's answers have given them most often among the persons it answers
    with now (cold-start persons included; taken the first time they are labelled, one
    id per member); a member with no id of their own yet gets a fresh id (a person the
    model has not met; an id, as feedback forwards only ids: a name and an id could both
    stand for one person, which the model does not expect).

    The feedback service's household disagreement trigger runs on the same feedback
    (services/feedback/domain/triggers.disagreement_triggers: 3 of the last 5 wrong,
    since its last trigger) and its Refit refits the household in full (``ServiceStream.
    refit``), as in the mesh."""
    from services.common.feedback_to_clustering import feedback_trigger_reason
    from services.feedback.domain.triggers import disagreement_triggers
    ids: list[str] = []
    probs: list[dict[str, float]] = []
    calibrated = np.ones(h.n_sessions, dtype=bool)
    groups = np.full(h.n_sessions, "", dtype=object)
    labels: list[str | None] = [None] * h.n_sessions
    id_of: dict[int, str] = {}
    verdicts: list[bool] = []   # feedback since the last disagreement trigger: was the answer right?
    stream = ServiceStream(h, **kw)
    for a, b, m, out, _ in stream.arrivals(batch):
        calibrated[a:b], groups[a:b] = feedback_calibrator_rows(m, out)
        for r in range(b - a):
            ids.append(out.person_ids[int(out.person_index[r])])
            probs.append({pid: float(p) for pid, p in zip(out.person_ids, out.probabilities[r])})
        if not fed[a:b].any():
            continue
        for i in np.flatnonzero(fed[a:b]) + a:
            true = int(h.person[i])
            if true not in id_of:
                answered = [pid for pid, t in zip(ids, h.person[:b]) if t == true
                            and pid in out.person_ids and pid not in id_of.values()]
                # (a member the household has no id for: the caller names a fresh one)
                id_of[true] = member_id(answered, true)
            labels[i] = id_of[true]
        # RecordLabels -> ModelKeeper.refresh(force="labels"): a stream binds the labels
        # to its persons, anything else (a young model fitted once, a cold start) is
        # refitted on every session so far with every label
        stream.record_labels(labels, b)
        # the feedback service's household trigger on the same feedback (k of the last n
        # said the answer was wrong, counted since its last trigger) asks for a Refit
        verdicts += [ids[i] == labels[i] for i in np.flatnonzero(fed[a:b]) + a]
        if disagreement_triggers([h.household_id] * len(verdicts), verdicts, np.arange(len(verdicts))):
            stream.refit(b, feedback_trigger_reason(0, ": disagreement"))
            verdicts = []
    return FedAnswers(columns(probs, sorted(set(ids) | {k for p in probs for k in p})), calibrated, groups)


def periodic_refit_stream(h: WorldHousehold, every: int = 50):
    """Baseline for composition change: a full refit every ``every`` sessions (k
    re-selected); a change of the person count counts as a composition event."""
    events, k_prev = [], None
    for b in range(every, h.n_sessions + 1, every):
        m = HouseholdModel().fit(h.features[:b], device_ids=h.device_id[:b])
        k = m.n_persons
        if k_prev is not None and k != k_prev:
            events.append((b, "join" if k > k_prev else "leave"))
        k_prev = k
    return events


def majority(h: WorldHousehold):
    return np.zeros(h.n_sessions, dtype=np.int64), np.ones((h.n_sessions, 1))


def _standardised(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    return (X - X.mean(axis=0)) / np.maximum(X.std(axis=0), 1e-3)


def device_heuristic(h: WorldHousehold):
    """Each personal device (mobile, tablet, desktop) is one person; sessions on shared
    devices go to the nearest personal device's centroid (standardised features without
    the device block); no personal device: one person."""
    personal = np.isin(h.device_type, PERSONAL_TYPES)
    devs = sorted(set(h.device_id[personal]))
    if not devs:
        return majority(h)
    keep = np.ones(F.FEATURE_DIM, dtype=bool)
    keep[F.DEVICE] = False
    Z = _standardised(h.features[:, keep])
    labels = np.empty(h.n_sessions, dtype=np.int64)
    centroids = []
    for j, d in enumerate(devs):
        sel = h.device_id == d
        labels[sel] = j
        centroids.append(Z[sel].mean(axis=0))
    C = np.array(centroids)
    shared = ~personal
    if shared.any():
        labels[shared] = ((Z[shared, None, :] - C[None]) ** 2).sum(axis=2).argmin(axis=1)
    P = np.zeros((h.n_sessions, len(devs)))
    P[np.arange(h.n_sessions), labels] = 1.0
    return labels, P


def sklearn_gmm_bic(h: WorldHousehold):
    X = h.features.astype(np.float64)
    best = None
    for k in range(1, min(6, len(X)) + 1):
        g = GaussianMixture(k, covariance_type="full", random_state=0, reg_covar=1e-3, max_iter=60).fit(X)
        b = g.bic(X)
        if best is None or b < best[0]:
            best = (b, g)
    return best[1].predict(X), best[1].predict_proba(X)


def sklearn_kmeans_true_k(h: WorldHousehold):
    labels = KMeans(h.n_persons, n_init=3, random_state=0).fit_predict(_standardised(h.features))
    P = np.zeros((h.n_sessions, h.n_persons))
    P[np.arange(h.n_sessions), labels] = 1.0
    return labels, P


def supervised_oracle(h: WorldHousehold, folds: int = 5):
    """Logistic regression on the true persons, cross-validated within the household
    (features + device-id one-hot): an estimate of how much signal the sessions carry."""
    if h.n_persons == 1:
        return majority(h)
    slots = h.device_slots()
    D = np.zeros((h.n_sessions, slots.max() + 1))
    D[np.arange(h.n_sessions), slots] = 1.0
    X = np.hstack((_standardised(h.features), D))
    y = h.person
    counts = np.bincount(y)
    n_splits = int(min(folds, counts.min())) if counts.min() >= 2 else 0
    P = np.zeros((h.n_sessions, h.n_persons))
    if n_splits < 2:  # a person with one session: leave it to the others' model
        clf = LogisticRegression(max_iter=300, C=1.0).fit(X, y)
        P[:, clf.classes_] = clf.predict_proba(X)
        return P.argmax(axis=1), P
    for train, test in StratifiedKFold(n_splits, shuffle=True, random_state=0).split(X, y):
        clf = LogisticRegression(max_iter=300, C=1.0).fit(X[train], y[train])
        P[np.ix_(test, clf.classes_)] = clf.predict_proba(X[test])
    return P.argmax(axis=1), P


# ---- metrics ---------------------------------------------------------------------------

def summarise(hs: list[WorldHousehold], preds: list[np.ndarray], probs: list[np.ndarray] | None) -> dict:
    correct = [matched_correct(h.person, p) for h, p in zip(hs, preds)]
    allc = np.concatenate(correct)
    single = [np.unique(p).size == 1 for h, p in zip(hs, preds) if h.n_persons == 1]
    out = {
        "session_accuracy": float(allc.mean()),
        "session_accuracy_household_mean": float(np.mean([c.mean() for c in correct])),
        "ari": float(np.mean([adjusted_rand_score(h.person, p) for h, p in zip(hs, preds)])),
        "nmi": float(np.mean([normalized_mutual_info_score(h.person, p) for h, p in zip(hs, preds)])),
        "household_size_exact": float(np.mean([np.unique(p).size == h.n_persons for h, p in zip(hs, preds)])),
        "household_size_mean_abs_error": float(np.mean([abs(np.unique(p).size - h.n_persons)
                                                        for h, p in zip(hs, preds)])),
        "single_person_kept": float(np.mean(single)) if single else None,
        "sessions": int(allc.size), "households": len(hs),
    }
    if probs is not None:
        out.update(probability_figures([h.person for h in hs], probs))
    return out


MORE_FEEDBACK_RATES = (0.15, 0.5)   # after_feedback's context: larger labelled shares
FEEDBACK_DRAWS = 20                 # ... and as many other random feedback samples


def pooled_answers(persons: list[np.ndarray], probs: list[np.ndarray], ages: list[np.ndarray] | None = None):
    """Every household's answers in one pool, as the mesh pools them: (P zero-padded to a
    common width, the column of the true person's matched model person or UNKNOWN_LABEL,
    answer right, model age (0 = unknown))."""
    from services.feedback.domain.metrics import UNKNOWN_LABEL
    width = max(P.shape[1] for P in probs)
    rows, labels, correct = [], [], []
    for person, P in zip(persons, probs):
        pred = P.argmax(axis=1)
        m = match(person, pred, P.shape[1])
        column_of = {int(p): c for c, p in enumerate(m) if p >= 0}
        rows.append(np.pad(P, ((0, 0), (0, width - P.shape[1]))))
        labels.append(np.array([column_of.get(int(t), UNKNOWN_LABEL) for t in person]))
        correct.append(m[pred] == person)
    P, y, ok = np.vstack(rows), np.concatenate(labels), np.concatenate(correct)
    age = np.concatenate(ages) if ages is not None else np.zeros(P.shape[0], dtype=np.int64)
    return P, y, ok, age


def after_feedback(hs: list[WorldHousehold], probs: list[np.ndarray], ages: list[np.ndarray] | None = None,
                   seed: int = 0) -> dict:
    """ECE after feedback, the way the mesh does it: the feedback service's calibrator is
    fitted on the answers of a random DEFAULT_FEEDBACK_RATE (3.75 %) of all sessions,
    each with the model person its true person is matched to (or "someone else" when
    the model has no such person), and clustering applies it to every answer. Scored on
    the other 96.25 %. This is the calibrator alone, on answers of households never
    refitted with the labels; ``run`` adds the whole loop (``mesh_after_feedback``: the
    labels refit the households too) as ``mesh``, makes its mean ``ece_after`` and keeps
    this function's ``ece_after`` as ``ece_after_calibrator_only``.

    ``ages`` (per household, per session: the sessions the model had seen when it
    answered, which clustering records with each prediction): the calibrator is the
    service's, ``fit_feedback_calibrator`` (a shift of the confidence level applied only
    as far as it exceeds its own noise, per
    model-age segment and kind of answer a further shrunk shift, a map of the shape only
    when it beats the level out of fold by two standard errors). Beside it on the same
    sample: ``ece_after_segmented``, the calibrator the service fitted until 2026-12-04
    (``fit_segmented_calibrator``: a map chosen by cross-validation, per age a residual
    map and a one-person shift shrunk by 10 pseudo-answers), ``ece_after_level_prior``, the
    service's until 2026-12-04 16:00 UTC (the common shift shrunk by 100 pseudo-answers
    whatever its evidence), and ``ece_after_pooled``, the segmented fit's pooled map alone."""
    from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, feedback_mask
    from services.feedback.domain.recalibration import (FeedbackSample, fit_calibrator, fit_feedback_calibrator,
                                                        fit_segmented_calibrator)

    def fit_level_prior_calibrator(sample, model_sessions):
        return fit_feedback_calibrator(sample, model_sessions, noise_multiple=None)

    P, y, ok, age = pooled_answers([h.person for h in hs], probs, ages)
    fed = feedback_mask(P.shape[0], DEFAULT_FEEDBACK_RATE, seed)
    sample = FeedbackSample.create(P[fed], labels=y[fed], correct=ok[fed].astype(float))
    held = ~fed
    out = {"feedback_rate": DEFAULT_FEEDBACK_RATE, "feedback_sessions": int(fed.sum()),
           "ece_before": ece(P[held].max(axis=1), ok[held]), "held_out_sessions": int(held.sum())}
    for key, calibrator in (("pooled", fit_calibrator(sample)),
                            ("segmented", fit_segmented_calibrator(sample, age[fed])),
                            ("level_prior", fit_level_prior_calibrator(sample, age[fed])),
                            ("service", fit_feedback_calibrator(sample, age[fed]))):
        after = calibrator.apply(P[held], age[held])
        correct_after = (after.argmax(axis=1) == P[held].argmax(axis=1)) & ok[held]
        out[f"ece_after_{key}"] = ece(after.max(axis=1), correct_after)
        out[f"calibrator_{key}"] = {"method": calibrator.method, "segments": {
            n: c.method for n, c in calibrator.segments.items()}, "one_person": calibrator.one_person,
            **({"shift": calibrator.training.get("shift"), "gate": calibrator.training.get("gate")}
               if key in ("service", "level_prior") else {})}
    out["feedback_used"] = int(sample.probs.shape[0])
    out["ece_after"] = out["ece_after_service" if ages is not None else "ece_after_pooled"]
    # What the target asks of a sample of this size: the same calibrator fitted on a
    # larger labelled share (scored on the rest), and the ECE that answers drawn right
    # with exactly their stated confidence would still show on as many held-out
    # answers (binning noise: no calibrator gets below it).
    by_rate = {}
    for rate in MORE_FEEDBACK_RATES:
        more = feedback_mask(P.shape[0], rate, seed)
        fitted = service_calibrator(P, y, ok, age, more)
        by_rate[str(rate)] = ece(fitted.apply(P[~more], age[~more]).max(axis=1), ok[~more])
    out["ece_after_by_feedback_rate"] = by_rate
    # One random 3.75 % sample fixes the level of the rest only to about +-0.023: the
    # figure above is one draw. The same on FEEDBACK_DRAWS other draws (the calibrator
    # the service fits, and the one it fitted before), to read it against.
    draws_after: dict[str, list[float]] = {"service": [], "level_prior": [], "segmented": [], "before": []}
    for d in range(1, FEEDBACK_DRAWS + 1):
        fed_d = feedback_mask(P.shape[0], DEFAULT_FEEDBACK_RATE, seed + d)
        sample_d = FeedbackSample.create(P[fed_d], labels=y[fed_d], correct=ok[fed_d].astype(float))
        draws_after["before"].append(ece(P[~fed_d].max(axis=1), ok[~fed_d]))
        for key, fit in (("service", fit_feedback_calibrator), ("level_prior", fit_level_prior_calibrator),
                         ("segmented", fit_segmented_calibrator)):
            after = fit(sample_d, age[fed_d]).apply(P[~fed_d], age[~fed_d])
            right = (after.argmax(axis=1) == P[~fed_d].argmax(axis=1)) & ok[~fed_d]
            draws_after[key].append(ece(after.max(axis=1), right))
    out["ece_after_draws"] = {key: {"draws": FEEDBACK_DRAWS, "mean": float(np.mean(v)), "median": float(np.median(v)),
                                    "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9)),
                                    "share_at_most_0.02": float(np.mean(np.asarray(v) <= 0.02))}
                              for key, v in draws_after.items()}
    out["ece_floor_calibrated"] = ece_floor(P[held].max(axis=1), reps=5, seed=seed)
    return out


FEEDBACK_MESH_DRAWS = 3   # draws of the whole loop (each refits every household: see run)


def feedback_draws(hs: list[WorldHousehold], draws: int = FEEDBACK_MESH_DRAWS, seed: int = 0) -> list[list[np.ndarray]]:
    """Per household, the sessions that get feedback in each of ``draws`` draws: the
    pooled masks after_feedback draws (seed, seed + 1, ...: the benchmark's own draw and
    the first of its other draws) cut back into households, so the whole loop and the
    calibrator alone are scored on the same feedback."""
    from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, feedback_mask
    edges = np.cumsum([0] + [h.n_sessions for h in hs])
    masks = [feedback_mask(int(edges[-1]), DEFAULT_FEEDBACK_RATE, seed + d) for d in range(draws)]
    return [[m[edges[i]:edges[i + 1]] for m in masks] for i in range(len(hs))]


def mesh_after_feedback(hs: list[WorldHousehold], probs: list[np.ndarray], fed_answers: list[list[FedAnswers]],
                        fed: list[list[np.ndarray]], ages: list[np.ndarray], sample_before: bool,
                        min_group: int | None = None, group_of: str | None = None) -> dict:
    """ECE after feedback as the mesh runs the whole loop, per draw of ``fed`` (per
    household, per draw: the sessions with feedback) and as the mean over draws, on the
    sessions without feedback:

    * ``no_feedback``: the answers without any feedback (``probs``);
    * ``calibrator_only``: the feedback service's calibrator applied to them (what
      ``ece_after_draws`` scores; the mesh's answers until labels reached clustering);
    * ``labels_only``: the answers of the households refitted with the labels
      (``fed_answers``, per household per draw: FedAnswers);
    * ``mesh`` (the figure): the service's grouped calibrator (``grouped_service_calibrator``,
      recalibration.fit_grouped_calibrator on the groups feedback_groups gives) applied to
      the refitted households' answers where and with the group the service applies it
      (FedAnswers.calibrated / .groups: model.feedback_calibrator_rows, the one rule of
      ClusteringApp._answer);
    * beside it, the same answers under the designs before it: ``mesh_calibrator_everywhere``
      (one pooled calibrator on every answer, the service until session 15) and
      ``mesh_skip_label_shaped`` (the pooled one, label-shaped answers left uncalibrated:
      session 15).
    * to read them against: ``mesh_floor`` / ``no_feedback_floor``, the ECE's own noise on
      the served / unfed answers' confidences (``ece_floor``: answers drawn right with
      exactly their confidence; no calibrator gets below it; it takes every answer as
      independent), ``mesh_household_floor`` / ``no_feedback_household_floor`` the same
      floor with the households resampled (``household_bootstrap``'s ``clustered_floor``:
      a household's answers miss together, so the ECE's noise is the households', ~0.03 at
      60 households), ``*_household_p025`` / ``*_household_p975`` the household bootstrap's
      2.5-97.5 % range of the ECE over household resamples (a percentile range, not a
      confidence interval: a resampled ECE runs high; each a mean over the draws), and
      ``mesh_level_per_group_ceiling``, the answers before the feedback calibrator with each
      calibration group moved by its own mean (confidence - right) on the scored answers
      themselves: what a level per group would give with unlimited feedback (fb17,
      session 17: above 0.02 on every TUNING sample, so the level is not what is left).

    The calibrator is fitted on the fed sessions' answers as the feedback service
    recorded them, i.e. as served before their feedback: ``sample_before`` (batch fits:
    every session was answered before any feedback, by a model no label had shaped:
    group "") from ``probs``, else (streams: each session is answered at arrival, after
    the feedback on earlier ones) from the fed answers with their groups. ``min_group``
    / ``group_of``: the service's MIN_GROUP_FEEDBACK / FEEDBACK_GROUP_OF unless given
    (bench/feedback_tuning.py groups sweeps them on TUNING)."""
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK
    min_group = MIN_GROUP_FEEDBACK if min_group is None else min_group
    group_of = FEEDBACK_GROUP_OF if group_of is None else group_of
    persons = [h.person for h in hs]
    P0, y0, ok0, age = pooled_answers(persons, probs, ages)
    account = np.concatenate([np.full(h.n_sessions, h.household_id, dtype=object) for h in hs])
    rows: dict[str, list[float]] = {"no_feedback": [], "calibrator_only": [], "labels_only": [], "mesh": [],
                                    "mesh_calibrator_everywhere": [], "mesh_skip_label_shaped": [],
                                    "accuracy_no_feedback": [], "accuracy_after": [], "share_uncalibrated": [],
                                    "share_label_shaped": [], "groups_with_own_calibrator": [],
                                    "mesh_floor": [], "no_feedback_floor": [], "mesh_level_per_group_ceiling": [],
                                    "mesh_household_floor": [], "mesh_household_p025": [], "mesh_household_p975": [],
                                    "no_feedback_household_floor": [], "no_feedback_household_p025": [],
                                    "no_feedback_household_p975": []}
    gaps: dict[str, list[float]] = {}
    for d in range(len(fed[0])):
        fed_d = np.concatenate([f[d] for f in fed])
        answers = [a[d] for a in fed_answers]
        P1, y1, ok1, _ = pooled_answers(persons, [a.probs for a in answers], ages)
        calibrated = np.concatenate([a.calibrated for a in answers])
        group = np.concatenate([a.groups for a in answers]).astype(str)
        # the group each fed answer was stamped with when served, and each household's now
        # (its newest answer's: the feedback service's current group of an account)
        answered = np.full(fed_d.size, "", dtype=object) if sample_before else group
        current = {h.household_id: str(a.groups[-1]) for h, a in zip(hs, answers)}
        Ps, ys, oks = (P0, y0, ok0) if sample_before else (P1, y1, ok1)
        calibrator = grouped_service_calibrator(Ps, ys, oks, age, fed_d, answered, account, current,
                                                min_group, group_of)
        pooled = replace(calibrator, groups={})
        held = ~fed_d
        rows["no_feedback"].append(ece(P0[held].max(axis=1), ok0[held]))
        rows["calibrator_only"].append(ece(pooled.apply(P0[held], age[held]).max(axis=1), ok0[held]))
        rows["labels_only"].append(ece(P1[held].max(axis=1), ok1[held]))
        everywhere = pooled.apply(P1[held], age[held])
        rows["mesh_calibrator_everywhere"].append(ece(everywhere.max(axis=1), ok1[held]))
        on = calibrated[held]
        label_shaped = group[held] != ""
        skip = np.where((on & ~label_shaped)[:, None], everywhere, P1[held])
        rows["mesh_skip_label_shaped"].append(ece(skip.max(axis=1), ok1[held]))
        served = np.where(on[:, None], calibrator.apply(P1[held], age[held], group[held]), P1[held])
        rows["mesh"].append(ece(served.max(axis=1), ok1[held]))
        rows["mesh_floor"].append(ece_floor(served.max(axis=1), seed=d))
        rows["no_feedback_floor"].append(ece_floor(P0[held].max(axis=1), seed=d))
        for key, conf, right in (("mesh", served.max(axis=1), ok1[held]), ("no_feedback", P0[held].max(axis=1), ok0[held])):
            boot = household_bootstrap(conf, right, account[held], seed=d)
            rows[f"{key}_household_floor"].append(boot["clustered_floor"])
            rows[f"{key}_household_p025"].append(boot["boot_p025"])
            rows[f"{key}_household_p975"].append(boot["boot_p975"])
        level = P1[held].max(axis=1)
        for name in np.unique(group[held]):
            g = group[held] == name
            level[g] = np.clip(level[g] - (level[g].mean() - ok1[held][g].mean()), 0.0, 1.0)
        rows["mesh_level_per_group_ceiling"].append(ece(level, ok1[held]))
        rows["share_uncalibrated"].append(float(1.0 - on.mean()))
        rows["share_label_shaped"].append(float(label_shaped.mean()))
        rows["groups_with_own_calibrator"].append(float(len(calibrator.groups)))
        rows["accuracy_no_feedback"].append(float(ok0[held].mean()))
        rows["accuracy_after"].append(float(ok1[held].mean()))
        # what is left, per group: mean confidence minus accuracy of the served answers
        for name in np.unique(group[held]):
            g = group[held] == name
            gaps.setdefault(name or "default", []).append(float(served[g].max(axis=1).mean() - ok1[held][g].mean()))
    return {"draws": len(fed[0]), "calibrator_sample": "before feedback" if sample_before else "as served",
            "min_group": min_group, "group_of": group_of,
            **{k: float(np.mean(v)) for k, v in rows.items()},
            "overconfidence_by_group": {k: round(float(np.mean(v)), 4) for k, v in gaps.items()}, "per_draw": rows}


def service_calibrator(P: np.ndarray, labels: np.ndarray, correct: np.ndarray, age: np.ndarray,
                       fed: np.ndarray):
    """The pooled calibrator the feedback service fits on the ``fed`` rows of pooled
    answers (pooled_answers: probabilities, label columns, right or not, model ages)."""
    from services.feedback.domain.recalibration import FeedbackSample, fit_feedback_calibrator
    return fit_feedback_calibrator(
        FeedbackSample.create(P[fed], labels=labels[fed], correct=correct[fed].astype(float)), age[fed])


def grouped_service_calibrator(P: np.ndarray, labels: np.ndarray, correct: np.ndarray, age: np.ndarray,
                               fed: np.ndarray, answered: np.ndarray, account: np.ndarray,
                               current: dict[str, str], min_group: int, group_of: str):
    """The calibrator the feedback service fits per variant (Calibration.recalibrate) on
    the ``fed`` rows: recalibration.fit_grouped_calibrator on the groups
    recalibration.feedback_groups gives (``answered``: each answer's stamped group;
    ``current``: each account's group now, used when ``group_of`` says so)."""
    from services.feedback.domain.recalibration import FeedbackSample, feedback_groups, fit_grouped_calibrator
    groups = feedback_groups(answered[fed], account[fed], current, group_of)
    return fit_grouped_calibrator(
        FeedbackSample.create(P[fed], labels=labels[fed], correct=correct[fed].astype(float)), age[fed], groups,
        min_group=min_group)


def model_ages(hs: list[WorldHousehold], mode: str, batch: int = STREAM_BATCH) -> list[np.ndarray]:
    """Per session, the sessions the model had seen when it answered: every session of the
    household in a batch fit; in a stream (ServiceStream), the sessions the keeper had
    folded in when it first answered the session's arrival (stream_ages)."""
    if mode == "batch":
        return [np.full(h.n_sessions, h.n_sessions, dtype=np.int64) for h in hs]
    return [stream_ages(h.n_sessions, batch) for h in hs]


def stream_ages(n: int, batch: int = STREAM_BATCH) -> np.ndarray:
    """(n,) the model's sessions when each session's arrival was answered in a stream of
    arrivals of ``batch``: the keeper folds an arrival in while the model is cold
    (fewer than MIN_SESSIONS) and once MICRO_BATCH sessions wait, else answers it with
    the model as it is (ModelKeeper.advance; a drift refit also includes every session,
    so it does not change the age; tests/unit/clustering/test_service_stream.py checks
    these ages against the stream's own models). A labels refit (feedback on a model
    that does not bind labels) folds in early and is not followed here."""
    ages = np.empty(n, dtype=np.int64)
    included = 0
    for a in range(0, n, batch):
        b = min(a + batch, n)
        if included < MIN_SESSIONS or b - included >= MICRO_BATCH:
            included = b
        ages[a:b] = included
    return ages


def gap_closed(acc: float, majority_acc: float, oracle_acc: float) -> float | None:
    gap = oracle_acc - majority_acc
    return float((acc - majority_acc) / gap) if gap > 1e-9 else None


def composition_scores(hs: list[WorldHousehold], events: list[list[tuple[int, str]] | None],
                       warmup: int = WARMUP_SESSIONS) -> dict:
    """``events`` None for a household = not run (excluded). False alarms are counted,
    and household-quarters measured, from session ``warmup`` on. Detection, delay and
    false alarms are also given by type (a join / a leave; a false alarm's type is the
    kind of event raised in a household without a change)."""
    detected, delays, by_kind = [], [], {"join": [], "leave": []}
    delays_by_kind: dict[str, list[int]] = {"join": [], "leave": []}
    same_kind = []
    false_alarms, quarters = 0, 0.0
    false_by_kind = {"join": 0, "leave": 0}
    for h, evs in zip(hs, events):
        if evs is None:
            continue
        if h.changes:
            c = h.changes[0]
            hits = [i for i, _ in evs if c.session_index <= i <= c.session_index + DETECTION_WINDOW]
            ok = bool(hits)
            detected.append(ok)
            same_kind.append(any(k == c.kind for i, k in evs if c.session_index <= i <= c.session_index + DETECTION_WINDOW))
            by_kind[c.kind].append(ok)
            if ok:
                delays.append(hits[0] - c.session_index)
                delays_by_kind[c.kind].append(hits[0] - c.session_index)
        else:
            if h.n_sessions > warmup:
                late = [k for i, k in evs if i > warmup]
                false_alarms += len(late)
                for k in late:
                    false_by_kind[k] = false_by_kind.get(k, 0) + 1
                span = h.start_ts[-1] - h.start_ts[warmup]
                quarters += max(span, 0.0) / QUARTER_S
    return {
        "detection_rate": float(np.mean(detected)) if detected else None,
        "detection_rate_by_kind": {k: (float(np.mean(v)) if v else None) for k, v in by_kind.items()},
        # The detection rate counts any event in the window; this one only an event of
        # the change's own kind (a join reported for a member who left is not counted).
        "detection_rate_same_kind": float(np.mean(same_kind)) if same_kind else None,
        "mean_delay_sessions": float(np.mean(delays)) if delays else None,
        "mean_delay_sessions_by_kind": {k: (float(np.mean(v)) if v else None) for k, v in delays_by_kind.items()},
        "false_alarms_per_household_quarter": false_alarms / quarters if quarters else None,
        "false_alarms_per_household_quarter_by_kind": {k: (v / quarters if quarters else None)
                                                       for k, v in false_by_kind.items()},
        "changes": len(detected), "changes_by_kind": {k: len(v) for k, v in by_kind.items()},
        "stable_household_quarters": round(quarters, 2),
        "window_sessions": DETECTION_WINDOW,
    }


def grouped(hs: list[WorldHousehold], results: dict[str, tuple[list, list | None]], key) -> dict:
    """Per group (family, household size): every method's summary and Hearth's gap_closed."""
    out = {}
    groups = sorted({key(h) for h in hs}, key=str)
    for g in groups:
        idx = [i for i, h in enumerate(hs) if key(h) == g]
        sub = [hs[i] for i in idx]
        block = {}
        for name, (preds, probs) in results.items():
            block[name] = summarise(sub, [preds[i] for i in idx], [probs[i] for i in idx] if probs else None)
        out[str(g)] = block
    return out


# ---- the whole "worlds" block ----------------------------------------------------------

BASELINES = {
    "majority": majority,
    "device_heuristic": device_heuristic,
    "sklearn_gmm_bic": sklearn_gmm_bic,
    "sklearn_kmeans_true_k": sklearn_kmeans_true_k,
    "supervised_oracle": supervised_oracle,
}


def _block(hs, idx, results, stream, comp=None) -> dict:
    sub = [hs[i] for i in idx]
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    summaries = {name: summarise(sub, pick(p), pick(q) if q else None) for name, (p, q) in results.items()}
    maj = summaries["majority"]["session_accuracy"]
    orc = summaries["supervised_oracle"]["session_accuracy"]
    block = dict(summaries["hearth"])
    block["gap_closed"] = gap_closed(block["session_accuracy"], maj, orc)
    block["baselines"] = {}
    for name, s in summaries.items():
        if name != "hearth":
            s["gap_closed"] = gap_closed(s["session_accuracy"], maj, orc)
            block["baselines"][name] = s
    simple = [summaries[n]["session_accuracy"] for n in ("majority", "device_heuristic", "sklearn_gmm_bic",
                                                         "sklearn_kmeans_true_k")]
    block["best_simple_baseline_accuracy"] = float(max(simple))
    if stream is not None:
        s = summarise(sub, pick(stream[0]), pick(stream[1]))
        s["gap_closed"] = gap_closed(s["session_accuracy"], maj, orc)
        block["streaming"] = s
        if len(stream) > 2:
            settled = summarise(sub, pick(stream[2]), pick(stream[3]))
            settled["gap_closed"] = gap_closed(settled["session_accuracy"], maj, orc)
            block["streaming_settled"] = settled
    if comp is not None:
        block["composition_change"] = composition_scores(sub, pick(comp["hearth"]))
        block["composition_change_baselines"] = {
            "no_change": composition_scores(sub, [[] for _ in idx]),
            "periodic_refit": composition_scores(sub, pick(comp["periodic_refit"])),
        }
    return block


def _one_household(h: WorldHousehold, periodic: bool, streaming: bool = True,
                   fed: list[np.ndarray] | None = None, prior: PopulationPrior | None = None) -> dict:
    """Every method on one household (a unit of work for the process pool); ``fed``
    (per feedback draw, the sessions with feedback): also the batch fit and the stream
    with that feedback's labels (hearth_batch_fed, hearth_stream_fed); ``prior``: its
    world's population prior (world_priors), which every Hearth path's cold start uses."""
    out = {"hearth": hearth_batch(h, population_prior=prior)}
    for name, fn in BASELINES.items():
        out[name] = fn(h)
    stream = hearth_stream(h, settled=True, population_prior=prior) if streaming else None
    out["stream"] = stream[:3] if stream else None
    out["stream_settled"] = stream[3] if stream else None
    out["periodic"] = periodic_refit_stream(h) if periodic and streaming else None
    out["fed_batch"] = [hearth_batch_fed(h, f, population_prior=prior) for f in fed or []]   # FedAnswers
    out["fed_stream"] = [hearth_stream_fed(h, f, population_prior=prior) for f in fed or []]
    return out


def run(hs: list[WorldHousehold], log=lambda m: None, held_out: tuple[str, ...] = (),
        periodic_baseline: bool = True, streaming: bool = True, workers: int = 1,
        feedback_mesh_draws: int = FEEDBACK_MESH_DRAWS,
        priors: dict[str, PopulationPrior | None] | None = None) -> dict:
    """Every method on ``hs``. ``streaming=False``: the batch fit and the baselines only
    (no time-ordered stream, no composition scores, no feedback) — the quick loop for
    batch-model work. ``workers`` > 1: households are scored in that many processes (each
    household's figures do not depend on the others', so the report is the same).
    ``feedback_mesh_draws``: feedback draws of the whole loop (after_feedback's
    ``mesh``; each draw is a batch fit and a stream with label refits per household:
    on 12 TUNING households the three draws took 2.2 times the CPU of everything else;
    0: the calibrator alone, as before). ``priors``: per world id, the population prior
    its service answers cold starts with (world_priors); None: none (the account
    strategy, as the benchmarks streamed until session 16)."""
    import time
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.time()
    # The periodic-refit baseline runs on every household, as Hearth's stream does: it
    # used to run on the changed households plus as many stable ones, so its false-alarm
    # rate came from a fifth of the stable household-quarters Hearth's did (5.38 vs 23.8
    # on REPORTING) and the two rates were not comparable.
    flags = [periodic_baseline] * len(hs)
    streams = [streaming] * len(hs)
    fed = feedback_draws(hs, feedback_mesh_draws) if streaming and feedback_mesh_draws else [None] * len(hs)
    prior_of = [(priors or {}).get(h.world_id) for h in hs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            outs = list(pool.map(_one_household, hs, flags, streams, fed, prior_of))
    else:
        outs = [_one_household(h, f, streaming, d, p) for h, f, d, p in zip(hs, flags, fed, prior_of)]
    log(f"[worlds] every method on {len(hs)} households ({workers} processes) {time.time() - t0:.0f}s")
    results: dict[str, tuple[list, list | None]] = {}
    for name in ("hearth", *BASELINES):
        results[name] = ([o[name][0] for o in outs], [o[name][1] for o in outs])
    probs = results["hearth"][1]
    if not streaming:
        report = {"all": _block(hs, list(range(len(hs))), results, None)}
        for fam in sorted({h.family for h in hs}):
            report[fam] = _block(hs, [i for i, h in enumerate(hs) if h.family == fam], results, None)
        if held_out and any(h.family in held_out for h in hs):
            report["held_out_families"] = _block(hs, [i for i, h in enumerate(hs) if h.family in held_out],
                                                 results, None)
            report["held_out_families"]["families"] = list(held_out)
        report["by_household_size"] = {
            str(k): _block(hs, [i for i, h in enumerate(hs) if h.n_persons == k], results, None)
            for k in sorted({h.n_persons for h in hs})}
        report["elapsed_s"] = round(time.time() - t0, 1)
        return report
    s_preds, s_probs, s_events = ([o["stream"][k] for o in outs] for k in range(3))
    periodic = [o["periodic"] for o in outs]
    settled = [o["stream_settled"] for o in outs]
    stream = (s_preds, s_probs, [x[0] for x in settled], [x[1] for x in settled])
    comp = {"hearth": s_events, "periodic_refit": periodic}
    all_idx = list(range(len(hs)))
    report = {"all": _block(hs, all_idx, results, stream, comp)}
    report["all"]["after_feedback"] = {"batch": after_feedback(hs, probs, model_ages(hs, "batch")),
                                       "streaming": after_feedback(hs, s_probs, model_ages(hs, "stream"))}
    if feedback_mesh_draws:
        # The whole loop as the mesh runs it (label refits + calibrator) is the figure;
        # the calibrator alone (the answers of households never refitted with the
        # labels) stays beside it as ece_after_calibrator_only.
        for mode, before, key, sample_before in (("batch", probs, "fed_batch", True),
                                                 ("streaming", s_probs, "fed_stream", False)):
            block = report["all"]["after_feedback"][mode]
            block["mesh"] = mesh_after_feedback(hs, before, [o[key] for o in outs], fed,
                                                model_ages(hs, "batch" if mode == "batch" else "stream"),
                                                sample_before)
            block["ece_after_calibrator_only"] = block["ece_after"]
            block["ece_after"] = block["mesh"]["mesh"]
    for fam in sorted({h.family for h in hs}):
        report[fam] = _block(hs, [i for i, h in enumerate(hs) if h.family == fam], results, stream, comp)
    if held_out:
        idx = [i for i, h in enumerate(hs) if h.family in held_out]
        if idx:
            report["held_out_families"] = _block(hs, idx, results, stream, comp)
            report["held_out_families"]["families"] = list(held_out)
    report["by_household_size"] = {
        str(k): _block(hs, [i for i, h in enumerate(hs) if min(h.n_persons, 6) == k], results, stream)
        for k in sorted({h.n_persons for h in hs})}
    report["elapsed_s"] = round(time.time() - t0, 1)
    return report
