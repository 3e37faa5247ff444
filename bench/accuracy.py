"""Clustering accuracy on simulated households: `python -m bench.accuracy [--quick] [--calibrate]`.

Prints progress and the scikit-learn GMM+BIC reference line to stderr and ONE JSON
object on the last stdout line: {"default": {...}, "easy": {...}, "hard": {...},
"worlds": {...}, "worlds_blind": {...}}. The "worlds" block scores the randomized world families of
bench/worlds.py (REPORTING split only) beside majority, device heuristic, sklearn
GMM+BIC, k-means with the true k and a supervised oracle (bench/_worlds_eval.py);
``--worlds-only`` / ``--no-worlds`` run one part. "worlds_blind" scores the same way the
households of bench/worlds_blind.py, a second generator written without reading the
model (seed BLIND_SEED, report only, never tuned on; ``--blind-only`` runs it alone;
``--no-worlds`` leaves it out too). ``--movielens-only`` scores real viewers the same way
(bench/worlds_movielens.py: MovieLens 100K users merged into accounts, report only; the
data is fetched once, it is not in the repository); ``--movielens-latest-only`` a second
population of real viewers (bench/worlds_movielens_latest.py: MovieLens latest-small's 671
users of 1995-2016, merged the same way, report only). ``--ece-population`` runs only issue
#10's ECE read (before and after feedback, each with its household noise) on
``worlds.ECE_REPORTING``, the population the ECE targets are judged on (bench/ece_population.py;
report only; ``--ece-split tuning`` checks the mechanics on TUNING seeds). ``--calibrate-confidence`` fits the
model's confidence maps: for bare vectors (TUNING worlds + simulator seeds 500) and for
sessions with device ids (TUNING worlds ``--fit-worlds``, default CONFIDENCE_FIT_WORLDS,
batch and stream pooled; ``--fresh-worlds`` also scores the fit on fresh TUNING worlds).

Seeds: evaluation households use seeds 1000+ (never used for tuning); the temperature
and the drift thresholds shipped in the code were calibrated with ``--calibrate`` on
seeds 500+; the population prior is learned on seeds 700+.
Metrics (micro averages over sessions unless said): session_accuracy (Hungarian match
of components to true persons per household), ari/nmi (mean over households),
household_size_exact (share of households with the true number of persons),
binge/nested accuracy (sessions with those tags; nested truth = the child),
cold_start_accuracy (3-9 session accounts, default strategy), accuracy_labels_1pct /
5pct (that share of sessions labelled with their true person), brier (multi-class,
summed over persons), ece (top label, 15 bins), drift_* (per household, see drift.py;
drift_alarm_statistic counts which statistic raised each detection, drift_thresholds
echoes the thresholds in use; --calibrate prints the six drift thresholds fitted at
alpha = 1 % on stable households of seeds 501).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from bench import _worlds_eval as worlds_eval, worlds, worlds_blind, worlds_movielens  # noqa: E402
from bench import ece_population, worlds_movielens_latest  # noqa: E402
from bench._clustering_eval import brier_ece_parts, ece, matched_correct, probability_figures  # noqa: E402
from services.clustering.domain import drift as D  # noqa: E402
from services.clustering.domain.model import YOUNG_MODEL_SESSIONS, HouseholdModel, PopulationPrior  # noqa: E402
from services.clustering.domain.simulator import (  # noqa: E402
    BASE_EPOCH, DAY_S, DIFFICULTY_LEVELS, DRIFT_TYPES, simulate_household, simulate_population,
)

SERVICE_COLD_START_PRIOR = worlds_eval.SERVICE_COLD_START_PRIOR


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summarise(hs, preds, probs=None) -> dict:
    correct = [matched_correct(h.person, p) for h, p in zip(hs, preds)]
    allc = np.concatenate(correct)
    binge = np.concatenate([c[h.binge] for h, c in zip(hs, correct)])
    nested = np.concatenate([c[h.nested] for h, c in zip(hs, correct)])
    out = {
        "session_accuracy": float(allc.mean()),
        "session_accuracy_household_mean": float(np.mean([c.mean() for c in correct])),
        "ari": float(np.mean([adjusted_rand_score(h.person, p) for h, p in zip(hs, preds)])),
        "nmi": float(np.mean([normalized_mutual_info_score(h.person, p) for h, p in zip(hs, preds)])),
        "household_size_exact": float(np.mean([np.unique(p).size == h.n_persons for h, p in zip(hs, preds)])),
        "binge_accuracy": float(binge.mean()) if binge.size else None,
        "nested_accuracy": float(nested.mean()) if nested.size else None,
        "sessions": int(allc.size), "households": len(hs),
    }
    if probs is not None:
        out.update(probability_figures([h.person for h in hs], probs))
    return out


def run_model(hs, **kw):
    preds, probs, fallbacks = [], [], 0
    for h in hs:
        m = HouseholdModel(**kw).fit(h.features)
        b = m.assign_batch(h.features)
        preds.append(b.person_index)
        probs.append(b.probabilities)
        fallbacks += m.fallback
    return preds, probs, fallbacks


def run_labels(hs, frac: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    correct = []
    for h in hs:
        labelled = rng.random(h.n_sessions) < frac
        labels = [f"person{p}" if lab else None for p, lab in zip(h.person, labelled)]
        m = HouseholdModel().fit(h.features, labels=labels)
        pred = m.assign_batch(h.features).person_index
        correct.append(matched_correct(h.person, pred))
    return float(np.concatenate(correct).mean())


def run_cold(small, prior) -> dict:
    out = {}
    for strategy in ("account", "population_prior", "heuristic"):
        correct = []
        for h in small:
            m = HouseholdModel(cold_start=strategy, population_prior=prior).fit(h.features)
            correct.append(matched_correct(h.person, m.assign_batch(h.features).person_index))
        out[strategy] = float(np.concatenate(correct).mean())
    return out


def sklearn_gmm_bic(hs):
    preds, probs = [], []
    for h in hs:
        X = h.features.astype(np.float64)
        best = None
        for k in range(1, min(6, len(X)) + 1):
            g = GaussianMixture(k, covariance_type="full", random_state=0).fit(X)
            b = g.bic(X)
            if best is None or b < best[0]:
                best = (b, g)
        preds.append(best[1].predict(X))
        probs.append(best[1].predict_proba(X))
    return preds, probs


def sklearn_kmeans_true_k(hs):
    return [KMeans(h.n_persons, n_init=3, random_state=0).fit_predict(h.features.astype(np.float64)) for h in hs]


# -- drift --------------------------------------------------------------------------
REF_FRACTION = 0.4  # reference = sessions of the first 40 % of the period


def drift_case(h, days: int, thresholds: D.DriftThresholds | None):
    """With ``thresholds`` None (calibration): the per-household maxima of the six
    statistics over the stream (surprise CUSUM, composition KL, window MMD, block
    agreement CUSUM, person weight CUSUM, predictive refit GLR), no alarms. Otherwise
    (absolute first alarm index or None, first event, reference end, every alarm's index)."""
    ref_end = int(np.searchsorted(h.timestamps, BASE_EPOCH + REF_FRACTION * days * DAY_S))
    if ref_end < 20 or h.n_sessions - ref_end < 20:
        return None
    X = h.features.astype(np.float64)
    off = D.DriftThresholds(np.inf, np.inf, mmd_threshold=np.inf, agreement_h=np.inf, weight_h=np.inf,
                            glr_h=np.inf)
    det = D.build_detector(X[:ref_end], thresholds=thresholds or off)
    stream = X[ref_end:]
    if thresholds is None:
        # No alarms: run the stream and keep each statistic's maximum.
        det.update(stream)
        return det.maxima()
    events = det.update(stream, h.timestamps[ref_end:])
    alarm = ref_end + events[0].session_index if events else None
    return alarm, events[0] if events else None, ref_end, [ref_end + e.session_index for e in events]


PERIODIC_REFIT_EVERY = 50  # sessions between refits of the periodic-refit drift baseline


def periodic_refit_alarms(h, ref_end: int, every: int = PERIODIC_REFIT_EVERY) -> list[int]:
    """Drift baseline: refit the household model from scratch on all sessions so far at
    the end of the reference and every ``every`` sessions after it; an alarm wherever the
    refit's person count differs from the previous one (what a service that only
    refits on a timer would notice)."""
    X = h.features.astype(np.float64)
    alarms, k_prev = [], None
    for b in range(ref_end, h.n_sessions + 1, every):
        k = HouseholdModel().fit(X[:b]).n_persons
        if k_prev is not None and k != k_prev:
            alarms.append(b)
        k_prev = k
    return alarms


def _drift_scores(runs: list[tuple[str | None, int | None, list[int], float]]) -> dict:
    """Detection rate, mean delay (by type) and false alarms per household-quarter of one
    detector: runs = (drift type or None, change session or None, alarm sessions at or
    after the reference's end, monitored days)."""
    detected = {t: [] for t in DRIFT_TYPES}
    delays = {t: [] for t in DRIFT_TYPES}
    false_alarms, quarters = 0, 0.0
    for dtype, start, alarms, days in runs:
        if dtype is None:
            false_alarms += len(alarms)
            quarters += days / 91.0
            continue
        first = alarms[0] if alarms else None
        hit = first is not None and first >= start
        detected[dtype].append(hit)
        if hit:
            delays[dtype].append(first - start)
    every = [x for v in detected.values() for x in v]
    return {"detection_rate": float(np.mean(every)) if every else None,
            "detection_rate_by_type": {t: (float(np.mean(v)) if v else None) for t, v in detected.items()},
            "mean_delay_sessions": {t: (float(np.mean(v)) if v else None) for t, v in delays.items()},
            "false_alarms_per_household_quarter": false_alarms / quarters if quarters else None,
            "stable_household_quarters": round(quarters, 2)}


def run_drift(level: float, n_stable: int, n_per_type: int, seed: int, days: int = 90,
              periodic_baseline: bool = True) -> dict:
    rng_seq = np.random.SeedSequence(seed)
    children = rng_seq.spawn(n_stable + n_per_type * len(DRIFT_TYPES))
    false_alarms = checked_stable = 0
    detected = {t: [] for t in DRIFT_TYPES}
    delays = {t: [] for t in DRIFT_TYPES}
    typed_ok = []
    pre_alarms = 0
    alarm_stats: dict[str, int] = {}  # which statistic raised each detection
    hearth_runs, periodic_runs = [], []  # per household, for the per-quarter rates and baselines
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        dtype = None if i < n_stable else DRIFT_TYPES[(i - n_stable) // n_per_type]
        h = simulate_household(rng, f"d{i}", level, drift_type=dtype, days=days)
        res = drift_case(h, days, D.DEFAULT_THRESHOLDS)
        if res is None:
            continue
        alarm, event, ref_end, alarms = res
        monitored_days = (h.timestamps[-1] - h.timestamps[ref_end]) / DAY_S
        change = h.drift[0].session_index if dtype is not None and h.drift else None
        if dtype is None or change is not None:
            hearth_runs.append((dtype, change, alarms, monitored_days))
            if periodic_baseline:
                periodic_runs.append((dtype, change, periodic_refit_alarms(h, ref_end), monitored_days))
        if dtype is None:
            checked_stable += 1
            false_alarms += alarm is not None
            continue
        if not h.drift:
            continue
        start = h.drift[0].session_index
        if alarm is not None and alarm < start:
            pre_alarms += 1
            detected[dtype].append(False)
            continue
        hit = alarm is not None
        detected[dtype].append(hit)
        if hit:
            delays[dtype].append(alarm - start)
            alarm_stats[event.statistic_name] = alarm_stats.get(event.statistic_name, 0) + 1
            typed_ok.append(event.type == dtype)
    all_det = [x for v in detected.values() for x in v]
    return {
        "drift_detection_rate": float(np.mean(all_det)) if all_det else None,
        "drift_detection_rate_by_type": {t: (float(np.mean(v)) if v else None) for t, v in detected.items()},
        "drift_false_alarm_rate": false_alarms / max(checked_stable, 1),
        "drift_alarm_before_change": pre_alarms,
        "drift_mean_delay_sessions": {t: (float(np.mean(v)) if v else None) for t, v in delays.items()},
        "drift_type_accuracy": float(np.mean(typed_ok)) if typed_ok else None,
        "drift_households": {"stable": checked_stable, "drifting": len(all_det)},
        "drift_alarm_statistic": alarm_stats,
        # The same households scored per household-quarter (every alarm of a stable
        # household counts; a drifting household's first alarm at or after the change is
        # its detection), beside a detector that never alarms and periodic refits.
        "drift_per_quarter": {"hearth": _drift_scores(hearth_runs),
                              "no_change": _drift_scores([(t, c, [], d) for t, c, _, d in hearth_runs]),
                              # None when skipped (--quick without --periodic-baseline)
                              "periodic_refit": _drift_scores(periodic_runs) if periodic_baseline else None},
        "drift_thresholds": {"cusum_h": D.DEFAULT_THRESHOLDS.cusum_h,
                             "kl_threshold": D.DEFAULT_THRESHOLDS.kl_threshold,
                             "mmd_threshold": D.DEFAULT_THRESHOLDS.mmd_threshold,
                             "agreement_h": D.DEFAULT_THRESHOLDS.agreement_h,
                             "weight_h": D.DEFAULT_THRESHOLDS.weight_h,
                             "glr_h": D.DEFAULT_THRESHOLDS.glr_h,
                             "false_alarm_rate_target": D.DEFAULT_THRESHOLDS.false_alarm_rate},
    }


def calibrate(quick: bool) -> dict:
    """Temperature (minimum NLL of the matched truth) and drift thresholds (stable
    households' stream maxima, alpha = 1 %) on calibration seeds."""
    level = DIFFICULTY_LEVELS["default"]
    hs = simulate_population(20 if quick else 120, seed=500, difficulty=level)
    raw = []
    for h in hs:
        m = HouseholdModel(temperature=1.0).fit(h.features)
        lj = m.mixture.log_joint(h.features) if m.mixture is not None else None
        if lj is not None:
            raw.append((h, lj))

    def nll(t: float) -> float:
        total = 0.0
        for h, lj in raw:
            z = lj / t
            P = np.exp(z - z.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            b, conf, correct = brier_ece_parts(h.person, P)
            total += float(b.sum())
        return total

    t_best = minimize_scalar(nll, bounds=(0.5, 50.0), method="bounded").x
    log(f"calibration: temperature (min Brier) = {t_best:.3f}")
    maxima = []
    for i, child in enumerate(np.random.SeedSequence(501).spawn(40 if quick else 400)):
        h = simulate_household(np.random.default_rng(child), f"c{i}", level, drift_type=None)
        r = drift_case(h, 90, None)
        if r is not None:
            maxima.append(r)
    th = D.calibrate(maxima, alpha=0.01)
    log(f"calibration: drift thresholds {th}")
    return {"temperature": float(t_best), "cusum_h": th.cusum_h, "kl_threshold": th.kl_threshold,
            "mmd_threshold": th.mmd_threshold, "agreement_h": th.agreement_h, "weight_h": th.weight_h,
            "glr_h": th.glr_h,
            "drift_calibration_alpha": th.false_alarm_rate, "stable_households": len(maxima)}


def calibrate_confidence(quick: bool) -> dict:
    """The confidence map shipped in services/clustering/domain/model.py
    (CONFIDENCE_MAP_X/Y, SINGLE_PERSON_CONFIDENCE): isotonic regression of "the
    assigned person is the right one" on the tempered top-label probability, fitted
    out of sample for the households it will serve — on the TUNING worlds and the
    simulator's calibration seeds (500), never on the reporting worlds."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    hs = worlds.generate(worlds.TUNING, worlds_per_family=1 if quick else 2,
                         households_per_world=4 if quick else 8)
    sim = simulate_population(10 if quick else 40, seed=500, difficulty=DIFFICULTY_LEVELS["default"])
    conf, correct, single = [], [], []
    for features, truth, devices in ([(h.features, h.person, h.device_id) for h in hs]
                                     + [(h.features, h.person, None) for h in sim]):
        m = HouseholdModel(calibrated=False).fit(features, device_ids=devices)
        b = m.assign_batch(features, device_ids=devices)
        ok = matched_correct(truth, b.person_index)
        if b.probabilities.shape[1] == 1:
            single.append(ok)
        else:
            conf.append(b.confidence)
            correct.append(ok)
    x, y = np.concatenate(conf), np.concatenate(correct).astype(float)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)
    grid = np.linspace(x.min(), 1.0, 21)
    knots_y = np.maximum.accumulate(iso.predict(grid))
    single_acc = float(np.concatenate(single).mean()) if single else 1.0
    log(f"confidence map: x {np.round(grid, 3).tolist()} y {np.round(knots_y, 3).tolist()} "
        f"single-person {single_acc:.3f} ({len(single)} households)")
    return {"confidence_map_x": np.round(grid, 4).tolist(), "confidence_map_y": np.round(knots_y, 4).tolist(),
            "single_person_confidence": round(single_acc, 4), "sessions": int(x.size),
            "single_person_households": len(single)}


# The TUNING worlds (of each family, 8 households each) the device maps are fitted on,
# and the fresh TUNING-seed worlds ``--fresh-worlds`` scores them on by default. The
# first 12 worlds (288 households) since session 12: on fresh TUNING worlds a fit on 12
# world indices beat one on 4 in every mode (24 paired draws of fit and fresh worlds; 16
# worlds added nothing), docs/benchmarks.md "Confidence on worlds nobody has seen".
# bench.feedback_tuning and bench.settled_feedback take their fresh worlds from 12 on.
CONFIDENCE_FIT_WORLDS = tuple(range(12))
CONFIDENCE_FRESH_WORLDS = tuple(range(12, 24))
CONFIDENCE_HOUSEHOLDS_PER_WORLD = 8
# Fitted on besides (session 14): the real viewers' TUNING half (60 households), each
# weighing CONFIDENCE_MOVIELENS_WEIGHT synthetic ones, and every stream also answered a day
# per arrival (the API's backfill pattern). Chosen on TUNING only (maps fitted on worlds
# 0-11 + the real viewers' tuning half; scored leaving a family out, on fresh worlds 12-23
# and leaving a real viewers' world out), ECE batch / at arrival / settled / a day per
# arrival, against the fit on the synthetic worlds alone and one session per arrival:
# fresh 0.044/0.045/0.015/0.068 -> 0.026/0.038/0.020/0.033, family left out
# 0.042/0.032/0.046/0.063 -> 0.029/0.025/0.034/0.019, real viewers
# 0.061/0.056/0.044/0.089 -> 0.046/0.044/0.029/0.044 (weight 4: 0.030/0.041/0.028/0.036
# fresh, 0.042/0.050/0.030/0.054 real; 16: 0.026/0.038/0.022/0.035, 0.043/0.044/0.034/0.041;
# weight 8 without the daily answers: a day per arrival 0.059 fresh, 0.070 real).
# docs/benchmarks.md, session 14. Re-checked in session 15 with a world left out (the
# families the fit has seen) besides, weights 0 / 1 / 2 / 4 / 8 / 16, the new-device answers
# in: 8 has the lowest mean of the sixteen held-out ECEs (family, world and real viewers'
# world left out, fresh worlds; 0.029 against 0.040 for the synthetic fit, 0.031 for 4,
# 0.030 for 16) and helps the seen families' batch answers (a world left out 0.033 ->
# 0.024). docs/benchmarks.md, session 15.
CONFIDENCE_MOVIELENS = True
CONFIDENCE_MOVIELENS_WEIGHT = 8.0
CONFIDENCE_DAILY = True


def world_indices(spec: str) -> tuple[int, ...]:
    """World indices from "a:b" ranges and single numbers, comma separated ("0:4,12:20")."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition(":")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"world indices {spec!r}: want ranges a:b or numbers, comma separated")
        out += range(int(lo), int(hi)) if sep else [int(lo)]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"world indices {spec!r}: empty or repeated")
    return tuple(out)


def answers_of(hs: list, daily: bool = False, priors: dict | None = None) -> list[dict]:
    """Raw answers (bench/_confidence.household_answers, settled answers included;
    ``daily``: and a day per arrival) of these households, two processes; ``priors``:
    per world id, the population prior its cold starts answer from (world_priors)."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        return list(pool.map(partial(_household_answers, daily=daily), hs,
                             [(priors or {}).get(h.world_id) for h in hs]))


def _household_answers(h, prior, daily: bool) -> dict:
    from bench._confidence import household_answers
    return household_answers(h, settled=True, daily=daily, prior=prior)


def tuning_answers(world_ids: tuple[int, ...], households_per_world: int,
                   daily: bool = False, population_prior: bool = SERVICE_COLD_START_PRIOR) -> tuple[list, list[dict]]:
    """The TUNING households of those worlds and their raw answers (answers_of); their
    cold starts answer as the service's default does (``population_prior``: from their
    worlds' priors, the maps then see what a service with HEARTH_COLD_START=
    population_prior serves and COLD_START_CONFIDENCE is fitted; session 16)."""
    def generate(n):
        return worlds.generate(worlds.TUNING, households_per_world=n, world_indices=world_ids)
    hs = generate(households_per_world)
    return hs, answers_of(hs, daily, cold_start_priors(hs, generate, population_prior))


def movielens_tuning_answers(quick: bool, daily: bool = False,
                             population_prior: bool = SERVICE_COLD_START_PRIOR) -> tuple[list, list[dict]]:
    """The real viewers' TUNING half (bench/worlds_movielens.py, split="tuning": viewers of
    even MovieLens ids, 60 households; --quick 10) and their raw answers (answers_of)."""
    def generate(n):
        return worlds_movielens.generate(split="tuning", worlds_per_family=1 if quick else 3,
                                         households_per_world=n)
    hs = generate(2 if quick else 4)
    return hs, answers_of(hs, daily, cold_start_priors(hs, generate, population_prior))


def calibrate_device_confidence(quick: bool, leave_one_world_out: bool = False,
                                leave_one_family_out: bool = False,
                                fit_worlds: tuple[int, ...] = CONFIDENCE_FIT_WORLDS,
                                fresh_worlds: tuple[int, ...] | None = None,
                                households_per_world: int = CONFIDENCE_HOUSEHOLDS_PER_WORLD,
                                movielens: bool = CONFIDENCE_MOVIELENS, daily: bool = CONFIDENCE_DAILY,
                                movielens_weight: float = CONFIDENCE_MOVIELENS_WEIGHT,
                                population_prior: bool = SERVICE_COLD_START_PRIOR) -> dict:
    """The device-evidence confidence maps of model.py, fitted on the TUNING worlds only
    (sessions with device ids): each session's uncalibrated answer from a batch fit and
    at its arrival in a time-ordered stream (bench/_confidence.py, the way the service
    sees them), split by what the service knows when it answers: the model's age and
    whether it has folded sessions in since its last full fit ("streamed"):

    * DEVICE_CONFIDENCE_MAPS: isotonic regression of "the answer is right" on the
      top-label probability of multi-person answers, one map per
      model.device_map_name (models of >= YOUNG_MODEL_SESSIONS sessions: fitted at once
      or streamed; younger models: one map);
    * ONE_PERSON_CONFIDENCE, per model.one_person_group (a full fit of more sessions than
      a stream's first; a stream's first fit, young streamed models and cold starts;
      streamed and mature; one_person_answers): a logistic regression of "the answer is
      right" on the answer's one-person evidence (model.ONE_PERSON_EVIDENCE), L2 with
      ONE_PERSON_C (scikit-learn's C).
    Printed in the form model.py holds them. ``fresh_worlds``: also the fit scored on
    those TUNING worlds (never fitted on), pooled and per family, and leave-one-family-out
    on them (fitted on two families of ``fit_worlds``, scored on the third's fresh worlds:
    neither the family nor the world seen, as an outside evaluator's households are).

    ``movielens``: the real viewers' TUNING half (movielens_tuning_answers) is fitted on
    too, each of its households weighing ``movielens_weight`` synthetic ones, and scored
    leaving each of its worlds out (fitted on the synthetic households and its other
    worlds; beside the fit on the synthetic households alone). ``daily``: every
    household's stream is also answered a day per arrival (the "daily" answers: the maps
    are fitted on both arrival patterns and scored on each)."""
    if quick:
        fit_worlds, households_per_world = fit_worlds[:1], 4
    t0 = time.time()
    hs, answers = tuning_answers(fit_worlds, households_per_world, daily, population_prior)
    families = [h.family for h in hs]
    weights = [1.0] * len(hs)
    ml: list[dict] = []
    ml_hs: list = []
    if movielens:
        ml_hs, ml = movielens_tuning_answers(quick, daily, population_prior)
        weights += [movielens_weight] * len(ml)
    out = {"households": len(hs), "movielens_households": len(ml), "movielens_weight": movielens_weight,
           "daily": daily, "fit_worlds": list(fit_worlds), **fit_device_confidence(answers + ml, weights=weights),
           "answers_s": round(time.time() - t0, 1)}
    log(f"{len(hs)} households of TUNING worlds {list(fit_worlds)} (+ {len(ml)} real viewers' TUNING) "
        f"answered in {out['answers_s']} s")
    extra = (ml, [movielens_weight] * len(ml))   # fitted on in every fold of the synthetic scores
    if leave_one_world_out:   # every family's w-th world held out together
        out["leave_one_world_out"] = score_held_out([h.world_id.rsplit("-w", 1)[1] for h in hs], answers,
                                                    "leave-one-world-out", families, extra=extra)
    if leave_one_family_out:  # a family the fit has never seen, as REPORTING's and blind's are
        out["leave_one_family_out"] = score_held_out(families, answers, "leave-one-family-out", families,
                                                     extra=extra)
    if movielens:   # real viewers the fit has not seen: fitted on the synthetic ones alone, and with the others
        ml_families = [h.family for h in ml_hs]
        out["movielens_synthetic_fit"] = score_fresh(answers, ml, ml_families, "real viewers, synthetic fit")
        out["movielens_leave_one_world_out"] = score_held_out(
            [h.world_id.rsplit("-w", 1)[1] for h in ml_hs], ml, "real viewers, leave-one-world-out", ml_families,
            extra=(answers, [1.0 / movielens_weight] * len(answers)))
    out["cold_start"] = fit_cold_start_confidence(answers + ml, families + ["real viewers"] * len(ml), weights)
    if fresh_worlds:
        if set(fresh_worlds) & set(fit_worlds):
            raise ValueError(f"fresh worlds {sorted(set(fresh_worlds) & set(fit_worlds))} are fitted on")
        fresh_hs, fresh = tuning_answers(fresh_worlds, households_per_world, daily, population_prior)
        fresh_families = [h.family for h in fresh_hs]
        out["fresh_worlds"] = {"worlds": list(fresh_worlds), "households": len(fresh_hs),
                               **score_fresh(answers + ml, fresh, fresh_families, "fresh worlds", weights)}
        out["fresh_worlds_leave_one_family_out"] = score_held_out(
            families, answers, "fresh worlds, leave-one-family-out", families, fresh=fresh,
            fresh_folds=fresh_families, fresh_families=fresh_families, extra=extra)
    return out


def fit_cold_start_confidence(answers: list[dict], sources: list[str], weights: list[float]) -> dict:
    """model.COLD_START_CONFIDENCE, scored: how often a cold start's answer among several
    persons is right (cold_multi_answers of the TUNING answers, every mode but the
    settled one: the streams' cold starts answer from their world's population prior as
    the service's do, _worlds_eval.world_priors; "right" against the persons matched over
    the whole stream, as the benchmarks score them), a Laplace-smoothed share weighted
    per household (``weights``) — fit_device_confidence's "cold_start_confidence". Scored
    leaving each TUNING family (``sources``) out, and on the real viewers ("real
    viewers") from the synthetic households alone: ECE of those answers, raw and through
    the figure. (Until session 16 a separate run of each household's first nine sessions
    with one prior fitted on 200 TUNING households of every world.)"""
    from bench._clustering_eval import ece
    source = np.asarray(sources)
    modes = ("batch", "stream", "daily")
    rows = [[(ans[m], cold_multi_answers(ans[m])) for m in modes if m in ans] for ans in answers]

    def share(sel: np.ndarray) -> float:
        right = sum(w * a.correct[r].sum() for parts, w, s in zip(rows, weights, sel) if s for a, r in parts)
        n = sum(w * r.sum() for parts, w, s in zip(rows, weights, sel) if s for _, r in parts)
        return float((right + 1.0) / (n + 2.0))

    def scored(sel: np.ndarray, value: float) -> dict:
        top = np.concatenate([a.P.max(axis=1)[r] for parts, s in zip(rows, sel) if s for a, r in parts])
        right = np.concatenate([a.correct[r] for parts, s in zip(rows, sel) if s for a, r in parts])
        if not top.size:
            return {"answers": 0}
        return {"answers": int(top.size), "accuracy": round(float(right.mean()), 4),
                "raw_confidence": round(float(top.mean()), 4), "ece_raw": round(ece(top, right), 4),
                "confidence": round(value, 4), "ece": round(ece(np.full(top.size, value), right), 4)}
    every = np.ones(len(answers), dtype=bool)
    n_cold = sum(int(r.sum()) for parts in rows for _, r in parts)
    n_all = sum(a.P.shape[0] for parts in rows for a, _ in parts)
    out = {"cold_start_confidence": round(share(every), 4) if n_cold else None, "answers": n_cold,
           "share_of_answers": round(n_cold / max(n_all, 1), 4)}
    out["leave_one_family_out"] = {str(f): scored(source == f, share(source != f))
                                   for f in np.unique(source[source != "real viewers"])}
    if (source == "real viewers").any():
        out["real_viewers_synthetic_fit"] = scored(source == "real viewers", share(source != "real viewers"))
    log(f"cold start (population prior): {out}")
    return out


def held_out_confidence(fit: dict, a, settled_mode: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a fit (fit_device_confidence's dict) answers for one household's raw answers
    ``a`` (bench._confidence.RawAnswers of one mode; ``settled_mode``: the settled
    answers, or an arrival's answers with the sessions its refresh included: the included
    sessions of a streamed mature model go through the "settled" map, as the keeper
    records them): (confidence of each
    answer, which answers are one-person ones). The maps' top-label value moved by its
    device-group shift and floored at 1 / persons, as model.calibrate_confidence does;
    one-person answers from their group's evidence; answers the maps leave alone raw."""
    from bench._confidence import MIXTURE
    from services.clustering.domain import model as M
    lo, hi = fit["one_person_log_sessions"]
    settled = a.included if settled_mode else np.zeros(a.P.shape[0], dtype=bool)
    conf = a.P.max(axis=1).copy()
    live = (a.P > 0).sum(axis=1)
    young = a.age < YOUNG_MODEL_SESSIONS
    one, groups = one_person_answers(a)
    unknown = new_device_answers(a)
    multi = a.device & (a.kind == MIXTURE) & (live > 1) & ~unknown
    names = np.array([M.device_map_name(bool(y), bool(s), bool(t)) for y, s, t in zip(young, a.streamed, settled)])
    for map_name, (xs, ys) in fit["device_confidence_maps"].items():
        rows = multi & (names == map_name)
        value = M.shifted_confidence(np.interp(conf[rows], xs, ys), M.household_shift(
            a.groups[rows], live[rows], fit["device_confidence_shift"][map_name], a.age[rows]))
        conf[rows] = np.maximum(value, 1.0 / live[rows])
    for group, (intercept, coef) in fit["one_person_confidence"].items():
        rows = one & (groups == group)
        x = np.column_stack((np.clip(a.evidence[rows, 0], lo, hi), a.evidence[rows, 1:]))
        conf[rows] = np.minimum(1.0 / (1.0 + np.exp(-(intercept + x @ np.asarray(coef)))), M.ONE_PERSON_MAX_CONFIDENCE)
    values = fit["new_device_confidence"]
    conf[unknown] = np.where(live[unknown] <= 1, values["one_person"],
                             np.maximum(values["several"], 1.0 / np.maximum(live[unknown], 1)))
    cold = cold_multi_answers(a)   # a cold start's answer among several persons (floored at 1 / persons)
    value = fit["cold_start_confidence"] if fit.get("cold_start_confidence") is not None else M.COLD_START_CONFIDENCE
    conf[cold] = np.maximum(value, 1.0 / live[cold])
    return conf, one


def cold_multi_answers(a) -> np.ndarray:
    """Of one household's raw answers ``a``: a cold start's answers among several persons
    (its world's population prior) that model.COLD_START_CONFIDENCE gives (with device
    evidence, as model.assign_batch calibrates them)."""
    from bench._confidence import COLD_MULTI
    return a.device & (a.kind == COLD_MULTI)


def new_device_answers(a) -> np.ndarray:
    """Of one household's raw answers ``a``: the answers about a session on a device the
    model (a mixture with device evidence) did not know when it answered
    (model.new_device_confidence gives them)."""
    from bench._confidence import MIXTURE
    if a.known is None:
        return np.zeros(a.P.shape[0], dtype=bool)
    return (a.kind == MIXTURE) & ~a.known


def one_person_answers(a) -> tuple[np.ndarray, np.ndarray]:
    """Of one household's raw answers ``a`` (bench._confidence.RawAnswers): which are
    one-person answers the one-person confidence gives (a model with device evidence that
    knows one person, or a cold start's one person), and each answer's
    model.one_person_group (cold starts are young streams')."""
    from bench._confidence import COLD_ONE, MIXTURE
    from services.clustering.domain.model import one_person_group
    live = (a.P > 0).sum(axis=1)
    cold = a.kind == COLD_ONE
    one = a.device & (((a.kind == MIXTURE) & (live <= 1)) | cold) & ~new_device_answers(a)
    young = (a.age < YOUNG_MODEL_SESSIONS) | cold
    fits = a.fit_sessions if a.fit_sessions is not None else [None] * live.size
    groups = np.array([one_person_group(bool(y), bool(s or c), None if f is None else int(f))
                       for y, s, c, f in zip(young, a.streamed, cold, fits)])
    return one, groups


def _score_with(fit: dict, answers: list[dict], families, scored: dict, gaps: dict) -> None:
    """Append each household's answers through ``fit`` to ``scored`` / ``gaps`` (per mode)."""
    from bench._confidence import MIXTURE
    from services.clustering.domain import model as M
    for ans, family in zip(answers, families):
        for mode in scored:
            a = ans[mode]
            conf, one = held_out_confidence(fit, a, a.included is not None)
            at = a.checkpoint if a.checkpoint is not None else np.full(a.P.shape[0], np.nan)
            _, group = one_person_answers(a)
            persons = a.persons_so_far if a.persons_so_far is not None else np.zeros(conf.size, dtype=np.int64)
            scored[mode].append((conf, a.correct, one, at, np.full(conf.size, family), group, persons))
            live = (a.P > 0).sum(axis=1)
            multi = a.device & (a.kind == MIXTURE) & (live > 1) & ~new_device_answers(a)
            if multi.sum() >= 10:   # the household's miscalibration beside its evidence
                gaps[mode].append((conf[multi].mean() - a.correct[multi].mean(),
                                   *M.household_evidence(a.groups[multi], live[multi], a.age[multi]).mean(axis=0)))


def _modes(answers: list[dict]) -> dict[str, list]:
    return {mode: [] for mode in ("batch", "stream", "settled", "daily") if mode in answers[0]}


def score_held_out(folds: list[str], answers: list[dict], name: str, families: list[str],
                   fresh: list[dict] | None = None, fresh_folds: list[str] | None = None,
                   fresh_families: list[str] | None = None,
                   extra: tuple[list[dict], list[float]] = ([], [])) -> dict:
    """How the fit does on households it has not seen: per fold (a world index, a
    family), the maps and one-person fit on the other folds, scored on the held-out
    households' answers (held_out_confidence). With ``fresh`` (answers of households of
    other worlds, never fitted on): each fold's fit is scored on the fresh households of
    that fold instead (``fresh_folds``; leave-one-family-out on fresh worlds: a family and
    worlds the fit has never seen). ``extra``: (answers, their weights) fitted on in every
    fold besides (the real viewers' with the synthetic ones). ECE of every answer per mode and per family (and the
    worst family), ECE / Brier of the one-person answers, and per mode the correlation
    over households of confidence − accuracy (their multi-person answers) with their
    HOUSEHOLD_EVIDENCE: what the shift has left."""
    fold, families = np.asarray(folds), np.asarray(families)
    scored = _modes(answers)
    gaps: dict[str, list] = {mode: [] for mode in scored}   # per household: confidence - accuracy, evidence
    for held in np.unique(fold):
        kept = [a for a, f in zip(answers, fold) if f != held]
        fit = fit_device_confidence(kept + extra[0], weights=[1.0] * len(kept) + list(extra[1]))
        if fresh is None:
            test = [(a, g) for a, f, g in zip(answers, fold, families) if f == held]
        else:
            test = [(a, g) for a, f, g in zip(fresh, fresh_folds, fresh_families) if f == held]
        _score_with(fit, [a for a, _ in test], [g for _, g in test], scored, gaps)
    return summarise_scored(scored, gaps, name)


def score_fresh(answers: list[dict], fresh: list[dict], fresh_families: list[str], name: str,
                weights: list[float] | None = None) -> dict:
    """One fit on every household of ``answers`` (``weights`` per household), scored on
    the ``fresh`` households (other worlds, never fitted on), as score_held_out reports."""
    scored = _modes(fresh)
    gaps: dict[str, list] = {mode: [] for mode in scored}
    _score_with(fit_device_confidence(answers, weights=weights), fresh, fresh_families, scored, gaps)
    return summarise_scored(scored, gaps, name)


def summarise_scored(scored: dict, gaps: dict, name: str) -> dict:
    """score_held_out's figures from the scored answers (per mode)."""
    from bench._clustering_eval import ece
    from services.clustering.domain import model as M
    out = {}
    for mode, parts in scored.items():
        c, y, one, at, family, group, persons = (np.concatenate([p[k] for p in parts]) for k in range(7))
        out[mode] = {"ece": round(ece(c, y), 4), "one_person_answers": int(one.sum()),
                     "one_person_ece": round(ece(c[one], y[one]), 4),
                     "one_person_brier": round(float(np.mean((c[one] - y[one]) ** 2)), 4)}
        # the one-person answers by group (model.one_person_group) and by whether the
        # sessions so far truly have one person (a one-person answer in a larger household
        # is a model that has not found the others: what its confidence must price)
        out[mode]["one_person_by"] = {
            key: {"answers": int(sel.sum()), "confidence": round(float(c[sel].mean()), 4),
                  "accuracy": round(float(y[sel].mean()), 4), "ece": round(ece(c[sel], y[sel]), 4)}
            for key, sel in [(g, one & (group == g)) for g in np.unique(group[one])]
            + [("one person", one & (persons == 1)), ("more persons", one & (persons > 1))] if sel.any()}
        if not np.isnan(at).all():   # settled answers: also where in the stream
            out[mode]["ece_at"] = {f"{f:g}": round(ece(c[at == f], y[at == f]), 4) for f in np.unique(at)}
        out[mode]["by_family"] = {str(f): {"ece": round(ece(c[family == f], y[family == f]), 4),
                                           "confidence_minus_accuracy": round(float(c[family == f].mean()
                                                                                    - y[family == f].mean()), 4)}
                                  for f in np.unique(family)}
        out[mode]["worst_family_ece"] = max(v["ece"] for v in out[mode]["by_family"].values())
        # what is left of the per-household miscalibration that the shift's evidence
        # follows (about -0.5 for the device-group share with pooled maps, on TUNING)
        g = np.array(gaps[mode])
        out[mode]["household_gap_correlation"] = {
            n: round(float(np.corrcoef(g[:, 0], g[:, 1 + j])[0, 1]), 3) if len(g) > 2 and g[:, 1 + j].std() > 0
            else None for j, n in enumerate(M.HOUSEHOLD_EVIDENCE)}
        log(f"{name} {mode}: {out[mode]}")
    return out


ONE_PERSON_C = 1.0   # C = 0.1 and 0.01 no better on TUNING (docs/clustering.md, "Confidence")
YOUNG_MAP_KNOTS, MATURE_MAP_KNOTS = 11, 21   # grid of a map: fewer young answers


MAP_FORMS = ("isotonic", "logistic", "beta")


def smooth_map(x: np.ndarray, y: np.ndarray, grid: np.ndarray, form: str,
               weight: np.ndarray | None = None) -> np.ndarray:
    """A confidence map's values at ``grid`` from answers at raw top-label probability
    ``x`` that were right (``y``): "isotonic" (a step function, as many steps as the
    answers support), "logistic" (Platt: logit of the value linear in the logit of x) or
    "beta" (Kull et al.'s beta calibration: linear in log x and log(1 - x)); the two
    parametric forms are smooth and have 2-3 parameters. Non-decreasing in x."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    if form == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y, sample_weight=weight)
        return np.maximum.accumulate(iso.predict(grid))
    if form not in MAP_FORMS:
        raise ValueError(f"map form {form!r}: one of {MAP_FORMS}")

    def design(v):
        v = np.clip(v, 1e-4, 1.0 - 1e-4)
        return (np.log(v / (1.0 - v))[:, None] if form == "logistic"
                else np.column_stack((np.log(v), -np.log(1.0 - v))))
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(design(x), y, sample_weight=weight)
    return np.maximum.accumulate(lr.predict_proba(design(grid))[:, 1])


def fit_device_confidence(answers: list[dict], one_person_c: float = ONE_PERSON_C, form: str = "isotonic",
                          mature_knots: int | None = None, weights: list[float] | None = None,
                          shift_l2: float | None = None, weighted: tuple[str, ...] | None = None) -> dict:
    """calibrate_device_confidence's fit on raw answers (bench/_confidence.household_answers).
    ``form``: how each map is fitted (smooth_map); ``mature_knots``: grid of the maps of
    older models (MATURE_MAP_KNOTS); ``weights``: per household (e.g. each family's
    households summing to the same), every answer of the household weighted so, in the
    maps named in ``weighted`` only (None: every map and one-person group);
    ``shift_l2``: the household shift's ridge (HOUSEHOLD_SHIFT_L2)."""
    from sklearn.linear_model import LogisticRegression

    from bench._confidence import MIXTURE
    from services.clustering.domain.model import (
        DEVICE_CONFIDENCE_MAPS, HOUSEHOLD_EVIDENCE, ONE_PERSON_EVIDENCE, device_map_name, household_evidence)
    # the "settled" map only when settled answers were recorded (household_answers(settled=True))
    multi: dict[str, tuple[list, ...]] = {name: ([], [], [], []) for name in DEVICE_CONFIDENCE_MAPS
                                          if name != "settled" or any("settled" in a for a in answers)}
    one: dict[str, list] = {name: [] for name in ("fitted", "young", "mature")}   # (evidence..., right, weight)
    new_device: dict[str, list] = {"one_person": [], "several": []}   # (right, weight)
    cold: list[np.ndarray] = []   # (right, weight) of cold starts' answers among several persons
    for ans, weight in zip(answers, weights if weights is not None else [1.0] * len(answers)):
        for mode in ("batch", "stream", "settled", "daily"):
            if mode not in ans:
                continue
            a = ans[mode]
            live = (a.P > 0).sum(axis=1)
            top = a.P.max(axis=1)
            young = a.age < YOUNG_MODEL_SESSIONS
            unknown = new_device_answers(a)
            rows = a.device & (a.kind == MIXTURE) & (live > 1) & ~unknown
            # the map each answer is recorded through (an arrival's sessions that its
            # refresh included, as the keeper records them)
            included = a.included if a.included is not None else np.zeros(live.size, dtype=bool)
            names = np.array([device_map_name(y, s, bool(t)) for y, s, t in zip(young, a.streamed, included)])
            household = household_evidence(a.groups, live, a.age)
            w = np.full(live.size, float(weight))
            if weighted is not None:   # the weight where the map of the answer is named
                w = np.where(np.isin(names, weighted), w, 1.0)
            if mode == "settled":
                # only the "settled" map learns from them (sessions a streamed mature model
                # had already included; the other answers keep their own maps and groups)
                rows &= a.included & (names == "settled")
                for column, values in zip(multi["settled"], (top, a.correct, household, w)):
                    column.append(values[rows])
                continue
            for name in multi:
                for column, values in zip(multi[name], (top, a.correct, household, w)):
                    column.append(values[rows & (names == name)])
            for name, sel in (("one_person", unknown & (live <= 1)), ("several", unknown & (live > 1))):
                new_device[name].append(np.c_[a.correct[sel], w[sel]])
            sel = cold_multi_answers(a)
            cold.append(np.c_[a.correct[sel], w[sel]])
            rows, group = one_person_answers(a)
            for name in one:
                sel = rows & (group == name)
                one[name].append(np.c_[a.evidence[sel], a.correct[sel], w[sel]])
    maps, shifts, counts, tables = {}, {}, {}, {}
    empty = [f"map {n!r}" for n in multi if not sum(v.size for v in multi[n][0])] + \
        [f"one-person group {n!r}" for n in one if not sum(v.shape[0] for v in one[n])]
    if empty:   # a NaN in model.py would answer NaN confidences
        raise ValueError(f"no answers for {', '.join(empty)}: fit on more households")
    for name in multi:
        x, y = np.concatenate(multi[name][0]), np.concatenate(multi[name][1]).astype(float)
        w = np.concatenate(multi[name][3])
        grid = np.linspace(x.min(), 1.0, YOUNG_MAP_KNOTS if name == "young" else mature_knots or MATURE_MAP_KNOTS)
        knots_y = smooth_map(x, y, grid, form, w)
        # The last knot (a posterior of 1.0): the accuracy of the whole top grid cell, not
        # the isotonic fit's last block, which on a few hundred young answers can be a
        # handful that were all right and would let a young model say 1.0.
        top_cell = x >= grid[-2]
        if top_cell.any():
            knots_y[-1] = max(knots_y[-2], float(np.average(y[top_cell], weights=w[top_cell])))
        maps[name] = (np.round(grid, 4).tolist(), np.round(knots_y, 4).tolist())
        counts[name] = int(x.size)
        household = np.vstack(multi[name][2])
        shifts[name] = fit_household_shift(np.interp(x, *maps[name]), household, y,
                                           HOUSEHOLD_SHIFT_L2 if shift_l2 is None else shift_l2, w)
        log(f"{name} device confidence map: x {maps[name][0]} y {maps[name][1]} "
            f"({x.size} multi-person answers, right {y.mean():.3f} at confidence {x.mean():.3f} raw); "
            f"logit shift: intercept {shifts[name][0]}, per unit of "
            f"{dict(zip(HOUSEHOLD_EVIDENCE, shifts[name][1]))} (on average {np.round(household.mean(axis=0), 3)})")
    every = np.vstack([r for rows in one.values() for r in rows]).astype(float)
    # the range of sessions seen the fit rests on (model.ONE_PERSON_LOG_SESSIONS): answers
    # of models outside it are judged at its edge
    log_sessions = (round(float(every[:, 0].min()), 4), round(float(every[:, 0].max()), 4))
    for name, rows in one.items():
        ones = np.vstack(rows).astype(float)
        x, y, w = ones[:, :len(ONE_PERSON_EVIDENCE)], ones[:, -2], ones[:, -1]
        x[:, 0] = np.clip(x[:, 0], *log_sessions)
        if np.unique(y).size < 2:   # all right (or all wrong): no slope to fit
            intercept, coef = float(np.log((y.sum() + 1.0) / (y.size - y.sum() + 1.0))), np.zeros(x.shape[1])
        else:
            lr = LogisticRegression(C=one_person_c, max_iter=1000).fit(x, y, sample_weight=w / w.mean())
            intercept, coef = float(lr.intercept_[0]), lr.coef_[0]
        tables[name] = (round(intercept, 4), tuple(round(float(c), 4) for c in coef))
        counts[f"one_person_{name}"] = int(ones.shape[0])
        log(f"{name} one-person confidence: intercept {tables[name][0]} coefficients "
            f"{dict(zip(ONE_PERSON_EVIDENCE, tables[name][1]))} ({ones.shape[0]} answers, right {y.mean():.3f})")
    # a session on a device the model did not know: how often such answers were right
    # (model.NEW_DEVICE_CONFIDENCE; a Laplace-smoothed share, weighted)
    new_device_values = {}
    for name, parts in new_device.items():
        rw = np.vstack(parts) if parts else np.zeros((0, 2))
        new_device_values[name] = round(float((rw[:, 0] @ rw[:, 1] + 1.0) / (rw[:, 1].sum() + 2.0)), 4)
        counts[f"new_device_{name}"] = int(rw.shape[0])
    log(f"new-device confidence: {new_device_values} ({counts['new_device_one_person']} one-person, "
        f"{counts['new_device_several']} several-person answers)")
    # a cold start's answer among several persons (the world's population prior): how
    # often such answers were right (model.COLD_START_CONFIDENCE; Laplace-smoothed, weighted)
    # (None without such answers: a cold start by the account strategy, the service's
    # default since session 16; the figure is refitted with --population-prior)
    rw = np.vstack(cold)
    cold_value = round(float((rw[:, 0] @ rw[:, 1] + 1.0) / (rw[:, 1].sum() + 2.0)), 4) if rw.shape[0] else None
    counts["cold_start_several"] = int(rw.shape[0])
    log(f"cold-start confidence (answers among several persons): {cold_value} ({rw.shape[0]} answers)")
    return {"device_confidence_maps": maps, "device_confidence_shift": shifts, "one_person_confidence": tables,
            "one_person_log_sessions": log_sessions, "new_device_confidence": new_device_values,
            "cold_start_confidence": cold_value, "answers": counts}


HOUSEHOLD_SHIFT_L2 = 1.0   # ridge on the coefficients (TUNING, share alone: 300 no better out of sample; docs/benchmarks.md)


def fit_household_shift(mapped: np.ndarray, evidence: np.ndarray, right: np.ndarray,
                        l2: float = HOUSEHOLD_SHIFT_L2,
                        weight: np.ndarray | None = None) -> tuple[float, tuple[float, ...]]:
    """model.DEVICE_CONFIDENCE_SHIFT of one map: (intercept, coefficients) of a logistic
    regression of "the answer is right" on the household ``evidence``
    (model.household_evidence) with the logit of the map's value as offset (the map's
    own slope kept). ``weight``: per answer (scaled to a mean of 1, so the ridge weighs
    the same)."""
    from scipy.optimize import minimize
    from scipy.special import expit, logit
    offset = logit(np.clip(mapped, 1e-4, 1.0 - 1e-4))
    A = np.column_stack((np.ones(len(right)), evidence))
    weight = np.ones(len(right)) if weight is None else np.asarray(weight, dtype=np.float64) / np.mean(weight)

    def loss(w):
        eta = offset + A @ w
        residual = weight * (expit(eta) - right)
        ridge = np.r_[0.0, w[1:]]   # the intercept is not shrunk
        return (np.sum(weight * (np.logaddexp(0.0, eta) - right * eta)) + 0.5 * l2 * ridge @ ridge,
                A.T @ residual + l2 * ridge)
    w = minimize(loss, np.zeros(A.shape[1]), jac=True, method="L-BFGS-B").x
    return round(float(w[0]), 4), tuple(round(float(c), 4) for c in w[1:])


def cold_start_priors(hs: list, generate, population_prior: bool) -> dict | None:
    """Per world of ``hs``, the population prior its service answers cold starts with
    (worlds_eval.world_priors over the world's established households; ``generate(n)``:
    the generator call of ``hs`` with n households per world); None with
    ``population_prior`` False (--no-population-prior: the account strategy, the service's
    default cold start since session 16)."""
    if not population_prior:
        return None
    import time
    t0 = time.time()
    priors = worlds_eval.world_priors(hs, generate)
    log(f"[worlds] population priors of {len(priors)} worlds ({worlds_eval.WORLD_POPULATION} established "
        f"households each, {sum(p is not None for p in priors.values())} built) {time.time() - t0:.0f}s")
    return priors


def run_worlds(quick: bool, streaming: bool = True, workers: int = 2,
               feedback_draws: int = worlds_eval.FEEDBACK_MESH_DRAWS,
               population_prior: bool = SERVICE_COLD_START_PRIOR) -> dict:
    """The randomized world families, REPORTING split only (never tuned on)."""
    split = worlds.REPORTING
    n_worlds = 1 if quick else split.worlds_per_family
    n_house = 3 if quick else split.households_per_world
    log(f"[worlds] generating {len(split.families) * n_worlds * n_house} households "
        f"({n_worlds} worlds x {n_house} households per family, split {split.name!r}, seed {split.seed})")
    hs = worlds.generate(split, worlds_per_family=n_worlds, households_per_world=n_house)
    priors = cold_start_priors(hs, lambda n: worlds.generate(split, worlds_per_family=n_worlds, households_per_world=n),
                               population_prior)
    block = worlds_eval.run(hs, log, held_out=worlds.HELD_OUT_FAMILIES, streaming=streaming, workers=workers,
                            feedback_mesh_draws=feedback_draws, priors=priors)
    block["split"] = {"name": split.name, "seed": split.seed, "families": list(split.families),
                      "held_out_families": list(worlds.HELD_OUT_FAMILIES),
                      "tuning_families": list(worlds.TUNING.families), "tuning_seed": worlds.TUNING.seed,
                      "worlds_per_family": n_worlds, "households_per_world": n_house,
                      "cold_start_prior_households": worlds_eval.WORLD_POPULATION if priors else 0}
    log_worlds_summary("worlds", block, streaming)
    return block


def log_worlds_summary(tag: str, block: dict, streaming: bool) -> None:
    a = block["all"]
    log(f"[{tag}] hearth acc {a['session_accuracy']:.3f} (best simple {a['best_simple_baseline_accuracy']:.3f}, "
        f"oracle {a['baselines']['supervised_oracle']['session_accuracy']:.3f}, gap closed {a['gap_closed']:.2f}) "
        f"size exact {a['household_size_exact']:.2f} single kept {a['single_person_kept']} ece {a['ece']:.3f}")
    if not streaming:
        return
    st, fb, cc = a["streaming"], a["after_feedback"], a["composition_change"]
    se = a["streaming_settled"]
    log(f"[{tag}] streaming settled (the final model on every session, as GET /v1/household serves it) acc "
        f"{se['session_accuracy']:.3f} size exact {se['household_size_exact']:.2f} single kept "
        f"{se['single_person_kept']} ece {se['ece']:.3f}")
    mesh = {m: fb[m].get("mesh") for m in ("batch", "streaming")}
    if mesh["batch"]:
        log(f"[{tag}] ece after feedback on 3.75 %, the mesh's whole loop (label refits + calibrator), mean of "
            f"{mesh['batch']['draws']} draws: batch {mesh['batch']['mesh']:.3f} streaming {mesh['streaming']['mesh']:.3f} "
            f"(no feedback {mesh['batch']['no_feedback']:.3f} / {mesh['streaming']['no_feedback']:.3f}, labels only "
            f"{mesh['batch']['labels_only']:.3f} / {mesh['streaming']['labels_only']:.3f}, calibrator only "
            f"{mesh['batch']['calibrator_only']:.3f} / {mesh['streaming']['calibrator_only']:.3f}; accuracy of the "
            f"other sessions {mesh['batch']['accuracy_no_feedback']:.3f} -> {mesh['batch']['accuracy_after']:.3f} / "
            f"{mesh['streaming']['accuracy_no_feedback']:.3f} -> {mesh['streaming']['accuracy_after']:.3f}; "
            f"binning floor {mesh['batch']['mesh_floor']:.3f} / {mesh['streaming']['mesh_floor']:.3f}, a level per "
            f"group fitted on the scored answers {mesh['batch']['mesh_level_per_group_ceiling']:.3f} / "
            f"{mesh['streaming']['mesh_level_per_group_ceiling']:.3f})")
        hh = {m: mesh[m] for m in ("batch", "streaming") if "mesh_household_floor" in mesh[m]}
        for m, r in hh.items():
            log(f"[{tag}] ece noise over households, {m}: after feedback {r['mesh']:.3f} (household resamples 2.5-97.5 % "
                f"{r['mesh_household_p025']:.3f}-{r['mesh_household_p975']:.3f}, household floor "
                f"{r['mesh_household_floor']:.3f}, binning floor {r['mesh_floor']:.3f}); before feedback "
                f"{r['no_feedback']:.3f} ({r['no_feedback_household_p025']:.3f}-{r['no_feedback_household_p975']:.3f}, "
                f"household floor {r['no_feedback_household_floor']:.3f}, binning floor {r['no_feedback_floor']:.3f})")
    log(f"[{tag}] streaming acc {st['session_accuracy']:.3f} ece {st['ece']:.3f}; ece after feedback, calibrator "
        f"alone, batch {fb['batch'].get('ece_after_calibrator_only', fb['batch']['ece_after']):.3f} streaming "
        f"{fb['streaming'].get('ece_after_calibrator_only', fb['streaming']['ece_after']):.3f} (mean of "
        f"{fb['batch']['ece_after_draws']['service']['draws']} other draws {fb['batch']['ece_after_draws']['service']['mean']:.3f}"
        f" / {fb['streaming']['ece_after_draws']['service']['mean']:.3f}; binning floor "
        f"{fb['batch']['ece_floor_calibrated']:.3f} / {fb['streaming']['ece_floor_calibrated']:.3f}); join/leave detected "
        f"{cc['detection_rate']} (same kind {cc['detection_rate_same_kind']}) at "
        f"{cc['false_alarms_per_household_quarter']} false alarms per household-quarter")
    log_composition_by_type(tag, cc, a.get("composition_change_baselines") or {})


def log_composition_by_type(tag: str, hearth: dict, baselines: dict) -> None:
    """Join/leave detection within the window, mean delay and false alarms per
    household-quarter, each by type (join / leave), Hearth beside the no-change and
    periodic-refit baselines on the same households."""
    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for name, sc in (("hearth", hearth), *baselines.items()):
        det, dly = sc["detection_rate_by_kind"], sc.get("mean_delay_sessions_by_kind") or {}
        fa = sc.get("false_alarms_per_household_quarter_by_kind") or {}
        n = sc.get("changes_by_kind") or {}
        log(f"[{tag}] join/leave {name}: " + "; ".join(
            f"{k} detected {fmt(det.get(k))} of {n.get(k, '?')} delay {fmt(dly.get(k), '.1f')} false alarms "
            f"{fmt(fa.get(k))}" for k in ("join", "leave"))
            + f" (per household-quarter, {sc['stable_household_quarters']} stable)")


def run_report_only(tag: str, generator, seed: int, quick: bool, streaming: bool = True, workers: int = 2,
                    feedback_draws: int = worlds_eval.FEEDBACK_MESH_DRAWS,
                    population_prior: bool = SERVICE_COLD_START_PRIOR) -> dict:
    """Households of a generator nobody tuned on (``generator.generate``: its families,
    worlds and households), scored as the worlds are. REPORT ONLY: never tune on it."""
    n_worlds, n_house = (1, 2) if quick else (3, 4)
    hs = generator.generate(worlds_per_family=n_worlds, households_per_world=n_house)
    log(f"[{tag}] {len(hs)} households ({n_worlds} worlds x {n_house} households per family, "
        f"seed {seed}, report only)")
    priors = cold_start_priors(hs, lambda n: generator.generate(worlds_per_family=n_worlds, households_per_world=n),
                               population_prior)
    block = worlds_eval.run(hs, log, streaming=streaming, workers=workers, feedback_mesh_draws=feedback_draws,
                            priors=priors)
    block["split"] = {"generator": f"bench/{generator.__name__.rsplit('.', 1)[-1]}.py", "seed": seed,
                      "families": list(worlds_blind.FAMILIES), "worlds_per_family": n_worlds,
                      "households_per_world": n_house, "report_only": True,
                      "unknown_genre_share": round(float(np.mean([h.unknown_genre_share for h in hs])), 3),
                      "households_with_composition_change": sum(bool(h.changes) for h in hs),
                      "cold_start_prior_households": worlds_eval.WORLD_POPULATION if priors else 0}
    log_worlds_summary(tag, block, streaming)
    return block


def run_blind(quick: bool, **kw) -> dict:
    """The blind worlds (bench/worlds_blind.py: a second generator written without
    reading the model), seed BLIND_SEED."""
    return run_report_only("blind", worlds_blind, worlds_blind.BLIND_SEED, quick, **kw)


def run_movielens(quick: bool, **kw) -> dict:
    """Real viewers (bench/worlds_movielens.py: MovieLens 100K users merged into accounts,
    the blind generator's times and devices), seed MOVIELENS_SEED."""
    return run_report_only("movielens", worlds_movielens, worlds_movielens.MOVIELENS_SEED, quick, **kw)


def run_movielens_latest(quick: bool, **kw) -> dict:
    """The second population of real viewers (bench/worlds_movielens_latest.py: MovieLens
    latest-small users merged into accounts the same way), seed LATEST_SEED."""
    return run_report_only("movielens_latest", worlds_movielens_latest, worlds_movielens_latest.LATEST_SEED,
                           quick, **kw)


def main() -> None:
    # The benchmark's run prints no warnings (sklearn's, numpy's: its figures are the output).
    # Set here, not at import: at import it silenced every warning of the process that imported
    # this module, so a pytest collection that imports it (tests/unit/clustering) hid every
    # warning raised at import after it, e.g. starlette's TestClient deprecation (newcomer34).
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--worlds-only", action="store_true",
                    help="only the randomized world families (bench/worlds.py)")
    ap.add_argument("--no-worlds", action="store_true", help="only Hearth's own simulator")
    ap.add_argument("--blind-only", action="store_true",
                    help="only the blind worlds (bench/worlds_blind.py, report only)")
    ap.add_argument("--movielens-only", action="store_true",
                    help="only real viewers: MovieLens 100K users merged into accounts (bench/worlds_movielens.py, "
                         "report only; the data: python -m bench.worlds_movielens --fetch)")
    ap.add_argument("--movielens-latest-only", action="store_true",
                    help="only the second population of real viewers: MovieLens latest-small users merged into "
                         "accounts (bench/worlds_movielens_latest.py, report only; the data: python -m "
                         "bench.worlds_movielens_latest --fetch)")
    ap.add_argument("--batch-only", action="store_true",
                    help="with --worlds-only / --blind-only / --movielens[-latest]-only: the batch fit and baselines, "
                         "no streaming part")
    ap.add_argument("--population-prior", action=argparse.BooleanOptionalAction, default=SERVICE_COLD_START_PRIOR,
                    help="the worlds' cold starts answer from their world's population prior "
                         "(bench/_worlds_eval.world_priors), as a service with HEARTH_COLD_START=population_prior "
                         "does; --no-population-prior: the account strategy. Default: the service's default "
                         f"({'--population-prior' if SERVICE_COLD_START_PRIOR else '--no-population-prior'})")
    ap.add_argument("--calibrate-confidence", action="store_true",
                    help="fit the confidence map on the TUNING worlds (prints it)")
    ap.add_argument("--device-maps-only", action="store_true",
                    help="with --calibrate-confidence: only the device-evidence maps (not the bare-vector map)")
    ap.add_argument("--periodic-baseline", action="store_true",
                    help="with --quick: also run the periodic-refit drift baseline (always on in a full run)")
    ap.add_argument("--leave-one-world-out", action="store_true",
                    help="with --calibrate-confidence: also score the device fit on each TUNING world index "
                         "fitted on the others")
    ap.add_argument("--leave-one-family-out", action="store_true",
                    help="with --calibrate-confidence: also score the device fit on each TUNING family "
                         "fitted on the other two (unseen families are what REPORTING and blind test)")
    ap.add_argument("--fit-worlds", type=world_indices, default=CONFIDENCE_FIT_WORLDS,
                    help="with --calibrate-confidence: the TUNING world indices the device maps are fitted on "
                         "(e.g. 0:4,12:20; default CONFIDENCE_FIT_WORLDS)")
    ap.add_argument("--fresh-worlds", type=world_indices, nargs="?", const=CONFIDENCE_FRESH_WORLDS, default=None,
                    help="with --calibrate-confidence: also score the device fit on these fresh TUNING worlds "
                         "(default CONFIDENCE_FRESH_WORLDS), pooled, per family and leaving each family out")
    ap.add_argument("--movielens", action=argparse.BooleanOptionalAction, default=CONFIDENCE_MOVIELENS,
                    help="with --calibrate-confidence: fit on the real viewers' TUNING half too (bench/"
                         "worlds_movielens.py split='tuning') and score it leaving each of its worlds out")
    ap.add_argument("--movielens-weight", type=float, default=CONFIDENCE_MOVIELENS_WEIGHT,
                    help="with --movielens: what one real viewers' household weighs in the fit (synthetic: 1)")
    ap.add_argument("--daily", action=argparse.BooleanOptionalAction, default=CONFIDENCE_DAILY,
                    help="with --calibrate-confidence: also answer every stream a day per arrival "
                         "(bench._worlds_eval.daily_ends), fit and score on both arrival patterns")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes scoring the world households (same figures for any number)")
    ap.add_argument("--feedback-draws", type=int, default=worlds_eval.FEEDBACK_MESH_DRAWS,
                    help="draws of the whole feedback loop in after_feedback (each refits every household "
                         "twice more: 3 draws about triple the worlds' CPU time; 0: the calibrator alone, as before)")
    ap.add_argument("--ece-population", action="store_true",
                    help="only issue #10's ECE read (before and after feedback, with the household noise) on "
                         "worlds.ECE_REPORTING, the population the ECE targets are judged on (REPORT ONLY; "
                         "bench/ece_population.py); batch fits unless --ece-streaming")
    ap.add_argument("--ece-split", choices=tuple(ece_population.SPLITS), default="ece_reporting",
                    help="with --ece-population: the worlds read (tuning: the mechanics checked on TUNING seeds)")
    ap.add_argument("--ece-worlds", type=int, default=None,
                    help="with --ece-population: worlds per family (default: the split's)")
    ap.add_argument("--ece-households", type=int, default=None,
                    help="with --ece-population: households per world (default: the split's)")
    ap.add_argument("--ece-streaming", action="store_true",
                    help="with --ece-population: the time-ordered streams too (about ten times the batch part's CPU)")
    ap.add_argument("--part", default=None, metavar="I/K",
                    help="with --ece-population and --cache: fit only part I of K (households i with i mod K = I)")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="with --ece-population: the parts' answers (written per part; a run without --part fits "
                         "what is missing and scores)")
    args = ap.parse_args()
    if args.ece_population:
        t0 = time.time()
        try:
            part = ece_population.parse_part(args.part)
        except ValueError as exc:
            ap.error(str(exc))
        if part is not None and not args.cache:
            ap.error("--part needs --cache DIR (where the parts' answers meet)")
        print(json.dumps({"ece_population": ece_population.run(
            ece_population.SPLITS[args.ece_split], log, streaming=args.ece_streaming, workers=args.workers,
            draws=args.feedback_draws, part=part, cache=args.cache, worlds_per_family=args.ece_worlds,
            households_per_world=args.ece_households), "elapsed_s": round(time.time() - t0, 1)}))
        return
    # The periodic-refit drift baseline refits every simulated drift household from
    # scratch every 50 sessions: it made `--quick --no-worlds` take 274 s instead of 46 s,
    # so the quick loop skips it unless asked; a full run always has it.
    periodic = args.periodic_baseline or not args.quick
    t0 = time.time()
    if args.calibrate:
        print(json.dumps(calibrate(args.quick)))
        return
    if args.calibrate_confidence:
        print(json.dumps({**({} if args.device_maps_only else {"bare": calibrate_confidence(args.quick)}),
                          "device": calibrate_device_confidence(args.quick, args.leave_one_world_out,
                                                                args.leave_one_family_out, args.fit_worlds,
                                                                args.fresh_worlds, movielens=args.movielens,
                                                                daily=args.daily,
                                                                movielens_weight=args.movielens_weight,
                                                                population_prior=args.population_prior)}))
        return
    if args.blind_only or args.movielens_only or args.movielens_latest_only:
        key, run = (("worlds_blind", run_blind) if args.blind_only else ("worlds_movielens", run_movielens)
                    if args.movielens_only else ("worlds_movielens_latest", run_movielens_latest))
        print(json.dumps({key: run(args.quick, streaming=not args.batch_only, workers=args.workers,
                                   feedback_draws=args.feedback_draws, population_prior=args.population_prior),
                          "elapsed_s": round(time.time() - t0, 1), "quick": args.quick}))
        return
    if args.worlds_only:
        print(json.dumps({"worlds": run_worlds(args.quick, streaming=not args.batch_only, workers=args.workers,
                                               feedback_draws=args.feedback_draws,
                                               population_prior=args.population_prior),
                          "elapsed_s": round(time.time() - t0, 1),
                          "quick": args.quick}))
        return
    n_acc = 15 if args.quick else 100
    n_lab = 8 if args.quick else 50
    n_cold = 40 if args.quick else 300
    n_stable, n_type = (10, 3) if args.quick else (100, 20)
    prior = PopulationPrior.fit([h.features for h in simulate_population(40 if args.quick else 150, seed=700)])
    report = {}
    for name, level in DIFFICULTY_LEVELS.items():
        seed = 1000 + int(level * 100)
        log(f"[{name}] difficulty {level}: simulating")
        hs = simulate_population(n_acc, seed=seed, difficulty=level)
        preds, probs, fallbacks = run_model(hs)
        block = summarise(hs, preds, probs)
        block["gmm_fallbacks"] = fallbacks
        km_preds, km_probs, _ = run_model(hs, variant="kmeans")
        block["kmeans_variant"] = summarise(hs, km_preds, km_probs)
        log(f"[{name}] model: acc {block['session_accuracy']:.3f} size {block['household_size_exact']:.2f} ({time.time() - t0:.0f}s)")
        small = simulate_population(n_cold, seed=seed + 1, difficulty=level, small_accounts=True)
        cold = run_cold(small, prior)
        block["cold_start_accuracy"] = cold["population_prior"]
        block["cold_start_by_strategy"] = cold
        block["accuracy_labels_1pct"] = run_labels(hs[:n_lab], 0.01, seed)
        block["accuracy_labels_5pct"] = run_labels(hs[:n_lab], 0.05, seed)
        block["accuracy_labels_0pct_same_households"] = float(np.concatenate(
            [matched_correct(h.person, p) for h, p in zip(hs[:n_lab], preds[:n_lab])]).mean())
        log(f"[{name}] labels/cold done ({time.time() - t0:.0f}s)")
        block.update(run_drift(level, n_stable, n_type, seed + 2, periodic_baseline=periodic))
        log(f"[{name}] drift done ({time.time() - t0:.0f}s)")
        g_preds, g_probs = sklearn_gmm_bic(hs)
        gmm_ref = summarise(hs, g_preds, g_probs)
        majority = summarise(hs, [np.zeros(h.n_sessions, dtype=int) for h in hs])
        small_major = np.concatenate([matched_correct(h.person, np.zeros(h.n_sessions, dtype=int)) for h in small])
        majority["cold_start_accuracy"] = float(small_major.mean())
        block["baselines"] = {"majority": majority, "sklearn_gmm_bic": gmm_ref,
                              "sklearn_kmeans_true_k": summarise(hs, sklearn_kmeans_true_k(hs))}
        log(f"[{name}] REFERENCE sklearn GaussianMixture(full)+BIC k=1..6: session_accuracy "
            f"{gmm_ref['session_accuracy']:.3f}, household_size_exact {gmm_ref['household_size_exact']:.2f} "
            f"| hearth {block['session_accuracy']:.3f} ({time.time() - t0:.0f}s)")
        block["difficulty"] = level
        report[name] = block
    if not args.no_worlds:
        report["worlds"] = run_worlds(args.quick, workers=args.workers)
        report["worlds_blind"] = run_blind(args.quick, workers=args.workers)
    report["elapsed_s"] = round(time.time() - t0, 1)
    report["quick"] = args.quick
    print(json.dumps(report))


if __name__ == "__main__":
    main()
