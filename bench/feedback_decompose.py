"""ECE after feedback taken apart, and its noise at the number of scored households (issue #10,
ece35, session 35; TUNING only).

Reads the answers ``bench.label_feedback --cache`` stored (``--batch-only`` or ``--stream-only``:
the same fits, draws and serving rule as #10's whole-loop figure; nothing is refitted), serves
each draw's answers as ``E.mesh_after_feedback`` does (the service's grouped calibrator fitted on
the draw's feedback answers, applied where clustering applies it) and takes the served ECE on
the answers without feedback apart:

* ``bins``: per confidence bin (15 equal, as ``ece``) its share, confidence, accuracy and part of
  the ECE (share × |gap|), signed: over-confident bins against under-confident ones;
* ``by``: per cell of a covariate — ``family`` (world family), ``size`` (true persons),
  ``persons`` (the persons the answer's vector holds: what the calibrator sees), ``single``
  (true single-person households), ``group`` (calibration group), ``age`` (the model's
  segment) — its share of the answers, its own ECE, its mean confidence − accuracy, and its
  **part of the pooled ECE**: Σ_b sign(gap_b) · W_bg (conf_bg − acc_bg) / W over the bins, which
  sums over the cells to the pooled ECE exactly (a negative part: the cell cancels the others'
  misses in its bins);
* ``level_ceiling``: per covariate, the ECE when each cell's answers are moved by their own
  exact mean miss on the scored answers (unlimited feedback; not a result);
* ``calibrator``: what the calibrator fitted on the labels did (answers it was fitted on, per
  group, the common shift, whether the shape gate let a map through);
* ``noise``: the measurement's own noise. ``bernoulli_floor``: answers drawn right with exactly
  their served confidence, independently (``ece_floor``, the floor quoted since session 17);
  ``household_bootstrap``: the households resampled with replacement (``BOOT`` draws; each draw
  keeps a household's answers together, since its misses are one household's) — the ECE's
  spread (sd, 5th–95th percentile) and ``clustered_floor``, the mean of Σ_b (W*_b / W*) |gap*_b −
  gap_b| over the draws: what a predictor with exactly the observed gap in every bin measures
  from the households' own spread, i.e. the ECE a calibrated predictor would read with 60
  households, and ``clustered_floor_at_households`` the same for samples of m households like
  these (``FLOOR_SIZES``; m drawn with replacement); ``debiased``: 2 · ECE − mean bootstrap ECE; ``household_offsets``: the same
  floor drawn parametrically (``household_offset_floor``).

``python -m bench.feedback_decompose --mode batch|stream SPEC=CACHE ...`` (SPEC as
``bench.feedback_methods``; ``--level-form temperature``: the calibrator's common level spent as
one temperature, ``temperature_for_shift``; ``--one-person-segment-prior``: the one-person
shifts held by fewer pseudo-answers; both measured and not kept, so they live here, not in the
service: ``fit_level_calibrator`` is the service's fit with these options, and the run puts it
in the service's place). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from bench import _worlds_eval as E
from bench import feedback_methods as M
from bench import feedback_shipped as FS
from bench._clustering_eval import bin_index, ece, ece_floor, household_bootstrap
from services.common.calibration import Calibrator, apply_temperature, one_person_rows
from services.feedback.domain import recalibration as R

BINS = 15
BOOT = 200
FLOOR_SIZES = (60, 120, 240, 480, 960)   # households: the clustered floor of a sample that size


# How the common level reaches the answers over several persons: "shift" (the service's) adds it
# to every top confidence (c -> c + shift); "temperature" spends the same mean move on the
# sample's answers as one temperature (softmax(ln p / T)), which leaves a tie a tie and an answer
# near 1 near 1 (ece35, session 35: the additive shift lifts the default group's two-person
# near-ties, right about half the time, into 0.60-0.67, the largest bin of the ECE left after
# feedback). Measured on TUNING, not kept (docs/feedback.md).
LEVEL_FORMS = ("shift", "temperature")
_SERVICE_LEVEL = R.fit_level_calibrator


def temperature_for_shift(sample: R.FeedbackSample, shift: float, level: Calibrator) -> Calibrator:
    """``level`` (a level calibrator moving top confidences by ``shift``) with its map over
    several persons replaced by the temperature that moves the mean top confidence of the
    sample's answers over several persons by ``shift`` (bisection on ln T within
    recalibration.TEMPERATURE_BOUNDS; the bound when the shift is beyond any temperature). No
    answer over several persons, or no shift: ``level`` unchanged."""
    multi = ~one_person_rows(sample.probs) & ((sample.probs > 0).sum(axis=1) > 1)
    if shift == 0.0 or not multi.any():
        return level
    P, w = sample.probs[multi], sample.weights[multi]
    target = float(np.dot(w, P.max(axis=1)) / w.sum()) + shift

    def mean_top(log_t: float) -> float:
        return float(np.dot(w, apply_temperature(P, float(np.exp(log_t))).max(axis=1)) / w.sum())

    lo, hi = np.log(R.TEMPERATURE_BOUNDS[0]), np.log(R.TEMPERATURE_BOUNDS[1])   # mean_top falls as T rises
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_top(mid) > target:
            lo = mid
        else:
            hi = mid
    t = round(float(np.exp(0.5 * (lo + hi))), 6)
    return replace(level, method="temperature", parameters={"temperature": t},
                   training={**level.training, "temperature": t})


def fit_level_calibrator(sample: R.FeedbackSample, model_sessions=None, segment_edges=R.DEFAULT_SEGMENT_EDGES,
                         version: int = 1, prior: float = 100.0, segment_prior: float | None = 300.0,
                         noise_multiple: float | None = None, prior_variance: float | None = None,
                         cell_noise_multiple: float | None = None, form: str = "shift",
                         one_person_segment_prior: float | None = None) -> Calibrator:
    """The service's ``recalibration.fit_level_calibrator`` (same arguments) with the two options
    measured here: ``form`` (LEVEL_FORMS; "temperature": the common level as
    ``temperature_for_shift``, the segments' shifts starting from its answers) and
    ``one_person_segment_prior`` (pseudo-answers holding a segment's one-person shift at the
    common one; default ``segment_prior``, the service's). With the defaults it is the
    service's fit."""
    if form not in LEVEL_FORMS:
        raise ValueError(f"form must be one of {LEVEL_FORMS}, got {form!r}")
    shift = R.common_level_shift(sample, prior, noise_multiple, prior_variance)
    common = _SERVICE_LEVEL(sample, None, segment_edges, version, prior, segment_prior, noise_multiple, prior_variance,
                            cell_noise_multiple)
    after = sample.probs.max(axis=1) + shift
    if form == "temperature":
        common = temperature_for_shift(sample, shift, common)
        several = ~one_person_rows(sample.probs) & ((sample.probs > 0).sum(axis=1) > 1)
        if common.method == "temperature" and several.any():
            after[several] = common.apply(sample.probs[several]).max(axis=1)
    one_prior = segment_prior if one_person_segment_prior is None else one_person_segment_prior
    return R.with_segment_shifts(common, sample, shift, after, model_sessions, segment_edges, version, segment_prior,
                                 one_prior, cell_noise_multiple, prior_variance)


def bin_table(conf: np.ndarray, right: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per non-empty bin: lower edge, share, confidence, accuracy, gap (conf − acc), part of ECE."""
    idx = bin_index(conf, bins)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            gap = float(conf[sel].mean() - right[sel].mean())
            out.append({"lower": round(b / bins, 3), "share": round(float(sel.mean()), 4),
                        "conf": round(float(conf[sel].mean()), 4), "acc": round(float(right[sel].mean()), 4),
                        "gap": round(gap, 4), "part": round(float(sel.mean()) * abs(gap), 5)})
    return out


def parts_by(conf: np.ndarray, right: np.ndarray, cell: np.ndarray, bins: int = BINS) -> dict[str, dict]:
    """Per cell: share, own ECE, mean conf − acc, and its part of the pooled ECE (module doc;
    the parts sum to ``ece(conf, right)``)."""
    idx = bin_index(conf, bins)
    n = conf.size
    sign = np.zeros(bins)
    for b in range(bins):
        sel = idx == b
        if sel.any():
            sign[b] = np.sign(conf[sel].mean() - right[sel].mean())
    out = {}
    for name in np.unique(cell):
        g = cell == name
        part = float(np.sum(sign[idx[g]] * (conf[g] - right[g])) / n)
        out[str(name)] = {"share": round(float(g.mean()), 4), "ece": round(ece(conf[g], right[g], bins), 4),
                          "gap": round(float(conf[g].mean() - right[g].mean()), 4), "part": round(part, 5)}
    return out


def level_ceiling(conf: np.ndarray, right: np.ndarray, cell: np.ndarray) -> float:
    """ECE with each cell's answers moved by their own exact mean miss (not a result)."""
    moved = conf.copy()
    for name in np.unique(cell):
        g = cell == name
        moved[g] = np.clip(conf[g] - (conf[g].mean() - right[g].mean()), 0.0, 1.0)
    return ece(moved, right)


def household_offset_floor(conf: np.ndarray, right: np.ndarray, account: np.ndarray, reps: int = 50,
                           seed: int = 0, bins: int = BINS) -> dict[str, float]:
    """A parametric check of ``clustered_floor``: outcomes drawn right with probability
    confidence + the household's own offset, where the offsets are the households' mean miss
    beyond their bins' pooled miss, shrunk by method of moments so that their spread is the
    spread beyond the binomial noise of their answers (so every bin is calibrated on average
    and households differ as much as these do), dealt out again to the households with random
    signs in each of ``reps`` draws (another sample of households). Mean ECE; beside it the
    offsets' s.d."""
    idx = bin_index(conf, bins)
    resid = right.astype(float) - conf
    pooled = np.zeros(bins)
    for b in np.unique(idx):
        pooled[b] = resid[idx == b].mean()
    beyond = resid - pooled[idx]
    names, inverse = np.unique(account, return_inverse=True)
    n_h = np.bincount(inverse).astype(float)
    u = np.bincount(inverse, weights=beyond) / n_h
    noise = np.bincount(inverse, weights=conf * (1.0 - conf)) / n_h ** 2
    var_u = float(np.average(u ** 2, weights=n_h))
    shrink = np.sqrt(max(0.0, 1.0 - float(np.average(noise, weights=n_h)) / var_u)) if var_u > 0 else 0.0
    rng = np.random.default_rng(seed)
    eces = []
    for _ in range(reps):
        # another sample of households: the offsets dealt out again, each with a random sign
        drawn = shrink * u[rng.permutation(names.size)] * rng.choice((-1.0, 1.0), names.size)
        eces.append(ece(conf, rng.random(conf.size) < np.clip(conf + drawn[inverse], 0.0, 1.0), bins))
    return {"floor": round(float(np.mean(eces)), 4), "p95": round(float(np.quantile(eces, 0.95)), 4),
            "offset_sd": round(float(shrink * np.sqrt(var_u)), 4)}


def draws(spec: str, cache: str, mode: str):
    """(households, per draw FS.Draw) of a ``label_feedback --cache`` file (TUNING only)."""
    return M.households_and_draws(spec, cache, mode)


def covariates(hs, d: FS.Draw) -> dict[str, np.ndarray]:
    """Per answer, the cells it is taken apart by (module doc)."""
    from services.feedback.domain.recalibration import DEFAULT_SEGMENT_EDGES
    from services.common.calibration import segment_names, segment_of
    size = np.concatenate([np.full(h.n_sessions, len(np.unique(h.person))) for h in hs])
    family = np.concatenate([np.full(h.n_sessions, h.family, dtype=object) for h in hs])
    persons = (d.P1 > 0).sum(axis=1)
    seg = np.asarray(segment_names(DEFAULT_SEGMENT_EDGES))[segment_of(d.age, DEFAULT_SEGMENT_EDGES)]
    return {"family": family.astype(str), "size": np.minimum(size, 5).astype(str),
            "persons": np.minimum(persons, 5).astype(str), "single": np.where(size == 1, "single", "several"),
            "group": np.where(d.group == "", "default", d.group), "age": seg.astype(str)}


def served(d: FS.Draw, mode: str):
    """(served confidences, the calibrator) as the mesh serves the draw (E.mesh_after_feedback)."""
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK
    P_fit, y_fit, ok_fit = (d.P0, d.y0, d.ok0) if mode == "batch" else (d.P1, d.y1, d.ok1)
    answered = np.full(d.P0.shape[0], "", dtype=object) if mode == "batch" else d.group.astype(object)
    current = dict(zip(d.account, d.fitted_in))
    cal = E.grouped_service_calibrator(P_fit, y_fit, ok_fit, d.age, d.fed, answered, d.account, current,
                                       MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
    conf = d.P1.max(axis=1).copy()
    on = d.calibrated
    conf[on] = cal.apply(d.P1[on], d.age[on], d.group[on]).max(axis=1)
    return conf, cal


def calibrator_report(cal) -> dict:
    t = cal.training
    out = {"n_all": t.get("n_all"), "method": cal.method, "shift": t.get("shift"),
           "gate": t.get("gate"), "groups": t.get("groups")}
    out["group_methods"] = {g: {"method": c.method, "shift": c.training.get("shift"),
                                "gate_fired": c.method not in ("identity",) and "shift" not in c.training}
                            for g, c in cal.groups.items()}
    return out


def score_draw(hs, d: FS.Draw, mode: str, seed: int) -> dict:
    conf, cal = served(d, mode)
    held = ~d.fed
    c, r = conf[held], d.ok1[held].astype(float)
    cov = {k: v[held] for k, v in covariates(hs, d).items()}
    c0, r0 = d.P0[held].max(axis=1), d.ok0[held].astype(float)
    table = bin_table(c, r)
    return {"ece": round(ece(c, r), 4), "no_feedback": round(ece(c0, r0), 4),
            "labels_only": round(ece(d.P1[held].max(axis=1), r), 4),
            "accuracy_no_feedback": round(float(r0.mean()), 4), "accuracy_after": round(float(r.mean()), 4),
            "over_confident_part": round(sum(b["part"] for b in table if b["gap"] > 0), 4),
            "under_confident_part": round(sum(b["part"] for b in table if b["gap"] < 0), 4),
            "bins": table,
            "by": {k: parts_by(c, r, v) for k, v in cov.items()},
            "level_ceiling": {k: round(level_ceiling(c, r, v), 4) for k, v in cov.items()},
            "level_ceiling_bins_x_group": round(level_ceiling(c, r, np.char.add(bin_index(c).astype(str),
                                                                                  cov["group"].astype(str))), 4),
            "calibrator": calibrator_report(cal),
            "fed": int(d.fed.sum()), "fed_calibrated": int((d.fed & d.calibrated).sum()), "held": int(held.sum()),
            "noise": {"bernoulli_floor": round(ece_floor(c, seed=seed), 4),
                      "household_bootstrap": household_bootstrap(c, r, d.account[held], seed=seed, sizes=FLOOR_SIZES),
                      "household_offsets": household_offset_floor(c, r, d.account[held], seed=seed),
                      "household_bootstrap_no_feedback": household_bootstrap(c0, r0, d.account[held], seed=seed, sizes=FLOOR_SIZES)}}


def _mean(per: list[dict]) -> dict:
    """Mean over draws of every number in the draws' reports (same keys in each)."""
    first = per[0]
    if isinstance(first, dict):
        return {k: _mean([p[k] for p in per]) for k in first if all(isinstance(p, dict) and k in p for p in per)}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(p, (int, float)) and p is not None for p in per):
        return round(float(np.mean(per)), 4)
    return first if all(p == first for p in per) else [p for p in per]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("batch", "stream"), required=True)
    ap.add_argument("--level-form", choices=("shift", "temperature"), default=None,
                    help="how the calibrator's common level reaches answers over several persons "
                         "(LEVEL_FORMS; default: the service's, shift)")
    ap.add_argument("--one-person-segment-prior", type=float, default=None,
                    help="pseudo-answers holding an age segment's one-person shift at the common one "
                         "(default: LEVEL_SEGMENT_PRIOR, as for answers over several persons)")
    ap.add_argument("samples", nargs="+", help="SPEC=CACHE (bench.label_feedback --cache of that mode)")
    args = ap.parse_args()
    import functools
    level_form = args.level_form or "shift"
    if level_form != "shift" or args.one_person_segment_prior is not None:
        # the service's feedback calibrator (fit_feedback_calibrator) fits its level with these options
        R.fit_level_calibrator = functools.partial(fit_level_calibrator, form=level_form,
                                                   one_person_segment_prior=args.one_person_segment_prior)
    report: dict = {"mode": args.mode, "bins": BINS, "bootstrap": BOOT, "level_form": level_form,
                    "one_person_segment_prior": args.one_person_segment_prior, "samples": {}}
    for item in args.samples:
        spec, cache = item.split("=", 1)
        hs, ds = draws(spec, cache, args.mode)
        per = [score_draw(hs, d, args.mode, seed=i) for i, d in enumerate(ds)]
        report["samples"][spec] = {"mean": _mean([{k: v for k, v in p.items() if k not in ("bins", "calibrator")}
                                                  for p in per]),
                                   "per_draw": per}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
