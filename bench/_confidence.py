"""Raw (uncalibrated) answers of Hearth on world households, with what the service knows
when it answers: the model's age (sessions it has seen), whether it has folded sessions
in since its last full fit (HouseholdModel.streamed), whether the answer is a
one-person / cold-start one, whether the sessions carry device ids the model knows, and
the evidence a one-person answer's confidence rests on (HouseholdModel.one_person_evidence).

``python -m bench.accuracy --calibrate-confidence`` fits the confidence maps of
services/clustering/domain/model.py on these answers (TUNING worlds only), and the
feedback benchmark (``bench/_worlds_eval.after_feedback``) gives the feedback service the
same model age the mesh records with each prediction.

Two ways of answering, as in bench/_worlds_eval.py: ``batch`` (one fit on every session,
then every session assigned) and ``stream`` (sessions in time order, STREAM_BATCH at a
time, each arrival one refresh of the clustering service: _worlds_eval.ServiceStream);
and a second arrival pattern of the stream, ``daily`` (a client posting a day of events
per request, _worlds_eval.daily_ends: several sessions per refresh, as bench.api_accuracy
sends them), whose at-arrival ECE was 0.063 on REPORTING with maps fitted on the first
pattern alone (docs/benchmarks.md, "Through the public API").
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from bench._clustering_eval import match
from bench._worlds_eval import STREAM_BATCH, ServiceStream, columns, daily_ends
from bench.worlds import WorldHousehold
from services.clustering.domain.model import HouseholdModel


@dataclass
class RawAnswers:
    """One household's answers in one mode (rows = sessions in order).

    ``P``: (n, K) uncalibrated probabilities (stream: persons over the whole run, a
    column per person id ever answered); ``pred``: argmax column; ``age``: sessions the
    model had seen when it answered; ``kind``: 0 mixture (calibrated by the maps),
    1 cold-start one-person answer, 2 k-means or no device evidence (left as is),
    3 cold-start answer among several persons (COLD_MULTI);
    ``device``: the device map applies (model with device evidence, known device ids)."""

    P: np.ndarray
    pred: np.ndarray
    age: np.ndarray
    kind: np.ndarray
    device: np.ndarray
    correct: np.ndarray
    labels: np.ndarray  # column of the true person's matched model person, -1 none
    devices: np.ndarray | None = None  # devices the model knew when it answered
    groups: np.ndarray | None = None   # personal-device person groups at its last fit
    streamed: np.ndarray | None = None  # HouseholdModel.streamed when it answered
    evidence: np.ndarray | None = None  # (n, len(ONE_PERSON_EVIDENCE)) one-person evidence
    included: np.ndarray | None = None  # (settled answers) sessions folded in before the answer
    checkpoint: np.ndarray | None = None  # (settled answers) the stream's fraction when answered
    fit_sessions: np.ndarray | None = None  # the sessions of the model's last full fit when it answered
    persons_so_far: np.ndarray | None = None  # true persons among the sessions so far (diagnosis, never evidence)
    shares: np.ndarray | None = None  # (n, 2) the answered person's and the largest person's share of the model's sessions
    known: np.ndarray | None = None   # the session's device is one the model knows (its own answer, per row)


MIXTURE, COLD_ONE, OTHER, COLD_MULTI = 0, 1, 2, 3


def _meta(m: HouseholdModel, out, device_ids) -> tuple[int, bool]:
    slots = m._known_slots(device_ids, len(device_ids))
    device = bool(m.device_evidence and (slots >= 0).any())
    if out.strategy.startswith("cold_start"):
        kind = (COLD_ONE if out.probabilities.shape[1] == 1 else COLD_MULTI) if device else OTHER
    else:
        kind = MIXTURE if m.mixture is not None else OTHER
    return kind, device


def _evidence(m: HouseholdModel, X: np.ndarray, device_ids) -> np.ndarray:
    return m.one_person_evidence(X.shape[0])


def _known(m: HouseholdModel, device_ids) -> np.ndarray:
    """Per session: its device is one the model knows (with device evidence)."""
    return (m._known_slots(list(device_ids), len(device_ids)) >= 0) & bool(m.device_evidence)


def _shares(m: HouseholdModel, out) -> np.ndarray:
    """(n, 2) of each answer: the answered person's share of the model's sessions and
    the largest person's share (NaN without a mixture: cold start, k-means)."""
    n = out.probabilities.shape[0]
    if m.mixture is None or m.mixture.counts.size != out.probabilities.shape[1]:
        return np.full((n, 2), np.nan)
    share = m.mixture.counts / max(float(m.mixture.counts.sum()), 1e-12)
    return np.column_stack((share[out.person_index], np.full(n, share.max())))


def _finish(h: WorldHousehold, P: np.ndarray, age, kind, device, devices, groups, streamed,
            evidence, fit_sessions, persons_so_far, shares, known) -> RawAnswers:
    pred = P.argmax(axis=1)
    m = match(h.person, pred, P.shape[1])
    column_of = {int(person): c for c, person in enumerate(m) if person >= 0}
    labels = np.array([column_of.get(int(t), -1) for t in h.person])
    return RawAnswers(P, pred, np.asarray(age, dtype=np.int64), np.asarray(kind, dtype=np.int8),
                      np.asarray(device, dtype=bool), m[pred] == h.person, labels,
                      np.asarray(devices, dtype=np.int64), np.asarray(groups, dtype=np.int64),
                      np.asarray(streamed, dtype=bool), np.asarray(evidence, dtype=np.float64),
                      fit_sessions=np.asarray(fit_sessions, dtype=np.int64),
                      persons_so_far=np.asarray(persons_so_far, dtype=np.int64),
                      shares=np.asarray(shares, dtype=np.float64).reshape(-1, 2),
                      known=np.asarray(known, dtype=bool))


def batch_answers(h: WorldHousehold, prior=None) -> RawAnswers:
    m = HouseholdModel(calibrated=False, population_prior=prior).fit(h.features, device_ids=h.device_id)
    out = m.assign_batch(h.features, device_ids=h.device_id, included=True)
    kind, device = _meta(m, out, list(h.device_id))
    n = h.n_sessions
    return _finish(h, out.probabilities, np.full(n, m.n_sessions), np.full(n, kind), np.full(n, device),
                   np.full(n, len(m.device_ids)), np.full(n, m.device_group_count), np.full(n, m.streamed),
                   _evidence(m, h.features, h.device_id), np.full(n, m.fit_sessions),
                   np.full(n, np.unique(h.person).size), _shares(m, out), _known(m, h.device_id))


# Where in each stream the settled answers are recorded (fractions of its sessions): a
# caller reads a household back at any point of its life, not only at the end (a map
# fitted on the ends of the TUNING streams alone was over-confident earlier on:
# docs/clustering.md, "Confidence").
SETTLED_AT = (0.25, 0.5, 0.75, 1.0)


def stream_answers(h: WorldHousehold, batch: int = STREAM_BATCH, settled: list | None = None,
                   arrival_ends: list[int] | None = None, prior=None) -> RawAnswers:
    """``settled``: given a list, the settled answers (settled_answers) at each of
    SETTLED_AT are appended to it; ``arrival_ends``: the arrivals' ends instead of
    ``batch`` sessions each (ServiceStream.arrivals(ends=...)). ``included`` of the
    answers: the sessions the refresh of their arrival included (a full fit's: the
    household's first, a refit), which the keeper records as included (as
    ServiceStream.arrivals answers them). ``prior``: the world's population prior its
    cold start answers from (_worlds_eval.world_priors), as the service's does."""
    probs: list[dict[str, float]] = []
    age, kind, device, devices, groups, streamed, evidence, fit_sessions, ends = [], [], [], [], [], [], [], [], []
    shares: list[np.ndarray] = []
    known: list[np.ndarray] = []
    included: list[np.ndarray] = []
    n = h.n_sessions
    stops = {max(batch, int(n * f) // batch * batch) if f < 1 else n: f for f in SETTLED_AT}
    stream = ServiceStream(h, population_prior=prior, calibrated=False)
    for a, b, m, out, _ in stream.arrivals(batch, ends=arrival_ends):
        included.append(np.arange(a, b) < stream.included_now)
        k, d = _meta(m, out, list(h.device_id[a:b]))
        for r in range(b - a):
            probs.append({pid: float(p) for pid, p in zip(out.person_ids, out.probabilities[r])})
        age += [m.n_sessions] * (b - a)
        kind += [k] * (b - a)
        device += [d] * (b - a)
        devices += [len(m.device_ids)] * (b - a)
        groups += [m.device_group_count] * (b - a)
        streamed += [m.streamed] * (b - a)
        evidence.append(_evidence(m, h.features[a:b], h.device_id[a:b]))
        shares.append(_shares(m, out))
        known.append(_known(m, h.device_id[a:b]))
        fit_sessions += [m.fit_sessions] * (b - a)
        ends += [b] * (b - a)
        if settled is not None and b in stops and a > 0:
            settled.append(settled_answers(h, stream, b, stops[b]))
    # the true persons among the sessions up to each answer's arrival (its end)
    firsts = np.sort(np.unique(h.person, return_index=True)[1])
    persons_so_far = np.searchsorted(firsts, np.asarray(ends), side="left")
    out = _finish(h, columns(probs), age, kind, device, devices, groups, streamed, np.vstack(evidence),
                  fit_sessions, persons_so_far, np.vstack(shares), np.concatenate(known))
    out.included = np.concatenate(included)
    return out


def settled_answers(h: WorldHousehold, stream: ServiceStream, end: int, checkpoint: float = 1.0) -> RawAnswers:
    """The stream's sessions so far (``end``) as the service has recorded them just after
    that arrival: what GET /v1/household serves at that moment (ServiceStream.settled:
    the last saved model; ``included``: the sessions it had included before its last
    save, the answers the "settled" map and one-person group are fitted on, the others
    answered at arrival, as in stream_answers); ``checkpoint``: the stream's fraction."""
    m = stream.envelope.model
    out = stream.settled(end)
    kind, device = _meta(m, out, list(h.device_id[:end]))
    ans = _finish(SimpleNamespace(person=h.person[:end]), out.probabilities, np.full(end, m.n_sessions),
                  np.full(end, kind), np.full(end, device), np.full(end, len(m.device_ids)),
                  np.full(end, m.device_group_count), np.full(end, m.streamed), m.one_person_evidence(end),
                  np.full(end, m.fit_sessions), np.full(end, np.unique(h.person[:end]).size), _shares(m, out),
                  _known(m, h.device_id[:end]))
    ans.included = np.arange(end) < min(stream.included, end)
    ans.checkpoint = np.full(end, checkpoint)
    return ans


def _stacked(parts: list[RawAnswers]) -> RawAnswers:
    """Several answer sets as one (rows stacked, P padded with zeros to the widest)."""
    width = max(p.P.shape[1] for p in parts)
    out = RawAnswers(np.vstack([np.pad(p.P, ((0, 0), (0, width - p.P.shape[1]))) for p in parts]),
                     *(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("pred", "age", "kind", "device", "correct", "labels", "devices", "groups",
                                 "streamed")),
                     np.vstack([p.evidence for p in parts]))
    out.included = np.concatenate([p.included for p in parts])
    out.checkpoint = np.concatenate([p.checkpoint for p in parts])
    out.fit_sessions = np.concatenate([p.fit_sessions for p in parts])
    out.persons_so_far = np.concatenate([p.persons_so_far for p in parts])
    out.shares = np.vstack([p.shares for p in parts])
    out.known = np.concatenate([p.known for p in parts])
    return out


def household_answers(h: WorldHousehold, settled: bool = False, daily: bool = False,
                      prior=None) -> dict[str, RawAnswers]:
    """``settled``: also the settled answers at each of SETTLED_AT, stacked (key "settled");
    ``daily``: also the stream's at-arrival answers when a day arrives per refresh (key
    "daily", _worlds_eval.daily_ends); ``prior``: the world's population prior
    (_worlds_eval.world_priors) every mode's cold start answers from."""
    parts: list[RawAnswers] = []
    out = {"batch": batch_answers(h, prior), "stream": stream_answers(h, settled=parts if settled else None,
                                                                      prior=prior)}
    if settled:
        out["settled"] = _stacked(parts)
    if daily:
        out["daily"] = stream_answers(h, arrival_ends=daily_ends(h.start_ts), prior=prior)
    return out
