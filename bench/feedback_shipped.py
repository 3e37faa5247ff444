"""A feedback calibrator shipped across deployments, each deployment's feedback adding only
its level (issue #10, calib29, session 29; TUNING only).

Session 28 (fbcal28, ``bench.feedback_per_world``) found, on 60-household worlds, that the
sample's calibrator (fitted across its worlds) plus each world's own level, cross-fitted,
lowered the whole loop's ECE after feedback 0.0306 -> 0.0270, while each world's own
calibrator (what one deployment fits today) did not. A deployment cannot fit across other
deployments; a calibrator *shipped with the model* can be, the way the confidence maps are
(fitted offline on TUNING). This scores that design on the answers ``bench.label_feedback
--cache`` runs stored (the same fits, draws and serving rule; nothing refitted):

* the shipped calibrator is fitted offline on ``--train`` samples (other TUNING worlds),
  never on the scored ones:

  - ``loops`` (the default): ``fit_grouped_calibrator`` (the service's fit) on every answer
    of the training loops after their labels, in the group clustering stamps on it, where
    clustering applies a calibrator (``FedAnswers.calibrated``) — offline every answer's
    truth is known, so it is fitted on the population it will serve, not on 3.75 %;
  - ``feedback``: the same fit on the training deployments' feedback answers pooled (what
    the service fits on one deployment's feedback, over many deployments);

* each deployment (a world) adds one level: the mean (right - confidence) of its feedback
  answers through the shipped calibrator (in the group feedback_groups gives them), less
  the training worlds' mean of the same, shrunk toward none by a prior fitted on the
  training worlds — ``fit_evidence_shift(prior_variance=tau2)``, the linear posterior mean,
  tau2 from the training world-draws (``level_prior``: empirical Bayes; a deployment of ~25
  feedback answers, se ~0.09, moves little; one of ~300 moves most of the way). Cross-fitted: a household's answers get the level of the OTHER households' feedback
  of its world, so its own labels never set its own level.

Scored per draw, pooled over the sample's held (unfed) answers, as ``mesh_after_feedback``:
``no_feedback``, ``labels_only``, ``mesh`` (the current loop as the benchmark scores it: one
calibrator fitted on the whole sample's feedback — issue #10's figure), ``mesh_per_world``
(the current loop as a deployment runs it: each world's own calibrator), ``shipped`` (the
shipped calibrator alone: its share), ``shipped_level`` (+ each world's shrunk cross-fitted
level: the design), ``shipped_level_ceiling`` (+ each world's exact level on the scored
answers: not a result). Every figure changes only confidences: who is answered is the same.

``--rules RULE ...`` (count30, session 30) also scores per-deployment decisions between the
shipped calibrator alone and it plus the level, by the deployment's z (``rule_shift``: measured on
TUNING, none kept; docs/benchmarks.md "Deciding per deployment between the shipped calibrator
alone and its level").

``--level-train SPEC=CACHE ...`` (viewers31b, session 31) fits the level's prior (mu_fed,
mu_served, tau2) on other samples than the calibrator's ``--train`` (e.g. one real-viewer
population's TUNING half, the calibrator on synthetic worlds): a level shipped per population of
deployments. ``shipped_prior_level`` scores the prior's served level alone (the shipped
calibrator plus mu_served, no deployment's feedback).

``python -m bench.feedback_shipped --train SPEC=CACHE ... --test SPEC=CACHE ...
[--shipped loops|feedback] [--tau2 cov|variance] [--rules RULE ...] [--level-train SPEC=CACHE ...]``; SPEC = ``split:first_world:worlds:households``
(e.g. ``tuning:12:4:5``, ``movielens-tuning:0:3:4``, ``movielens-latest-tuning:0:3:4``), CACHE a ``bench.label_feedback
--batch-only --cache`` file of those households and draws. ``--leave-one-out``: score each
``--train`` sample with the others as training (the choice of settings), no ``--test``.
Prints one JSON object. TUNING splits only.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from dataclasses import dataclass

import numpy as np

from bench import _worlds_eval as E
from bench import label_feedback as LF
from bench._clustering_eval import ece

SPLITS = ("tuning", *LF.REAL_VIEWERS_TUNING)


@dataclass
class Draw:
    """One sample's answers in one feedback draw, pooled as the mesh pools them."""
    P0: np.ndarray          # answers before feedback
    ok0: np.ndarray
    y0: np.ndarray
    P1: np.ndarray          # answers after the labels reached clustering
    ok1: np.ndarray
    y1: np.ndarray
    age: np.ndarray
    fed: np.ndarray         # (n,) bool: the session got feedback
    calibrated: np.ndarray  # clustering applies a calibrator to it (feedback_calibrator_rows)
    group: np.ndarray       # the calibration group clustering stamps on it after the labels
    fitted_in: np.ndarray   # the group its feedback is fitted in (feedback_groups: its household's now)
    account: np.ndarray
    world: np.ndarray


def load(spec: str, cache: str) -> list[Draw]:
    """The ``bench.label_feedback --batch-only --cache`` answers of SPEC, one Draw per draw."""
    split, first, n_worlds, n_house = spec.split(":")
    if split not in SPLITS:
        raise SystemExit(f"{spec}: split must be one of {SPLITS} (REPORTING is read by bench.label_feedback)")
    hs = LF.households(split, int(first), int(n_worlds), int(n_house))
    with open(cache, "rb") as fh:
        held = pickle.load(fh)
    if held["households"] != [h.household_id for h in hs] or not held["batch"]:
        raise SystemExit(f"{cache}: holds other households than {spec}, or no batch answers")
    return draws_of(split, hs, held["outs"], held["draws"])


def draws_of(split: str, hs, outs: list[dict], draws: int, mode: str = "batch") -> list[Draw]:
    """Per draw, the households' answers pooled (``outs``: per household, ``batch`` — its
    answers before feedback — and ``fed_batch`` — per draw, E.FedAnswers; ``mode`` "stream":
    ``stream`` / ``fed_stream``, each fed answer as served at arrival, in the group clustering
    stamped on it, bench.feedback_methods)."""
    from services.feedback.domain.recalibration import FEEDBACK_GROUP_OF, feedback_groups
    before, after = ("batch", "fed_batch") if mode == "batch" else ("stream", "fed_stream")
    fed = E.feedback_draws(hs, draws)
    persons = [h.person for h in hs]
    ages = E.model_ages(hs, mode)
    P0, y0, ok0, age = E.pooled_answers(persons, [o[before] for o in outs], ages)
    account = np.concatenate([np.full(h.n_sessions, f"{split}/{h.household_id}", dtype=object) for h in hs])
    world = np.concatenate([np.full(h.n_sessions, f"{split}/{h.world_id}", dtype=object) for h in hs])
    out = []
    for d in range(draws):
        answers = [o[after][d] for o in outs]
        P1, y1, ok1, _ = E.pooled_answers(persons, [a.probs for a in answers], ages)
        group = np.concatenate([a.groups for a in answers]).astype(str)
        current = {f"{split}/{h.household_id}": str(a.groups[-1]) for h, a in zip(hs, answers)}
        # batch: every fed answer was served before any label, in the default group
        answered = np.full(P0.shape[0], "", dtype=object) if mode == "batch" else group.astype(object)
        fitted_in = np.asarray(feedback_groups(answered, account, current, FEEDBACK_GROUP_OF)).astype(str)
        out.append(Draw(P0, ok0, y0, P1, ok1, y1, age, np.concatenate([f[d] for f in fed]),
                        np.concatenate([a.calibrated for a in answers]), group, fitted_in, account, world))
    return out


def _pad(P: np.ndarray, width: int) -> np.ndarray:
    return np.pad(P, ((0, 0), (0, width - P.shape[1])))


def fit_shipped(train: list[list[Draw]], kind: str = "loops", max_rows: int = 60_000, seed: int = 0):
    """The calibrator shipped with the model, fitted on the training samples (module doc)."""
    from services.feedback.domain.recalibration import MIN_GROUP_FEEDBACK, FeedbackSample, fit_grouped_calibrator
    width = max(d.P1.shape[1] for s in train for d in s)
    parts = []
    for sample in train:
        for d in sample:
            if kind == "loops":
                rows = ~d.fed & d.calibrated
                parts.append((_pad(d.P1[rows], width), d.y1[rows], d.ok1[rows], d.age[rows], d.group[rows]))
            else:
                rows = d.fed
                parts.append((_pad(d.P0[rows], width), d.y0[rows], d.ok0[rows], d.age[rows], d.fitted_in[rows]))
    P, y, ok, age, group = (np.concatenate([p[i] for p in parts]) for i in range(5))
    # rows of samples whose widest answer is narrower: padded with zeros (padding stays padding)
    if P.shape[0] > max_rows:   # the fit's own cost; a fixed subsample of the pooled answers
        keep = np.sort(np.random.default_rng(seed).choice(P.shape[0], max_rows, replace=False))
        P, y, ok, age, group = P[keep], y[keep], ok[keep], age[keep], group[keep]
    return fit_grouped_calibrator(FeedbackSample.create(P, labels=y, correct=ok.astype(float)), age, group,
                                  min_group=MIN_GROUP_FEEDBACK)


def _apply(calibrator, P: np.ndarray, age: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Top confidences through ``calibrator`` (rows padded to its width and back)."""
    return calibrator.apply(P, age, group).max(axis=1)


def fed_residuals(shipped, d: Draw) -> np.ndarray:
    """(n,) right - confidence of each answer as its feedback would show it through the
    shipped calibrator (meaningful on the fed rows)."""
    out = np.zeros(d.P0.shape[0])
    f = d.fed
    out[f] = d.ok0[f] - _apply(shipped, d.P0[f], d.age[f], d.fitted_in[f])
    return out


def level_prior(shipped, train: list[list[Draw]], by_size: bool = False) -> dict:
    """The prior a deployment's level is shrunk with, by moments over the training
    world-draws, as the level is applied (cross-fitted). Per household of a world: r, the
    mean (right - confidence) through the shipped calibrator of the feedback answers of the
    world's OTHER households (what the deployment measures for it), and b, the same of the
    household's served answers after the labels (what its level should move). ``mu_fed`` / ``mu_served``: the
    same over every training answer (answer-weighted: the pooled levels; a deployment
    measures r - mu_fed and starts from mu_served, since feedback is given on answers before
    the labels, which differ from those after them); ``tau2`` = cov(r, b), the variance of
    the part of the world's feedback level that predicts a household's served level
    (the two are measured on different households' answers, so their noises do not
    covary; what they share is the world's), at least 0.
    ``by_size``: tau2 per size of world (households), in ``tau2_by_size``; a deployment
    takes the nearest size's (a small world's level varies with its few households)."""
    r, b, noise, size = [], [], [], []
    fed_sum = fed_n = served_sum = served_n = 0.0
    for sample in train:
        for d in sample:
            res = fed_residuals(shipped, d)
            conf = d.ok0 - res
            top = d.P1.max(axis=1).copy()
            on = d.calibrated
            top[on] = _apply(shipped, d.P1[on], d.age[on], d.group[on])
            fed_sum, fed_n = fed_sum + res[d.fed].sum(), fed_n + d.fed.sum()
            s_all = ~d.fed & on
            served_sum, served_n = served_sum + (d.ok1[s_all] - top[s_all]).sum(), served_n + s_all.sum()
            for w in np.unique(d.world):
                in_w = d.world == w
                households = np.unique(d.account[in_w])
                # as the level is applied, cross-fitted: the OTHER households' feedback
                # against this household's served answers
                for acc in households:
                    f = d.fed & in_w & (d.account != acc)
                    s = ~d.fed & (d.account == acc)
                    if f.sum() < 2 or not s.any():
                        continue
                    r.append(float(res[f].mean()))
                    b.append(float((d.ok1[s] - top[s]).mean()))
                    noise.append(float(np.sum(conf[f] * (1 - conf[f])) / f.sum() ** 2))
                    size.append(len(households))
    r, b, noise, size = np.asarray(r), np.asarray(b), np.asarray(noise), np.asarray(size)

    def tau2(rows) -> float:
        return max(0.0, float(np.cov(r[rows], b[rows])[0, 1])) if rows.sum() > 2 else 0.0

    every = np.ones(r.size, dtype=bool)
    return {"mu_fed": float(fed_sum / fed_n), "mu_served": float(served_sum / served_n), "tau2": tau2(every),
            "tau2_from_variance": max(0.0, float(np.var(r) - noise.mean())),
            "tau2_by_size": {int(n): tau2(size == n) for n in np.unique(size)} if by_size else {},
            "world_draws": int(r.size), "fed_level_sd": float(np.std(r)), "served_level_sd": float(np.std(b)),
            "mean_fed_se": float(np.sqrt(noise.mean())), "corr": float(np.corrcoef(r, b)[0, 1])}


def _tau2_for(prior: dict, households: int) -> float:
    sizes = prior.get("tau2_by_size") or {}
    if not sizes:
        return prior["tau2"]
    return sizes[min(sizes, key=lambda n: abs(np.log(n) - np.log(households)))]


def _moved(top: np.ndarray, P: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Top confidences moved by ``shift``, clipped to [1 / persons, 1] (a one-person answer,
    whose rest belongs to nobody the model knows, to [0, 1]) — who is answered never changes."""
    persons = (P > 0).sum(axis=1)
    return np.clip(top + shift, np.where(persons > 1, 1.0 / np.maximum(persons, 1), 0.0), 1.0)


def deployment_evidence(conf: np.ndarray, correct: np.ndarray, mu_fed: float) -> tuple[float, float]:
    """(d, z) of one deployment's feedback answers through the shipped calibrator: d the mean
    (right - confidence) less the training worlds' (``mu_fed``), z = d / se with se the
    spread d would have if every answer were right with exactly its confidence (the same
    d and se ``fit_evidence_shift`` shrinks with)."""
    c = np.asarray(conf, dtype=np.float64) + mu_fed
    if c.size < 2:
        return 0.0, 0.0
    d = float(np.mean(np.asarray(correct, dtype=np.float64) - c))
    se = float(np.sqrt(np.sum(np.clip(c, 0.0, 1.0) * (1.0 - np.clip(c, 0.0, 1.0)))) / c.size)
    return d, (d / se if se > 0.0 else 0.0)


def rule_shift(rule: str, d: float, z: float, design: float, mu_served: float) -> float:
    """The level a per-deployment decision rule applies (count30, session 30), given the
    deployment's evidence (d, z) and the design's shrunk level ``design`` (mu_served +
    the tau2 posterior mean):

    * ``gateB``: the design's level when |z| >= B, else none (the shipped calibrator alone);
    * ``fullB``: the unshrunk level (mu_served + d) when |z| >= B, else none;
    * ``jsM``: positive-part James-Stein with noise multiple M, d * max(0, 1 - M / z^2) (the
      service's own ``fit_evidence_shift`` rule; M = B^2 is a soft gate at |z| = B);
    * ``overB``: ``fullB`` only when the deployment is over-confident (z <= -B).
    """
    kind, bar = re.fullmatch(r"(gate|full|js|over)([0-9.]+)", rule).groups()
    bar = float(bar)
    if kind == "gate":
        return design if abs(z) >= bar else 0.0
    if kind == "full":
        return mu_served + d if abs(z) >= bar else 0.0
    if kind == "over":
        return mu_served + d if z <= -bar else 0.0
    return d * max(0.0, 1.0 - bar / (z * z)) if z != 0.0 else 0.0


def score(sample: list[Draw], shipped, prior: dict, rules: tuple[str, ...] = ()) -> dict:
    from services.feedback.domain.recalibration import (FEEDBACK_GROUP_OF, MIN_GROUP_FEEDBACK,
                                                        fit_evidence_shift)
    rows: dict[str, list[float]] = {k: [] for k in (
        "no_feedback", "labels_only", "mesh", "mesh_per_world", "shipped", "shipped_prior_level", "shipped_level",
        "shipped_level_ceiling", "accuracy_after", "mean_abs_level",
        *(f"rule:{r}" for r in rules), *(f"applied:{r}" for r in rules))}
    zs: list[float] = []
    for d in sample:
        held = ~d.fed
        cur = dict(zip(d.account, d.fitted_in))

        def current_loop(where: np.ndarray) -> np.ndarray:
            cal = E.grouped_service_calibrator(d.P0, d.y0, d.ok0, d.age, d.fed & where,
                                               np.full(d.P0.shape[0], "", dtype=object), d.account, cur,
                                               MIN_GROUP_FEEDBACK, FEEDBACK_GROUP_OF)
            top = d.P1.max(axis=1).copy()
            on = d.calibrated & where
            top[on] = _apply(cal, d.P1[on], d.age[on], d.group[on])
            return top

        rows["no_feedback"].append(ece(d.P0[held].max(axis=1), d.ok0[held]))
        rows["labels_only"].append(ece(d.P1[held].max(axis=1), d.ok1[held]))
        rows["accuracy_after"].append(float(d.ok1[held].mean()))
        rows["mesh"].append(ece(current_loop(np.ones_like(held))[held], d.ok1[held]))
        per_world = np.zeros(d.P1.shape[0])
        for w in np.unique(d.world):
            in_w = d.world == w
            per_world[in_w] = current_loop(in_w)[in_w]
        rows["mesh_per_world"].append(ece(per_world[held], d.ok1[held]))
        top = d.P1.max(axis=1).copy()
        on = d.calibrated
        top[on] = _apply(shipped, d.P1[on], d.age[on], d.group[on])
        rows["shipped"].append(ece(top[held], d.ok1[held]))
        res = fed_residuals(shipped, d)
        conf = d.ok0 - res
        shift = np.zeros(d.P1.shape[0])
        by_rule = {r: np.zeros(d.P1.shape[0]) for r in rules}
        ceiling = top.copy()
        for w in np.unique(d.world):
            in_w = d.world == w
            for acc in np.unique(d.account[in_w]):
                mine = d.account == acc
                others = d.fed & in_w & ~mine
                # a deployment starts at the training worlds' served level; its own feedback,
                # measured against the training worlds' feedback level, moves it by the linear
                # posterior mean under the prior tau2 (fit_evidence_shift's prior_variance)
                shift[mine] = prior["mu_served"] + fit_evidence_shift(
                    conf[others] + prior["mu_fed"], d.ok0[others], np.ones(others.sum()),
                    prior_variance=_tau2_for(prior, len(np.unique(d.account[in_w]))))
                lvl, z = deployment_evidence(conf[others], d.ok0[others], prior["mu_fed"])
                if others.sum() >= 2:
                    zs.append(z)
                for r in rules:
                    by_rule[r][mine] = rule_shift(r, lvl, z, float(shift[mine][0]), prior["mu_served"])
            g = held & in_w
            ceiling[in_w] = np.clip(top[in_w] - (top[g].mean() - d.ok1[g].mean()), 0.0, 1.0)
        shift = np.where(on, shift, 0.0)
        moved = np.where(on, _moved(top, d.P1, shift), top)
        # the prior's served level alone (a level shipped with the calibrator, no deployment's feedback)
        prior_only = np.where(on, _moved(top, d.P1, np.where(on, prior["mu_served"], 0.0)), top)
        rows["shipped_prior_level"].append(ece(prior_only[held], d.ok1[held]))
        rows["shipped_level"].append(ece(moved[held], d.ok1[held]))
        rows["shipped_level_ceiling"].append(ece(ceiling[held], d.ok1[held]))
        rows["mean_abs_level"].append(float(np.abs(shift[on]).mean()) if on.any() else 0.0)
        for r in rules:
            s_r = np.where(on, by_rule[r], 0.0)
            rows[f"rule:{r}"].append(ece(np.where(on, _moved(top, d.P1, s_r), top)[held], d.ok1[held]))
            rows[f"applied:{r}"].append(float(np.mean(s_r[on] != 0.0)) if on.any() else 0.0)
    z = np.abs(np.asarray(zs))
    return {**{k: round(float(np.mean(v)), 4) for k, v in rows.items()},
            "per_draw": {k: [round(float(x), 4) for x in v] for k, v in rows.items()},
            **({"evidence_z": {"n": int(z.size), "median_abs": round(float(np.median(z)), 3),
                               "share_abs_ge": {b: round(float(np.mean(z >= b)), 3) for b in (1.0, 1.5, 2.0, 2.5)},
                               "mean_signed": round(float(np.mean(zs)), 3)}} if zs else {})}


def _chosen(prior: dict, tau2: str) -> dict:
    return prior if tau2 == "cov" else {**prior, "tau2": prior["tau2_from_variance"], "tau2_by_size": {}}


def fit_shipped_and_prior(train: list[list[Draw]], level_train: list[list[Draw]] | None = None, kind: str = "loops",
                          by_size: bool = False, tau2: str = "cov"):
    """(shipped calibrator, level prior): the calibrator fitted on ``train``; the level's prior
    (mu_fed, mu_served, tau2) on ``level_train`` through that calibrator when given — a level
    shipped per population of deployments (viewers31b, session 31: fitted on one real-viewer
    population, applied to another) — else on ``train``."""
    shipped = fit_shipped(train, kind)
    return shipped, _chosen(level_prior(shipped, level_train or train, by_size), tau2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", required=True, metavar="SPEC=CACHE")
    ap.add_argument("--test", nargs="*", default=[], metavar="SPEC=CACHE")
    ap.add_argument("--shipped", choices=("loops", "feedback"), default="loops")
    ap.add_argument("--tau2", choices=("cov", "variance"), default="cov",
                    help="the level's prior variance: cov(r, b), cross-fitted, over the training worlds (default) or "
                         "var(r) less its noise")
    ap.add_argument("--prior-by-size", action="store_true",
                    help="the level's prior variance per size of world (households), the nearest size's")
    ap.add_argument("--shipped-cache", default=None,
                    help="pickle of the fitted shipped calibrator and prior: written when absent, reused "
                         "when present for the same --train, --shipped and prior options")
    ap.add_argument("--level-train", nargs="*", default=[], metavar="SPEC=CACHE",
                    help="fit the level's prior (mu_fed, mu_served, tau2) on these samples through the calibrator "
                         "fitted on --train, instead of on --train (a level shipped per population)")
    ap.add_argument("--leave-one-out", action="store_true")
    ap.add_argument("--rules", nargs="*", default=[], metavar="RULE",
                    help="per-deployment decisions between the shipped calibrator alone and it plus the "
                         "deployment's level, scored beside the rest (rule_shift: gateB, fullB, jsM, overB)")
    args = ap.parse_args()
    train = {s: load(*s.split("=", 1)) for s in args.train} \
        if not (args.shipped_cache and os.path.exists(args.shipped_cache)) else dict.fromkeys(args.train)
    out: dict = {"shipped": args.shipped, "tau2": args.tau2, "prior_by_size": args.prior_by_size,
                 "train": list(train), "level_train": args.level_train}
    if args.leave_one_out:
        if args.level_train:
            raise SystemExit("--level-train: not with --leave-one-out")
        for name, sample in train.items():
            rest = [v for k, v in train.items() if k != name]
            shipped, prior = fit_shipped_and_prior(rest, None, args.shipped, args.prior_by_size, args.tau2)
            out[name] = {"prior": prior, **score(sample, shipped, prior, tuple(args.rules))}
    else:
        key = (list(train), args.shipped, args.tau2, args.prior_by_size, *([args.level_train] if args.level_train else []))
        held = None
        if args.shipped_cache and os.path.exists(args.shipped_cache):
            with open(args.shipped_cache, "rb") as fh:
                held = pickle.load(fh)
            if held["key"] != key:
                raise SystemExit(f"--shipped-cache {args.shipped_cache}: fitted with other options")
        if held is None:
            level_train = [load(*s.split("=", 1)) for s in args.level_train] or None
            shipped, prior = fit_shipped_and_prior(list(train.values()), level_train, args.shipped,
                                                   args.prior_by_size, args.tau2)
            held = {"key": key, "shipped": shipped, "prior": prior}
            if args.shipped_cache:
                with open(args.shipped_cache, "wb") as fh:
                    pickle.dump(held, fh)
        shipped, prior = held["shipped"], held["prior"]
        out["prior"] = prior
        for t in args.test:
            out[t.split("=", 1)[0]] = score(load(*t.split("=", 1)), shipped, prior, tuple(args.rules))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
