"""Tuning harness for the feedback calibrator (ECE after feedback), on TUNING-seed worlds only.

``python -m bench.feedback_tuning collect --out FILE [--first-world 12 --worlds 4
--households 5]`` answers the sessions of fresh TUNING-seed worlds (bench/worlds.py,
seed 20260001, worlds ``first-world`` .. of the three TUNING families; the confidence
maps of model.py are fitted on worlds 0-11 since session 12 (0-3 before: figures quoted
for worlds 4-11 predate that), so from world 12 on the maps have never seen
the world, as on REPORTING) the way ``bench/_worlds_eval`` does — a batch fit and a
time-ordered stream, calibrated answers with the model's age — and stores them.

``python -m bench.feedback_tuning sweep FILE [FILE ...] [--draws 40]`` pools a file's
answers as ``_worlds_eval.after_feedback`` does (the mesh pools every household's
answers), draws ``--draws`` random 3.75 % feedback samples, fits each calibrator
candidate on the sample and scores ECE on the other answers; prints mean, median and
90th percentile per candidate and mode, JSON on the last line.

``python -m bench.feedback_tuning ceiling FILE [FILE ...]``: per pool, no feedback, the
levels fitted on every answer (what unlimited feedback gives a level calibrator) and the
binning floor.

``python -m bench.feedback_tuning groups --split tuning|movielens-tuning [--first-world 12
--worlds 4 --households 5] [--mode batch|stream] [--draws 3] [--cache FILE]``: the whole loop
(``bench.label_feedback``'s per-household work, cached in ``--cache``) scored by
``_worlds_eval.mesh_after_feedback`` under every (FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK)
pair of the calibrator per group; beside each, the pooled calibrator everywhere and the
session-15 skip, the mean over-confidence per group that is left, the binning floor of the
served and unfed answers (``mesh_floor``, ``no_feedback_floor``: ``ece_floor``) and the exact
level per group (``mesh_level_per_group_ceiling``: what unlimited feedback gives a level).

It never reads the REPORTING split: choices are made here, figures are reported by
``python -m bench.accuracy --worlds-only``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import _worlds_eval as E
from bench import worlds


def _answers(h: worlds.WorldHousehold) -> dict:
    _, batch = E.hearth_batch(h)
    _, stream, _ = E.hearth_stream(h)
    return {"id": h.household_id, "family": h.family, "person": h.person, "batch": batch, "stream": stream}


def collect(first_world: int, n_worlds: int, households: int, workers: int, out: str) -> None:
    hs = worlds.generate(worlds.TUNING, worlds_per_family=first_world + n_worlds, households_per_world=households)
    per_family = (first_world + n_worlds) * households   # generate's order: family, world, household
    hs = [h for i, h in enumerate(hs) if i % per_family >= first_world * households]
    t0 = time.time()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_answers, hs))
    else:
        rows = [_answers(h) for h in hs]
    with open(out, "wb") as f:
        pickle.dump({"households": [(h.household_id, h.family) for h in hs], "rows": rows}, f)
    print(json.dumps({"households": len(hs), "sessions": int(sum(h.n_sessions for h in hs)),
                      "elapsed_s": round(time.time() - t0, 1), "out": out}))


def _load(files: list[str]) -> list[tuple[str, tuple]]:
    """Per file and mode, the pooled answers (P, labels, correct, age) of after_feedback."""
    out = []
    for path in files:
        with open(path, "rb") as f:
            rows = pickle.load(f)["rows"]
        persons = [r["person"] for r in rows]
        for mode in ("batch", "stream"):
            probs = [r[mode] for r in rows]
            ages = [np.full(len(p), len(p)) if mode == "batch" else
                    E.stream_ages(len(p)) for p in persons]
            out.append((f"{path}:{mode}", E.pooled_answers(persons, probs, ages)))
    return out


def candidates() -> dict:
    """name -> fit(sample, ages) -> Calibrator."""
    from services.feedback.domain.recalibration import fit_calibrator, fit_segmented_calibrator
    from services.feedback.domain.recalibration import fit_feedback_calibrator
    out = {"identity": None, "pooled_map": lambda s, a: fit_calibrator(s, criterion="brier"),
           "service": fit_feedback_calibrator,
           # the service until 2026-12-04 16:00 UTC: the common shift shrunk by 100 pseudo-answers
           "level_first_prior100": lambda s, a: fit_feedback_calibrator(s, a, noise_multiple=None)}
    for prior in (10, 30, 100, 300):
        out[f"segmented_prior{prior}"] = (lambda p: lambda s, a: fit_segmented_calibrator(s, a, one_person_prior=p))(prior)
    for prior in (30, 100, 300):
        out[f"no_segments_prior{prior}"] = (lambda p: lambda s, a: fit_segmented_calibrator(
            s, a, segment_edges=(1,), one_person_prior=p))(prior)
    from services.feedback.domain.recalibration import fit_one_person_shift, level_calibrator, one_person_rows

    def level(k, k_kind=None):
        def fit(s, a):
            c, y, w = s.probs.max(axis=1), s.correct, s.weights
            every = fit_one_person_shift(c, y, w, k)
            if k_kind is None:
                return level_calibrator(every)
            one = one_person_rows(s.probs)
            multi = (s.probs > 0).sum(axis=1) > 1
            return level_calibrator(every + fit_one_person_shift(c[multi] + every, y[multi], w[multi], k_kind),
                                    every + fit_one_person_shift(c[one] + every, y[one], w[one], k_kind))
        return fit
    for k in (0, 50, 100, 200, 400):
        out[f"level{k}"] = level(k)
    from services.feedback.domain.recalibration import fit_level_calibrator
    for k in (50, 100, 200):
        for kk in (100, 300, 1000):
            out[f"level{k}_age{kk}"] = (lambda p, q: lambda s, a: fit_level_calibrator(s, a, prior=p, segment_prior=q))(k, kk)
    from services.feedback.domain.recalibration import fit_feedback_calibrator
    for k in (50, 100):
        for g in (1.0, 2.0, 3.0):
            out[f"gated{k}_se{g:g}"] = (lambda p, q: lambda s, a: fit_feedback_calibrator(
                s, a, prior=p, gate=q, noise_multiple=None))(k, g)
    for k in (50, 200):
        for kk in (50, 200):
            out[f"level{k}_kind{kk}"] = level(k, kk)
    # Shifts applied only as far as the evidence exceeds its own noise (positive-part
    # shrinkage, noise multiple m), with or without the age x kind cells; and the linear
    # empirical-Bayes posterior mean with the miss's prior s.d. tau fixed.
    for m in (0.5, 1.0, 2.0, 3.0):   # common shift by evidence, cells as named
        out[f"evidence{m:g}"] = (lambda q: lambda s, a: fit_level_calibrator(s, a, noise_multiple=q,
                                                                           cell_noise_multiple=q))(m)
        for kk in (300, 1000):
            out[f"evidence{m:g}_cells{kk}"] = (lambda q, r: lambda s, a: fit_level_calibrator(
                s, a, noise_multiple=q, segment_prior=r))(m, kk)
        out[f"evidence{m:g}_common"] = (lambda q: lambda s, a: fit_level_calibrator(
            s, a, segment_prior=None, noise_multiple=q))(m)
        out[f"evidence{m:g}_gated"] = (lambda q: lambda s, a: fit_feedback_calibrator(s, a, noise_multiple=q))(m)
    for m in (3.0, 4.0, 6.0):   # the common shift beyond 2 se^2, each cell only beyond m of its own
        out[f"evidence2_cellev{m:g}"] = (lambda q: lambda s, a: fit_feedback_calibrator(
            s, a, noise_multiple=2.0, cell_noise_multiple=q))(m)
    for tau in (0.01, 0.02, 0.03, 0.05):
        out[f"eb_tau{tau:g}"] = (lambda t: lambda s, a: fit_level_calibrator(s, a, prior_variance=t * t))(tau)
    for prior in (10, 30, 100):
        for seg in (30, 100):
            out[f"hier_prior{prior}_seg{seg}"] = (lambda p, q: lambda s, a: fit_segmented_calibrator(
                s, a, one_person_prior=p, segment_prior=q))(prior, seg)
    return out


def sweep(files: list[str], draws: int, names: list[str] | None = None, distort: tuple[float, ...] = (0.0,),
          young_distort: tuple[float, ...] = ()) -> dict:
    from bench._clustering_eval import ece
    from services.common.calibration import Calibrator
    from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, feedback_mask
    from services.feedback.domain.recalibration import FeedbackSample
    from services.feedback.domain.recalibration import level_calibrator
    pools = []
    for key, (P, y, ok, age) in _load(files):
        for d in distort:   # a world the confidence maps misjudge by d (who is right unchanged)
            pools.append((f"{key}{'' if d == 0 else f'@{d:+.2f}'}",
                          (level_calibrator(d).apply(P) if d else P, y, ok, age)))
        for d in young_distort:   # ... only for models of under 60 sessions
            young = age < 60
            Q = P.copy()
            Q[young] = level_calibrator(d).apply(P[young])
            pools.append((f"{key}@young{d:+.2f}", (Q, y, ok, age)))
    fits = candidates()
    report: dict = {}
    for key, (P, y, ok, age) in pools:
        scores = {name: [] for name in fits if names is None or name in names}
        before = []
        for d in range(draws):
            fed = feedback_mask(P.shape[0], DEFAULT_FEEDBACK_RATE, 1000 + d)
            held = ~fed
            before.append(ece(P[held].max(axis=1), ok[held]))
            sample = FeedbackSample.create(P[fed], labels=y[fed], correct=ok[fed].astype(float))
            for name in scores:
                cal = fits[name](sample, age[fed]) if fits[name] else Calibrator(0, "identity")
                after = cal.apply(P[held], age[held])
                right = (after.argmax(axis=1) == P[held].argmax(axis=1)) & ok[held]
                scores[name].append(ece(after.max(axis=1), right))
        report[key] = {"answers": int(P.shape[0]), "accuracy": float(ok.mean()),
                       "confidence": float(P.max(axis=1).mean()),
                       **{n: {"mean": round(float(np.mean(v)), 4), "median": round(float(np.median(v)), 4),
                              "p90": round(float(np.quantile(v, 0.9)), 4),
                              "share_le_0.02": round(float(np.mean(np.array(v) <= 0.02)), 3)}
                          for n, v in scores.items()}}
        for n, v in report[key].items():
            if isinstance(v, dict):
                print(f"{key:30s} {n:24s} mean {v['mean']:.4f} median {v['median']:.4f} p90 {v['p90']:.4f} "
                      f"<=0.02 {v['share_le_0.02']:.2f}", flush=True)
    return report


def ceiling(files: list[str]) -> dict:
    """Per pool, what no calibrator of the level can beat: ECE with the common level and
    with a level per age x kind cell fitted on *every* answer (unlimited feedback), beside
    no feedback and the binning floor (answers drawn right with exactly their confidence)."""
    from bench._clustering_eval import ece, ece_floor
    from services.feedback.domain.recalibration import FeedbackSample, fit_level_calibrator
    report = {}
    for key, (P, y, ok, age) in _load(files):
        every = FeedbackSample.create(P, labels=y, correct=ok.astype(float))
        conf = P.max(axis=1)
        report[key] = {"answers": int(P.shape[0]), "no_feedback": round(ece(conf, ok), 4),
                       "common_level": round(ece(fit_level_calibrator(every, age, prior=0, segment_prior=None)
                                                 .apply(P, age).max(axis=1), ok), 4),
                       "cell_levels": round(ece(fit_level_calibrator(every, age, prior=0, segment_prior=0)
                                                .apply(P, age).max(axis=1), ok), 4),
                       "floor": round(ece_floor(conf, reps=20, seed=0), 4)}
        print(key, report[key], flush=True)
    return report


GROUP_MINIMA = (0, 25, 50, 100, 200, 400)


def cached(cache: str | None, compute):
    """``compute()``'s result (the per-household work of a TUNING sample), pickled in
    ``cache`` and read back from it when the file exists; no cache: computed."""
    import os
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            return pickle.load(f)
    out = compute()
    if cache:
        with open(cache, "wb") as f:
            pickle.dump(out, f)
    return out


def groups(split: str, first_world: int, n_worlds: int | None, households: int | None, mode: str, draws: int,
           cache: str | None) -> dict:
    """The calibrator per group's choices on a TUNING split (module doc, ``groups``)."""
    from bench import label_feedback as LF
    from services.feedback.domain.recalibration import GROUP_OF_CHOICES
    if split not in ("tuning", "movielens-tuning"):
        raise SystemExit("groups: choices are made on tuning or movielens-tuning only")
    hs = LF.households(split, first_world, n_worlds, households)
    fed = E.feedback_draws(hs, draws)
    outs = cached(cache, lambda: [LF._one((h, f, mode == "stream", mode == "batch")) for h, f in zip(hs, fed)])
    before, key, sample_before = ("batch", "fed_batch", True) if mode == "batch" else ("stream", "fed_stream", False)
    ages = E.model_ages(hs, mode)
    table = {}
    for group_of in GROUP_OF_CHOICES:
        for minimum in GROUP_MINIMA:
            r = E.mesh_after_feedback(hs, [o[before] for o in outs], [o[key] for o in outs], fed, ages,
                                      sample_before, minimum, group_of)
            table[f"{group_of}:{minimum}"] = {
                **{k: round(r[k], 4) for k in ("mesh", "mesh_calibrator_everywhere", "mesh_skip_label_shaped",
                                                "no_feedback", "share_label_shaped", "groups_with_own_calibrator",
                                                "mesh_floor", "no_feedback_floor", "mesh_level_per_group_ceiling")},
                "overconfidence_by_group": r["overconfidence_by_group"]}
    return {"split": split, "first_world": first_world, "mode": mode, "households": len(hs), "draws": draws,
            "groups": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", required=True)
    c.add_argument("--first-world", type=int, default=12)   # bench.accuracy.CONFIDENCE_FIT_WORLDS: 0-11
    c.add_argument("--worlds", type=int, default=4)
    c.add_argument("--households", type=int, default=5)
    c.add_argument("--workers", type=int, default=1)
    s = sub.add_parser("sweep")
    s.add_argument("files", nargs="+")
    s.add_argument("--draws", type=int, default=40)
    s.add_argument("--only", nargs="*", help="candidate names (default: all)")
    s.add_argument("--distort", type=float, nargs="*", default=[0.0],
                   help="confidence shifts applied to the answers first (a world the maps misjudge)")
    s.add_argument("--young-distort", type=float, nargs="*", default=[],
                   help="the same, only for answers of models that had seen under 60 sessions")
    e = sub.add_parser("ceiling")
    e.add_argument("files", nargs="+")
    g = sub.add_parser("groups")
    g.add_argument("--split", choices=("tuning", "movielens-tuning"), default="tuning")
    g.add_argument("--first-world", type=int, default=12)
    g.add_argument("--worlds", type=int, default=None)
    g.add_argument("--households", type=int, default=None)
    g.add_argument("--mode", choices=("batch", "stream"), default="batch")
    g.add_argument("--draws", type=int, default=E.FEEDBACK_MESH_DRAWS)
    g.add_argument("--cache", default=None, help="pickle of the per-household work (reused when present)")
    args = ap.parse_args()
    if args.command == "groups":
        print(json.dumps(groups(args.split, args.first_world, args.worlds, args.households, args.mode, args.draws,
                                args.cache)))
    elif args.command == "ceiling":
        print(json.dumps(ceiling(args.files)))
    elif args.command == "collect":
        collect(args.first_world, args.worlds, args.households, args.workers, args.out)
    else:
        print(json.dumps(sweep(args.files, args.draws, args.only, tuple(args.distort), tuple(args.young_distort))))


if __name__ == "__main__":
    main()
