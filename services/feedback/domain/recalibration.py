"""Recalibration of "who is watching" probabilities from held-out feedback.

Two methods, chosen per model by cross-validation on the feedback sample:

- **Temperature scaling** (one parameter T > 0): p_k -> p_k^(1/T) / sum_j p_j^(1/T),
  i.e. softmax(log p / T). T > 1 softens over-confident vectors, T < 1 sharpens.
  It never changes the arg-max. T is fitted by bounded scalar minimisation
  (``scipy.optimize.minimize_scalar``, on log T in [log 0.05, log 20]) of the weighted
  negative log-likelihood of *what was observed*: -ln p_T[label] for rows with a true
  label, and -ln q_T or -ln(1 - q_T) (q_T = top-label confidence after scaling) for
  rows where feedback only says right or wrong.
- **Isotonic regression** of top-label confidence on correctness
  (``sklearn.isotonic.IsotonicRegression``, weighted, clipped to [0, 1]); stored as its
  breakpoints and applied with linear interpolation (what ``predict`` does), so
  applying a calibrator needs no scikit-learn. On a vector the top probability becomes
  the calibrated confidence c' and the other persons share 1 - c' in their original
  proportions (renormalisation). c' is floored at p2 / (1 - c + p2) (p2 = runner-up)
  so the predicted person never changes: recalibration adjusts how sure we are, not
  who we say it was.

Both methods leave a probability of exactly 0 at 0, so zero-padded columns of
smaller households stay empty, and a vector with all mass on one person stays as is.

``fit_calibrator`` scores identity (no change), temperature and isotonic by k-fold
cross-validated ECE (default) or NLL on the feedback sample and keeps the best; the
identity wins ties, so recalibration is only adopted when it helps out of sample.
With the ECE criterion a method whose cross-validated NLL is worse than the
identity's is not eligible: ECE is blind to a map that pushes confidences to 0 or 1
in sparse regions, the likelihood is not.
The result is a versioned, JSON-serialisable ``Calibrator`` (its type lives in
``services/common/calibration.py``, shared with the clustering service that applies it).

``fit_feedback_calibrator`` is what the service fits: ``fit_level_calibrator`` (one shift
of every answer's confidence, the mean of correct - confidence applied only as far as
it exceeds its own noise, ``fit_evidence_shift`` with ``LEVEL_NOISE_MULTIPLE``; per
model-age segment and kind of answer a further shift shrunk toward it by
``LEVEL_SEGMENT_PRIOR`` pseudo-answers), unless a map of the shape beats that level
out of fold by ``SHAPE_GATE_SE`` standard errors (``shape_gain``); then
``fit_segmented_calibrator``. With a few hundred answers a map of the shape was mostly
noise and the level is what they show (docs/feedback.md, "What the service fits").

``fit_segmented_calibrator`` adds what one pooled map cannot do (the mesh pools the
answers of young and mature models, which are wrong at different rates at the same
confidence): given the number of sessions each prediction's model had seen, it fits,
after the pooled map, a residual map per model-age segment (chosen the same way, so a
segment keeps the pooled map unless its own feedback shows it helps out of sample) and
a shift of the one-person confidence per segment (a one-person answer's only number:
the weighted mean of correct - confidence, shrunk toward no shift by
``ONE_PERSON_PRIOR_WEIGHT`` pseudo-answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.common.calibration import (  # noqa: F401  (re-exported: the shared calibrator type)
    ALL_AGES,
    CALIBRATOR_SCHEMA,
    IDENTITY,
    METHODS,
    Calibrator,
    apply_temperature,
    apply_top_label_map,
    one_person_rows,
    segment_names,
    segment_of,
)
from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import (
    DEFAULT_BINS,
    UNKNOWN_LABEL,
    FloatArray,
    IntArray,
    resolve_outcomes,
    as_probability_matrix,
    as_weights,
    expected_calibration_error,
)

TEMPERATURE_BOUNDS = (0.05, 20.0)
MIN_SAMPLES_TO_FIT = 50  # below this, cross-validation cannot tell methods apart: keep identity
# Model-age segments (sessions the model had seen): clustering's young-model boundary
# (services/clustering/domain/model.py YOUNG_MODEL_SESSIONS), where its confidence
# changes source; feedback only needs the edge, carried in the calibrator it serves.
DEFAULT_SEGMENT_EDGES = (60,)
ONE_PERSON_PRIOR_WEIGHT = 10.0
_NLL_FLOOR = 1e-12
Method = Literal["identity", "temperature", "isotonic"]
Criterion = Literal["ece", "nll", "brier"]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FeedbackSample:
    """Predictions with feedback: ``probs`` (n, K), ``labels`` (-1 unknown), ``correct`` 0/1, ``weights``.

    Build it with ``FeedbackSample.create`` from labels, correctness, or both.
    """

    probs: FloatArray
    labels: IntArray
    correct: FloatArray
    weights: FloatArray

    @classmethod
    def create(
        cls,
        probs: ArrayLike,
        labels: ArrayLike | None = None,
        correct: ArrayLike | None = None,
        weights: ArrayLike | None = None,
    ) -> "FeedbackSample":
        matrix = as_probability_matrix(probs)
        truth, outcome = resolve_outcomes(matrix, labels, correct)
        return cls(matrix, truth, outcome, as_weights(weights, matrix.shape[0]))

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def subset(self, rows: np.ndarray) -> "FeedbackSample":
        return FeedbackSample(self.probs[rows], self.labels[rows], self.correct[rows], self.weights[rows])


# ----------------------------------------------------------------------------- transforms


def observed_nll(probs: FloatArray, labels: IntArray, correct: FloatArray, weights: FloatArray) -> float:
    """Weighted NLL of the observed feedback (labels where known, else right/wrong)."""
    n = probs.shape[0]
    rows = np.arange(n)
    known = labels != UNKNOWN_LABEL
    conf = probs.max(axis=1)
    p_label = probs[rows, np.where(known, labels, 0)]
    p_observed = np.where(known, p_label, np.where(correct > 0.5, conf, 1.0 - conf))
    return float(np.dot(weights, -np.log(np.maximum(p_observed, _NLL_FLOOR))) / weights.sum())


def top_label_nll(probs: FloatArray, correct: FloatArray, weights: FloatArray) -> float:
    """Weighted NLL of right/wrong under the top-label confidence (what ECE judges)."""
    conf = np.clip(probs.max(axis=1), _NLL_FLOOR, 1.0 - _NLL_FLOOR)
    return float(np.dot(weights, -(correct * np.log(conf) + (1.0 - correct) * np.log(1.0 - conf))) / weights.sum())


TEMPERATURE_OBJECTIVE = "observed"


def fit_temperature(sample: FeedbackSample, objective: str | None = None) -> float:
    """Temperature minimising ``observed_nll`` (``"observed"``) or ``top_label_nll``
    (``"top_label"``) on the sample, within ``TEMPERATURE_BOUNDS``."""
    if len(sample) == 0:
        raise InvalidArgument("sample", "needs at least one prediction with feedback")
    kind = objective or TEMPERATURE_OBJECTIVE

    def loss(log_t: float) -> float:
        scaled = apply_temperature(sample.probs, float(np.exp(log_t)))
        if kind == "top_label":
            return top_label_nll(scaled, sample.correct, sample.weights)
        return observed_nll(scaled, sample.labels, sample.correct, sample.weights)

    from scipy.optimize import minimize_scalar   # here: SciPy is ~40 % of the service's start-up

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def fit_isotonic(sample: FeedbackSample) -> tuple[FloatArray, FloatArray]:
    """Breakpoints (x, y) of the weighted isotonic fit of correctness on top-label confidence."""
    if len(sample) == 0:
        raise InvalidArgument("sample", "needs at least one prediction with feedback")
    from sklearn.isotonic import IsotonicRegression   # here: see fit_temperature

    conf = sample.probs.max(axis=1)
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(conf, sample.correct, sample_weight=sample.weights)
    return np.asarray(model.X_thresholds_, dtype=np.float64), np.asarray(model.y_thresholds_, dtype=np.float64)


def _fit_method(method: str, sample: FeedbackSample, version: int) -> Calibrator:
    if method == "temperature":
        return Calibrator(version, "temperature", {"temperature": fit_temperature(sample)})
    if method == "isotonic":
        x, y = fit_isotonic(sample)
        return Calibrator(version, "isotonic", {"x": x.tolist(), "y": y.tolist()})
    return Calibrator(version, "identity")


def _score(calibrator: Calibrator, sample: FeedbackSample, criterion: str, n_bins: int) -> float:
    calibrated = calibrator.apply(sample.probs)
    if criterion == "nll":
        return observed_nll(calibrated, sample.labels, sample.correct, sample.weights)
    if criterion == "brier":   # top-label Brier: a proper score of the confidence itself
        return float(np.dot(sample.weights, (calibrated.max(axis=1) - sample.correct) ** 2) / sample.weights.sum())
    return expected_calibration_error(calibrated.max(axis=1), sample.correct, sample.weights, n_bins)


def cross_validated_scores(
    sample: FeedbackSample,
    methods: Sequence[str] = METHODS,
    n_folds: int = 5,
    n_bins: int = DEFAULT_BINS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean out-of-fold ECE, NLL and top-label Brier per method: ``{method: {"ece": .., "nll": .., "brier": ..}}``."""
    n = len(sample)
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise InvalidArgument("n_folds", f"must be an integer >= 2, got {n_folds!r}")
    if n < n_folds:
        raise InvalidArgument("sample", f"has {n} rows, fewer than n_folds={n_folds}")
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    totals = {m: {"ece": 0.0, "nll": 0.0, "brier": 0.0} for m in methods}
    for held_out in folds:
        train = np.ones(n, dtype=bool)
        train[held_out] = False
        train_sample, test_sample = sample.subset(train), sample.subset(held_out)
        if test_sample.weights.sum() <= 0 or train_sample.weights.sum() <= 0:
            raise InvalidArgument("weights", "a cross-validation fold has zero total weight")
        for method in methods:
            calibrator = _fit_method(method, train_sample, 0)
            totals[method]["ece"] += _score(calibrator, test_sample, "ece", n_bins) / n_folds
            totals[method]["brier"] += _score(calibrator, test_sample, "brier", n_bins) / n_folds
            totals[method]["nll"] += _score(calibrator, test_sample, "nll", n_bins) / n_folds
    return totals


def fit_calibrator(
    sample: FeedbackSample,
    version: int = 1,
    methods: Sequence[str] = METHODS,
    criterion: Criterion = "ece",
    n_folds: int = 5,
    n_bins: int = DEFAULT_BINS,
    seed: int = 0,
    min_samples: int = MIN_SAMPLES_TO_FIT,
) -> Calibrator:
    """Choose a method by cross-validated ``criterion`` and refit it on the whole sample.

    ``methods`` are tried in order; the first with the lowest score wins (with "ece",
    among methods whose CV NLL is no worse than the identity's), so put simpler ones first (the default order identity, temperature, isotonic means a method is only
    adopted when it strictly beats doing nothing). With fewer than ``min_samples`` rows the
    identity is returned (``training["reason"]`` says why).
    """
    if not methods or any(m not in METHODS for m in methods):
        raise InvalidArgument("methods", f"must be a non-empty subset of {METHODS}, got {list(methods)!r}")
    if criterion not in ("ece", "nll", "brier"):
        raise InvalidArgument("criterion", f"must be 'ece', 'nll' or 'brier', got {criterion!r}")
    # One-person answers (a single positive entry) are not moved by a map between persons
    # (fit_segmented_calibrator shifts them); a fit on them would only blur the others.
    sample = sample.subset((sample.probs > 0).sum(axis=1) > 1)
    training: dict[str, Any] = {"n": len(sample), "weight": float(sample.weights.sum()), "criterion": criterion}
    if len(sample) < max(min_samples, n_folds):
        training["reason"] = f"too few samples ({len(sample)} < {max(min_samples, n_folds)})"
        return Calibrator(version, "identity", {}, training)
    scores = cross_validated_scores(sample, methods, n_folds, n_bins, seed)
    eligible = list(methods)
    if criterion == "ece" and "identity" in scores:
        # ECE alone can prefer a map that is sharp in the wrong places (isotonic ends at
        # 0 or 1); a method must also not lose likelihood against doing nothing.
        baseline_nll = scores["identity"]["nll"]
        eligible = [m for m in methods if m == "identity" or scores[m]["nll"] <= baseline_nll]
    best = min(eligible, key=lambda m: (scores[m][criterion], methods.index(m)))
    chosen = _fit_method(best, sample, version)
    training["cv"] = scores
    return Calibrator(version, chosen.method, chosen.parameters, training)


def fit_one_person_shift(confidence: ArrayLike, correct: ArrayLike, weights: ArrayLike,
                         prior_weight: float = ONE_PERSON_PRIOR_WEIGHT) -> float:
    """Shift of one-person confidences: weighted mean of (correct - confidence), shrunk
    toward 0 by ``prior_weight`` pseudo-answers that agree with the confidence as it is."""
    c, y, w = (np.asarray(a, dtype=np.float64) for a in (confidence, correct, weights))
    return float(np.dot(w, y - c) / (w.sum() + prior_weight))


def fit_evidence_shift(confidence: ArrayLike, correct: ArrayLike, weights: ArrayLike,
                       noise_multiple: float = 1.0, prior_variance: float | None = None) -> float:
    """Shift of confidences applied only as far as the feedback shows it beyond its own
    noise: the weighted mean d of (correct - confidence) times max(0, 1 - m se^2 / d^2)
    (positive-part James-Stein shrinkage toward no shift, ``noise_multiple`` m), se^2 =
    sum w^2 c (1 - c) / (sum w)^2 the variance d would have if every answer were right
    with exactly its confidence. With m = 1 this is the empirical-Bayes posterior mean
    d tau^2 / (tau^2 + se^2) with the miss's prior variance tau^2 estimated from the
    sample itself as max(0, d^2 - se^2). A miss within m^(1/2) standard errors of none is
    left alone, so feedback cannot move well-calibrated answers by more than what is left
    of the noise past that cut; a miss several standard errors wide is corrected nearly
    in full. ``prior_variance`` tau^2 given instead: the linear posterior mean (tried on
    TUNING with tau fixed, not used by the service)."""
    c, y, w = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (confidence, correct, weights))
    total = w.sum()
    if c.size < 2 or total <= 0.0:
        return 0.0
    d = float(np.dot(w, y - c) / total)
    var = float(np.dot(w * w, c * (1.0 - c)) / total ** 2)
    if prior_variance is not None:
        return d * prior_variance / (prior_variance + var)
    if d == 0.0:
        return 0.0
    return d * max(0.0, 1.0 - noise_multiple * var / (d * d))


LEVEL_GRID = np.linspace(0.0, 1.0, 101)


def level_calibrator(shift: float, one_person_shift: float | None = None, version: int = 1,
                     training: dict[str, Any] | None = None) -> Calibrator:
    """A calibrator that moves every answer's confidence by ``shift`` (multi-person answers:
    the top label, as an isotonic map c -> clip(c + shift); one-person answers: their
    shift, ``one_person_shift`` when given)."""
    y = np.clip(LEVEL_GRID + shift, 0.0, 1.0)
    one = shift if one_person_shift is None else one_person_shift
    method = "identity" if shift == 0.0 else "isotonic"
    params = {} if shift == 0.0 else {"x": LEVEL_GRID.round(6).tolist(), "y": y.round(6).tolist()}
    return Calibrator(version, method, params, training or {}, one_person={ALL_AGES: round(float(one), 6)})


def _shrunk(conf: FloatArray, right: FloatArray, weight: FloatArray, pseudo_answers: float | None,
            multiple: float | None, prior_variance: float | None) -> float:
    """A shift of ``conf`` toward ``right``: by its own evidence (``fit_evidence_shift``) with a
    noise ``multiple`` or a ``prior_variance``, else shrunk by ``pseudo_answers``."""
    if multiple is not None or prior_variance is not None:
        return fit_evidence_shift(conf, right, weight, multiple or 1.0, prior_variance)
    return fit_one_person_shift(conf, right, weight, pseudo_answers)


def common_level_shift(sample: FeedbackSample, prior: float = 100.0, noise_multiple: float | None = None,
                       prior_variance: float | None = None) -> float:
    """``fit_level_calibrator``'s common shift of every answer's top confidence."""
    return _shrunk(sample.probs.max(axis=1), sample.correct, sample.weights, prior, noise_multiple, prior_variance)


def fit_level_calibrator(
    sample: FeedbackSample,
    model_sessions: ArrayLike | None = None,
    segment_edges: Sequence[int] = DEFAULT_SEGMENT_EDGES,
    version: int = 1,
    prior: float = 100.0,
    segment_prior: float | None = 300.0,
    noise_multiple: float | None = None,
    prior_variance: float | None = None,
    cell_noise_multiple: float | None = None,
) -> Calibrator:
    """One shift of every answer's confidence, the weighted mean of (correct - confidence)
    shrunk toward no shift by ``prior`` pseudo-answers; with ``model_sessions`` and
    ``segment_prior``, per model-age segment a further shift of that segment's answers,
    shrunk toward the common one by ``segment_prior`` pseudo-answers
    (``with_segment_shifts``). With ``noise_multiple`` every shift is instead shrunk by its
    own evidence (``fit_evidence_shift``): the priors are then unused."""
    w = sample.weights
    shift = common_level_shift(sample, prior, noise_multiple, prior_variance)
    training: dict[str, Any] = {"n": len(sample), "n_all": len(sample), "weight": float(w.sum()),
                                "method": "level", "prior": prior, "segment_prior": segment_prior,
                                "noise_multiple": noise_multiple,
                                "shift": round(float(shift), 6)}
    common = level_calibrator(shift, version=version, training=training)
    return with_segment_shifts(common, sample, shift, sample.probs.max(axis=1) + shift, model_sessions, segment_edges,
                               version, segment_prior, segment_prior, cell_noise_multiple, prior_variance)


def with_segment_shifts(
    common: Calibrator,
    sample: FeedbackSample,
    shift: float,
    after: FloatArray,
    model_sessions: ArrayLike | None,
    segment_edges: Sequence[int],
    version: int,
    segment_prior: float | None,
    one_person_prior: float | None,
    cell_noise_multiple: float | None = None,
    prior_variance: float | None = None,
) -> Calibrator:
    """``common`` (the level calibrator of the common ``shift``) with, per model-age segment,
    a further shift of the segment's answers over several persons (a residual map after the
    common one, starting from ``after``: the sample's top confidences after ``common``) and
    of its one-person answers, each shrunk toward the common shift by ``segment_prior`` /
    ``one_person_prior`` pseudo-answers (or by its own evidence with ``cell_noise_multiple``).
    No ``model_sessions``, ``segment_prior`` or edges: ``common`` as it is."""
    edges = tuple(int(e) for e in segment_edges)
    if model_sessions is None or segment_prior is None or not edges:
        return common
    c, y, w = sample.probs.max(axis=1), sample.correct, sample.weights
    segment = segment_of(model_sessions, edges)
    single = one_person_rows(sample.probs)
    parts: dict[str, Calibrator] = {}
    shifts = {ALL_AGES: common.one_person[ALL_AGES]}
    report = {}
    for i, name in enumerate(segment_names(edges)):
        # Per segment, its multi-person answers (a residual map after the common one) and
        # its one-person answers (their shift) each move from the common shift only as
        # far as their own feedback outweighs segment_prior pseudo-answers.
        multi = (segment == i) & ~single
        extra = (_shrunk(after[multi], y[multi], w[multi], segment_prior, cell_noise_multiple, prior_variance)
                 if multi.any() else 0.0)
        if extra != 0.0:
            part = level_calibrator(extra, version=version)
            parts[name] = Calibrator(version, part.method, part.parameters)
        one = (segment == i) & single
        one_extra = (_shrunk(c[one] + shift, y[one], w[one], one_person_prior, cell_noise_multiple, prior_variance)
                     if one.any() else 0.0)
        shifts[name] = round(float(np.clip(shift + one_extra, -1.0, 1.0)), 6)
        report[name] = {"n": int(multi.sum()), "shift": round(float(shift + extra), 6), "one_person_n": int(one.sum()),
                        "one_person_shift": shifts[name]}
    return Calibrator(version, common.method, common.parameters, {**common.training, "segments": report}, edges,
                      parts, shifts)


def shape_gain(sample: FeedbackSample, prior: float, n_folds: int = 5, seed: int = 0,
               noise_multiple: float | None = None) -> tuple[float, float, str]:
    """How much a map of the shape (temperature or isotonic, the better one out of fold)
    beats the level shift out of fold: (mean per-answer top-label Brier gain, its standard
    error, the method). ``sample``: multi-person answers."""
    n = len(sample)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    err = {m: np.zeros(n) for m in ("level", "temperature", "isotonic")}
    for held_out in folds:
        train = np.ones(n, dtype=bool)
        train[held_out] = False
        fit_on, test = sample.subset(train), sample.subset(held_out)
        conf = fit_on.probs.max(axis=1)
        shift = (fit_evidence_shift(conf, fit_on.correct, fit_on.weights, noise_multiple) if noise_multiple is not None
                 else fit_one_person_shift(conf, fit_on.correct, fit_on.weights, prior))
        fitted = {"level": level_calibrator(shift), "temperature": _fit_method("temperature", fit_on, 0),
                  "isotonic": _fit_method("isotonic", fit_on, 0)}
        for m, cal in fitted.items():
            err[m][held_out] = (cal.apply(test.probs).max(axis=1) - test.correct) ** 2
    w = sample.weights / sample.weights.sum()
    best = min(("temperature", "isotonic"), key=lambda m: float(np.dot(w, err[m])))
    gain = err["level"] - err[best]
    mean = float(np.dot(w, gain))
    se = float(np.sqrt(np.dot(w, (gain - mean) ** 2) / max(n - 1, 1)))
    return mean, se, best


LEVEL_NOISE_MULTIPLE = 2.0   # the common shift: only as far as it exceeds its noise (fit_evidence_shift; TUNING)
LEVEL_PRIOR = 100.0          # pseudo-answers holding a map of the shape's one-person shifts at none
LEVEL_SEGMENT_PRIOR = 300.0  # ... holding a model-age segment's shift at the common one
SHAPE_GATE_SE = 2.0          # a map of the shape only when it beats the level by this many standard errors


def fit_feedback_calibrator(
    sample: FeedbackSample,
    model_sessions: ArrayLike,
    segment_edges: Sequence[int] = DEFAULT_SEGMENT_EDGES,
    version: int = 1,
    prior: float = LEVEL_PRIOR,
    segment_prior: float = LEVEL_SEGMENT_PRIOR,
    gate: float = SHAPE_GATE_SE,
    n_folds: int = 5,
    seed: int = 0,
    noise_multiple: float | None = LEVEL_NOISE_MULTIPLE,
    cell_noise_multiple: float | None = None,
) -> Calibrator:
    """What the service fits: the level shift (``fit_level_calibrator``: the common shift
    by ``fit_evidence_shift`` with ``noise_multiple``, or shrunk by ``prior`` pseudo-answers
    when it is None; per age and kind of answer shrunk toward it by ``segment_prior``)
    unless a map of the shape beats it out of fold by ``gate`` standard errors on the
    multi-person answers; then ``fit_segmented_calibrator`` (pooled map, per-age residual
    maps, one-person shifts shrunk toward the common one)."""
    level = fit_level_calibrator(sample, model_sessions, segment_edges, version, prior, segment_prior, noise_multiple,
                                 cell_noise_multiple=cell_noise_multiple)
    multi = (sample.probs > 0).sum(axis=1) > 1
    gate_report: dict[str, Any] = {"gate_se": gate}
    if multi.sum() >= max(MIN_SAMPLES_TO_FIT, n_folds):
        gain, se, method = shape_gain(sample.subset(multi), prior, n_folds, seed, noise_multiple)
        gate_report.update({"shape_gain": round(gain, 6), "shape_gain_se": round(se, 6), "shape_method": method})
        if gain > gate * se:
            shaped = fit_segmented_calibrator(sample, model_sessions, segment_edges, version, seed=seed,
                                              one_person_prior=prior, segment_prior=segment_prior)
            return replace(shaped, training={**shaped.training, "gate": gate_report})
    return replace(level, training={**level.training, "gate": gate_report})


# A calibration group gets its own calibrator from this many feedback answers, else the
# pooled one (TUNING, session 16: 25 and 50 best and equal on worlds 12-15 and real viewers'
# tuning half; 100 loses the label-shaped group's own calibrator on worlds, 200 on both).
MIN_GROUP_FEEDBACK = 50
# Which group a feedback answer is fitted in: "answered" = the group clustering stamped on
# it when it was served; "household" = its household's group now (its newest prediction's).
# "household" (TUNING, session 16): the feedback that reshaped a household was given on
# answers served before its labels, in the default group; they describe the households
# labels reshape (under-counted, over-confident), so they are fitted with them, and the
# default group's calibrator learns from the households that stay in it.
FEEDBACK_GROUP_OF = "household"
GROUP_OF_CHOICES = ("answered", "household")


def fit_grouped_calibrator(
    sample: FeedbackSample,
    model_sessions: ArrayLike,
    groups: ArrayLike,
    min_group: int = MIN_GROUP_FEEDBACK,
    version: int = 1,
) -> Calibrator:
    """What the service fits per variant: ``fit_feedback_calibrator`` on every answer
    with feedback (the pooled calibrator, the top level), and the same fit on each
    calibration group's answers alone (``groups`` (n,): each answer's group, as
    clustering stamped it, ``feedback_groups``) for every group with at least
    ``min_group`` of them; a group with fewer, or one clustering names later, gets the
    pooled calibrator (services/common/calibration.py, "Groups"). With one group only,
    its calibrator would be the pooled one: none is stored."""
    names = np.asarray(groups, dtype=object).reshape(-1).astype(str)
    ages = np.asarray(model_sessions).reshape(-1)
    if names.shape[0] != len(sample) or ages.shape[0] != len(sample):
        raise InvalidArgument("groups", f"must have one value per answer ({len(sample)})")
    pooled = fit_feedback_calibrator(sample, ages, version=version)
    present, counts = np.unique(names, return_counts=True)
    parts: dict[str, Calibrator] = {}
    report: dict[str, Any] = {}
    for name, count in zip(present.tolist(), counts.tolist()):
        own = count >= min_group and present.size > 1
        if own:
            rows = names == name
            parts[name] = fit_feedback_calibrator(sample.subset(rows), ages[rows], version=version)
        report[name] = {"n": int(count), "own": bool(own),
                        **({"shift": parts[name].training.get("shift")} if own else {})}
    return replace(pooled, groups=parts,
                   training={**pooled.training, "groups": report, "min_group": int(min_group)})


def feedback_groups(answered: ArrayLike, account_ids: ArrayLike, current: dict[str, str] | None,
                    group_of: str = FEEDBACK_GROUP_OF) -> NDArray:
    """(n,) the calibration group each feedback answer is fitted in. ``answered``: the
    group clustering stamped on it; with ``group_of`` "household", ``current`` (account ->
    group of the account's newest prediction): the household's group now, which the
    answer takes instead (docs/feedback.md, "Calibration groups")."""
    if group_of not in GROUP_OF_CHOICES:
        raise InvalidArgument("group_of", f"must be one of {GROUP_OF_CHOICES}, got {group_of!r}")
    out = np.asarray(answered, dtype=object).reshape(-1).copy()
    if group_of == "household" and current:
        accounts = np.asarray(account_ids, dtype=object).reshape(-1)
        out = np.array([current.get(a, g) for a, g in zip(accounts, out)], dtype=object)
    return out


def fit_segmented_calibrator(
    sample: FeedbackSample,
    model_sessions: ArrayLike,
    segment_edges: Sequence[int] = DEFAULT_SEGMENT_EDGES,
    version: int = 1,
    criterion: Criterion = "brier",
    n_folds: int = 5,
    n_bins: int = DEFAULT_BINS,
    seed: int = 0,
    min_samples: int = MIN_SAMPLES_TO_FIT,
    one_person_prior: float = ONE_PERSON_PRIOR_WEIGHT,
    methods: Sequence[str] = METHODS,
    segment_prior: float | None = None,
) -> Calibrator:
    """The pooled map (``fit_calibrator`` on every multi-person answer), then per model-age
    segment a residual map on the pooled map's output (chosen by ``fit_calibrator``:
    identity unless it helps out of sample) and a one-person shift. ``model_sessions``
    (n,): sessions each prediction's model had seen, 0 = unknown (pooled map only; those
    one-person rows take the shift fitted on every one-person answer, ``"all"``).

    The methods are chosen by cross-validated top-label Brier (``criterion="brier"``), not
    ECE: a segment has a few hundred answers, a fold a few dozen, and an ECE over 15 bins
    of a few dozen answers is mostly noise (on the TUNING worlds' answers, 3.75 %
    feedback, 8 draws: the ECE criterion once took a temperature that doubled the
    held-out ECE; mean held-out ECE batch 0.053 / stream 0.047 with ECE, 0.039 / 0.044
    with Brier, a proper score of the confidence itself)."""
    edges = tuple(int(e) for e in segment_edges)
    ages = np.asarray(model_sessions, dtype=np.int64).reshape(-1)
    if ages.shape[0] != len(sample):
        raise InvalidArgument("model_sessions", f"must have one value per prediction ({len(sample)})")
    pooled = fit_calibrator(sample, version, methods=methods, criterion=criterion, n_folds=n_folds, n_bins=n_bins,
                            seed=seed, min_samples=min_samples)
    segment = segment_of(ages, edges)
    names = segment_names(edges)
    single = one_person_rows(sample.probs)
    multi = (sample.probs > 0).sum(axis=1) > 1
    after_pooled = pooled.apply(sample.probs)
    parts: dict[str, Calibrator] = {}
    shifts: dict[str, float] = {}
    report: dict[str, Any] = {}
    for i, name in enumerate(names):
        rows = multi & (segment == i)
        part = fit_calibrator(FeedbackSample(after_pooled[rows], sample.labels[rows], sample.correct[rows],
                                             sample.weights[rows]),
                              version, methods=methods, criterion=criterion, n_folds=n_folds, n_bins=n_bins,
                              seed=seed, min_samples=min_samples)
        if part.method != "identity":
            parts[name] = part
        report[name] = {"n": int(rows.sum()), "method": part.method, "one_person_n": int((single & (segment == i)).sum())}
    if single.any():
        shifts[ALL_AGES] = fit_one_person_shift(sample.probs[single].max(axis=1), sample.correct[single],
                                                sample.weights[single], one_person_prior)
    for i, name in enumerate(names):
        rows = single & (segment == i)
        if rows.any():
            # A segment's shift is shrunk toward every age's shift (segment_prior
            # pseudo-answers), and that one toward no shift (one_person_prior).
            toward = shifts[ALL_AGES] if segment_prior is not None else 0.0
            weight = segment_prior if segment_prior is not None else one_person_prior
            shifts[name] = toward + fit_one_person_shift(
                sample.probs[rows].max(axis=1) + toward, sample.correct[rows], sample.weights[rows], weight)
    shifts = {n: round(float(np.clip(v, -1.0, 1.0)), 6) for n, v in shifts.items()}
    # "n" is what the pooled map was fitted on (multi-person answers); "n_all" every
    # prediction with feedback (what the service counts to decide when to refit).
    training = {**pooled.training, "n_all": len(sample), "segments": report,
                "one_person_prior_weight": one_person_prior}
    return Calibrator(version, pooled.method, pooled.parameters, training, edges, parts, shifts)
