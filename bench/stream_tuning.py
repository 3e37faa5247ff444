"""Tuning harness for streaming and composition change, on the TUNING worlds only.

``python -m bench.stream_tuning [--households N] [--workers W] [--trace] [--no-birth]``
streams the TUNING split's households (bench/worlds.py, seed 20260001; every household
with a member joining or leaving, then stable ones up to N; ``--seed`` for extra
TUNING-seed worlds) through ``_worlds_eval.ServiceStream`` — the clustering service's own
refresh decision, the loop the accuracy bench uses; ``--arrival`` sessions per refresh —
and prints on the last line a JSON object: streaming session accuracy, single-person
kept, join/leave detection within 30 sessions with false alarms per household-quarter
(``_worlds_eval.composition_scores``), accuracy / ECE / size exact / singles kept at
arrival and as recorded at the end (``settled``), how often the service's drift alarms
and refits ran (``service_paths``), plus per-household traces.

``--trace`` also records, at every check of the persons, each person's posterior mass
before and after every candidate change point (``TRACE_LOOKBACK`` sessions back, at
least ``TRACE_MIN_HISTORY`` sessions before it) and the newcomer test's figures
(``HouseholdModel.birth_statistics``). The share test only reads the model, so with the
newcomer test off (``--no-birth``: it still computes its figures, it only never adds a
person) the stream does not depend on any composition threshold, and ``sweep`` replays
``_detect_composition`` exactly for any thresholds (the newcomer test's firing is then
approximated: where it would have fired, without the person it would have added).
``--trace`` also records the new-device newcomer test's figures for every window
(``HouseholdModel._new_device_statistics``, even where it would not run) and ``replay``
applies its ``anchored_*`` thresholds; ``--no-new-device`` turns that test off (the
baseline it is compared with). ``--trace`` also records, for a household with a change,
each person's posterior mass on the changed member's sessions before and after it (truth,
for the diagnosis only); ``--diagnose F`` classifies the misses of such a run (``diagnose``).
``--paths`` logs every change of the persons with the stream path that made it and the
session count (``person_changes``; the refit, the re-selection, either newcomer test), and
``singles_split`` names the single-person households answered with more than one id;
``--worlds-per-family 16 --singles`` streams the single-person households of more
TUNING-seed worlds. With ``--paths`` the output's ``singles`` (``singles_diagnosis``) says,
for every single-person stream that ever showed a second person, by which path it was
first added (a device group more, a person born beside the device groups, the shared-only
refit, the newcomer tests), at which session, how many sessions the extra ids answered and
whether the stream ended on one person again; and singles kept by each definition: ids
answered at arrival (``bench.accuracy``'s streaming figure), the settled answers, the final
model's person count (the size GET /v1/household reports) and never shown split. Each
logged change carries the posterior mass of the persons it added (``born_mass``) and, for
the diagnosis only, the members with >= 3 sessions so far (``members_seen``).
``--change-suite W`` streams the join/leave suite instead (``change_suite``: W worlds per
TUNING family on the suite's own TUNING seed, 8 households with a member joining or
leaving forced and 6 stable ones per world); every run's ``by_evidence`` (and
``--diagnose``) says detection and delay per kind of change and kind of evidence the
member leaves (``change_evidence``), and, on a ``--trace`` run, whether the model held
as many persons as members in the window.
``--light-trace`` (with ``--trace``) leaves out the new-device newcomer test's figures and
keeps, at every check, each person's posterior on the newest TRACE_TAIL sessions;
``--leaves F`` reads such a file: each leave's anatomy (``leave_anatomy``: share, sessions
after, the silence evidence any test of who watched could hold in the window, detectable or
below chance), detection on the detectable leaves beside all, and the silence CUSUM
(``silence_cusum``, measured, not wired) replayed with the stream (``silence_report``).
``--population movielens-latest-tuning`` / ``movielens-tuning`` streams a real-viewer
population's TUNING half instead (even viewer ids; bench/worlds_movielens_latest.py,
bench/worlds_movielens.py); with ``--trace`` the output's ``arrival_decomposition`` puts the
answers at arrival beside the same sessions' answers with each id read as its majority person,
by a full refit every N sessions (``--periodic-refit N``), settled and by the batch fit, overall
and by position in the stream (docs/benchmarks.md, "Answers at arrival on the real viewers'
TUNING halves").
It never reads the REPORTING split: choices are made here, figures are reported by
``python -m bench.accuracy --worlds-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from bench import _worlds_eval as E
from bench import worlds
from bench._clustering_eval import matched_correct
from services.clustering.domain import features as F
from services.clustering.domain import model as model_module

TRACE_LOOKBACK = (10, 15, 20, 25, 30, 40)
TRACE_MIN_HISTORY = 10
TRACE_TAIL = 100   # sessions of per-session posteriors a trace keeps (the silence replay)


# A leave by a person's silence (measured on TUNING, not wired: docs/clustering.md, "A leave
# by a person's silence"): the CUSUM of log(1 - p_i) - log(1 - w_i) over the newest
# TRACE_TAIL sessions.
SILENCE_MIN_SESSIONS = 3.0  # a person's posterior mass (sessions) so far, to be able to leave
SILENCE_P_MAX = 0.999     # a session surely the person's resets the CUSUM (log(1 - p) finite)


def silence_cusum(P: np.ndarray, mass_before: np.ndarray, n_before: int) -> np.ndarray:
    """Per person: the CUSUM, at the newest session, of the per-session log-likelihood
    ratio of "this person is gone" against "they still watch their share" over the
    sessions ``P`` (posterior per session and person; ``mass_before`` the persons' mass
    over the ``n_before`` sessions before them). A session that is not the person's is
    (1 - p_i) / (1 - w_i) times likelier under "gone" (w_i: the person's share of the
    sessions before session i), so the statistic is the largest sum of
    log(1 - p_i) - log(1 - w_i) over the runs that end at the newest session: the
    expected-run-length evidence of a silence, which the share test's fixed change
    points cut at 30 sessions and at checks. A session surely theirs resets it."""
    P = np.clip(np.asarray(P, dtype=np.float64), 0.0, SILENCE_P_MAX)
    n, k = P.shape
    if n == 0:
        return np.zeros(k)
    mass = np.asarray(mass_before, dtype=np.float64) + np.vstack((np.zeros((1, k)), np.cumsum(P, axis=0)[:-1]))
    seen = (n_before + np.arange(n))[:, None]
    share = np.clip(mass / np.maximum(seen, 1), 0.0, SILENCE_P_MAX)
    steps = np.log1p(-P) - np.log1p(-share)
    walk = np.vstack((np.zeros((1, k)), np.cumsum(steps, axis=0)))
    cusum = walk[-1] - walk.min(axis=0)
    return np.where(mass[-1] + P[-1] >= SILENCE_MIN_SESSIONS, cusum, 0.0)


def _masses(m: model_module.HouseholdModel) -> dict | None:
    """Per person and candidate change point: posterior mass before / after it."""
    mix = m.mixture
    if mix is None:
        return None
    X = m._buffer_X()
    n = X.shape[0]
    P = mix.predict_proba(X)
    cum = np.vstack((np.zeros((1, P.shape[1])), np.cumsum(P, axis=0)))
    looks = [r for r in TRACE_LOOKBACK if n - r >= TRACE_MIN_HISTORY]
    tail = min(TRACE_TAIL, n)
    return {"n": n, "ids": list(m.person_ids),
            # the silence replay (``silence_events``): each person's posterior on the newest
            # TRACE_TAIL sessions and their mass before them
            "tail_before": cum[n - tail].round(4).tolist(), "tail": P[n - tail:].round(3).tolist(),
            "old": {str(r): cum[n - r].round(4).tolist() for r in looks},
            "new": {str(r): (cum[n] - cum[n - r]).round(4).tolist() for r in looks}}


# The stream's paths that change the persons (``--paths``): refits (device-first or, with
# no personal device, as the batch fit), the BIC re-selection, the two newcomer tests.
PERSON_PATHS = ("_refit_on_device_evidence", "_reselect", "_birth_of_newcomer", "_newcomer_on_new_device")
_person_changes: list[dict] = []


def record_person_changes() -> None:
    """Wrap the stream's person-changing paths so that every change of the persons is
    logged with the session count and the path that made it (which path split a
    single-person stream, and when). Install before the worker processes fork."""
    for name in PERSON_PATHS:
        orig = getattr(model_module.HouseholdModel, name)
        if getattr(orig, "_records_person_changes", False):
            continue

        def wrapped(self, *args, _orig=orig, _name=name, **kw):
            before = (list(self.person_ids), self.device_group_count)
            result = _orig(self, *args, **kw)
            if (list(self.person_ids), self.device_group_count) != before:
                # the posterior mass (sessions) of each person the change brought in, over
                # the buffer: a born person's support at birth
                born = [j for j, pid in enumerate(self.person_ids) if pid not in before[0]]
                mass = (self.mixture.predict_proba(self._buffer_X())[:, born].sum(axis=0).round(1).tolist()
                        if born and self.mixture is not None else [])
                _person_changes.append({"at": int(self.n_sessions), "path": _name.strip("_"),
                                        "persons": [len(before[0]), len(self.person_ids)],
                                        "device_groups": [before[1], self.device_group_count],
                                        "born_mass": mass})
            return result
        wrapped._records_person_changes = True
        setattr(model_module.HouseholdModel, name, wrapped)


def _member_masses(m: model_module.HouseholdModel, h: worlds.WorldHousehold, b: int) -> dict:
    """Diagnosis only (truth): each person's posterior mass on the changed member's
    sessions so far, before and after the change (buffer row i = session i while the
    buffer holds every session)."""
    if not h.changes or m.buffer.shape[0] != b:
        return {}
    c = h.changes[0]
    P = m.mixture.predict_proba(m._buffer_X())
    mine = h.person[:b] == c.person
    after = np.arange(b) >= c.session_index
    return {"member": {"before": P[mine & ~after].sum(axis=0).round(3).tolist(),
                       "after": P[mine & after].sum(axis=0).round(3).tolist(),
                       "others_after": P[~mine & after].sum(axis=0).round(3).tolist()}}


def _one(h: worlds.WorldHousehold, trace: bool = False, arrival: int = E.STREAM_BATCH, first: int = 0) -> dict:
    ids, events, checks = [], [], []
    probs: list[dict[str, float]] = []
    arrival_persons: list[int] = []   # persons of the model that answered each session (0: cold start)
    _person_changes.clear()
    stream = E.ServiceStream(h)
    for a, b, m, out, new_events in stream.arrivals(arrival, first):
        events += [(b, ev["kind"]) for ev in new_events]
        probs += [{pid: float(p) for pid, p in zip(out.person_ids, row)} for row in out.probabilities]
        arrival_persons += [0 if m.active_variant == "cold_start" else m.n_persons] * (b - a)
        if trace and m.mixture is not None and m.since_check == 0 and b >= 2 * model_module.MIN_SESSIONS:
            checks.append({"at": b, "persons": m.n_persons, "birth": m.birth_statistics,
                           **(_masses(m) or {}),
                           **_member_masses(m, h, b)})
        m.birth_statistics = None
        ids += [out.person_ids[int(i)] for i in out.person_index]
    names = {n: i for i, n in enumerate(sorted(set(ids) | {k for p in probs for k in p}))}
    labels = np.array([names[i] for i in ids])
    settled = stream.settled()
    # what a caller of GET /v1/household sees: the persons of the model stored after each
    # arrival (its count is the household's size there), and at the end
    shown = np.array(arrival_persons)
    change = h.changes[0] if h.changes else None
    t = h.start_ts
    quarters = (t[-1] - t[E.WARMUP_SESSIONS]) / E.QUARTER_S if h.n_sessions > E.WARMUP_SESSIONS else 0.0
    correct = matched_correct(h.person, labels)
    extra = {}
    if trace:
        # the loss decomposition of ``diagnose`` compares each answer with the batch fit's
        batch_labels, _ = E.hearth_batch(h)
        extra = {"arrival_persons": arrival_persons,
                 "arrival_correct": correct.astype(int).tolist(),
                 "batch_correct": matched_correct(h.person, np.asarray(batch_labels)).astype(int).tolist(),
                 # each id answered at arrival read as its majority person (several ids may be
                 # one person's): what renames and splits of one person cost
                 "majority_correct": majority_correct(h.person, labels).astype(int).tolist(),
                 "settled_correct": matched_correct(h.person, np.asarray(settled.person_index)).astype(int).tolist()}
        if PERIODIC_REFIT:
            extra["periodic_correct"] = periodic_refit_correct(h, PERIODIC_REFIT).astype(int).tolist()
    return {"id": h.household_id, "family": h.family, "persons": h.n_persons, "sessions": h.n_sessions,
            "change": (change.kind, change.session_index) if change else None, "quarters": quarters,
            "correct": correct.tolist(), "accuracy": float(correct.mean()),
            "ids_used": int(np.unique(labels).size), "events": events, "checks": checks,
            "id_sessions": {i: ids.count(i) for i in dict.fromkeys(ids)},
            "final_persons": int(stream.envelope.model.n_persons),
            "settled_ids": int(np.unique(settled.person_index).size),
            "sessions_shown_split": int((shown > 1).sum()),
            # each change with the members (>= 3 sessions so far) it was made among (truth,
            # for the diagnosis only: was a rise in persons a real member?)
            "person_changes": [{**c, "members_seen": int((np.bincount(h.person[:c["at"]]) >= 3).sum())}
                               for c in _person_changes],
            # the service's own paths: its drift alarms (sessions so far, type) and full
            # refits (sessions so far, reason), and the answers for the summaries
            "drift_alarms": stream.drift, "refits": stream.refits,
            "_answers": (labels, E.columns(probs, sorted(names)), settled.person_index, settled.probabilities),
            **extra}


# --periodic-refit N (trace runs): each session is also answered by HouseholdModel.fit on
# every session before the last multiple of N (ids matched fit to fit), the ceiling of a
# stream that refits in full every N sessions (docs/clustering.md, "Where the stream loses
# to the batch fit")
PERIODIC_REFIT = 0


def majority_correct(truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label read as the true person most of its sessions belong to."""
    out = np.zeros(truth.size, dtype=bool)
    for lab in np.unique(labels):
        sel = labels == lab
        out[sel] = truth[sel] == np.bincount(truth[sel]).argmax()
    return out


def periodic_refit_correct(h: worlds.WorldHousehold, every: int) -> np.ndarray:
    """Answers at arrival of a stream that refits in full (HouseholdModel.fit on every
    session so far) at each multiple of ``every`` from MIN_SESSIONS, each arrival answered
    by the last fit (before the first: one person); a fit's persons take the ids of the
    previous fit's persons they share most sessions with (Hungarian), new ids otherwise;
    scored as the stream (one Hungarian match of ids to persons over the household)."""
    from scipy.optimize import linear_sum_assignment
    n = h.n_sessions
    labels = np.zeros(n, dtype=np.int64)
    prev: np.ndarray | None = None   # global ids of the last fit's sessions
    mapping: np.ndarray = np.zeros(1, dtype=np.int64)
    next_id = 1
    model = None
    fit_at = model_module.MIN_SESSIONS
    for i in range(n):
        if i >= fit_at and (i - model_module.MIN_SESSIONS) % every == 0:
            model = model_module.HouseholdModel().fit(h.features[:i], device_ids=h.device_id[:i])
            own = model.assign_batch(h.features[:i], device_ids=h.device_id[:i], included=True).person_index
            k = int(own.max()) + 1
            mapping = np.full(k, -1, dtype=np.int64)
            if prev is not None:
                g = int(prev.max()) + 1
                C = np.zeros((k, g))
                np.add.at(C, (own[:prev.size], prev), 1)   # the sessions both fits hold
                r, c = linear_sum_assignment(-C)
                ok = C[r, c] > 0
                mapping[r[ok]] = c[ok]
            for j in range(k):
                if mapping[j] < 0:
                    mapping[j], next_id = next_id, next_id + 1
            prev = mapping[own]
        if model is not None:
            labels[i] = mapping[int(model.assign_batch(h.features[i:i + 1], device_ids=h.device_id[i:i + 1]).person_index[0])]
    return matched_correct(h.person, labels)


def arrival_decomposition(outs: list[dict]) -> dict | None:
    """A --trace run's answers at arrival beside the same sessions' other answers:
    the ids read as their majority person (renames, one person's several ids), the
    settled answers of the last model, the periodic refit (--periodic-refit) and the
    batch fit; and the same by the session's position in its stream."""
    rows = [o for o in outs if "arrival_correct" in o]
    if not rows:
        return None
    keys = [k for k in ("arrival", "majority", "periodic", "settled", "batch") if f"{k}_correct" in rows[0]]
    total = {k: float(np.mean(np.concatenate([o[f"{k}_correct"] for o in rows]))) for k in keys}
    bands = ((0, 10), (10, 20), (20, 40), (40, 80), (80, 160), (160, 320), (320, 10 ** 9))
    by_band = {}
    for lo, hi in bands:
        parts = {k: np.concatenate([np.asarray(o[f"{k}_correct"][lo:hi]) for o in rows]) for k in keys}
        n = parts["arrival"].size
        if n:
            by_band[f"{lo}-{hi if hi < 10 ** 9 else ''}"] = {"share": round(n / sum(len(o["arrival_correct"]) for o in rows), 3),
                                                           **{k: round(float(v.mean()), 3) for k, v in parts.items()}}
    return {"accuracy": {k: round(v, 4) for k, v in total.items()}, "by_position": by_band}


def rise_path(change: dict) -> str:
    """The kind of a logged rise in persons (``--paths``), for the singles diagnosis."""
    path, (g0, g1) = change["path"], change["device_groups"]
    if path == "refit_on_device_evidence":
        if g0 == g1 == 0:
            return "shared-only refit"
        if g1 > g0 and g0 > 0:
            return "device refit: a device group more (one owner's devices told apart)"
        return "device refit: a person born beside the device groups"
    return {"birth_of_newcomer": "newcomer test", "newcomer_on_new_device": "new-device newcomer test",
            "reselect": "BIC re-selection"}.get(path, path)


def singles_diagnosis(outs: list[dict]) -> dict:
    """The single-person streams of a ``--paths`` run: which ever showed a second person,
    by which path (the first rise in persons), when (sessions so far), how many sessions
    were answered with the extra ids, and whether the stream ended on one person again
    (the id answered, then dropped) or kept two. Beside it, singles kept by each
    definition: ids answered at arrival (``bench.accuracy``'s streaming figure), ids in
    the settled answers (the final model on every session), the final model's person
    count (the household size GET /v1/household reports at the end), and never shown as
    more than one person at any arrival."""
    singles = [o for o in outs if o["persons"] == 1]
    rows = []
    for o in singles:
        rises = [c for c in o["person_changes"] if c["persons"][1] > c["persons"][0]]
        if o["ids_used"] == 1 and o["final_persons"] == 1 and o["sessions_shown_split"] == 0:
            continue
        first = rises[0] if rises else None
        top = max(o["id_sessions"].values())
        rows.append({"id": o["id"], "path": rise_path(first) if first else "first fit",
                     "at": first["at"] if first else None, "rises": len(rises),
                     "ids_at_arrival": o["ids_used"], "extra_id_sessions": o["sessions"] - top,
                     "sessions": o["sessions"], "sessions_shown_split": o["sessions_shown_split"],
                     "final_persons": o["final_persons"],
                     "outcome": "kept" if o["final_persons"] > 1 else "dropped"})
    if not singles:
        return {"households": 0}
    n = len(singles)
    by_path: dict[str, dict[str, int]] = {}
    for r in rows:
        d = by_path.setdefault(r["path"], {"households": 0, "dropped": 0, "kept": 0})
        d["households"] += 1
        d[r["outcome"]] += 1
    return {"households": len(singles),
            "kept_ids_at_arrival": sum(o["ids_used"] == 1 for o in singles) / n,
            "kept_settled_ids": sum(o["settled_ids"] == 1 for o in singles) / n,
            "kept_final_model": sum(o["final_persons"] == 1 for o in singles) / n,
            "kept_never_shown_split": sum(o["sessions_shown_split"] == 0 for o in singles) / n,
            "sessions_shown_split": sum(o["sessions_shown_split"] for o in singles) / max(
                sum(o["sessions"] for o in singles), 1),
            "by_path": by_path, "households_split": rows}


# The join/leave suite (``--change-suite W``): TUNING families only, its own TUNING seed
# (never the REPORTING one), W worlds per family; in each world SUITE_CHANGED households
# of 2-4 members with a member joining or leaving forced (the world's own generator and
# parameters otherwise: a joiner has a personal device of their own as often as the
# world's members do) and SUITE_STABLE households drawn as the world draws them with no
# change, so that detection and false alarms are measured on the same worlds. The regular
# TUNING split has 46 changes on two seeds (13 joins on seed 2): a choice made on a
# handful of joins did not carry over to REPORTING.
SUITE_SEED = 20_260_015
SUITE_CHANGED = 8
SUITE_STABLE = 6


def change_suite(worlds_per_family: int, seed: int = SUITE_SEED) -> list[worlds.WorldHousehold]:
    """The join/leave suite's households (see SUITE_SEED): changed ones first."""
    if seed in worlds.REPORT_ONLY_SEEDS:
        raise ValueError(f"the change suite never uses a report-only seed ({seed}: worlds.REPORT_ONLY_SEEDS)")
    changed, stable = [], []
    for f in worlds.TUNING.families:
        fam_index = list(worlds.FAMILIES).index(f)
        for w in range(worlds_per_family):
            world_ss, *house_ss = np.random.SeedSequence([seed, fam_index, w]).spawn(
                1 + 4 * SUITE_CHANGED + SUITE_STABLE)
            world = worlds.make_world(f, np.random.default_rng(world_ss), f"suite-{f}-w{w}")
            forced = dataclasses.replace(world, params={**world.params, "join_leave_p": 1.0})
            quiet = dataclasses.replace(world, params={**world.params, "join_leave_p": 0.0})
            made = 0
            for i, ss in enumerate(house_ss[SUITE_STABLE:]):
                if made == SUITE_CHANGED:
                    break
                rng = np.random.default_rng(ss)
                h = worlds.make_household(forced, rng, f"s{f[:4]}{w}c{i}", force_size=int(rng.integers(2, 5)))
                if h.changes:   # a change too early or late in the stream is not kept by the generator
                    changed.append(h)
                    made += 1
            stable += [worlds.make_household(quiet, np.random.default_rng(ss), f"s{f[:4]}{w}s{i}")
                       for i, ss in enumerate(house_ss[:SUITE_STABLE])]
    return changed + stable


def change_evidence(h: worlds.WorldHousehold) -> dict | None:
    """Truth, for the diagnosis only: what the changed member's sessions carry that the
    others' do not, in the 30 sessions after a join (before a leave): how many there are,
    how many on a personal device of their own first seen then (a join) / used by
    nobody else (a leave), on shared devices, and how far their viewing hours sit from
    the others' (circular distance of the mean hour, hours) and their genre mix (total
    variation distance of the mean genre vectors)."""
    if not h.changes:
        return None
    c = h.changes[0]
    w = E.DETECTION_WINDOW
    seg = np.arange(c.session_index, min(c.session_index + w, h.n_sessions)) if c.kind == "join" else \
        np.arange(max(c.session_index - w, 0), c.session_index)
    mine = h.person == c.person
    in_seg = np.zeros(h.n_sessions, bool)
    in_seg[seg] = True
    personal = np.isin(h.device_type, worlds.PERSONAL_TYPES)
    others_devices = set(h.device_id[~mine].tolist())
    before_devices = set(h.device_id[:c.session_index].tolist())
    own_dev = np.array([d not in others_devices for d in h.device_id]) & personal
    fresh = np.array([d not in before_devices for d in h.device_id]) & personal
    hour = ((h.start_ts % 86_400) / 3600.0) * (2 * np.pi / 24)

    def mean_hour(sel):
        return np.angle(np.exp(1j * hour[sel]).mean()) * 24 / (2 * np.pi) if sel.any() else np.nan

    gap = abs(mean_hour(mine) - mean_hour(~mine)) % 24
    gen = h.features[:, F.GENRE]
    tv = 0.5 * float(np.abs(gen[mine].mean(axis=0) - gen[~mine].mean(axis=0)).sum()) if (~mine).any() else 0.0
    return {"kind": c.kind, "at": c.session_index,
            "member_sessions_in_window": int((mine & in_seg).sum()),
            "on_own_personal_device": int((mine & in_seg & own_dev).sum()),
            "on_fresh_personal_device": int((mine & in_seg & fresh).sum()) if c.kind == "join" else None,
            "on_shared": int((mine & in_seg & ~personal).sum()),
            "hour_gap": round(float(min(gap, 24 - gap)), 2), "genre_tv": round(tv, 3)}


def evidence_class(ev: dict) -> str:
    """The kind of evidence a change leaves in its window (``change_evidence``)."""
    if ev["member_sessions_in_window"] <= 4:
        return "at most 4 sessions"
    own = ev["on_fresh_personal_device"] if ev["kind"] == "join" else ev["on_own_personal_device"]
    if own >= 2:
        return "own personal device"
    return "shared devices, hours apart (>= 3 h)" if ev["hour_gap"] >= 3 else "shared devices, same hours"


def by_evidence(outs: list[dict], hs: list[worlds.WorldHousehold]) -> dict:
    """Detection within the window (any event / same kind) and delay per kind of change
    and kind of evidence (``evidence_class``), and which stream paths raised the first
    event in the window."""
    by_id = {h.household_id: h for h in hs}
    rows: dict[str, dict] = {}
    for o in outs:
        h = by_id[o["id"]]
        ev = change_evidence(h)
        if ev is None:
            continue
        c = ev["at"]
        hits = [(a, k) for a, k in o["events"] if c <= a <= c + E.DETECTION_WINDOW]
        keys = [f"{ev['kind']}: {evidence_class(ev)}"]
        # a --trace run: did the model ever hold as many persons as the members with
        # >= 3 sessions by the window's end, at a check in the window? ("short": never)
        held = [ch["persons"] for ch in o["checks"] if c <= ch["at"] <= c + E.DETECTION_WINDOW]
        if held:
            members = int((np.bincount(h.person[:c + E.DETECTION_WINDOW]) >= 3).sum())
            keys.append(f"{ev['kind']}: model {'short' if max(held) < members else 'enough'} in the window")
        for key in keys:
            r = rows.setdefault(key, {"changes": 0, "detected": 0, "same_kind": 0, "delays": []})
            r["changes"] += 1
            r["detected"] += bool(hits)
            r["same_kind"] += any(k == ev["kind"] for _, k in hits)
            if hits:
                r["delays"].append(hits[0][0] - c)
    return {k: {**{x: v[x] for x in ("changes", "detected", "same_kind")},
                "mean_delay": round(float(np.mean(v["delays"])), 1) if v["delays"] else None}
            for k, v in sorted(rows.items())}


def select(hs: list[worlds.WorldHousehold], limit: int | None) -> list[worlds.WorldHousehold]:
    changed = [h for h in hs if h.changes]
    stable = [h for h in hs if not h.changes]
    if limit is not None:
        stable = stable[:max(limit - len(changed), 0)]
    return changed + stable


@dataclass(frozen=True)
class Thresholds:
    """The share test's and the newcomer test's thresholds (model.py names)."""
    join_h: float = model_module.CHANGE_GLR_H
    leave_h: float = model_module.LEAVE_GLR_H
    min_history: int = model_module.CHANGE_MIN_HISTORY
    lookback: tuple[int, ...] = model_module.CHANGE_LOOKBACK
    join_min_sessions: float = model_module.JOIN_MIN_SESSIONS
    join_min_ratio: float = model_module.JOIN_MIN_RATIO
    leave_min_old_share: float = model_module.LEAVE_MIN_OLD_SHARE
    leave_max_ratio: float = model_module.LEAVE_MAX_RATIO
    birth_h: float = float("inf")
    birth_min_gain: float = model_module.BIRTH_MIN_GAIN
    anchored_h: float = float("inf")      # the anchored newcomer test's total gain (nats)
    anchored_min_mass: float = 4.0        # ... the newcomer's sessions since the change point
    anchored_min_history: int = 10        # ... sessions before the change point
    anchored_max_free: float = float("inf")  # ... gain of the free newcomer / anchored gain at most this
    anchored_lookback: tuple[int, ...] = (10, 20, 30)
    anchored_null: str = "max"            # the gain minus the earlier windows' "max" / "mean" / "none"
    anchored_min_earlier: int = 1         # ... earlier windows needed
    anchored_min_new_device: int = 0      # ... sessions on personal devices first seen in the window


def anchored_fires(b: dict | None, n: int, t: Thresholds) -> bool:
    """Would the anchored newcomer test have added a person at this check?"""
    for a in (b or {}).get("anchored", []):
        if a["r"] not in t.anchored_lookback or n - a["r"] < t.anchored_min_history:
            continue
        earlier = a.get("earlier", [])
        if len(earlier) < t.anchored_min_earlier:
            continue
        null = {"max": max(earlier, default=0.0), "mean": float(np.mean(earlier)) if earlier else 0.0,
                "none": 0.0}[t.anchored_null]
        if a["mass"] < t.anchored_min_mass or a["gain"] - null < t.anchored_h:
            continue
        if a["new_device_sessions"] < t.anchored_min_new_device:
            continue
        if a["gain_free"] is not None and a["gain_free"] > t.anchored_max_free * a["gain"]:
            continue
        return True
    return False


def _arrays(c: dict, r: int) -> tuple[np.ndarray, np.ndarray]:
    cache = c.setdefault("_arrays", {})
    if r not in cache:
        cache[r] = (np.array(c["old"][str(r)]), np.array(c["new"][str(r)]))
    return cache[r]


def _share_test_scores(looks, counts_of, n: int, t) -> tuple[np.ndarray, np.ndarray]:
    """The stream's join / leave scores at ``n`` sessions: per person, the largest
    share-change log-likelihood ratio over the lookbacks ``looks`` that passes the join
    (leave) gate. ``counts_of(r)`` gives (sessions before the last r, sessions in them)
    per person."""
    join = leave = 0.0            # scores are floored at zero: a share that moved the other way
    for r in looks:
        old, new = counts_of(r)
        llr = model_module._share_change_llr(old, n - r, new, r)
        share_old, share_new = old / (n - r), new / r
        up = (new >= t.join_min_sessions) & (share_new >= t.join_min_ratio * share_old)
        down = (share_old >= t.leave_min_old_share) & (share_new <= t.leave_max_ratio * share_old)
        join = np.maximum(join, np.where(up, llr, 0.0))
        leave = np.maximum(leave, np.where(down, llr, 0.0))
    return join, leave


def replay(o: dict, t: Thresholds) -> list[tuple[int, str]]:
    """The composition events ``_detect_composition`` would have raised on this traced
    stream with thresholds ``t`` (plus the newcomer test's, approximately)."""
    joined, inactive, events = set(), set(), []
    last_birth = -10 ** 9
    for c in o["checks"]:
        if "n" not in c:
            continue
        n = c["n"]
        looks = [r for r in t.lookback if n - r >= t.min_history and str(r) in c["old"]]
        b = c["birth"]
        fires = b and b["llr"] >= t.birth_h and b["gain"] >= t.birth_min_gain and n - max(t.lookback) >= 0
        # A newcomer once added is in the model: the next checks would not add them again.
        if (fires or anchored_fires(b, n, t)) and c["at"] - last_birth > 30:
            events.append((c["at"], "join"))
            last_birth = c["at"]
        if not looks or (len(c["ids"]) < 2 and not inactive):
            continue
        join, leave = _share_test_scores(looks, lambda r: _arrays(c, r), n, t)
        since = np.array(c["new"][str(looks[0])])
        for j, pid in enumerate(c["ids"]):
            if join[j] >= t.join_h and pid not in joined:
                joined.add(pid)
                events.append((c["at"], "join"))
            if leave[j] >= t.leave_h and pid not in inactive:
                inactive.add(pid)
                events.append((c["at"], "leave"))
            elif pid in inactive and since[j] >= 2.0:
                inactive.discard(pid)
    return events


def silence_replay(o: dict, silence_h: float, share_leave_h: float = model_module.LEAVE_GLR_H,
                   t: Thresholds = Thresholds(), only_new: bool = False) -> list[tuple[int, str]]:
    """The events of a traced stream (``--trace``/``--light-trace``, which keeps each
    check's per-session posteriors on the newest TRACE_TAIL sessions) had its leaves
    been the share test's at ``share_leave_h`` or the silence CUSUM's
    (``silence_cusum``) at ``silence_h``, as ``_detect_composition`` decides
    them (one reported leave per absence, a person back again with >= 2 sessions
    since the nearest change point may leave again). Leaves change no person, so the
    stream's other events (joins: share test and newcomer tests) are its own.
    ``only_new``: only the leaves the silence CUSUM raises where the share test's
    replay does not (to add to the stream's own events: a trace also holds a check
    after each full refit, where the stream ran none, so the share test's replayed
    leaves are not exactly the stream's)."""
    events = [] if only_new else [(a, k) for a, k in o["events"] if k != "leave"]
    inactive: set[str] = set()
    for c in o["checks"]:
        if "tail" not in c:
            continue
        n = c["n"]
        looks = [r for r in t.lookback if n - r >= t.min_history and str(r) in c["old"]]
        if not looks or (len(c["ids"]) < 2 and not inactive):
            continue
        _, leave = _share_test_scores(looks, lambda r: _arrays(c, r), n, t)
        tail = np.array(c["tail"], dtype=np.float64).reshape(-1, len(c["ids"]))
        silent = silence_cusum(tail, np.array(c["tail_before"]), n - tail.shape[0])
        since = np.array(c["new"][str(looks[0])])
        for j, pid in enumerate(c["ids"]):
            if (leave[j] >= share_leave_h or silent[j] >= silence_h) and pid not in inactive:
                inactive.add(pid)
                if not only_new or leave[j] < share_leave_h:
                    events.append((c["at"], "leave"))
            elif pid in inactive and since[j] >= 2.0:
                inactive.discard(pid)
    return sorted(events)


def sweep(outs: list[dict], hs: list[worlds.WorldHousehold], t: Thresholds) -> dict:
    """composition_scores had the thresholds been ``t`` (traces of a --trace run); false
    alarms counted from the first session the share test can fire at, when that is
    before the bench's warm-up."""
    warmup = min(E.WARMUP_SESSIONS, t.min_history + min(t.lookback) - 1)
    return E.composition_scores(hs, [replay(o, t) for o in outs], warmup=warmup)


def newcomer_events(o: dict, landed: Thresholds = Thresholds()) -> list[tuple[int, str]]:
    """The events of a traced stream that its share test did not raise: the newcomer
    tests' joins (they changed the model, so ``replay`` cannot re-run them). The share
    test's are the ones ``replay`` reproduces at the bars the stream ran with
    (``landed``); each is taken out once."""
    share: dict[tuple[int, str], int] = {}
    for ev in replay(o, landed):
        share[ev] = share.get(ev, 0) + 1
    out = []
    for a, k in o["events"]:
        if share.get((a, k), 0) > 0:
            share[(a, k)] -= 1
        else:
            out.append((a, k))
    return out


def rebarred_events(o: dict, t: Thresholds, landed: Thresholds = Thresholds()) -> list[tuple[int, str]]:
    """The events of a traced stream had the share test run at ``t``: its newcomer
    events as raised, its share-test events replayed at ``t``. Exact for a leave bar
    (a leave changes no person); for a join bar approximate (a reported join keeps its
    person through refits, NEWCOMER_GRACE), and a trace holds a check after each full
    refit where the stream ran none, so compare with this function at ``landed``, not
    with the stream's own figures."""
    return sorted(newcomer_events(o, landed) + replay(o, t))


RESWEEP_GRID = tuple((j, lv, r, lr) for j in (2.5, 3.0, 4.0) for lv in (4.0, 5.0, 6.0)
                     for r in (4.0, 8.0) for lr in (0.25, 0.4))


def resweep(sets: list[tuple[list[dict], list[worlds.WorldHousehold]]],
            grid=RESWEEP_GRID) -> list[dict]:
    """``rebarred_events`` over a grid of (join bar, leave bar, join ratio, leave ratio),
    scored per trace and pooled (detection over all changes, false alarms over all
    stable household-quarters)."""
    rows = []
    for jh, lh, jr, lr in grid:
        t = Thresholds(join_h=jh, leave_h=lh, join_min_ratio=jr, leave_max_ratio=lr)
        per = [E.composition_scores(hs, [rebarred_events(o, t) for o in outs]) for outs, hs in sets]
        changes = sum(s["changes"] for s in per)
        quarters = sum(s["stable_household_quarters"] for s in per)
        rows.append({"join_h": jh, "leave_h": lh, "join_min_ratio": jr, "leave_max_ratio": lr,
                     "detected": round(sum((s["detection_rate"] or 0.0) * s["changes"] for s in per) / changes, 3)
                     if changes else None,
                     "false_alarms": round(sum((s["false_alarms_per_household_quarter"] or 0.0)
                                               * s["stable_household_quarters"] for s in per) / quarters, 3)
                     if quarters else None,
                     "per_trace": [(round(s["detection_rate"] or 0.0, 3),
                                    round(float(s["false_alarms_per_household_quarter"] or 0.0), 3)) for s in per]})
    return rows


def diagnose(outs: list[dict], hs: list[worlds.WorldHousehold]) -> dict:
    """Why each change of a --trace run was missed (truth: the ``member`` masses), the
    first class that fits: found within the window; found 31-50 sessions after; a
    newcomer with at most 4 of the 30 sessions after the join; no person of their own in
    the model within the window (a newcomer: with two or more persons, one takes at least
    half of the member's post-change mass and the member is at least half of that
    person's; a leaver: with two or more persons, one holds 60 % of their sessions);
    else a person of their own whose share test stayed below its bar."""
    by_id = {h.household_id: h for h in hs}
    counts: dict[str, dict[str, int]] = {"join": {}, "leave": {}}
    for o in outs:
        if not o["change"]:
            continue
        kind, c = o["change"]
        h = by_id[o["id"]]
        if any(c <= a <= c + E.DETECTION_WINDOW for a, _ in o["events"]):
            cls = "detected"
        elif any(c + E.DETECTION_WINDOW < a <= c + 50 for a, _ in o["events"]):
            cls = "found 31-50 sessions after"
        elif kind == "join" and (h.person[c:c + E.DETECTION_WINDOW] == h.changes[0].person).sum() <= 4:
            cls = "at most 4 sessions in the 30 after"
        else:
            own = False
            for ch in o["checks"]:
                if "member" not in ch or not c <= ch["at"] <= c + E.DETECTION_WINDOW or ch["persons"] < 2:
                    continue
                m = ch["member"]
                if kind == "join":
                    aft, oth = np.array(m["after"]), np.array(m["others_after"])
                    j = int(aft.argmax())
                    own |= aft.sum() >= 2 and aft[j] >= 0.5 * aft.sum() and aft[j] >= 0.5 * (aft[j] + oth[j])
                else:
                    bef = np.array(m["before"])
                    own |= bef.max() >= 0.6 * max(bef.sum(), 1e-9)
            cls = "own person, below the bar" if own else "no person of their own"
        counts[kind][cls] = counts[kind].get(cls, 0) + 1
    return counts


def oracle_silence_events(h: worlds.WorldHousehold, silence_h: float,
                          share_leave_h: float = model_module.LEAVE_GLR_H,
                          t: Thresholds = Thresholds()) -> list[tuple[int, str]]:
    """``oracle_events`` with the leaves of ``silence_replay``: the share test's joins,
    and a leave when the share test's leave ratio reaches ``share_leave_h`` or the
    silence CUSUM on the true persons (one-hot posteriors, the newest TRACE_TAIL
    sessions) reaches ``silence_h``."""
    P = np.eye(h.n_persons)[h.person]
    cum = np.vstack((np.zeros((1, h.n_persons)), np.cumsum(P, axis=0)))
    joined, inactive, events = set(), set(), []
    for n in range(2 * model_module.MIN_SESSIONS, h.n_sessions + 1, model_module.RESELECT_EVERY):
        looks = [r for r in t.lookback if n - r >= t.min_history]
        if not looks:
            continue
        join, leave = _share_test_scores(looks, lambda r: (cum[n - r], cum[n] - cum[n - r]), n, t)
        tail = min(TRACE_TAIL, n)
        silent = silence_cusum(P[n - tail:n], cum[n - tail], n - tail) if np.isfinite(silence_h) \
            else np.zeros(h.n_persons)
        since = cum[n] - cum[n - looks[0]]
        for j in range(h.n_persons):
            if join[j] >= t.join_h and j not in joined:
                joined.add(j)
                events.append((n, "join"))
            if (leave[j] >= share_leave_h or silent[j] >= silence_h) and j not in inactive:
                inactive.add(j)
                events.append((n, "leave"))
            elif j in inactive and since[j] >= 2.0:
                inactive.discard(j)
    return events


def leave_anatomy(hs: list[worlds.WorldHousehold], bar: float) -> dict:
    """Truth, for the diagnosis only: each leave as the change suite defines it (the
    first session at or after the leaver's last day; detection counts an event at a
    check — every RESELECT_EVERY sessions — within DETECTION_WINDOW sessions of it):
    the leaver's share of the sessions before, sessions since their last one at the
    leave, sessions of the household in the window (the stream may end sooner), and
    the most silence evidence any test of their share could hold at a check in the
    window, -L log(1 - share) nats, L = sessions since their last one (the silence
    CUSUM on the true persons). ``bar``: the evidence a stable household's members
    reach by chance at most once a quarter (the true persons' silence bar within the
    budget); a leave below it at every check in its window is indistinguishable from
    chance there, by anyone who knows only who watched."""
    rows = []
    for h in hs:
        if not h.changes or h.changes[0].kind != "leave":
            continue
        c = h.changes[0]
        mine = np.flatnonzero(h.person[:c.session_index] == c.person)
        share = mine.size / c.session_index
        checks = [n for n in range(2 * model_module.MIN_SESSIONS, h.n_sessions + 1, model_module.RESELECT_EVERY)
                  if c.session_index <= n <= c.session_index + E.DETECTION_WINDOW]
        silence = max(checks, default=0) - 1 - (mine[-1] if mine.size else -1)
        nats = float(-silence * np.log1p(-share)) if checks else 0.0
        rows.append({"id": h.household_id, "members": h.n_persons, "at": c.session_index,
                     "share": round(share, 3), "silent_before": int(c.session_index - 1 - mine[-1]) if mine.size else None,
                     "sessions_after": int(min(E.DETECTION_WINDOW, h.n_sessions - c.session_index)),
                     "checks_in_window": len(checks), "silence_at_last_check": int(silence),
                     "silence_nats": round(nats, 2), "detectable": nats >= bar})

    def why(r):
        if r["detectable"]:
            return "detectable"
        if r["sessions_after"] < 20:
            return "below the bar: the stream ends < 20 sessions after the leave"
        if r["share"] < 0.2:
            return "below the bar: share < 0.20"
        return "below the bar: share >= 0.20, silence too short"
    classes: dict[str, int] = {}
    for r in rows:
        classes[why(r)] = classes.get(why(r), 0) + 1
    return {"bar": bar, "leaves": len(rows), "classes": classes, "rows": rows}


def silence_report(outs: list[dict], hs: list[worlds.WorldHousehold], bar: float = 8.0,
                   silence_bars: tuple[float, ...] = (5, 6, 7, 8, 9, 10, 12, 15)) -> dict:
    """``--leaves``: the leaves' anatomy (``leave_anatomy`` at ``bar``), the stream's and
    the true persons' share test's detection on the whole set and on the detectable
    leaves, and the silence CUSUM replayed on the traced stream, added to the share
    test's leaves (``union``) or instead of them (``instead``)."""
    an = leave_anatomy(hs, bar)
    detectable = {r["id"] for r in an["rows"] if r["detectable"]}

    def on_detectable(evs):
        return sum(any(h.changes[0].session_index <= a <= h.changes[0].session_index + E.DETECTION_WINDOW
                       for a, _ in e) for h, e in zip(hs, evs) if h.household_id in detectable)

    def summary(evs):
        sc = E.composition_scores(hs, evs)
        return {**{k: sc[k] for k in ("detection_rate", "detection_rate_by_kind", "mean_delay_sessions_by_kind",
                                      "false_alarms_per_household_quarter",
                                      "false_alarms_per_household_quarter_by_kind")},
                "detectable_leaves_found": on_detectable(evs), "detectable_leaves": len(detectable)}
    base = [[tuple(e) for e in o["events"]] for o in outs]
    out = {"anatomy": an, "stream": summary(base), "true_persons_share_test": summary([oracle_events(h) for h in hs])}
    for h_ in silence_bars:
        out[f"union_{h_}"] = summary([sorted(b + silence_replay(o, h_, only_new=True)) for b, o in zip(base, outs)])
        out[f"instead_{h_}"] = summary([silence_replay(o, h_, float("inf")) for o in outs])
    return out


def oracle_events(h: worlds.WorldHousehold, t: Thresholds = Thresholds()) -> list[tuple[int, str]]:
    """The share test of ``_detect_composition`` run on the TRUE persons (each session's
    posterior one-hot on its member) at the stream's checks (every RESELECT_EVERY
    sessions from 2 * MIN_SESSIONS): the composition events a stream whose persons were
    exactly the household's members would raise. The ceiling of the share test."""
    return oracle_silence_events(h, float("inf"), t.leave_h, t)


def ceiling(hs: list[worlds.WorldHousehold]) -> dict:
    """Given the true persons, how many changes can be detected within the window at
    all: the changed member's sessions in the window (a newcomer's in the 30 after the
    join, a leaver's in the 30 before the leave), and the share test on the true persons
    (``oracle_events``: detection and false alarms per household-quarter, the ceiling of
    tuning the persons alone at the current bars)."""
    window = E.DETECTION_WINDOW
    sessions: dict[str, list[int]] = {"join": [], "leave": []}
    for h in hs:
        if h.changes:
            c = h.changes[0]
            seg = slice(c.session_index, c.session_index + window) if c.kind == "join" else \
                slice(max(c.session_index - window, 0), c.session_index)
            sessions[c.kind].append(int((h.person[seg] == c.person).sum()))
    oracle = E.composition_scores(hs, [oracle_events(h) for h in hs])
    # the best the share test could do on the true persons at the budget, over its bars
    best = None
    for join_h, leave_h, ratio, leave_ratio in ((a, b, c, d) for a in (3.0, 4.0, 6.0, 8.0)
                                                for b in (4.0, 6.0, 8.0, 12.0) for c in (4.0, 8.0)
                                                for d in (0.25, 0.5)):
        t = Thresholds(join_h=join_h, leave_h=leave_h, join_min_ratio=ratio, leave_max_ratio=leave_ratio)
        sc = E.composition_scores(hs, [oracle_events(h, t) for h in hs])
        fa = sc["false_alarms_per_household_quarter"] or 0.0
        if sc["detection_rate"] is None:
            break
        if fa <= 1.0 and (best is None or sc["detection_rate"] > best["detection_rate"]):
            best = {"detection_rate": sc["detection_rate"], "false_alarms_per_household_quarter": fa,
                    "join_h": join_h, "leave_h": leave_h, "join_min_ratio": ratio, "leave_max_ratio": leave_ratio}
    return {"true_persons_best_bars_within_budget": best,"member_sessions_in_window": {k: {"n": len(v), "at_most_4": sum(x <= 4 for x in v),
                                               "median": float(np.median(v)) if v else None}
                                           for k, v in sessions.items()},
            "true_persons_share_test": {k: oracle[k] for k in (
                "detection_rate", "detection_rate_by_kind", "detection_rate_same_kind",
                "false_alarms_per_household_quarter", "changes", "stable_household_quarters")}}


def arrival_loss(outs: list[dict], hs: list[worlds.WorldHousehold]) -> dict | None:
    """Where the answers at arrival lose to the batch fit of the same household (a
    --trace run: each session's arrival and batch correctness, the persons of the model
    that answered it). Every session falls in one class: answered in cold start (before
    the first fit); answered by a model with fewer persons than members seen so far
    (with >= 3 sessions by then: a late birth); else enough persons (stale parameters,
    renames, over-splits). Loss = (batch right - arrival right) / all sessions, so the
    three sum to the batch - arrival gap."""
    by_id = {h.household_id: h for h in hs}
    rows = [o for o in outs if "arrival_correct" in o]
    if not rows:
        return None
    total = sum(len(o["arrival_correct"]) for o in rows)
    acc = {c: {"sessions": 0, "arrival_right": 0, "batch_right": 0} for c in ("cold", "late", "enough")}
    late_shared_only = 0
    for o in rows:
        h = by_id[o["id"]]
        shared_only = not np.isin(h.device_type, worlds.PERSONAL_TYPES).any()
        counts = np.zeros(h.n_persons, dtype=int)
        for i, (p, ar, br) in enumerate(zip(o["arrival_persons"], o["arrival_correct"], o["batch_correct"])):
            counts[h.person[i]] += 1
            seen = int((counts >= 3).sum())
            cls = "cold" if p == 0 else "late" if p < seen else "enough"
            acc[cls]["sessions"] += 1
            acc[cls]["arrival_right"] += ar
            acc[cls]["batch_right"] += br
            late_shared_only += (br - ar) if cls == "late" and shared_only else 0
    out = {}
    for c, v in acc.items():
        out[c] = {"share": round(v["sessions"] / total, 3),
                  "arrival_acc": round(v["arrival_right"] / max(v["sessions"], 1), 3),
                  "batch_acc": round(v["batch_right"] / max(v["sessions"], 1), 3),
                  "loss": round((v["batch_right"] - v["arrival_right"]) / total, 4)}
    out["late"]["loss_households_without_personal_device"] = round(late_shared_only / total, 4)
    out["arrival_acc"] = round(sum(v["arrival_right"] for v in acc.values()) / total, 4)
    out["batch_acc"] = round(sum(v["batch_right"] for v in acc.values()) / total, 4)
    return out


def _summary(hs, preds, probs) -> dict:
    s = E.summarise(hs, preds, probs)
    return {k: None if s[k] is None else round(s[k], 4)   # no single-person household: None
            for k in ("session_accuracy", "ece", "mean_confidence", "household_size_exact", "single_person_kept")}


def service_paths(outs: list[dict], hs: list[worlds.WorldHousehold]) -> dict:
    """How often the service's own paths ran: drift alarms (each refits the household)
    per stable household-quarter from the warm-up on and within the detection window of
    a change, and full refits by reason."""
    stable = [o for o, h in zip(outs, hs) if not h.changes]
    quarters = sum(o["quarters"] for o in stable)
    alarms = sum(1 for o in stable for at, _ in o["drift_alarms"] if at > E.WARMUP_SESSIONS)
    changed = [(o, h.changes[0]) for o, h in zip(outs, hs) if h.changes]
    within = [any(c.session_index <= at <= c.session_index + E.DETECTION_WINDOW for at, _ in o["drift_alarms"])
              for o, c in changed]
    reasons: dict[str, int] = {}
    for o in outs:
        for _, r in o["refits"]:
            reasons[r] = reasons.get(r, 0) + 1
    return {"drift_alarms_per_stable_household_quarter": alarms / quarters if quarters else None,
            "changes_with_a_drift_alarm_in_window": float(np.mean(within)) if within else None,
            "households_with_a_drift_alarm": sum(bool(o["drift_alarms"]) for o in outs),
            "refits": reasons}


POPULATIONS = ("worlds", "movielens-tuning", "movielens-latest-tuning")


def real_viewers_tuning(population: str, worlds_per_family: int | None) -> list[worlds.WorldHousehold]:
    """A real-viewer population's TUNING half (even viewer ids), as many worlds per blind
    family as its report reads of the other half (3, 4 households each) unless told."""
    from bench import worlds_movielens, worlds_movielens_latest
    gen = worlds_movielens if population == "movielens-tuning" else worlds_movielens_latest
    return gen.generate(worlds_per_family=worlds_per_family or 3, households_per_world=4, split="tuning")


def traced_households(doc: dict) -> list[worlds.WorldHousehold]:
    """The households a --trace --out file was run on, in its order (its seed, change
    suite or household limit; never a report-only seed: the run refused it)."""
    split = worlds.TUNING if doc["seed"] == worlds.TUNING.seed else worlds.Split(
        **{**worlds.TUNING.__dict__, "seed": doc["seed"]})
    return change_suite(doc["change_suite"], doc["seed"]) if doc.get("change_suite") else select(
        worlds.generate(split, worlds_per_family=doc.get("worlds_per_family")),
        doc.get("limit", doc["households"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--households", type=int, default=None,
                    help="changed households plus stable ones up to this many (default: all)")
    ap.add_argument("--seed", type=int, default=worlds.TUNING.seed,
                    help="TUNING-split seed (default the TUNING split; never a report-only seed, worlds.REPORT_ONLY_SEEDS)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--arrival", type=int, default=E.STREAM_BATCH,
                    help="sessions per arrival (one service refresh each)")
    ap.add_argument("--import-first", type=int, default=0,
                    help="the first arrival is this many sessions (a household imported with its history)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--light-trace", action="store_true",
                    help="--trace without the new-device newcomer test's figures (TRACE_ANCHORED; cheaper)")
    ap.add_argument("--no-birth", action="store_true", help="the newcomer test computes but never adds a person")
    ap.add_argument("--no-new-device", action="store_true",
                    help="the new-device newcomer test never adds a person (the baseline without it)")
    ap.add_argument("--min-history", type=int, default=None, help="override CHANGE_MIN_HISTORY for this run")
    ap.add_argument("--paths", action="store_true",
                    help="log every change of the persons with the path that made it (person_changes)")
    ap.add_argument("--worlds-per-family", type=int, default=None,
                    help="more TUNING-seed worlds (a prefix of the same households); e.g. 16 for 576 households")
    ap.add_argument("--singles", action="store_true", help="only the single-person households")
    ap.add_argument("--leave-h", type=float, default=None, help="override LEAVE_GLR_H for this run")
    ap.add_argument("--change-suite", type=int, default=None, metavar="W",
                    help="the join/leave suite (change_suite): W worlds per TUNING family, its own TUNING seed")
    ap.add_argument("--population", choices=POPULATIONS, default="worlds",
                    help="whose households: the synthetic TUNING worlds (default) or a real-viewer "
                         "population's TUNING half (even ids; never its REPORTING half)")
    ap.add_argument("--periodic-refit", type=int, default=0, metavar="N",
                    help="with --trace: also answer every session by a full refit every N sessions")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--leaves", default=None, metavar="TRACE_JSON",
                    help="only the leaves' anatomy and the silence CUSUM replayed on an earlier "
                         "--trace/--light-trace --out file (silence_report)")
    ap.add_argument("--resweep", default=None, metavar="TRACE_JSON[,TRACE_JSON]",
                    help="only the share test's bars re-swept on earlier --trace --out files, the "
                         "streams' newcomer events kept (rebarred_events; RESWEEP_GRID)")
    ap.add_argument("--grid", default=None, metavar="J/L/R/LR[,J/L/R/LR]",
                    help="with --resweep: these (join bar, leave bar, join ratio, leave ratio) only")
    ap.add_argument("--diagnose", default=None, metavar="TRACE_JSON",
                    help="only classify the misses of an earlier --trace --out file (its seed)")
    args = ap.parse_args()
    if args.change_suite and args.seed == worlds.TUNING.seed:
        args.seed = SUITE_SEED
    if args.seed in worlds.REPORT_ONLY_SEEDS:
        raise SystemExit(f"--seed: {args.seed} is a report-only seed (worlds.REPORT_ONLY_SEEDS), never used for tuning")
    if args.trace and not args.light_trace:
        model_module.TRACE_ANCHORED = True
    if args.no_birth:
        model_module.BIRTH_GLR_H = float("inf")
    if args.no_new_device:
        model_module.NEW_DEVICE_GAIN = float("inf")
    if args.min_history is not None:
        model_module.CHANGE_MIN_HISTORY = args.min_history
    if args.paths:
        record_person_changes()
    global PERIODIC_REFIT
    PERIODIC_REFIT = args.periodic_refit
    if args.leave_h is not None:
        model_module.LEAVE_GLR_H = args.leave_h
    if args.leaves:
        doc = json.load(open(args.leaves))
        print(json.dumps(silence_report(doc["households_detail"], traced_households(doc))))
        return
    if args.resweep:
        sets = []
        for path in args.resweep.split(","):
            doc = json.load(open(path))
            sets.append((doc["households_detail"], traced_households(doc)))
        grid = RESWEEP_GRID if not args.grid else [tuple(float(x) for x in g.split("/"))
                                                    for g in args.grid.split(",")]
        for row in resweep(sets, grid):
            print(json.dumps(row), flush=True)
        return
    if args.diagnose:
        # one or more --trace files (comma-separated), their households pooled
        outs, hs = [], []
        for path in args.diagnose.split(","):
            doc = json.load(open(path))
            sel = traced_households(doc)
            # "singles" was both the --singles flag and, with --paths, the singles diagnosis
            # (a dict, truthy): the flag is now "singles_only"
            only_singles = doc.get("singles_only", doc.get("singles") is True)
            sel = [h for h in sel if h.n_persons == 1] if only_singles else sel
            # ids repeat across seeds: each household named by its seed as well
            hs += [dataclasses.replace(h, household_id=f"{doc['seed']}:{h.household_id}") for h in sel]
            outs += [{**o, "id": f"{doc['seed']}:{o['id']}"} for o in doc["households_detail"]]
        print(json.dumps({"misses": diagnose(outs, hs), "by_evidence": by_evidence(outs, hs),
                          "ceiling": ceiling(hs),
                          "arrival_loss": arrival_loss(outs, hs)}))
        return
    t0 = time.time()
    split = worlds.TUNING if args.seed == worlds.TUNING.seed else worlds.Split(
        **{**worlds.TUNING.__dict__, "seed": args.seed})
    if args.population != "worlds":
        hs = select(real_viewers_tuning(args.population, args.worlds_per_family), args.households)
    else:
        hs = change_suite(args.change_suite, args.seed) if args.change_suite else select(
            worlds.generate(split, worlds_per_family=args.worlds_per_family), args.households)
    if args.singles:
        hs = [h for h in hs if h.n_persons == 1]
    traces = [args.trace] * len(hs)
    arrivals = [args.arrival] * len(hs)
    firsts = [args.import_first] * len(hs)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            outs = list(pool.map(_one, hs, traces, arrivals, firsts, chunksize=1))
    else:
        outs = [_one(h, t, r, f) for h, t, r, f in zip(hs, traces, arrivals, firsts)]
    answers = [o.pop("_answers") for o in outs]
    scores = E.composition_scores(hs, [o["events"] for o in outs])
    correct = np.concatenate([o["correct"] for o in outs])
    single = [o["ids_used"] == 1 for o in outs if o["persons"] == 1]
    doc = json.dumps({"split": "tuning", "seed": args.seed, "households": len(hs), "limit": args.households,
                      "worlds_per_family": args.worlds_per_family, "singles_only": args.singles,
                      "streaming_accuracy": float(correct.mean()),
                      "single_person_kept": float(np.mean(single)) if single else None,
                      "singles_split": [o["id"] for o in outs if o["persons"] == 1 and o["ids_used"] > 1],
                      "composition_change": scores, "change_suite": args.change_suite,
                      "by_evidence": by_evidence(outs, hs),
                      "arrival": args.arrival, "import_first": args.import_first,
                      # at arrival and as recorded at the stream's end (settled): accuracy,
                      # ECE, size exact, singles kept (_worlds_eval.summarise)
                      "at_arrival": _summary(hs, [x[0] for x in answers], [x[1] for x in answers]),
                      "settled": _summary(hs, [x[2] for x in answers], [x[3] for x in answers]),
                      "service_paths": service_paths(outs, hs),
                      "singles": singles_diagnosis(outs) if args.paths else None,
                      "population": args.population,
                      "arrival_loss": arrival_loss(outs, hs) if args.trace else None,
                      "arrival_decomposition": arrival_decomposition(outs) if args.trace else None,
                      "households_detail": [{k: v for k, v in o.items() if k != "correct"} for o in outs],
                      "elapsed_s": round(time.time() - t0, 1)})
    if args.out:
        with open(args.out, "w") as f:
            f.write(doc + "\n")
    print(doc)


if __name__ == "__main__":
    main()
