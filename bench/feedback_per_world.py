"""The feedback calibrator per world: does a level each deployment learns from its own feedback
lower the whole loop's ECE? TUNING only (issue #10, fbcal28, session 28).

``bench.label_feedback`` (``bench._worlds_eval.mesh_after_feedback``, the figure of
``bench.accuracy``'s ``after_feedback`` ``mesh`` block) fits ONE feedback calibrator on the
fed answers of the whole sample — 60 households of 12 worlds (3 families x 4 worlds x 5
households). A running mesh is one deployment, i.e. one world: its feedback service fits the
calibrator on that world's feedback alone. Session 27 (calib27) found the correctly counted
households' error before feedback to be a per-world offset (-0.028 .. -0.080) that no map
fitted on other worlds knows; the feedback of a deployment measures it. This scores, on the
answers a ``bench.label_feedback --cache FILE`` run stored (the same fits, draws and serving
rule; nothing is refitted):

* ``mesh``: the whole loop as ``mesh_after_feedback`` scores it (the check: the same figure);
* ``mesh_per_world``: the service's grouped calibrator fitted on each world's own feedback
  and applied to that world's answers (what a deployment of that world's households fits);
* ``mesh_world_level`` / ``mesh_world_level_crossfit``: the sample's calibrator, then each
  world's own level on top — the mean (right - confidence) of the world's fed answers
  after that calibrator, shrunk as the service shrinks its common shift
  (``fit_evidence_shift``, m = LEVEL_NOISE_MULTIPLE) — applied to the world's calibrated
  answers; cross-fitted: a household's answers get the level of the OTHER households'
  feedback of its world (its own labels never set its own level; the household rule's
  groups select a household's feedback, docs/benchmarks.md session 17);
* ceilings (not results: fitted on the scored answers themselves): ``world_level_ceiling``
  (the served answers, each world moved by its own exact mean confidence - right) and
  ``world_group_level_ceiling`` (each world x calibration group).

``python -m bench.feedback_per_world --cache FILE --split tuning --first-world W --worlds N
--households H [--draws D] [--mode batch|streaming]`` with the same households and draws as
the ``bench.label_feedback`` run that wrote FILE; prints one JSON object. TUNING splits only.
"""

from __future__ import annotations

import argparse
import json
import pickle
import numpy as np

from bench import _worlds_eval as E
from bench import label_feedback as LF
from bench._clustering_eval import ece


def _level(confidence: np.ndarray, correct: np.ndarray) -> float:
    """A level learnt from feedback answers as the service shrinks its common shift."""
    from services.feedback.domain.recalibration import LEVEL_NOISE_MULTIPLE, fit_evidence_shift
    if confidence.size < 2:
        return 0.0
    return fit_evidence_shift(confidence, correct.astype(float), np.ones(confidence.size), LEVEL_NOISE_MULTIPLE)


def _moved(P: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Top confidences moved by ``shift`` (per row), clipped to [1 / persons, 1] (a
    one-person answer, whose rest belongs to nobody the model knows, to [0, 1])."""
    top = P.max(axis=1)
    persons = (P > 0).sum(axis=1)
    return np.clip(top + shift, np.where(persons > 1, 1.0 / np.maximum(persons, 1), 0.0), 1.0)


def score(hs, probs, fed_answers, fed, ages, sample_before: bool) -> dict:
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK, feedback_groups
    persons = [h.person for h in hs]
    P0, y0, ok0, age = E.pooled_answers(persons, probs, ages)
    account = np.concatenate([np.full(h.n_sessions, h.household_id, dtype=object) for h in hs])
    world = np.concatenate([np.full(h.n_sessions, h.world_id, dtype=object) for h in hs])
    rows: dict[str, list[float]] = {k: [] for k in (
        "no_feedback", "labels_only", "mesh", "mesh_per_world", "mesh_world_level", "mesh_world_level_crossfit",
        "world_level_ceiling", "world_group_level_ceiling", "accuracy_after", "worlds_with_own_level",
        "mean_abs_world_level")}
    for d in range(len(fed[0])):
        fed_d = np.concatenate([f[d] for f in fed])
        answers = [a[d] for a in fed_answers]
        P1, y1, ok1, _ = E.pooled_answers(persons, [a.probs for a in answers], ages)
        calibrated = np.concatenate([a.calibrated for a in answers])
        group = np.concatenate([a.groups for a in answers]).astype(str)
        answered = np.full(fed_d.size, "", dtype=object) if sample_before else group
        current = {h.household_id: str(a.groups[-1]) for h, a in zip(hs, answers)}
        Ps, ys, oks = (P0, y0, ok0) if sample_before else (P1, y1, ok1)
        held = ~fed_d

        def served_by(calibrator, where: np.ndarray) -> np.ndarray:
            out = P1.copy()
            on = where & calibrated
            if on.any():
                out[on] = calibrator.apply(P1[on], age[on], group[on])
            return out

        calibrator = E.grouped_service_calibrator(Ps, ys, oks, age, fed_d, answered, account, current,
                                                  MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
        served = served_by(calibrator, np.ones(P1.shape[0], dtype=bool))
        rows["no_feedback"].append(ece(P0[held].max(axis=1), ok0[held]))
        rows["labels_only"].append(ece(P1[held].max(axis=1), ok1[held]))
        rows["mesh"].append(ece(served[held].max(axis=1), ok1[held]))
        rows["accuracy_after"].append(float(ok1[held].mean()))
        # the calibrator each world's deployment fits on its own feedback
        per_world = P1.copy()
        for w in np.unique(world):
            in_w = world == w
            own = E.grouped_service_calibrator(Ps, ys, oks, age, fed_d & in_w, answered, account, current,
                                               MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
            per_world[in_w] = served_by(own, in_w)[in_w]
        rows["mesh_per_world"].append(ece(per_world[held].max(axis=1), ok1[held]))
        # the sample's calibrator, then each world's level from its own feedback after it
        # the fed answers as the calibrator saw them, through it (in the group they were
        # fitted in: their household's now, feedback_groups)
        fed_conf = np.zeros(P1.shape[0])
        fitted_in = np.asarray(feedback_groups(answered, account, current, FEEDBACK_GROUP_OF)).astype(str)
        fed_conf[fed_d] = calibrator.apply(Ps[fed_d], age[fed_d], fitted_in[fed_d]).max(axis=1)
        shift = np.zeros(P1.shape[0])
        shift_x = np.zeros(P1.shape[0])
        levels = []
        for w in np.unique(world):
            in_w = world == w
            f_w = fed_d & in_w
            lev = _level(fed_conf[f_w], oks[f_w])
            levels.append(lev)
            shift[in_w] = lev
            for acc in np.unique(account[in_w]):
                mine = account == acc
                others = f_w & ~mine
                shift_x[mine] = _level(fed_conf[others], oks[others])
        on = calibrated
        lvl = served.max(axis=1).copy()
        lvl[on] = _moved(served[on], shift[on])
        rows["mesh_world_level"].append(ece(lvl[held], ok1[held]))
        lvx = served.max(axis=1).copy()
        lvx[on] = _moved(served[on], shift_x[on])
        rows["mesh_world_level_crossfit"].append(ece(lvx[held], ok1[held]))
        rows["worlds_with_own_level"].append(float(np.mean([lev != 0.0 for lev in levels])))
        rows["mean_abs_world_level"].append(float(np.mean(np.abs(levels))))
        # ceilings: exact levels on the scored answers themselves
        top = served.max(axis=1)
        for name, keys in (("world_level_ceiling", world), ("world_group_level_ceiling",
                                                            np.char.add(world.astype(str), group))):
            moved = top.copy()
            for k in np.unique(keys[held]):
                g = held & (keys == k)
                moved[g] = np.clip(top[g] - (top[g].mean() - ok1[g].mean()), 0.0, 1.0)
            rows[name].append(ece(moved[held], ok1[held]))
    return {"draws": len(fed[0]), **{k: round(float(np.mean(v)), 4) for k, v in rows.items()},
            "per_draw": {k: [round(float(x), 4) for x in v] for k, v in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="a bench.label_feedback --cache file")
    ap.add_argument("--split", choices=("tuning", "movielens-tuning"), default="tuning")
    ap.add_argument("--first-world", type=int, default=0)
    ap.add_argument("--worlds", type=int, default=None)
    ap.add_argument("--households", type=int, default=None)
    ap.add_argument("--draws", type=int, default=E.FEEDBACK_MESH_DRAWS)
    ap.add_argument("--mode", choices=("batch", "streaming"), default="batch")
    args = ap.parse_args()
    hs = LF.households(args.split, args.first_world, args.worlds, args.households)
    with open(args.cache, "rb") as fh:
        held = pickle.load(fh)
    if held["households"] != [h.household_id for h in hs] or held["draws"] != args.draws:
        raise SystemExit(f"--cache {args.cache}: holds other households or draws than asked for")
    outs = held["outs"]
    fed = E.feedback_draws(hs, args.draws)
    before, key = ("batch", "fed_batch") if args.mode == "batch" else ("stream", "fed_stream")
    report = score(hs, [o[before] for o in outs], [o[key] for o in outs], fed,
                   E.model_ages(hs, "batch" if args.mode == "batch" else "stream"), args.mode == "batch")
    print(json.dumps({"split": args.split, "first_world": args.first_world, "households": len(hs),
                      "mode": args.mode, **report}))


if __name__ == "__main__":
    main()
