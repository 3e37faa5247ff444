"""Benchmark of calibration and recalibration from feedback: ``python -m bench.feedback [--quick]``.

Scenario (issue 7): the simulated households of the clustering benchmark
(``services.clustering.domain.simulator``); every session gets a "who is watching"
probability vector from the household's model variant; households are split between
the variants ``kmeans`` (control) and ``gmm`` by the service's deterministic assignment
(50/50); feedback (the true person) arrives on a random 3.75 % of predictions. One
calibrator per variant is fitted on that feedback (``fit_calibrator``: identity,
temperature or isotonic by cross-validated ECE) and every metric is reported on the
other 96.25 %, before and after (``evaluation.evaluate_recalibration``).

The models: ``services/clustering/domain/model.py`` does not exist yet, so the variants
are scikit-learn stand-ins fitted per household on all its sessions (batch):
``gmm`` = GaussianMixture, full covariances, k in 1..6 by BIC (the simulator's
reference model); ``kmeans`` = KMeans with k from the same BIC choice, probabilities
softmax(-d^2 / (2 s^2)) with s^2 the mean within-cluster squared distance per
dimension (a soft k-means, typically over-confident). Model persons are matched to true
persons by the Hungarian method on the confusion matrix; a session whose true person
has no model person gets a zero-probability column for it (counts as wrong).

Also measured (``service``): the same feedback sample recorded through the service's
use cases (FeedbackApp on SQLite), recalibrated there, and its stored calibrators
applied to the held-out predictions: the service path must give the domain's figures.

Progress goes to stderr; the last stdout line is one JSON object with the
``make bench-feedback`` keys (``feedback_rate``, ``before``, ``after``, ``by_variant``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from services.clustering.domain.model import HouseholdModel
from services.clustering.domain.simulator import simulate_population
from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, evaluate_recalibration, feedback_mask
from services.feedback.domain.metrics import calibration_summary, cohort_labels
from services.feedback.domain.variants import ExperimentFlags, assign_variants
from bench._common import cpu_model, log

TARGET_BRIER = 0.10
TARGET_ECE = 0.02
MAX_PERSONS = 6
MODEL_NOTE = ("Hearth's HouseholdModel (services/clustering/domain/model.py), variant gmm or kmeans, "
              "fitted per household on all its sessions; cold-start accounts answered by the "
              "account-level strategy")


def fit_household(features: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gmm probabilities, kmeans probabilities) of Hearth's own household model
    (services/clustering/domain/model.py), fitted on the household's sessions the way
    the service does, answering for each of them."""
    x = features.astype(np.float64)
    out = []
    for variant in ("gmm", "kmeans"):
        model = HouseholdModel(variant, cold_start="account", seed=seed).fit(x)
        out.append(model.assign_batch(x).probabilities)
    return out[0], out[1]


def aligned(probs: np.ndarray, truth: np.ndarray, n_persons: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder model columns to true persons (Hungarian on the confusion matrix) and pad:
    returns (probs (n, MAX_PERSONS), labels); unmatched true persons get empty columns,
    unmatched model persons keep theirs after the true ones."""
    n, k = probs.shape
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, n_persons))
    np.add.at(confusion, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)
    column_of = np.full(k, -1)
    column_of[rows] = cols
    spare = iter(range(n_persons, n_persons + k))
    for j in range(k):
        if column_of[j] < 0:
            column_of[j] = next(spare)
    width = max(MAX_PERSONS * 2, n_persons + k + 1)
    out = np.zeros((n, width))
    out[:, column_of] = probs
    # A one-person model leaves mass for a member it has not seen (its row sums to < 1,
    # docs/clustering.md); padded into a wider matrix that mass belongs to a person none of the
    # columns name, so it gets a column of its own rather than vanishing.
    unseen = 1.0 - probs.sum(axis=1)
    if k == 1 and np.any(unseen > 1e-9):
        out[:, n_persons + k] = np.clip(unseen, 0.0, 1.0)
    return out, truth.astype(np.int64)


def build_predictions(n_households: int, seed: int, days: int, cold_fraction: float = 0.1) -> dict[str, np.ndarray]:
    warm = simulate_population(n_households, seed=seed, days=days)
    cold = simulate_population(max(1, int(n_households * cold_fraction)), seed=seed + 1, small_accounts=True)
    flags = ExperimentFlags(salt="model-variant", control="gmm", traffic={"kmeans": 50.0})
    households = [(h, False) for h in warm] + [(h, True) for h in cold]
    variant_of = dict(zip([h.household_id for h, _ in households],
                          assign_variants(flags, [h.household_id for h, _ in households])))
    probs, labels, variants, sizes, cold_flags, households_ids = [], [], [], [], [], []
    started = time.perf_counter()
    for i, (h, is_cold) in enumerate(households):
        if h.n_sessions < 2:
            continue
        gmm_p, km_p = fit_household(h.features, seed)
        truth = np.unique(h.person, return_inverse=True)[1]
        variant = str(variant_of[h.household_id])
        p, y = aligned(gmm_p if variant == "gmm" else km_p, truth, h.n_persons)
        probs.append(p)
        labels.append(y)
        n = h.n_sessions
        variants += [variant] * n
        sizes += [h.n_persons] * n
        cold_flags += [is_cold] * n
        households_ids += [h.household_id] * n
        if (i + 1) % 50 == 0:
            log(f"  fitted {i + 1}/{len(households)} households ({time.perf_counter() - started:.0f} s)")
    width = max(p.shape[1] for p in probs)
    matrix = np.vstack([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in probs])
    # Drop all-zero trailing columns to keep the matrix small.
    used = np.flatnonzero(matrix.any(axis=0) | (np.arange(width) <= max(int(y.max()) for y in labels)))
    matrix = matrix[:, : used.max() + 1]
    return {"probs": matrix, "labels": np.concatenate(labels), "variants": np.array(variants),
            "household_size": np.array(sizes), "cold_start": np.array(cold_flags),
            "households": np.array(households_ids)}


def service_path(data: dict[str, np.ndarray], seed: int) -> dict:
    """Record the feedback sample through FeedbackApp (SQLite), recalibrate there, and
    evaluate its stored calibrators on the held-out rows."""
    from services.common.storage.sql import SqliteDatabase
    from services.feedback.app import FeedbackApp, FeedbackPolicy
    from services.feedback.domain.signals import SignalKind
    from services.feedback.domain.triggers import TriggerThresholds
    from services.feedback.peers import RecordingRefits
    from services.feedback.store import FeedbackStore, PredictionRecord

    probs, labels, variants = data["probs"], data["labels"], data["variants"]
    n = probs.shape[0]
    mask = feedback_mask(n, DEFAULT_FEEDBACK_RATE, seed)
    rows = np.flatnonzero(mask)
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        db = SqliteDatabase(Path(tmp) / "feedback.db")
        store = FeedbackStore(db)
        store.migrate()
        # Household disagreement triggers would fire on bad households: count them, do not refit.
        app = FeedbackApp(store, FeedbackPolicy(thresholds=TriggerThresholds()), refits=RecordingRefits())
        started = time.perf_counter()
        items, feedback = [], []
        for i in rows:
            present = np.flatnonzero(probs[i] > 0)
            top = int(np.argmax(probs[i]))
            vector = {f"p{j}": float(probs[i, j]) for j in present}
            items.append(PredictionRecord(f"pr{i}", str(data["households"][i]), f"s{i}", f"p{top}", vector,
                                          str(variants[i]), 1, now - 3600, bool(data["cold_start"][i]),
                                          int(data["household_size"][i])))
            truth = int(labels[i])
            feedback.append((f"pr{i}", top, truth))
        app.intake.record_predictions(items)
        for pid, top, truth in feedback:
            if truth == top:
                app.intake.record_feedback(f"f{pid}", pid, SignalKind.PROFILE_CONFIRMED, None, now - 60)
            else:
                app.intake.record_feedback(f"f{pid}", pid, SignalKind.PROFILE_CORRECTED, f"p{truth}", now - 60)
        record_s = time.perf_counter() - started
        app.triggers.drain_refits(5)
        t0 = time.perf_counter()
        fitted = app.calibration.recalibrate()
        recalibrate_s = time.perf_counter() - t0
        held = ~mask
        after = probs[held].copy()
        for variant in fitted:
            in_variant = variants[held] == variant
            after[in_variant] = app.calibration.apply_calibration(variant, probs[held][in_variant])
        summary = calibration_summary(after, labels[held])
        triggers = len(store.triggers())
        app.close()
        db.close()
    return {"n_feedback": int(rows.size), "record_feedback_s": round(record_s, 2),
            "record_feedback_per_s": round(rows.size / record_s, 1), "recalibrate_s": round(recalibrate_s, 3),
            "calibrators": {v: c.method for v, c in fitted.items()},
            "household_triggers": triggers,
            "after": {"brier": summary.brier, "ece": summary.ece}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small population (< 60 s)")
    parser.add_argument("--households", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_households = args.households or (40 if args.quick else 300)
    days = 60 if args.quick else 120
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    started = time.perf_counter()
    log(f"bench-feedback: {n_households} households (+10 % cold start), seed {args.seed}")
    from threadpoolctl import threadpool_limits

    # One BLAS thread: many small fits on a shared 2-core machine are ~10x slower oversubscribed.
    with threadpool_limits(1):
        data = build_predictions(n_households, args.seed, days)
    n = data["probs"].shape[0]
    log(f"  {n} predictions in {time.perf_counter() - started:.1f} s; recalibrating on {DEFAULT_FEEDBACK_RATE:.2%}")
    cohorts = cohort_labels(data["household_size"], data["cold_start"])
    report = evaluate_recalibration(data["probs"], data["labels"], data["variants"], cohorts,
                                    feedback_rate=DEFAULT_FEEDBACK_RATE, seed=args.seed)
    log(f"  before: brier {report['before']['brier']:.4f} ece {report['before']['ece']:.4f}; "
        f"after: brier {report['after']['brier']:.4f} ece {report['after']['ece']:.4f}")
    log("  service path (FeedbackApp on SQLite) ...")
    service = service_path(data, args.seed)
    log(f"  service after: brier {service['after']['brier']:.4f} ece {service['after']['ece']:.4f}")
    by_variant = {
        v: {"n_feedback": e["n_feedback"], "n_holdout": e["n_holdout"], "calibrator": e["calibrator"]["method"],
            "parameters": e["calibrator"]["parameters"] if e["calibrator"]["method"] == "temperature" else {},
            "before": {k: e["before"][k] for k in ("brier", "ece", "accuracy", "mean_confidence")},
            "after": {k: e["after"][k] for k in ("brier", "ece", "accuracy", "mean_confidence")}}
        for v, e in report["by_variant"].items()}
    result = {
        "feedback_rate": DEFAULT_FEEDBACK_RATE,
        "before": {k: report["before"][k] for k in ("brier", "ece", "ece_equal_mass", "log_loss", "accuracy",
                                                   "mean_confidence")},
        "after": {k: report["after"][k] for k in ("brier", "ece", "ece_equal_mass", "log_loss", "accuracy",
                                                  "mean_confidence")},
        "by_variant": by_variant,
        "by_cohort": {c: {"before": {k: e["before"][k] for k in ("n", "brier", "ece")},
                          "after": {k: e["after"][k] for k in ("brier", "ece")}}
                      for c, e in report["by_cohort"].items()},
        "reliability": report["reliability"],
        "targets": {"brier": TARGET_BRIER, "ece": TARGET_ECE,
                    "brier_met": report["after"]["brier"] <= TARGET_BRIER,
                    "ece_met": report["after"]["ece"] <= TARGET_ECE},
        "service": service,
        "n_predictions": n, "n_feedback": report["n_feedback"], "n_holdout": report["n_holdout"],
        "households": n_households, "days": days, "model": MODEL_NOTE, "quick": args.quick, "seed": args.seed,
        "machine": {"cpu": cpu_model(), "cores": __import__("os").cpu_count()},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, allow_nan=False, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
