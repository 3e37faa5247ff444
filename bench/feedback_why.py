"""Where the batch feedback loop's ECE comes from, on TUNING households only (issue #10, session 26).

In a batch fit (a household imported at once, then fed) explicit feedback does two things
(bench/label_feedback.py): the labels refit the household (``hearth_batch_fed``) and the
feedback service's grouped calibrator is fitted on the fed sessions' answers from before the
labels. ``bench._worlds_eval.mesh_after_feedback`` scores the whole loop on the sessions
without feedback; this tool takes that figure apart, on the same households and draws:

* which held-out sessions the labels change (households whose labels add persons,
  ``persons_from_labels``; elsewhere a batch fit's labels only name its persons and every
  answer is as it was), and whether they change a session's confidence, its correctness, or
  the number of persons answered over;
* swaps: the answers before the labels with one part swapped for the labelled answers
  (every part of the labels' change in turn: the confidence alone, the correctness alone, the
  households whose person count grew), and the ECE each swap gives;
* per confidence bin, the share of the ECE each kind of household carries before and after;
* candidate repairs scored beside the whole loop (``candidates``), each on the same draws.

Every figure comes twice: for the labelled fits' answers as the service gives them
(``fed_batch``) and read with the confidence maps' household shift at the unlabelled fit's
person count (``fed_batch_fit_persons``, ``fit_persons_answers``: measured in session 26,
not kept — docs/benchmarks.md).

``python -m bench.feedback_why --split tuning|movielens-tuning [--first-world 12 --worlds 4
--households 5] [--draws 3] [--workers 2] [--cache FILE]`` prints tables and one JSON object
on its last line. TUNING splits only: REPORTING is read by ``python -m bench.accuracy``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from bench import _worlds_eval as E
from bench import label_feedback as LF
from bench._clustering_eval import ece
from bench.feedback_tuning import cached

BINS = 15


def collect(split: str, first_world: int, n_worlds: int | None, households: int | None, draws: int,
            workers: int, cache: str | None):
    hs = LF.households(split, first_world, n_worlds, households)
    fed = E.feedback_draws(hs, draws)

    def work():
        prior = LF.priors(split, first_world, n_worlds, hs) if E.SERVICE_COLD_START_PRIOR else None
        args = [(h, f, False, True, *((prior.get(h.world_id),) if prior is not None else ()))
                for h, f in zip(hs, fed)]
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_one, args))

    outs = cached(cache, work)
    return hs, fed, outs


def fit_persons_answers(m, h, persons_before: int, answer) -> np.ndarray:
    """(n, persons) ``m``'s batch answers (``answer``: its assign_batch of every session,
    included) with the confidence maps' household shift reading the persons the
    unlabelled fit found (``persons_before``, at least two) instead of the persons the
    labels made: for a model whose persons labels added, the maps were fitted on
    unlabelled fits, whose count is the fit's own evidence (the shift rises ~0.39 logit
    per person, DEVICE_CONFIDENCE_SHIFT["fitted"]). Other models: their answers."""
    from services.clustering.domain import model as M
    extra = m.n_persons - persons_before
    if not m.persons_from_labels or extra <= 0 or m.n_persons < 2 or not m.device_evidence or m.streamed:
        return answer.probabilities
    raw = m._proba(m._augment(h.features, m._known_slots(h.device_id, h.n_sessions)))
    kw = dict(device=True, young=m.n_sessions < M.YOUNG_MODEL_SESSIONS, streamed=False, settled=True,
              device_groups=m.device_group_count, sessions=m.n_sessions)
    # the same call as assign_batch's (a batch fit answering the sessions it includes)
    assert np.allclose(M.calibrate_confidence(raw, **kw), answer.probabilities, atol=1e-6)
    return M.calibrate_confidence(raw, **kw, evidence_persons=np.full(h.n_sessions, max(persons_before, 2)))


def _one(args: tuple) -> dict:
    """One household's batch answers without feedback and, per draw, with its labels
    (``hearth_batch_fed``'s fit): as the service answers them (``fed_batch``) and with
    the maps' household shift reading the unlabelled fit's persons
    (``fed_batch_fit_persons``: fit_persons_answers)."""
    from services.clustering.domain import model as M
    h, fed, _, _, *rest = args
    kw = {"population_prior": rest[0]} if rest else {}
    m0 = M.HouseholdModel(**kw).fit(h.features, device_ids=h.device_id)
    b = m0.assign_batch(h.features, device_ids=h.device_id, included=True)
    out = {"batch": b.probabilities, "fed_batch": [], "fed_batch_fit_persons": []}
    for f in fed:
        m = M.HouseholdModel(**kw).fit(h.features, labels=E.feedback_labels(h, f), device_ids=h.device_id)
        a = m.assign_batch(h.features, device_ids=h.device_id, included=True)
        rows, group = M.feedback_calibrator_rows(m, a)
        groups = np.full(h.n_sessions, group, dtype=object)
        out["fed_batch"].append(E.FedAnswers(a.probabilities, rows, groups))
        out["fed_batch_fit_persons"].append(E.FedAnswers(fit_persons_answers(m, h, m0.n_persons, a), rows, groups))
    return out


def _bins(conf: np.ndarray) -> np.ndarray:
    return np.minimum((conf * BINS).astype(int), BINS - 1)


def bin_table(conf: np.ndarray, ok: np.ndarray, kind: np.ndarray) -> list[dict]:
    """Per bin: answers, confidence - right, and per kind its answers and its signed gap
    times its weight in the pool (the kinds' parts add up to the bin's part of the ECE
    before the absolute value: where they have opposite signs they cancel)."""
    b = _bins(conf)
    n = conf.size
    rows = []
    for k in range(BINS):
        m = b == k
        if not m.any():
            continue
        row = {"bin": f"{k / BINS:.2f}-{(k + 1) / BINS:.2f}", "n": int(m.sum()),
               "gap": round(float(conf[m].mean() - ok[m].mean()), 3),
               "ece_part": round(float(abs(conf[m].sum() - ok[m].sum()) / n), 4)}
        for name in np.unique(kind):
            g = m & (kind == name)
            row[f"{name}_n"] = int(g.sum())
            row[f"{name}_part"] = round(float((conf[g].sum() - ok[g].sum()) / n), 4)
        rows.append(row)
    return rows


def decompose(hs, fed, outs, key: str = "fed_batch") -> dict:
    """The labels' change taken apart per draw (module doc); means over draws."""
    persons = [h.person for h in hs]
    ages = E.model_ages(hs, "batch")
    P0, y0, ok0, age = E.pooled_answers(persons, [o["batch"] for o in outs], ages)
    width0 = np.concatenate([np.full(h.n_sessions, o["batch"].shape[1]) for h, o in zip(hs, outs)])
    account = np.concatenate([np.full(h.n_sessions, h.household_id, dtype=object) for h in hs])
    res: dict[str, list] = {}
    tables = []

    def put(k, v):
        res.setdefault(k, []).append(float(v))

    for d in range(len(fed[0])):
        fed_d = np.concatenate([f[d] for f in fed])
        answers = [o[key][d] for o in outs]
        P1, y1, ok1, _ = E.pooled_answers(persons, [a.probs for a in answers], ages)
        width1 = np.concatenate([np.full(h.n_sessions, a.probs.shape[1]) for h, a in zip(hs, answers)])
        group = np.concatenate([a.groups for a in answers]).astype(str)
        calibrated = np.concatenate([a.calibrated for a in answers])
        held = ~fed_d
        c0, c1 = P0.max(axis=1), P1.max(axis=1)
        shaped = group != ""
        grew = width1 > width0
        changed = np.abs(c1 - c0) > 1e-9
        h_ = held
        put("no_feedback", ece(c0[h_], ok0[h_]))
        put("labels_only", ece(c1[h_], ok1[h_]))
        put("share_label_shaped", shaped[h_].mean())
        put("share_changed", changed[h_].mean())
        put("changed_outside_label_shaped", (changed & ~shaped)[h_].sum())
        put("share_grew", grew[h_].mean())
        # swaps: answers before the labels with one part of the change put in
        def swap(mask, conf_too=True, ok_too=True):
            c = np.where(mask & conf_too, c1, c0)
            o = np.where(mask & ok_too, ok1, ok0)
            return ece(c[h_], o[h_])
        every = np.ones_like(held)
        put("swap_confidence_only", swap(every, True, False))
        put("swap_correctness_only", swap(every, False, True))
        put("swap_label_shaped_grew", swap(shaped & grew))
        put("swap_label_shaped_same_width", swap(shaped & ~grew))
        flip_up = (~ok0) & ok1
        flip_down = ok0 & ~ok1
        put("swap_right_to_wrong_only", swap(flip_down))
        put("swap_wrong_to_right_only", swap(flip_up))
        put("swap_correctness_unchanged_only", swap(ok0 == ok1))
        # the two kinds' levels, before and after, on the held-out answers
        for name, g in (("default", ~shaped), ("label_shaped", shaped)):
            m = g & h_
            put(f"{name}_accuracy_before", ok0[m].mean())
            put(f"{name}_accuracy_after", ok1[m].mean())
            put(f"{name}_confidence_before", c0[m].mean())
            put(f"{name}_confidence_after", c1[m].mean())
            put(f"{name}_ece_before", ece(c0[m], ok0[m]))
            put(f"{name}_ece_after", ece(c1[m], ok1[m]))
        # each kind on its own, the other held at its pre-label answers: the ECE each alone
        # would give, and the pooled ECE with each kind perfectly calibrated within its bins
        kind = np.where(shaped, "label_shaped", "default")
        tables.append({"before": bin_table(c0[h_], ok0[h_], kind[h_]),
                       "labels_only": bin_table(c1[h_], ok1[h_], kind[h_])})
        # the whole loop and candidate repairs
        for name, served in candidates(P0, y0, ok0, P1, ok1, age, fed_d, group, calibrated, account, hs,
                                       answers).items():
            put(f"loop_{name}", ece(served[h_], ok1[h_]))
    out = {k: round(float(np.nanmean(v)), 4) for k, v in res.items()}
    out["per_draw"] = {k: [round(x, 4) for x in v] for k, v in res.items() if k.startswith(("loop_", "no_", "lab"))}
    out["bins_draw0"] = tables[0]
    return out


def candidates(P0, y0, ok0, P1, ok1, age, fed_d, group, calibrated, account, hs, answers) -> dict[str, np.ndarray]:
    """Served confidence (max probability) per pooled session under each design, on this draw."""
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK
    answered = np.full(fed_d.size, "", dtype=object)   # batch: every fed answer served before any label
    current = {h.household_id: str(a.groups[-1]) for h, a in zip(hs, answers)}
    cal = E.grouped_service_calibrator(P0, y0, ok0, age, fed_d, answered, account, current,
                                       MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
    pooled = replace(cal, groups={})
    shaped = group != ""
    out = {}
    served = np.where(calibrated[:, None], cal.apply(P1, age, group), P1)
    out["mesh"] = served.max(axis=1)
    out["pooled_everywhere"] = np.where(calibrated, pooled.apply(P1, age).max(axis=1), P1.max(axis=1))
    out["no_calibrator"] = P1.max(axis=1)
    # the default group's answers are the unlabelled fit's own: calibrated as before the labels
    # (the pooled calibrator), the label-shaped group by its own
    out["default_pooled_shaped_group"] = np.where(shaped, out["mesh"], out["pooled_everywhere"])
    # the label-shaped households answered with the labelled fit's person but the confidence
    # the unlabelled fit gave (through the pooled calibrator)
    c0p = pooled.apply(P0, age).max(axis=1)
    out["shaped_keep_pre_label_confidence"] = np.where(shaped, c0p, out["mesh"])
    # label-shaped: group calibrator; default group left as unfed (no calibrator)
    out["only_shaped_calibrated"] = np.where(shaped, out["mesh"], P1.max(axis=1))
    # label-shaped answers left uncalibrated (session 15's rule), the default group by its own
    out["shaped_uncalibrated"] = np.where(shaped, P1.max(axis=1), out["mesh"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tuning", "movielens-tuning"), default="tuning")
    ap.add_argument("--first-world", type=int, default=12)
    ap.add_argument("--worlds", type=int, default=4)
    ap.add_argument("--households", type=int, default=5)
    ap.add_argument("--draws", type=int, default=E.FEEDBACK_MESH_DRAWS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="pickle of the per-household work (reused when present)")
    args = ap.parse_args()
    t0 = time.time()
    hs, fed, outs = collect(args.split, args.first_world, args.worlds, args.households, args.draws, args.workers,
                            args.cache)
    rep = {key: decompose(hs, fed, outs, key) for key in ("fed_batch", "fed_batch_fit_persons")}
    for k, v in rep["fed_batch"].items():
        if k not in ("per_draw", "bins_draw0"):
            print(f"{k:40s} {v:>8} {rep['fed_batch_fit_persons'][k]:>8}")
    print(json.dumps({"split": args.split, "first_world": args.first_world, "households": len(hs),
                      "draws": args.draws, **rep, "elapsed_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
