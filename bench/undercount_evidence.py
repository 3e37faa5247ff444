"""Evidence that a batch fit under-counts its household, for the confidence maps' household
shift, measured on TUNING households only (issue #10, calib27, session 27).

Session 26 (bench/feedback_why.py) found why feedback raises the batch loop's ECE: before
any label, the under-confident correctly counted households and the over-confident
under-counted ones cancel within the bins of the ``fitted`` map; labels move the second
kind's answers away. The maps' household shift (model.HOUSEHOLD_EVIDENCE: the device-group
share and the persons) cannot tell the two kinds apart. This tool asks whether evidence a
fit can compute from the household's own sessions can, and whether a shift that reads it
lowers the ECE before *and* after feedback:

* ``hour_spread``: per fitted person, 1 - the length of the mean start-hour vector of its
  sessions (0: every session at one hour; ~1: spread round the clock), weighted by the
  person's sessions. Two people merged into one watch at more hours than one does.
* ``taste_spread``: per fitted person, the mean squared distance of its sessions' genre
  mixes from the person's mean mix, weighted the same way. Two tastes merged spread more.
* ``personal_excess``: personal devices (persons.personal_slots: ≥ 5 sessions, a
  personal device type) beyond the fit's persons, at most PERSONAL_EXCESS_MAX: two owners'
  devices merged into one person (the largest count error on the real viewers,
  docs/benchmarks.md session 14).
* ``split_gain``: the held-out log-likelihood gain per session of one more component
  (split_gain): the fit's mixture family refitted on every other session with the fit's
  persons and with one person split in two (each person tried, the best kept), both
  scored on the other sessions. A household with a member the fit has not found gains
  from the extra component out of sample; a correctly counted one over-fits.
* ``log_sessions_per_person``: model.household_evidence's measured and not kept third
  column (session 15), for comparison.

What it does: each household's batch fit without feedback and, per feedback draw, with the
fed sessions' labels (bench.feedback_why's draws and fits), the raw posteriors kept. The
``fitted`` map's shift is refitted (bench.accuracy.fit_household_shift, the shipped map as
is) on a TUNING fit set — worlds ``--fit-worlds`` and the real viewers' tuning half
(weight bench.accuracy.CONFIDENCE_MOVIELENS_WEIGHT; scored leaving a real viewers' world
out) — once with the shipped evidence and once with each candidate beside it, and both
are scored on held-out TUNING households (``--eval-first-world``, never fitted on): ECE of
the batch answers before feedback, and of bench.feedback_why's whole loop (labels + the
feedback service's grouped calibrator, ``loop_mesh``) after feedback on 3.75 %. A map and a
shift never change who is answered, so accuracy is the same in every row (checked).

``--carry-evidence`` reads every labelled fit with its unlabelled fit's evidence and persons
(``carried``); ``loop_shaped_uncalibrated`` is the loop with the label-shaped answers kept
out of the feedback calibrator (bench.feedback_why's candidate; with ``--carry-evidence``,
session 26's unlanded design plus the evidence). Figures: docs/benchmarks.md, "Evidence
that a batch fit under-counts its household" (measured, not kept).

``OMP_NUM_THREADS=1 python -m bench.undercount_evidence [--fit-worlds 0:12]
[--fit-households 8] [--eval-first-world 16 --eval-worlds 4 --eval-households 5]
[--draws 3] [--workers 2] [--carry-evidence] [--cache FILE]`` prints tables and one JSON
object on its last line. TUNING splits only: REPORTING is read by ``python -m bench.accuracy``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CANDIDATES = ("hour_spread", "taste_spread", "personal_excess", "split_gain", "log_sessions_per_person")
SPLIT_MIN_SESSIONS = 10   # a person with fewer training sessions is not tried as the one split
SPLIT_EM_ITERATIONS = 40  # as the model's own candidate fits (model.py's births)
PERSONAL_EXCESS_MAX = 3


def hour_spread(X: np.ndarray, who: np.ndarray) -> float:
    """Session-weighted mean over the persons answered (``who``, per session) of 1 - the
    length of the mean start-hour vector (features' HOUR block: sin, cos) of their
    sessions: 0 when each person watches at one hour, near 1 when round the clock."""
    from services.clustering.domain import features as F
    X = np.asarray(X, dtype=np.float64)
    who = np.asarray(who)
    if X.shape[0] == 0:
        raise ValueError("hour_spread: no sessions")
    h = X[:, F.HOUR]
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    total = 0.0
    for p in np.unique(who):
        sel = who == p
        total += sel.sum() * (1.0 - float(np.linalg.norm(h[sel].mean(axis=0))))
    return total / who.size


def taste_spread(X: np.ndarray, who: np.ndarray) -> float:
    """Session-weighted mean over the persons answered of the mean squared distance of
    their sessions' genre mixes (features' GENRE block) from the person's mean mix."""
    from services.clustering.domain import features as F
    X = np.asarray(X, dtype=np.float64)
    who = np.asarray(who)
    if X.shape[0] == 0:
        raise ValueError("taste_spread: no sessions")
    g = X[:, F.GENRE]
    total = 0.0
    for p in np.unique(who):
        sel = who == p
        total += float(((g[sel] - g[sel].mean(axis=0)) ** 2).sum())
    return total / who.size


def personal_excess(X: np.ndarray, slots: np.ndarray, persons: int) -> float:
    """Personal devices (persons.personal_slots) beyond ``persons``, in 0..PERSONAL_EXCESS_MAX."""
    from services.clustering.domain.persons import personal_slots
    return float(min(max(len(personal_slots(X, slots)) - int(persons), 0), PERSONAL_EXCESS_MAX))


def split_gain(X: np.ndarray, who: np.ndarray, family, seed: int = 0) -> float:
    """Held-out log-likelihood gain per session (nats) of one more component: ``family``
    (the fit's mixture family) fitted by EM on the even sessions (in time order) from the
    persons ``who`` answers, and from the same persons with one of them split in two by
    a 2-means of its sessions' seeding features (every person with at least
    SPLIT_MIN_SESSIONS training sessions tried, the best split by its training
    likelihood); both scored on the odd sessions. 0 when no person can be split."""
    from services.clustering.domain import gmm as G
    from services.clustering.domain.kmeans import kmeans_plus_plus
    X = np.asarray(X, dtype=np.float64)
    who = np.unique(np.asarray(who), return_inverse=True)[1]
    train, test = np.arange(0, X.shape[0], 2), np.arange(1, X.shape[0], 2)
    if not test.size:
        raise ValueError("split_gain: fewer than two sessions")
    rng = np.random.default_rng(seed)
    Xtr, init = X[train], np.unique(who[train], return_inverse=True)[1]
    k = int(init.max()) + 1
    base, _ = G.fit_em(Xtr, k, family, rng, init_labels=init, max_iter=SPLIT_EM_ITERATIONS)
    Z = G._seeding(family, Xtr)
    best, best_train = None, -np.inf
    for p in range(k):
        mine = np.flatnonzero(init == p)
        if mine.size < SPLIT_MIN_SESSIONS:
            continue
        centers = kmeans_plus_plus(Z[mine], 2, rng)
        half = ((Z[mine][:, None, :] - centers[None]) ** 2).sum(axis=2).argmin(axis=1)
        if half.min() == half.max():
            continue
        labels = init.copy()
        labels[mine[half == 1]] = k
        cand, _ = G.fit_em(Xtr, k + 1, family, rng, init_labels=labels, max_iter=SPLIT_EM_ITERATIONS)
        ll = cand.log_likelihood(Xtr)
        if ll > best_train:
            best, best_train = cand, ll
    if best is None:
        return 0.0
    return (best.log_likelihood(X[test]) - base.log_likelihood(X[test])) / test.size


def candidate_evidence(X: np.ndarray, who: np.ndarray, slots: np.ndarray, persons: int, sessions: int,
                       augmented: np.ndarray | None = None, family=None) -> dict:
    """Every candidate (CANDIDATES) of one fit: its sessions ``X``, the person each is
    answered with (``who``), their device slots, the fit's persons and sessions; with
    ``family`` (the fit's mixture family) and ``augmented`` (the sessions as it reads
    them), split_gain as well (NaN without)."""
    return {"hour_spread": hour_spread(X, who), "taste_spread": taste_spread(X, who),
            "personal_excess": personal_excess(X, slots, persons),
            "split_gain": split_gain(augmented, who, family) if family is not None else float("nan"),
            "log_sessions_per_person": float(np.log(max(sessions, 1) / max(persons, 1)))}


@dataclass
class FitAnswers:
    """One fit's answers with what re-reading them through another shift needs."""
    raw: np.ndarray                 # (n, K) the mixture's posterior before the maps
    served: np.ndarray              # (n, K) the service's answer (assign_batch)
    shifted: bool                   # the "fitted" map's shift applies (device, mixture, K >= 2, not young)
    groups: int                     # device_group_count
    persons: int
    evidence: dict = field(default_factory=dict)
    rows: np.ndarray | None = None          # feedback_calibrator_rows (labelled fits)
    cal_groups: np.ndarray | None = None


def _answers(m, h, labelled: bool) -> FitAnswers:
    from services.clustering.domain import model as M
    out = m.assign_batch(h.features, device_ids=h.device_id, included=True)
    slots = m._known_slots(list(h.device_id), h.n_sessions)
    shifted = bool(m.mixture is not None and m.device_evidence and m.n_persons >= 2 and not m.streamed
                   and m.n_sessions >= M.YOUNG_MODEL_SESSIONS and (slots >= 0).all())
    augmented = m._augment(h.features, slots)
    raw = m._proba(augmented) if m.mixture is not None else out.probabilities
    # (the split gain only where the shift applies: it costs a few EM fits)
    ans = FitAnswers(raw, out.probabilities, shifted, m.device_group_count, m.n_persons,
                     candidate_evidence(h.features, out.probabilities.argmax(axis=1), slots, m.n_persons,
                                        m.n_sessions, augmented, m.mixture.family if shifted else None))
    if labelled:
        rows, group = M.feedback_calibrator_rows(m, out)
        ans.rows, ans.cal_groups = rows, np.full(h.n_sessions, group, dtype=object)
    return ans


def _one(args: tuple) -> dict:
    """One household: the unlabelled batch fit and, per draw of ``fed``, the labelled one."""
    from bench import _worlds_eval as E
    from services.clustering.domain import model as M
    h, fed, prior = args
    kw = {"population_prior": prior} if prior is not None else {}
    m0 = M.HouseholdModel(**kw).fit(h.features, device_ids=h.device_id)
    out = {"batch": _answers(m0, h, False), "fed": []}
    for f in fed or []:
        m = M.HouseholdModel(**kw).fit(h.features, labels=E.feedback_labels(h, f), device_ids=h.device_id)
        out["fed"].append(_answers(m, h, True))
    return out


def collect(split: str, first_world: int, n_worlds: int, households: int, draws: int, workers: int,
            cache: Path | None, tag: str):
    """The households and their fits (cached per ``tag`` in ``cache``)."""
    from bench import _worlds_eval as E
    from bench import label_feedback as LF
    hs = LF.households(split, first_world, n_worlds, households)
    fed = E.feedback_draws(hs, draws) if draws else [None] * len(hs)
    store = {}
    # a cache written by ``python -m bench.undercount_evidence`` holds __main__.FitAnswers
    sys.modules["__main__"].__dict__.setdefault("FitAnswers", FitAnswers)
    if cache is not None and cache.exists():
        store = pickle.loads(cache.read_bytes())
    if tag not in store:
        prior = LF.priors(split, first_world, n_worlds, hs) if E.SERVICE_COLD_START_PRIOR else None
        args = [(h, f, prior.get(h.world_id) if prior is not None else None) for h, f in zip(hs, fed)]
        with ProcessPoolExecutor(workers) as pool:
            store[tag] = list(pool.map(_one, args))
        if cache is not None:
            cache.write_bytes(pickle.dumps(store))
    return hs, fed, store[tag]


def design(ans: FitAnswers, names: tuple[str, ...]) -> np.ndarray:
    """(n, 2 + len(names)) the shift's evidence of every answer of one fit: the shipped
    HOUSEHOLD_EVIDENCE (device-group share, persons) and the named candidates."""
    from services.clustering.domain import model as M
    n = ans.raw.shape[0]
    base = M.household_evidence(ans.groups, np.full(n, ans.persons))
    return np.column_stack([base] + [np.full(n, ans.evidence[k]) for k in names])


def reread(ans: FitAnswers, shift: tuple[float, tuple[float, ...]], names: tuple[str, ...]) -> np.ndarray:
    """(n, K) the fit's answers with the ``fitted`` map's value moved by ``shift`` over
    design(ans, names) instead of the shipped one (other fits: as served). Same who."""
    from services.clustering.domain import model as M
    if not ans.shifted:
        return ans.served
    xs, ys = M.DEVICE_CONFIDENCE_MAPS["fitted"]
    top = ans.raw.max(axis=1)
    intercept, coef = shift
    value = M.shifted_confidence(np.interp(top, xs, ys), intercept + design(ans, names) @ np.asarray(coef))
    P = M._with_top(ans.raw, value.astype(ans.raw.dtype), np.full(top.size, ans.raw.shape[1]), 0.0)
    return P


def fit_rows(hs, outs, weight: float = 1.0):
    """The ``fitted`` map's training rows of unlabelled fits: mapped value, right, weight, fit."""
    from bench._clustering_eval import match
    from services.clustering.domain import model as M
    xs, ys = M.DEVICE_CONFIDENCE_MAPS["fitted"]
    rows = []
    for h, o in zip(hs, outs):
        a = o["batch"]
        if not a.shifted:
            continue
        pred = a.raw.argmax(axis=1)
        m = match(h.person, pred, a.raw.shape[1])
        rows.append((np.interp(a.raw.max(axis=1), xs, ys), (m[pred] == h.person).astype(float),
                     np.full(h.n_sessions, weight), a))
    return rows


def fit_shift(rows, names: tuple[str, ...]) -> tuple[float, tuple[float, ...]]:
    """The ``fitted`` map's shift over design(., names), bench.accuracy.fit_household_shift."""
    from bench.accuracy import fit_household_shift
    mapped = np.concatenate([r[0] for r in rows])
    right = np.concatenate([r[1] for r in rows])
    w = np.concatenate([r[2] for r in rows])
    X = np.vstack([design(r[3], names) for r in rows])
    return fit_household_shift(mapped, X, right, weight=w)


def separation(hs, outs) -> dict:
    """Per candidate, the AUC (over the multi-person unlabelled fits the shift applies to)
    of "the fit has fewer persons than the household": 0.5 separates nothing."""
    under = []
    values = {k: [] for k in CANDIDATES}
    for h, o in zip(hs, outs):
        a = o["batch"]
        if not a.shifted:
            continue
        under.append(a.persons < np.unique(h.person).size)
        for k in CANDIDATES:
            values[k].append(a.evidence[k])
    y = np.array(under)
    out = {"fits": int(y.size), "under_counted": int(y.sum())}
    for k, v in values.items():
        out[k] = round(auc(np.array(v), y), 3)
    return out


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC of ``score`` for ``y`` (ties half); 0.5 with one class only."""
    y = np.asarray(y, dtype=bool)
    pos, neg = score[y], score[~y]
    if not pos.size or not neg.size:
        return 0.5
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(greater / (pos.size * neg.size))


def carried(labelled: FitAnswers, unlabelled: FitAnswers) -> FitAnswers:
    """``labelled`` read with the evidence and persons of the household's unlabelled fit
    (fbece26's ``evidence_persons``, for every candidate): evidence that keeps its meaning
    when labels add the person it pointed at. A household whose unlabelled fit the shift
    did not answer for (one person, young) keeps its labelled fit's own evidence."""
    if not unlabelled.shifted:
        return labelled
    return FitAnswers(labelled.raw, labelled.served, labelled.shifted, labelled.groups, unlabelled.persons,
                      unlabelled.evidence, labelled.rows, labelled.cal_groups)


def loop_figures(hs, fed, outs, shift, names, carry: bool = False) -> dict:
    """ECE before feedback and of bench.feedback_why's whole loop (``loop_mesh``), mean of
    the draws, with every fit re-read through ``shift`` (None: as served); ``carry``: the
    labelled fits read with their unlabelled fit's evidence (``carried``)."""
    from bench import _worlds_eval as E
    from bench import feedback_why as W

    def read(a):
        return a.served if shift is None else reread(a, shift, names)

    def fed_answers(o):
        return [carried(a, o["batch"]) if carry else a for a in o["fed"]]
    view = [{"batch": read(o["batch"]),
             "fed_batch": [E.FedAnswers(read(a), a.rows, a.cal_groups) for a in fed_answers(o)]} for o in outs]
    rep = W.decompose(hs, fed, view, "fed_batch")
    persons = [h.person for h in hs]
    _, _, ok, _ = E.pooled_answers(persons, [v["batch"] for v in view])
    return {"no_feedback": rep["no_feedback"], "labels_only": rep["labels_only"], "loop_mesh": rep["loop_mesh"],
            # fbece26's design: the label-shaped answers skip the feedback calibrator (with
            # --carry-evidence: its branch fbece26-design, plus the evidence)
            "loop_shaped_uncalibrated": rep["loop_shaped_uncalibrated"],
            "per_draw": {k: rep["per_draw"][k] for k in ("no_feedback", "loop_mesh", "loop_shaped_uncalibrated")},
            "accuracy": round(float(ok.mean()), 4),
            # each kind's own ECE before feedback ("label-shaped": the draw's labels add a
            # person, feedback_why; their cancelling within bins is what session 26 found)
            "default_ece_before": rep["default_ece_before"], "label_shaped_ece_before": rep["label_shaped_ece_before"],
            # the label-shaped households once their labels are in (no calibrator): does the
            # evidence of the labelled fit raise their confidence past their accuracy?
            "label_shaped_after_labels": {"confidence": rep["label_shaped_confidence_after"],
                                          "accuracy": rep["label_shaped_accuracy_after"],
                                          "ece": rep["label_shaped_ece_after"]},
            "default_confidence_minus_accuracy": round(rep["default_confidence_before"]
                                                       - rep["default_accuracy_before"], 4),
            "label_shaped_confidence_minus_accuracy": round(rep["label_shaped_confidence_before"]
                                                            - rep["label_shaped_accuracy_before"], 4)}


# "oracle_under_counted": the fit has fewer persons than the household truly has — the
# truth, never evidence: how far a shift that knew it could go (the ceiling of this route)
ORACLE = "oracle_under_counted"
VARIANTS = (("shipped", None), ("refit", ()), *((f"+{k}", (k,)) for k in CANDIDATES),
            ("+split_gain+hour_spread+personal_excess", ("split_gain", "hour_spread", "personal_excess")),
            (f"+{ORACLE}", (ORACLE,)))


def mark_oracle(hs, outs) -> None:
    """Put ORACLE (truth, for the ceiling only) into every fit's evidence."""
    for h, o in zip(hs, outs):
        persons = np.unique(h.person).size
        for a in [o["batch"], *o["fed"]]:
            a.evidence[ORACLE] = float(a.persons < persons)


def main() -> None:
    from bench.accuracy import CONFIDENCE_MOVIELENS_WEIGHT, world_indices
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-worlds", default="0:12")
    ap.add_argument("--fit-households", type=int, default=8)
    ap.add_argument("--eval-first-world", type=int, default=16)
    ap.add_argument("--eval-worlds", type=int, default=4)
    ap.add_argument("--eval-households", type=int, default=5)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-movielens", action="store_true", help="leave the real viewers' tuning half out")
    ap.add_argument("--cache", type=Path, default=None, help="pickle of the fits (reused when present)")
    ap.add_argument("--carry-evidence", action="store_true",
                    help="read the labelled fits with their unlabelled fit's evidence and persons (carried)")
    args = ap.parse_args()
    t0 = time.time()
    fit_ids = world_indices(args.fit_worlds)
    if fit_ids[0] + len(fit_ids) - 1 != fit_ids[-1]:
        raise ValueError("--fit-worlds: one range a:b")
    if not set(fit_ids).isdisjoint(range(args.eval_first_world, args.eval_first_world + args.eval_worlds)):
        raise ValueError("--eval-first-world: the evaluation worlds must not be fitted on")
    fit_hs, _, fit_outs = collect("tuning", fit_ids[0], len(fit_ids), args.fit_households, 0, args.workers,
                                  args.cache, f"fit {args.fit_worlds} x{args.fit_households}")
    ev_hs, ev_fed, ev_outs = collect("tuning", args.eval_first_world, args.eval_worlds, args.eval_households,
                                     args.draws, args.workers, args.cache,
                                     f"eval {args.eval_first_world}+{args.eval_worlds} x{args.eval_households} "
                                     f"d{args.draws}")
    ml = None
    if not args.no_movielens:
        ml = collect("movielens-tuning", 0, 3, 4, args.draws, args.workers, args.cache, f"ml d{args.draws}")
    print(f"fits collected {time.time() - t0:.0f}s", flush=True)
    for hs, _, outs in [(fit_hs, None, fit_outs), (ev_hs, ev_fed, ev_outs)] + ([ml] if ml is not None else []):
        mark_oracle(hs, outs)
    synth_rows = fit_rows(fit_hs, fit_outs)
    report = {"separation": {"fit": separation(fit_hs, fit_outs), "eval": separation(ev_hs, ev_outs)}}
    if ml is not None:
        report["separation"]["movielens"] = separation(ml[0], ml[2])
    for tag, sep in report["separation"].items():
        print(f"AUC of 'under-counted' ({tag}): {sep}")
    ml_rows = fit_rows(ml[0], ml[2], CONFIDENCE_MOVIELENS_WEIGHT) if ml is not None else []
    report["synthetic_eval"], report["movielens_eval"], report["shifts"] = {}, {}, {}
    for name, names in VARIANTS:
        shift = None if names is None else fit_shift(synth_rows + ml_rows, names)
        report["shifts"][name] = shift
        report["synthetic_eval"][name] = loop_figures(ev_hs, ev_fed, ev_outs, shift, names or (),
                                                      args.carry_evidence)
        if ml is not None:   # leave the real viewers' world out of the shift that reads them
            hs, fed, outs = ml
            worlds_of = np.array([h.world_id for h in hs])
            view = [dict(o) for o in outs]
            for w in np.unique(worlds_of):
                kept = [r for r, h in zip(ml_rows, [h for h, o in zip(hs, outs) if o["batch"].shifted])
                        if h.world_id != w]
                s = None if names is None else fit_shift(synth_rows + kept, names)
                for i in np.flatnonzero(worlds_of == w):
                    o = outs[i]
                    view[i] = {"batch": _as_served(o["batch"], s, names),
                               "fed": [_as_served(carried(a, o["batch"]) if args.carry_evidence else a, s, names)
                                       for a in o["fed"]]}
            report["movielens_eval"][name] = loop_figures(hs, fed, view, None, ())
        for tag in ("synthetic_eval", "movielens_eval"):
            if name in report[tag]:
                r = report[tag][name]
                print(f"{tag:15s} {name:28s} before {r['no_feedback']:.4f} labels only {r['labels_only']:.4f} "
                      f"loop {r['loop_mesh']:.4f} acc {r['accuracy']:.4f} per draw {r['per_draw']['loop_mesh']} "
                      f"gap default {r['default_confidence_minus_accuracy']:+.3f} label-shaped "
                      f"{r['label_shaped_confidence_minus_accuracy']:+.3f} ece default {r['default_ece_before']:.3f} "
                      f"label-shaped {r['label_shaped_ece_before']:.3f}", flush=True)
    report["elapsed_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, default=str))


def _as_served(a: FitAnswers, shift, names) -> FitAnswers:
    """``a`` with its served answers re-read through ``shift`` (None: unchanged)."""
    if shift is None:
        return a
    return FitAnswers(a.raw, reread(a, shift, names), a.shifted, a.groups, a.persons, a.evidence, a.rows,
                      a.cal_groups)


if __name__ == "__main__":
    main()
