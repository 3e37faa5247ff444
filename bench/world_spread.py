"""A fitted person's spread judged against the world's own persons: a count borrowed across
households (issue #10, session 27, "count"; TUNING only; docs/clustering.md 4o).

Every count rule of docs/clustering.md 4–4n judged a household on its own sessions (BIC,
hours z-bars, held-out likelihood, learned rules over its candidates) or with a same-member
model learned on other worlds' truth (4m, 4n). None told a member the fit missed (most often
a member without a personal device, absorbed into another person, 4g) from one person's own
kinds of viewing: within one household both look like "a person whose sessions split
cleanly". The idea measured here: **how cleanly one person's sessions split is a property of
the world** (how lumpy its people's tastes and hours are), so the households of the same
world calibrate it — a fitted person that splits much more cleanly than the world's other
fitted persons of its size is a blend of two members. A hierarchical prior in its simplest
form: the world's persons give the distribution of one person's spread, and a person far in
its upper tail is split. No label is read: the reference is the world's fitted persons (or,
``reference="devices"``, the world's personal devices' sessions — one owner each).

The pieces (pure, unit-tested in tests/unit/clustering/test_world_spread.py):

- ``spread_features``: the columns that say *who* and not *on what device* — the viewing
  hours (two-hour bins, by weekend, weekday; ``persons.viewing_hours``) and the taste (genre
  mix, kids and teen shares); lengths, binge, titles and VPN are left out because device type
  shapes them (a person's phone and TV sessions differ there, 4e).
- ``two_means``: 2-means on those columns in which each personal-device group's sessions
  move together (a device group is one person, step 1 of the model), best of a few seeded
  starts.
- ``split_gain``: 1 − W₂ / W₁, the share of the person's within-sum of squares the best
  two-part split explains.
- ``world_z``: each person's gain against the world's: least squares of the gain on
  1/sqrt(n) over the world's reference sets (2-means explains more of a small set by chance),
  the residuals' median and MAD, a person's robust z.
- ``split_outliers``: every fitted person with ≥ 2·``min_size`` sessions whose z ≥ ``min_z``
  is divided into its two parts when both hold ≥ ``min_size`` sessions (first-order: the
  parts are relabelled, without the refit a service change would do).

``python -m bench.world_spread [--movielens-tuning] [--view all|hours|taste] [--workers 2] [--cache DIR]``
scores the households (Hearth's batch fit and the baselines, in ``--workers`` processes; kept
in ``--cache`` and read back from it) of TUNING seed 20260001 worlds 0–3 (the choice: best session accuracy +
size exact among the settings keeping at least as many single viewers single as Hearth; also
cross-fitted over the two halves of the worlds), and reports on TUNING seed 20260002 worlds
0–3 and the real viewers' TUNING half beside Hearth's batch fit, majority, the device
heuristic, scikit-learn GaussianMixture + BIC and the supervised oracle (``pair_merge``'s
baselines, the same functions). It refuses the report-only seeds (``pair_model._tuning_worlds``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import feedback_tuning, pair_merge as PMG, pair_model as PM, worlds  # noqa: E402
from services.clustering.domain import features as F, persons  # noqa: E402

MIN_Z = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
MIN_SIZES = (10, 20)
REFERENCES = ("persons", "devices")
STARTS = 4                 # seeded 2-means starts per person
DEVICE_MIN_SESSIONS = 20   # a personal device in the "devices" reference


# ---- the pure pieces -----------------------------------------------------------------------

VIEWS = ("all", "hours", "taste")


def spread_features(X: np.ndarray, view: str = "all") -> np.ndarray:
    """Viewing hours (27 columns) and taste (genre mix, kids and teen shares), not what device
    type shapes; ``view`` "hours" or "taste": one of the two alone."""
    X = np.asarray(X, dtype=np.float64)
    hours = persons.viewing_hours(X)
    taste = np.hstack((X[:, F.GENRE], X[:, F.KIDS_SHARE:F.TEEN_SHARE + 1]))
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    return hours if view == "hours" else taste if view == "taste" else np.hstack((hours, taste))


def world_scale(Zs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of every column over a world's sessions: one scale for all its persons, so
    their gains are comparable (a household-level scale would stretch a household's quiet
    columns differently in every household)."""
    Z = np.vstack(Zs)
    return Z.mean(axis=0), np.maximum(Z.std(axis=0), 1e-3)


def _blocks(group: np.ndarray) -> np.ndarray:
    """(n,) block of each session: one block per device group (>= 0), one per other session."""
    group = np.asarray(group, dtype=np.int64)
    out = np.empty(group.size, dtype=np.int64)
    free = group < 0
    out[free] = np.arange(int(free.sum()))
    names = np.unique(group[~free])
    out[~free] = int(free.sum()) + np.searchsorted(names, group[~free])
    return out


def two_means(Z: np.ndarray, group: np.ndarray | None = None, starts: int = STARTS, seed: int = 0,
              iters: int = 30) -> tuple[np.ndarray, float]:
    """(labels 0/1, within sum of squares) of the best of ``starts`` 2-means runs on ``Z`` in
    which the sessions of each device group (``group`` >= 0) stay together. Fewer than two
    blocks: all zeros and the total sum of squares."""
    Z = np.asarray(Z, dtype=np.float64)
    n = Z.shape[0]
    blocks = _blocks(np.full(n, -1) if group is None else group)
    nb = int(blocks.max()) + 1 if n else 0
    total = float(((Z - Z.mean(axis=0)) ** 2).sum()) if n else 0.0
    if nb < 2:
        return np.zeros(n, dtype=np.int64), total
    onehot = np.zeros((n, nb))
    onehot[np.arange(n), blocks] = 1.0
    rng = np.random.default_rng(seed)
    best_labels, best_w = np.zeros(n, dtype=np.int64), total
    for _ in range(starts):
        a = int(rng.integers(n))                         # k-means++ style: second start far from the first
        d = ((Z - Z[a]) ** 2).sum(axis=1)
        b = int(rng.choice(n, p=d / d.sum())) if d.sum() > 0 else int(rng.integers(n))
        C = Z[[a, b]].copy()
        labels = None
        for _ in range(iters):
            cost = ((Z[:, None, :] - C[None]) ** 2).sum(axis=2)      # (n, 2)
            block_cost = onehot.T @ cost                             # (nb, 2): a block goes where its sessions cost least
            new = block_cost.argmin(axis=1)[blocks]
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            if labels.min() == labels.max():
                break
            C = np.vstack([Z[labels == k].mean(axis=0) for k in (0, 1)])
        if labels.min() == labels.max():
            continue
        w = float(sum(((Z[labels == k] - Z[labels == k].mean(axis=0)) ** 2).sum() for k in (0, 1)))
        if w < best_w:
            best_labels, best_w = labels.astype(np.int64), w
    return best_labels, best_w


def split_gain(Z: np.ndarray, group: np.ndarray | None = None, seed: int = 0) -> tuple[float, np.ndarray]:
    """(1 - W2 / W1, the two parts): how much of the set's spread the best two-part split explains."""
    labels, w2 = two_means(Z, group, seed=seed)
    w1 = float(((Z - Z.mean(axis=0)) ** 2).sum())
    return (1.0 - w2 / w1 if w1 > 0 else 0.0), labels


def world_z(ref_gain: np.ndarray, ref_n: np.ndarray, gain: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Robust z of each ``gain`` (of a set of ``n`` sessions) against the reference sets'
    gains: least squares of gain on [1, 1/sqrt(n)] over the reference, then the residuals'
    median and MAD (1.4826 MAD, at least 1e-3). With fewer than 3 reference sets, zeros."""
    ref_gain, ref_n = np.asarray(ref_gain, dtype=np.float64), np.asarray(ref_n, dtype=np.float64)
    gain, n = np.asarray(gain, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if ref_gain.size < 3:
        return np.zeros(gain.size)
    A = np.column_stack((np.ones(ref_n.size), 1.0 / np.sqrt(ref_n)))
    coef = np.linalg.lstsq(A, ref_gain, rcond=None)[0]
    resid = ref_gain - A @ coef
    med = np.median(resid)
    mad = max(1.4826 * float(np.median(np.abs(resid - med))), 1e-3)
    pred = np.column_stack((np.ones(n.size), 1.0 / np.sqrt(n))) @ coef
    return (gain - pred - med) / mad


@dataclass
class Person:
    """One fitted person of one household: its sessions (indices), spread gain and parts."""
    household: int
    label: int
    idx: np.ndarray
    gain: float
    parts: np.ndarray
    z: float = 0.0
    references: int = 0      # the world's reference sets its z was measured against (< 3: z is 0, no evidence)


def household_persons(Zw: np.ndarray, labels: np.ndarray, group: np.ndarray, household: int,
                      min_sessions: int) -> list[Person]:
    """The gain and two parts of every fitted person of one household with >= ``min_sessions``
    (``Zw``: the household's spread features on its world's scale)."""
    out = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        if idx.size < min_sessions:
            continue
        gain, parts = split_gain(Zw[idx], group[idx], seed=int(k))
        out.append(Person(household, int(k), idx, gain, parts))
    return out


def split_outliers(labels: np.ndarray, people: list[Person], min_z: float, min_size: int) -> np.ndarray:
    """``labels`` with every person of ``people`` whose z >= ``min_z`` and whose two parts both
    hold >= ``min_size`` sessions divided in two (the second part a new label), renumbered."""
    out = np.asarray(labels).copy()
    nxt = int(out.max()) + 1 if out.size else 0
    for p in people:
        if p.z < min_z or p.idx.size < 2 * min_size:
            continue
        if min(int((p.parts == 0).sum()), int((p.parts == 1).sum())) < min_size:
            continue
        out[p.idx[p.parts == 1]] = nxt
        nxt += 1
    return np.unique(out, return_inverse=True)[1]


# ---- the world's reference -------------------------------------------------------------------

@dataclass
class Household:
    household_id: str
    world_id: str
    person: np.ndarray
    X: np.ndarray
    group: np.ndarray        # personal-device groups as the model builds them (-1: no identity)
    slots: np.ndarray        # device slot of each session
    answers: dict[str, np.ndarray]

    @property
    def n_persons(self) -> int:
        return int(np.unique(self.person).size)


def device_reference(hs: list[Household], Zws: list[np.ndarray], min_sessions: int) -> tuple[list[float], list[int]]:
    """Gains of the world's personal devices with >= ``min_sessions`` sessions (each one owner's)."""
    gains, ns = [], []
    for h, Zw in zip(hs, Zws):
        for s in persons.personal_slots(h.X, h.slots, min_sessions):
            idx = np.flatnonzero(h.slots == s)
            gains.append(split_gain(Zw[idx], None, seed=int(s))[0])
            ns.append(idx.size)
    return gains, ns


def world_people(hs: list[Household], reference: str, min_sessions: int, view: str = "all") -> list[list[Person]]:
    """Per household of one world: its fitted persons (Hearth's batch fit) with their z
    against the world's ``reference`` ("persons": every fitted person of the world's
    households; "devices": the world's personal devices)."""
    Zs = [spread_features(h.X, view) for h in hs]
    mu, sd = world_scale(Zs)
    Zws = [(Z - mu) / sd for Z in Zs]
    people = [household_persons(Zw, h.answers["hearth_batch"], h.group, k, min_sessions)
              for k, (h, Zw) in enumerate(zip(hs, Zws))]
    flat = [p for pp in people for p in pp]
    if reference == "persons":
        ref_g, ref_n = [p.gain for p in flat], [p.idx.size for p in flat]
    else:
        ref_g, ref_n = device_reference(hs, Zws, DEVICE_MIN_SESSIONS)
    z = world_z(np.array(ref_g), np.array(ref_n), np.array([p.gain for p in flat]),
                np.array([p.idx.size for p in flat]))
    for p, v in zip(flat, z):
        p.z, p.references = float(v), len(ref_g)
    return people


# ---- scoring, choice, report -------------------------------------------------------------------

def _score(h: worlds.WorldHousehold, names: tuple[str, ...]) -> Household:
    slots = np.unique(h.device_id, return_inverse=True)[1]
    group = persons.personal_device_groups(h.features, slots)
    return Household(h.household_id, h.world_id, np.asarray(h.person), np.asarray(h.features), group, slots,
                     PMG._baselines(h, names))


def score(hs: list[worlds.WorldHousehold], names: tuple[str, ...], workers: int) -> list[Household]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_score, hs, [names] * len(hs), chunksize=2))


@dataclass(frozen=True)
class Setting:
    reference: str
    min_z: float
    min_size: int


def settings() -> list[Setting]:
    return [Setting(r, z, m) for r in REFERENCES for z in MIN_Z for m in MIN_SIZES]


def people_of(hs: list[Household], reference: str, view: str = "all") -> list[list[Person]]:
    """Every household's persons with their z, worlds kept apart."""
    out: list[list[Person]] = [[] for _ in hs]
    for w in sorted({h.world_id for h in hs}):
        ks = [k for k, h in enumerate(hs) if h.world_id == w]
        for k, pp in zip(ks, world_people([hs[k] for k in ks], reference, 2 * min(MIN_SIZES), view)):
            out[k] = pp
    return out


def predict(hs: list[Household], people: dict[str, list[list[Person]]], s: Setting) -> list[np.ndarray]:
    return [split_outliers(h.answers["hearth_batch"], pp, s.min_z, s.min_size)
            for h, pp in zip(hs, people[s.reference])]


def figures(hs: list[Household], preds: list[np.ndarray]) -> dict:
    return PM.figures(hs, preds)


def _key(f: dict) -> float:
    return f["session_accuracy"] + f["household_size_exact"]


def choose(hs: list[Household], people: dict, options: list[Setting]) -> tuple[Setting | None, dict]:
    """The setting with the best accuracy + size exact that keeps at least as many single
    viewers single as Hearth (None: none beats Hearth's batch fit)."""
    before = figures(hs, [h.answers["hearth_batch"] for h in hs])
    best, best_key, table = None, _key(before), {}
    for s in options:
        f = figures(hs, predict(hs, people, s))
        table[repr(s)] = f
        if (f["single_person_kept"] or 0) >= (before["single_person_kept"] or 0) - 1e-9 and _key(f) > best_key + 1e-9:
            best, best_key = s, _key(f)
    return best, table


def changed(hs: list[Household], preds: list[np.ndarray]) -> dict:
    return PMG.changed(hs, preds)       # reads .answers["hearth_batch"] and .n_persons


def cross_fitted(hs: list[Household], people: dict, options: list[Setting]) -> dict:
    """Each half of the worlds answered with the setting chosen on the other half."""
    ids = sorted({h.world_id for h in hs})
    first = set(ids[0::2])
    halves = ([k for k, h in enumerate(hs) if h.world_id in first], [k for k, h in enumerate(hs) if h.world_id not in first])
    preds: list = [None] * len(hs)
    chosen = []
    for pick, use in (halves, halves[::-1]):
        sub = {r: [people[r][k] for k in pick] for r in people}
        s, _ = choose([hs[k] for k in pick], sub, options)
        chosen.append(repr(s))
        for k in use:
            preds[k] = (split_outliers(hs[k].answers["hearth_batch"], people[s.reference][k], s.min_z, s.min_size)
                        if s else hs[k].answers["hearth_batch"])
    return {"chosen_per_half": chosen, **figures(hs, preds), **changed(hs, preds)}


def diagnose(hs: list[Household], people: dict) -> dict:
    """How well the z tells a fitted person holding two members (the two parts' majority
    true members differ; the parts as the test would cut them, both >= the smallest
    ``min_size``) from one holding one, per reference; and the z of single viewers' persons."""
    out = {}
    for r, pp in people.items():
        two, one, single, holds, pure, holds_ref, pure_ref = [], [], [], [], [], [], []
        # beside each measured z: the person's share of shared-device sessions (does the z
        # say more than "this person watches on the TV"?)
        holds_shared, pure_shared = [], []
        for h, persons_ in zip(hs, pp):
            for p in persons_:
                t = h.person[p.idx]
                measured = p.references >= 3
                # by the truth inside the person: a blend holds a second member of >= 10 sessions
                # (>= 20 % of the person), a pure person holds one member with >= 90 %
                counts = np.sort(np.bincount(t))[::-1]
                if counts.size > 1 and counts[1] >= max(min(MIN_SIZES), 0.2 * t.size):
                    holds.append(p.z)
                    if measured:
                        holds_ref.append(p.z)
                        holds_shared.append(float((h.group[p.idx] < 0).mean()))
                elif counts[0] >= 0.9 * t.size:
                    pure.append(p.z)
                    if measured:
                        pure_ref.append(p.z)
                        pure_shared.append(float((h.group[p.idx] < 0).mean()))
                if h.n_persons == 1:
                    single.append(p.z)
                sizes = [(p.parts == 0).sum(), (p.parts == 1).sum()]
                if min(sizes) < min(MIN_SIZES):
                    continue
                holds_two = np.bincount(t[p.parts == 0]).argmax() != np.bincount(t[p.parts == 1]).argmax()
                (two if holds_two else one).append(p.z)
        out[r] = {"persons_parts_two_members": len(two), "persons_parts_one_member": len(one),
                  "auc_higher_for_parts_two": PMG._auc(np.array(two), np.array(one)),
                  "z_quantiles_parts_two_members": PMG._quantiles(np.array(two)),
                  "z_quantiles_parts_one_member": PMG._quantiles(np.array(one)),
                  "persons_blend": len(holds), "persons_pure": len(pure),
                  "auc_higher_for_blends": PMG._auc(np.array(holds), np.array(pure)),
                  "z_quantiles_blends": PMG._quantiles(np.array(holds)),
                  "z_quantiles_pure": PMG._quantiles(np.array(pure)),
                  # only the worlds with >= 3 reference sets (elsewhere z is 0 by construction)
                  "measured_blends": len(holds_ref), "measured_pure": len(pure_ref),
                  "measured_auc_higher_for_blends": PMG._auc(np.array(holds_ref), np.array(pure_ref)),
                  "measured_z_quantiles_blends": PMG._quantiles(np.array(holds_ref)),
                  "measured_z_quantiles_pure": PMG._quantiles(np.array(pure_ref)),
                  "measured_auc_shared_share_alone": PMG._auc(np.array(holds_shared), np.array(pure_shared)),
                  **_mostly_shared(np.array(holds_ref), np.array(pure_ref), np.array(holds_shared), np.array(pure_shared)),
                  "z_quantiles_single_viewers": PMG._quantiles(np.array(single))}
    return out


def _mostly_shared(zb: np.ndarray, zp: np.ndarray, sb: np.ndarray, sp: np.ndarray) -> dict:
    """The z's AUC among persons with >= half their sessions on shared devices only."""
    b, p = zb[sb >= 0.5] if zb.size else zb, zp[sp >= 0.5] if zp.size else zp
    return {"measured_mostly_shared_blends": int(b.size), "measured_mostly_shared_pure": int(p.size),
            "measured_mostly_shared_auc_higher_for_blends": PMG._auc(b, p)}


def report(hs: list[Household], people: dict, chosen: Setting | None, options: list[Setting]) -> dict:
    out = {name: figures(hs, [h.answers[name] for h in hs]) for name in PMG.BASELINES if name in hs[0].answers}
    if chosen is not None:
        preds = predict(hs, people, chosen)
        out["hearth_world_split"] = {**figures(hs, preds), **changed(hs, preds), "setting": repr(chosen)}
    rows = {repr(s): {**figures(hs, p), **changed(hs, p)} for s in options for p in [predict(hs, people, s)]}
    best = max(rows, key=lambda k: _key(rows[k]))
    out["hindsight_best"] = {"setting": best, **rows[best]}          # a description, never a choice
    out["diagnosis"] = diagnose(hs, people)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seed", type=int, default=worlds.TUNING.seed)
    ap.add_argument("--test-seed", type=int, default=20_260_002)
    ap.add_argument("--worlds", default="0:4", help="TUNING worlds per family of both seeds, lo:hi")
    ap.add_argument("--movielens-tuning", action="store_true", help="also the real viewers' TUNING half")
    ap.add_argument("--view", default="all", choices=VIEWS, help="the columns the spread is measured on")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="a directory for the scored households (reused when present)")
    args = ap.parse_args()
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    cache = Path(args.cache) if args.cache else None

    def cached(name: str, make):
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        value = feedback_tuning.cached(str(cache / f"{name}.pkl") if cache else None, make)
        log(f"{name}: {len(value)} households")
        return value

    lo, hi = (int(x) for x in args.worlds.split(":"))
    options = settings()
    train = cached(f"train-{args.train_seed}-{lo}-{hi}",
                   lambda: score(PM._tuning_worlds(args.train_seed, lo, hi), ("hearth_batch",), args.workers))
    people = {r: people_of(train, r, args.view) for r in REFERENCES}
    chosen, table = choose(train, people, options)
    log(f"chosen on the training seed: {chosen!r}")
    result: dict = {"train_seed": args.train_seed, "worlds": args.worlds, "view": args.view, "chosen": repr(chosen),
                    "train": {"hearth_batch": figures(train, [h.answers["hearth_batch"] for h in train]),
                              "table": table, "cross_fitted": cross_fitted(train, people, options),
                              "diagnosis": diagnose(train, people)}}
    log(f"train {json.dumps({k: v for k, v in result['train'].items() if k != 'table'})}")
    test = cached(f"test-{args.test_seed}-{lo}-{hi}",
                  lambda: score(PM._tuning_worlds(args.test_seed, lo, hi), PMG.BASELINES, args.workers))
    result["test_seed"] = args.test_seed
    result["test"] = report(test, {r: people_of(test, r, args.view) for r in REFERENCES}, chosen, options)
    log(f"test {json.dumps(result['test'])}")
    if args.movielens_tuning:
        from bench import worlds_movielens
        ml = cached("movielens-tuning", lambda: score(worlds_movielens.generate(worlds_per_family=4, split="tuning"),
                                                      PMG.BASELINES, args.workers))
        result["movielens_tuning"] = report(ml, {r: people_of(ml, r, args.view) for r in REFERENCES}, chosen, options)
        log(f"movielens-tuning {json.dumps(result['movielens_tuning'])}")
    result["elapsed_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
