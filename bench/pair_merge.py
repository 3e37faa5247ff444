"""Pair evidence as an extra merge (and split) test on Hearth's own batch fit (issue #10,
session 25; TUNING only; docs/clustering.md 4n).

Session 24's same-member pair model (``bench.pair_model``, docs/clustering.md 4m) lost as a
*replacement* of Hearth's person resolution. Here it is only a second opinion on the persons
Hearth's batch fit found:

- **merge test** (``merge_persons``): for every two fitted persons, the mean pair log-odds
  between their sessions (``score="absolute"``), or that mean less the mean of the two
  persons' own within-person log-odds (``score="relative"``: how much less the cross pairs
  agree than each person's own pairs, so one bar serves households whose pairs all score
  high or all low); the two persons with the highest score are merged while it is above
  ``threshold`` (average linkage over Hearth's persons). With ``keep_devices`` two persons
  that each hold a personal device with >= ``persons.MIN_DEVICE_SESSIONS`` sessions are never
  merged (Hearth's held-out device test already judged them, docs/clustering.md 4f).
- **split test** (``split_persons``): each fitted person with at least ``2 * min_size``
  sessions is resolved by the pair model alone (session 24's linkage at ``LINK_THRESHOLD``,
  clusters under ``min_size`` dissolved, then linked down to two parts); the person is split
  in two when both parts hold >= ``min_size`` sessions and the parts' score (as above) is below
  ``threshold``.

A merge here relabels the two persons' sessions as one (a split, the two parts as two): the
first-order effect of the test, without the refit a service change would do afterwards.

``python -m bench.pair_merge [--stack] [--movielens-tuning] [--workers 1] [--cache DIR]``:
trains the first stage (with ``--stack`` also the second) on TUNING seed 20260001 worlds 0–3,
scores each of those households with a model of the other half of the worlds (out-of-sample
pair log-odds, ``pair_model.held_out_logodds``) beside Hearth's batch fit of it, chooses every
test's threshold there (best session accuracy + size exact among the settings that keep as many
single viewers single as Hearth does; also chosen on one half of the worlds and applied to the
other, the ``cross_fitted`` figures), and reports on TUNING worlds 0–3 of seed 20260002 and,
with ``--movielens-tuning``, the real viewers' TUNING half, beside Hearth's batch fit, majority,
the device heuristic, scikit-learn GaussianMixture + BIC and the supervised oracle on the same
households. It refuses the report-only seeds (worlds.REPORT_ONLY_SEEDS).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import _worlds_eval as WE, pair_model as PM, worlds  # noqa: E402

LINK_THRESHOLD = -0.5          # session 24's cross-fitted linkage threshold (docs/clustering.md 4m)
MERGE_THRESHOLDS = {"absolute": (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0),
                    "relative": (-4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0)}
SPLIT_THRESHOLDS = {"absolute": (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0),
                    "relative": (-8.0, -6.0, -5.0, -4.0, -3.0, -2.0)}
SPLIT_MIN_SIZES = (8, 12, 20)
BASELINES = ("hearth_batch", "majority", "device_heuristic", "sklearn_gmm_bic", "supervised_oracle")


@dataclass(frozen=True)
class MergeTest:
    score: str = "absolute"
    threshold: float = 0.0
    keep_devices: bool = False

    def apply(self, L: np.ndarray, labels: np.ndarray, devices: np.ndarray) -> np.ndarray:
        return merge_persons(L, labels, devices, self.threshold, self.score, self.keep_devices)


@dataclass(frozen=True)
class SplitTest:
    score: str = "absolute"
    threshold: float = -3.0
    min_size: int = 12

    def apply(self, L: np.ndarray, labels: np.ndarray, devices: np.ndarray) -> np.ndarray:
        return split_persons(L, labels, devices, self.threshold, self.score, self.min_size)


def _means(L: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, K) mean log-odds between persons, (K,) mean within each person over its distinct
    pairs (0 for a one-session person), (K,) sizes; labels 0..K-1."""
    k = int(labels.max()) + 1
    A = np.zeros((k, labels.size))
    A[labels, np.arange(labels.size)] = 1.0
    size = A.sum(axis=1)
    S = A @ L @ A.T
    pairs = size * (size - 1)
    within = np.where(pairs > 0, np.diag(S) / np.maximum(pairs, 1), 0.0)   # L's diagonal is 0
    return S / np.outer(size, size), within, size


def pair_scores(L: np.ndarray, labels: np.ndarray, score: str) -> np.ndarray:
    """(K, K) the test's score for every two persons (diagonal -inf)."""
    M, within, _ = _means(L, labels)
    if score == "relative":
        M = M - (within[:, None] + within[None, :]) / 2.0
    elif score != "absolute":
        raise ValueError(f"score must be 'absolute' or 'relative', not {score!r}")
    np.fill_diagonal(M, -np.inf)
    return M


def device_persons(labels: np.ndarray, devices: np.ndarray) -> np.ndarray:
    """(K,) whether each person holds sessions of a personal-device group (``devices`` >= 0)."""
    k = int(labels.max()) + 1
    out = np.zeros(k, dtype=bool)
    out[np.unique(labels[devices >= 0])] = True
    return out


def merge_persons(L: np.ndarray, labels: np.ndarray, devices: np.ndarray, threshold: float,
                  score: str = "absolute", keep_devices: bool = False) -> np.ndarray:
    """Merge the two persons with the highest score while it is above ``threshold``
    (labels renumbered 0..K'-1). ``devices``: (N,) personal-device group per session, -1
    for none (``pair_model.must_link_groups``)."""
    out = np.unique(labels, return_inverse=True)[1]
    while out.max() > 0:
        S = pair_scores(L, out, score)
        if keep_devices:
            d = device_persons(out, devices)
            S[np.outer(d, d)] = -np.inf
        a, b = divmod(int(np.argmax(S)), S.shape[0])
        if not np.isfinite(S[a, b]) or S[a, b] <= threshold:
            break
        out = np.unique(np.where(out == b, a, out), return_inverse=True)[1]
    return out


def two_parts(L: np.ndarray, devices: np.ndarray, min_size: int) -> np.ndarray | None:
    """(n,) 0/1 parts of one person's sessions as the pair model alone would divide them
    (linkage at LINK_THRESHOLD, clusters under ``min_size`` dissolved, then linked down to
    two; each personal device kept whole), or None when it sees one part or a part under
    ``min_size``."""
    labels = PM.resolve(L, devices, LINK_THRESHOLD, min_size, min_share=1.0)
    if labels.max() < 1:
        return None
    parts = PM.average_linkage(L, labels, -np.inf, min_clusters=2)
    # dissolve_small places a small cluster's sessions one by one: a device goes back whole,
    # to the part holding most of its sessions
    for g in np.unique(devices[devices >= 0]):
        sel = devices == g
        parts[sel] = np.bincount(parts[sel], minlength=2).argmax()
    if parts.max() < 1 or np.bincount(parts).min() < min_size:
        return None
    return parts


def split_persons(L: np.ndarray, labels: np.ndarray, devices: np.ndarray, threshold: float,
                  score: str = "absolute", min_size: int = 12) -> np.ndarray:
    """Split each person with >= 2 * ``min_size`` sessions in two when the pair model's two
    parts of it score below ``threshold`` (labels renumbered 0..K'-1)."""
    out = np.unique(labels, return_inverse=True)[1]
    nxt = int(out.max()) + 1
    for p in range(nxt):
        idx = np.flatnonzero(out == p)
        if idx.size < 2 * min_size:
            continue
        sub = L[np.ix_(idx, idx)]
        d = devices[idx]
        parts = two_parts(sub, np.unique(d, return_inverse=True)[1] - (1 if (d < 0).any() else 0), min_size)
        if parts is None:
            continue
        if pair_scores(sub, parts, score)[0, 1] < threshold:
            out[idx[parts == 1]] = nxt
            nxt += 1
    return np.unique(out, return_inverse=True)[1]


# ---- scoring the households once ---------------------------------------------------------

def _baselines(h: worlds.WorldHousehold, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: getattr(WE, name)(h)[0] for name in names}


@dataclass
class Scored:
    """One household: its truth, the pair log-odds, the personal-device groups and every
    method's answer."""
    household_id: str
    world_id: str
    person: np.ndarray
    L: np.ndarray
    devices: np.ndarray
    answers: dict[str, np.ndarray]

    @property
    def n_persons(self) -> int:
        return int(np.unique(self.person).size)


def score_households(hs: list[worlds.WorldHousehold], logodds, names: tuple[str, ...], workers: int,
                     log=lambda m: None) -> list[Scored]:
    """Each household's pair log-odds (``logodds(k, h) -> (L, groups)``, in this process)
    and the answers of ``names`` (in ``workers`` processes, at the same time)."""
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_baselines, h, names) for h in hs]
        Ls = []
        for k, h in enumerate(hs):
            Ls.append(logodds(k, h))
            if k % 24 == 23:
                log(f"  pair log-odds {k + 1}/{len(hs)}")
        answers = [f.result() for f in futures]
    return [Scored(h.household_id, h.world_id, np.asarray(h.person), L, g, a)
            for h, (L, g), a in zip(hs, Ls, answers)]


# ---- figures and the choice --------------------------------------------------------------

def figures(scored: list[Scored], preds: list[np.ndarray]) -> dict:
    return PM.figures(scored, preds)       # reads .person and .n_persons only


def changed(scored: list[Scored], preds: list[np.ndarray]) -> dict:
    """How many households the test changed the count of, and how: closer to the truth or further."""
    closer = further = moved = 0
    for s, p in zip(scored, preds):
        before, after = np.unique(s.answers["hearth_batch"]).size, np.unique(p).size
        if before != after:
            moved += 1
            if abs(after - s.n_persons) < abs(before - s.n_persons):
                closer += 1
            else:
                further += 1
    return {"households_changed": moved, "closer": closer, "further": further}


def apply_tests(scored: list[Scored], tests: tuple) -> list[np.ndarray]:
    preds = []
    for s in scored:
        p = s.answers["hearth_batch"]
        for t in tests:
            p = t.apply(s.L, p, s.devices)
        preds.append(p)
    return preds


def candidates() -> dict[str, list]:
    merges = [MergeTest(sc, t, kd) for sc, ts in MERGE_THRESHOLDS.items() for t in ts for kd in (False, True)]
    splits = [SplitTest(sc, t, m) for sc, ts in SPLIT_THRESHOLDS.items() for t in ts for m in SPLIT_MIN_SIZES]
    return {"merge": merges, "split": splits}


def _key(f: dict) -> float:
    return f["session_accuracy"] + f["household_size_exact"]


def choose(scored: list[Scored], tests: list, before: dict) -> tuple[object | None, dict]:
    """The test with the best session accuracy + size exact on ``scored`` among those that
    keep at least as many single viewers single as Hearth (None: none beats Hearth)."""
    table = {}
    best, best_key = None, _key(before)
    for t in tests:
        f = figures(scored, apply_tests(scored, (t,)))
        table[repr(t)] = f
        if (f["single_person_kept"] or 0) >= (before["single_person_kept"] or 0) - 1e-9 and _key(f) > best_key + 1e-9:
            best, best_key = t, _key(f)
    return best, table


def hindsight(scored: list[Scored], tests: list) -> dict:
    """Every test on ``scored`` (a description, never a choice): the one with the best
    accuracy + size exact, and the most households it moves closer to the truth."""
    rows = {repr(t): {**figures(scored, p), **changed(scored, p)} for t in tests for p in [apply_tests(scored, (t,))]}
    best = max(rows, key=lambda k: _key(rows[k]))
    most = max(rows, key=lambda k: (rows[k]["closer"] - rows[k]["further"], rows[k]["closer"]))
    return {"best": {"test": best, **rows[best]}, "most_net_closer": {"test": most, **rows[most]}}


def _halves(scored: list[Scored]) -> tuple[list[int], list[int]]:
    ids = sorted({s.world_id for s in scored})
    first = set(ids[0::2])
    a = [k for k, s in enumerate(scored) if s.world_id in first]
    return a, [k for k, s in enumerate(scored) if s.world_id not in first]


def cross_fitted(scored: list[Scored], tests: list) -> dict:
    """Each half of the worlds answered with the test chosen on the other half (Hearth's
    answer where none was chosen): an out-of-sample figure for the choice itself."""
    preds: list = [None] * len(scored)
    chosen = []
    for pick, use in (_halves(scored), _halves(scored)[::-1]):
        part = [scored[k] for k in pick]
        t, _ = choose(part, tests, figures(part, [s.answers["hearth_batch"] for s in part]))
        chosen.append(repr(t))
        for k in use:
            preds[k] = apply_tests([scored[k]], (t,) if t else ())[0]
    return {"chosen_per_half": chosen, **figures(scored, preds), **changed(scored, preds)}


def report(scored: list[Scored], chosen: dict[str, object | None]) -> dict:
    out = {name: figures(scored, [s.answers[name] for s in scored]) for name in BASELINES
           if name in scored[0].answers}
    for label, tests in (("merge", (chosen["merge"],)), ("split", (chosen["split"],)),
                         ("merge_then_split", (chosen["merge"], chosen["split"]))):
        tests = tuple(t for t in tests if t is not None)
        if not tests:
            continue
        preds = apply_tests(scored, tests)
        out[f"hearth_{label}"] = {**figures(scored, preds), **changed(scored, preds), "tests": [repr(t) for t in tests]}
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties half."""
    if pos.size == 0 or neg.size == 0:
        return None
    both = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(both, kind="mergesort"), kind="mergesort") + 1.0
    for v in np.unique(both):          # average ranks of ties
        sel = both == v
        ranks[sel] = ranks[sel].mean()
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _quantiles(x: np.ndarray) -> list[float] | None:
    return [round(float(v), 2) for v in np.quantile(x, (0.1, 0.25, 0.5, 0.75, 0.9))] if x.size else None


def diagnose(scored: list[Scored], min_size: int = 12) -> dict:
    """How well the tests' scores tell right from wrong decisions, pooled over households.

    Merge: every two fitted persons of Hearth's batch fit, "one member" when their sessions'
    majority true member is the same; and per household the best-scoring pair, in
    households where Hearth over-counted with such a pair (a merge could fix it) against
    households where every pair is two members (any merge is wrong). Split: every fitted
    person with >= 2 * ``min_size`` sessions whose pair-model parts are both >= ``min_size``,
    "holds two members" when the parts' majority members differ."""
    out: dict = {}
    for score in ("absolute", "relative"):
        same, diff, best_fixable, best_wrong = [], [], [], []
        for s in scored:
            p = np.unique(s.answers["hearth_batch"], return_inverse=True)[1]
            if p.max() < 1:
                continue
            S = pair_scores(s.L, p, score)
            major = np.array([np.bincount(s.person[p == k]).argmax() for k in range(p.max() + 1)])
            iu = np.triu_indices(S.shape[0], 1)
            one = major[iu[0]] == major[iu[1]]
            same += list(S[iu][one])
            diff += list(S[iu][~one])
            (best_fixable if one.any() else best_wrong).append(S[iu].max())
        out[f"merge_{score}"] = {
            "pairs_one_member": len(same), "pairs_two_members": len(diff),
            "auc": _auc(np.array(same), np.array(diff)),
            "quantiles_one_member": _quantiles(np.array(same)),
            "quantiles_two_members": _quantiles(np.array(diff)),
            "households_fixable": len(best_fixable), "households_no_merge_right": len(best_wrong),
            "best_pair_quantiles_fixable": _quantiles(np.array(best_fixable)),
            "best_pair_quantiles_no_merge_right": _quantiles(np.array(best_wrong)),
        }
    split: dict[str, list] = {"absolute_two": [], "absolute_one": [], "relative_two": [], "relative_one": []}
    for s in scored:
        p = np.unique(s.answers["hearth_batch"], return_inverse=True)[1]
        for k in range(p.max() + 1):
            idx = np.flatnonzero(p == k)
            if idx.size < 2 * min_size:
                continue
            d = s.devices[idx]
            parts = two_parts(s.L[np.ix_(idx, idx)], np.unique(d, return_inverse=True)[1] - (1 if (d < 0).any() else 0),
                              min_size)
            if parts is None:
                continue
            truth = s.person[idx]
            two = np.bincount(truth[parts == 0]).argmax() != np.bincount(truth[parts == 1]).argmax()
            for score in ("absolute", "relative"):
                split[f"{score}_{'two' if two else 'one'}"].append(pair_scores(s.L[np.ix_(idx, idx)], parts, score)[0, 1])
    for score in ("absolute", "relative"):
        two, one = np.array(split[f"{score}_two"]), np.array(split[f"{score}_one"])
        out[f"split_{score}"] = {"persons_two_members": int(two.size), "persons_one_member": int(one.size),
                                 "auc_lower_for_two": _auc(-two, -one),
                                 "quantiles_two_members": _quantiles(two), "quantiles_one_member": _quantiles(one)}
    return out


def _tuning(seed: int, lo: int, hi: int) -> list[worlds.WorldHousehold]:
    return PM._tuning_worlds(seed, lo, hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seed", type=int, default=worlds.TUNING.seed)
    ap.add_argument("--train-worlds", default="0:4")
    ap.add_argument("--test-seed", type=int, default=20_260_002)
    ap.add_argument("--test-worlds", default="0:4")
    ap.add_argument("--stack", action="store_true", help="the stacked second stage's log-odds")
    ap.add_argument("--movielens-tuning", action="store_true", help="also the real viewers' TUNING half")
    ap.add_argument("--workers", type=int, default=1, help="processes for the baselines beside this one")
    ap.add_argument("--cache", default=None, help="a directory for the scored households (reused when present)")
    args = ap.parse_args()
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    kw = {"stack": args.stack}
    cache = Path(args.cache) if args.cache else None
    tag = "stack" if args.stack else "first"

    def cached(name: str, make):
        path = cache / f"{name}-{tag}.pkl" if cache else None
        if path is not None and path.exists():
            log(f"{name}: from {path}")
            return pickle.loads(path.read_bytes())
        value = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(value))
        return value

    lo, hi = (int(x) for x in args.train_worlds.split(":"))
    train_hs = _tuning(args.train_seed, lo, hi)
    log(f"training households {len(train_hs)} (seed {args.train_seed}, worlds {lo}:{hi}), {kw}")

    def train_scored() -> list[Scored]:
        held = PM.held_out_logodds(train_hs, **kw)
        log("held-out pair log-odds of the training households")
        return score_households(train_hs, lambda k, h: held[k], ("hearth_batch",), args.workers, log)

    train = cached("train", train_scored)
    pm = cached("pair-model", lambda: PM.PairModel(**kw).fit(train_hs))
    before = figures(train, [s.answers["hearth_batch"] for s in train])
    log(f"training seed, Hearth batch fit: {before}")
    result: dict = {"train_seed": args.train_seed, "train_worlds": args.train_worlds, **kw,
                    "train": {"hearth_batch": before, "diagnosis": diagnose(train)}}
    log(f"training seed diagnosis: {json.dumps(result['train']['diagnosis'])}")
    chosen = {}
    for kind, tests in candidates().items():
        t, table = choose(train, tests, before)
        chosen[kind] = t
        best = sorted(table.items(), key=lambda kv: -_key(kv[1]))[:8]
        log(f"{kind}: chosen {t!r}; best by accuracy + size exact: "
            + "; ".join(f"{k} {v['session_accuracy']}/{v['household_size_exact']}/{v['single_person_kept']}"
                        f" u{v['under']} o{v['over']}" for k, v in best))
        result["train"][f"{kind}_table"] = table
        result["train"][f"{kind}_chosen"] = repr(t)
        if t is not None:
            preds = apply_tests(train, (t,))
            result["train"][f"hearth_{kind}"] = {**figures(train, preds), **changed(train, preds)}
        result["train"][f"{kind}_cross_fitted"] = cross_fitted(train, tests)
        log(f"{kind} cross-fitted on the training seed: {result['train'][f'{kind}_cross_fitted']}")

    lo, hi = (int(x) for x in args.test_worlds.split(":"))
    test_hs = _tuning(args.test_seed, lo, hi)
    test = cached("test", lambda: score_households(test_hs, lambda k, h: pm.logodds(h), BASELINES, args.workers, log))
    result["test_seed"], result["test_worlds"] = args.test_seed, args.test_worlds
    result["test"] = {**report(test, chosen), "diagnosis": diagnose(test),
                      "merge_hindsight": hindsight(test, candidates()["merge"])}
    log(f"test, the merge tests in hindsight: {json.dumps(result['test']['merge_hindsight'])}")
    log(f"test {json.dumps(result['test'])}")
    if args.movielens_tuning:
        from bench import worlds_movielens
        ml_hs = worlds_movielens.generate(worlds_per_family=4, split="tuning")
        ml = cached("movielens", lambda: score_households(ml_hs, lambda k, h: pm.logodds(h), BASELINES,
                                                          args.workers, log))
        result["movielens_tuning"] = {**report(ml, chosen), "diagnosis": diagnose(ml),
                                      "merge_hindsight": hindsight(ml, candidates()["merge"])}
        log(f"movielens-tuning {json.dumps(result['movielens_tuning'])}")
    result["elapsed_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
