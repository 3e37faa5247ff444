"""Feedback-calibration methods a deployment can run on its own 3.75 % labels, scored beside
the service's, with the ECE's noise floor at the same sample size (issue #10, ece32,
session 32; TUNING only).

Reads the answers ``bench.label_feedback --cache`` stored (``--batch-only`` or
``--stream-only``: the same fits, draws and serving rule as #10's whole-loop figure;
nothing is refitted) and, per feedback draw, fits each method on that draw's feedback
answers only (as the feedback service records them: batch — served before any label, in
the default group; streams — as served at arrival), applies it where clustering applies
the feedback calibrator (``FedAnswers.calibrated``) and scores ECE (15 bins, top label) on
the answers without feedback, as ``E.mesh_after_feedback`` does. The whole sample is one
deployment, as in #10's figure.

Methods (``METHODS``):

* ``no_feedback``, ``labels_only``: the answers before feedback / after the labels alone;
* ``mesh``: the service's grouped calibrator (``E.grouped_service_calibrator``) — #10's
  figure, reproduced to the digit from the same cache (a check of this tool);
* ``skip_label_shaped``: fbece26's next step — the service's calibrator fitted on the
  feedback of the households that stay in the default group only, applied to them;
  answers of households whose labels added a person served as the labels leave them;
* ``level_cv`` / ``platt_cv``: one shift of the top confidence / a logit-linear map
  (logit c' = a + b logit c, Platt on the confidence's logit: beta calibration with its two
  exponents tied), both shrunk toward no change (the confidence maps clustering ships) by a
  factor alpha in ``ALPHAS`` chosen by repeated 5-fold cross-validated top-label Brier on the
  feedback answers themselves (alpha = 0 wins unless the map helps out of fold);
  ``..._skip``: the same fitted on the default group's feedback, label-shaped answers left
  as the labels leave them;
* ``platt_all_held`` (not a result): the logit-linear map fitted on every scored answer —
  what this map family gives with unlimited feedback;
* ``floor``: ``ece`` of answers drawn right with exactly their ``mesh`` confidence
  (``FLOOR_REPS`` draws; mean, standard deviation, 95th percentile): what a perfectly
  calibrated predictor measures on these answers at this sample size;
* ``floor_through_service``: the same perfectly calibrated answers (the answers after the
  labels, every one drawn right with exactly its confidence, the fed ones too) through the
  service's grouped calibrator fitted on the fed ones (``SERVICE_FLOOR_REPS`` draws): what the
  3.75 % labels' own noise costs a predictor that needs no recalibration.

``python -m bench.feedback_methods --mode batch|stream SPEC=CACHE ...`` (SPEC as
``bench.feedback_shipped``: ``tuning:12:4:5``, ``movielens-tuning:0:3:4``,
``movielens-latest-tuning:0:3:4``). Prints one JSON object: per sample, per method, the
mean over draws and each draw.
"""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np

from bench import _worlds_eval as E
from bench import feedback_shipped as FS
from bench import label_feedback as LF
from bench._clustering_eval import ece

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CV_FOLDS, CV_REPEATS = 5, 4
FLOOR_REPS = 200
SERVICE_FLOOR_REPS = 10
_EPS = 1e-6


def draws(spec: str, cache: str, mode: str) -> list[FS.Draw]:
    """Per draw, the sample's answers pooled (FS.Draw). ``stream``: the fed rows are the
    answers as served at arrival (``P1``), each fitted in its household's group now."""
    return households_and_draws(spec, cache, mode)[1]


def households_and_draws(spec: str, cache: str, mode: str):
    """(the sample's households, ``draws``) of a ``bench.label_feedback --cache`` file."""
    split, first, n_worlds, n_house = spec.split(":")
    if split not in FS.SPLITS:
        raise SystemExit(f"{spec}: split must be one of {FS.SPLITS} (TUNING only)")
    hs = LF.households(split, int(first), int(n_worlds), int(n_house))
    with open(cache, "rb") as fh:
        held = pickle.load(fh)
    if held["households"] != [h.household_id for h in hs]:
        raise SystemExit(f"{cache}: holds other households than {spec}")
    if not held["batch" if mode == "batch" else "streaming"]:
        raise SystemExit(f"{cache}: no {mode} answers")
    return hs, FS.draws_of(split, hs, held["outs"], held["draws"], mode)


def _logit(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, _EPS, 1.0 - _EPS)
    return np.log(c) - np.log1p(-c)


def fit_platt(c: np.ndarray, y: np.ndarray, iters: int = 30, ridge: float = 1e-3) -> tuple[float, float]:
    """(a, b) of logit c' = a + b logit c by Newton's method on the log-loss (a small ridge
    toward (0, 1) keeps a sample of one outcome finite)."""
    z = _logit(c)
    X = np.column_stack([np.ones_like(z), z])
    theta = np.array([0.0, 1.0])
    prior = theta.copy()
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (p - y) + ridge * (theta - prior)
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.abs(step).max() < 1e-9:
            break
    return float(theta[0]), float(theta[1])


def platt_map(params: tuple[float, float], alpha: float):
    a, b = params
    a, b = alpha * a, 1.0 + alpha * (b - 1.0)
    return lambda c: 1.0 / (1.0 + np.exp(-(a + b * _logit(c))))


def level_map(shift: float, alpha: float):
    return lambda c: np.clip(c + alpha * shift, 0.0, 1.0)


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    """Summed top-label Brier (the service's out-of-fold criterion, ``shape_gain``: a level
    clipped at 1 would make a log-loss infinite on one wrong answer)."""
    return float(np.sum((p - y) ** 2))


FAMILIES = {
    "platt": (fit_platt, platt_map),
    "level": (lambda c, y: float(np.mean(y - c)), level_map),
}


def cv_alpha(c: np.ndarray, y: np.ndarray, family: str, seed: int = 0) -> tuple[float, dict]:
    """alpha in ALPHAS with the least repeated k-fold top-label Brier of the map fitted out of fold
    (ties: the smaller alpha, nearer the shipped maps)."""
    fit, make = FAMILIES[family]
    loss = np.zeros(len(ALPHAS))
    rng = np.random.default_rng(seed)
    for _ in range(CV_REPEATS):
        folds = np.array_split(rng.permutation(c.size), CV_FOLDS)
        for k in folds:
            train = np.ones(c.size, dtype=bool)
            train[k] = False
            params = fit(c[train], y[train])
            for i, a in enumerate(ALPHAS):
                loss[i] += _brier(make(params, a)(c[k]), y[k])
    best = int(np.argmin(np.round(loss, 9)))
    return ALPHAS[best], {"cv_brier": [round(float(x / CV_REPEATS), 3) for x in loss]}


def fitted_map(c: np.ndarray, y: np.ndarray, family: str):
    alpha, info = cv_alpha(c, y, family)
    fit, make = FAMILIES[family]
    return make(fit(c, y), alpha), alpha


def score_draw(d: FS.Draw, mode: str) -> dict[str, float]:
    from services.feedback.domain.metrics import UNKNOWN_LABEL
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK, fit_feedback_calibrator, \
        FeedbackSample
    held = ~d.fed
    P_fit, y_fit, ok_fit = (d.P0, d.y0, d.ok0) if mode == "batch" else (d.P1, d.y1, d.ok1)
    answered = np.full(d.P0.shape[0], "", dtype=object) if mode == "batch" else d.group.astype(object)
    current = dict(zip(d.account, d.fitted_in))
    raw = d.P1.max(axis=1)
    on = d.calibrated
    shaped = d.group != ""
    out: dict[str, float] = {"no_feedback": ece(d.P0[held].max(axis=1), d.ok0[held]),
                             "labels_only": ece(raw[held], d.ok1[held])}
    cal = E.grouped_service_calibrator(P_fit, y_fit, ok_fit, d.age, d.fed, answered, d.account, current,
                                       MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
    mesh = raw.copy()
    mesh[on] = cal.apply(d.P1[on], d.age[on], d.group[on]).max(axis=1)
    out["mesh"] = ece(mesh[held], d.ok1[held])
    # fbece26's next step: the default group's households' feedback only, label-shaped raw
    default_fed = d.fed & (d.fitted_in == "")
    skip = raw.copy()
    if default_fed.sum() >= 2:
        own = fit_feedback_calibrator(FeedbackSample.create(P_fit[default_fed], labels=y_fit[default_fed],
                                                            correct=ok_fit[default_fed].astype(float)),
                                      d.age[default_fed])
        rows = on & ~shaped
        skip[rows] = own.apply(d.P1[rows], d.age[rows]).max(axis=1)
    out["skip_label_shaped"] = ece(skip[held], d.ok1[held])
    c_fit = P_fit.max(axis=1)
    for family in FAMILIES:
        f, alpha = fitted_map(c_fit[d.fed], ok_fit[d.fed].astype(float), family)
        served = np.where(on, f(raw), raw)
        out[f"{family}_cv"] = ece(served[held], d.ok1[held])
        out[f"{family}_cv_alpha"] = alpha
        f, alpha = fitted_map(c_fit[default_fed], ok_fit[default_fed].astype(float), family)
        served = np.where(on & ~shaped, f(raw), raw)
        out[f"{family}_cv_skip"] = ece(served[held], d.ok1[held])
        out[f"{family}_cv_skip_alpha"] = alpha
    # per calibration group (the service's groups: each feedback answer in its household's
    # group now), each group's map shrunk by its own cross-validation; a group with fewer
    # than MIN_GROUP_FEEDBACK answers takes the pooled one
    for family in FAMILIES:
        pooled, _ = fitted_map(c_fit[d.fed], ok_fit[d.fed].astype(float), family)
        served = np.where(on, pooled(raw), raw)
        alphas = []
        for g in np.unique(d.fitted_in[d.fed]):
            rows_fit = d.fed & (d.fitted_in == g)
            if rows_fit.sum() < MIN_GROUP_FEEDBACK:
                continue
            f, alpha = fitted_map(c_fit[rows_fit], ok_fit[rows_fit].astype(float), family)
            alphas.append(alpha)
            served = np.where(on & (d.group == g), f(raw), served)
        out[f"{family}_cv_grouped"] = ece(served[held], d.ok1[held])
        out[f"{family}_cv_grouped_alpha"] = float(np.mean(alphas)) if alphas else float("nan")
    # the service's grouped calibrator blended with no change, per group, by cross-validation
    served = raw.copy()
    sample = FeedbackSample.create(P_fit, labels=y_fit, correct=ok_fit.astype(float))
    blend = {}
    for g in np.unique(d.group[on]):
        rows_fit = d.fed & (d.fitted_in == g)
        if rows_fit.sum() < MIN_GROUP_FEEDBACK:
            rows_fit = d.fed
        idx = np.flatnonzero(rows_fit)
        loss = np.zeros(len(ALPHAS))
        rng = np.random.default_rng(0)
        for _ in range(CV_REPEATS):
            for k in np.array_split(rng.permutation(idx.size), CV_FOLDS):
                train = np.ones(idx.size, dtype=bool)
                train[k] = False
                fit_rows, test_rows = idx[train], idx[k]
                part = fit_feedback_calibrator(sample.subset(fit_rows), d.age[fit_rows])
                c0 = P_fit[test_rows].max(axis=1)
                c1 = part.apply(P_fit[test_rows], d.age[test_rows]).max(axis=1)
                for i, a in enumerate(ALPHAS):
                    loss[i] += _brier(c0 + a * (c1 - c0), ok_fit[test_rows].astype(float))
        alpha = ALPHAS[int(np.argmin(np.round(loss, 9)))]
        blend[g] = alpha
        rows = on & (d.group == g)
        served[rows] = raw[rows] + alpha * (mesh[rows] - raw[rows])
    out["mesh_cv_blend"] = ece(served[held], d.ok1[held])
    out["mesh_cv_blend_alpha"] = float(np.mean(list(blend.values()))) if blend else float("nan")
    ceiling = raw.copy()
    for g in np.unique(d.group[on]):
        rows = on & (d.group == g)
        params = fit_platt(raw[held & rows], d.ok1[held & rows].astype(float))
        ceiling[rows] = platt_map(params, 1.0)(raw[rows])
    out["platt_per_group_all_held"] = ece(ceiling[held], d.ok1[held])
    params = fit_platt(raw[held & on], d.ok1[held & on].astype(float))
    out["platt_all_held"] = ece(np.where(on, platt_map(params, 1.0)(raw), raw)[held], d.ok1[held])
    rng = np.random.default_rng(0)
    floors = [ece(mesh[held], rng.random(int(held.sum())) < mesh[held]) for _ in range(FLOOR_REPS)]
    out["floor"] = float(np.mean(floors))
    out["floor_sd"] = float(np.std(floors))
    out["floor_p95"] = float(np.quantile(floors, 0.95))
    # a perfectly calibrated predictor through the service's feedback: every answer (fed ones
    # too) drawn right with exactly its confidence after the labels, the service's grouped
    # calibrator fitted on the fed ones: what the labels' own noise costs ECE
    through = []
    unlabelled = np.full(raw.size, UNKNOWN_LABEL)   # the drawn outcomes are no person's
    for rep in range(SERVICE_FLOOR_REPS):
        truth = rng.random(raw.size) < raw
        cal_star = E.grouped_service_calibrator(d.P1, unlabelled, truth, d.age, d.fed, answered, d.account, current,
                                                MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
        star = raw.copy()
        star[on] = cal_star.apply(d.P1[on], d.age[on], d.group[on]).max(axis=1)
        through.append(ece(star[held], truth[held]))
    out["floor_through_service"] = float(np.mean(through))
    out["floor_through_service_sd"] = float(np.std(through))
    out["held_answers"] = int(held.sum())
    out["fed_answers"] = int(d.fed.sum())
    out["fed_label_shaped"] = int((d.fed & (d.fitted_in != "")).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("batch", "stream"), required=True)
    ap.add_argument("samples", nargs="+", help="SPEC=CACHE (bench.label_feedback --cache of that mode)")
    args = ap.parse_args()
    report: dict = {"mode": args.mode, "alphas": ALPHAS, "cv": f"{CV_FOLDS} folds x {CV_REPEATS}", "samples": {}}
    for item in args.samples:
        spec, cache = item.split("=", 1)
        per = [score_draw(d, args.mode) for d in draws(spec, cache, args.mode)]
        report["samples"][spec] = {"mean": {k: round(float(np.mean([p[k] for p in per])), 4) for k in per[0]},
                                   "per_draw": {k: [round(float(p[k]), 4) for p in per] for k in per[0]}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
