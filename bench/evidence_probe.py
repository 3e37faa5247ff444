"""What links between sessions say about persons, on truth (issue #10).

The person count fails where the 35 session features cannot tell a missed member from one
person's second kind of viewing (``bench.size_tuning --diagnose``). Evidence outside the
features must come from relations between sessions. This measures two candidates on the
worlds' truth, before anyone builds a model on them:

* **overlap**: two sessions on different devices that overlap in time. A person rarely
  streams twice at once, so an overlap should mean two persons.
* **series continuation**: a session and the household's previous session that carried one
  of the same series ids. A person tends to go on with their own series.

For each link kind: how many sessions carry one, the share of links that join sessions of one
person, the same share for random pairs of sessions of the same multi-person households (the
base rate), and the likelihood ratio in favour of "the same person" (< 1: "different
persons"). A link is worth building on only when its ratio is far from 1 on TUNING; the blind
worlds are read to see whether it would carry over, never to choose.

``--given-fit`` asks what a link says *beyond the model*: the batch fit without links
(``_worlds_eval.hearth_batch``) answers every session, and the same-person share of the
series links and of random pairs is split by whether the fit put the two sessions in one
person. A link can only move answers where it disagrees with the fit, so the share that
matters is the one among pairs the fit split (docs/benchmarks.md, session 10).

    python -m bench.evidence_probe [--blind] [--given-fit] [--workers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench import worlds
from bench.worlds import WorldHousehold

BASE_PAIRS_PER_HOUSEHOLD = 300


def overlap_links(h: WorldHousehold) -> np.ndarray:
    """(L, 2) index pairs of sessions on different devices that overlap in time."""
    start, end = h.start_ts, h.end_ts
    order = np.argsort(start, kind="stable")
    pairs = []
    for pos, a in enumerate(order):
        for b in order[pos + 1:]:
            if start[b] >= end[a]:
                break
            if h.device_id[a] != h.device_id[b]:
                pairs.append((a, b))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def series_links(h: WorldHousehold) -> np.ndarray:
    """(L, 2) index pairs: a session and the household's previous session (in start order)
    carrying one of its series ids."""
    last: dict[str, int] = {}
    pairs = []
    for i in np.argsort(h.start_ts, kind="stable"):
        for series in h.series[i]:
            if series in last:
                pairs.append((last[series], i))
        for series in h.series[i]:
            last[series] = int(i)
    return np.unique(np.array(pairs, dtype=np.int64).reshape(-1, 2), axis=0)


LINKS = {"overlap": overlap_links, "series_continuation": series_links}


def probe(households: list[WorldHousehold], seed: int = 0) -> dict:
    """Same-person share of each link kind beside the base rate, over multi-person
    households (a single person's links are all "same" and say nothing)."""
    rng = np.random.default_rng(seed)
    multi = [h for h in households if h.n_persons > 1]
    base = []
    for h in multi:
        a, b = rng.integers(0, h.n_sessions, (2, BASE_PAIRS_PER_HOUSEHOLD))
        keep = a != b
        base.append(h.person[a[keep]] == h.person[b[keep]])
    base_same = float(np.concatenate(base).mean())
    out: dict = {"households": len(households), "multi_person_households": len(multi),
                 "sessions": int(sum(h.n_sessions for h in multi)), "base_same_person": round(base_same, 3)}
    for name, links_of in LINKS.items():
        same, linked_sessions = [], 0
        for h in multi:
            links = links_of(h)
            same.append(h.person[links[:, 0]] == h.person[links[:, 1]])
            linked_sessions += np.unique(links).size
        same_all = np.concatenate(same) if same else np.zeros(0, bool)
        share = float(same_all.mean()) if same_all.size else float("nan")
        odds = share / max(1 - share, 1e-9)
        out[name] = {"links": int(same_all.size), "sessions_linked": round(linked_sessions / out["sessions"], 3),
                     "same_person": round(share, 3),
                     "likelihood_ratio_same": round(odds / (base_same / (1 - base_same)), 2)}
    return out


def given_fit(households: list[WorldHousehold], answers: list[np.ndarray], seed: int = 0) -> dict:
    """Same-person share of the series links and of random pairs of sessions (multi-person
    households), split by whether ``answers`` (per household, the fit's person index of
    each session) put the two sessions in one person; the likelihood ratio of a link
    within each split (> 1: the link still says "same person" beyond the fit)."""
    rng = np.random.default_rng(seed)
    link_true, link_fit, base_true, base_fit = [], [], [], []
    for h, pred in zip(households, answers):
        if h.n_persons < 2:
            continue
        links = series_links(h)
        link_true.append(h.person[links[:, 0]] == h.person[links[:, 1]])
        link_fit.append(pred[links[:, 0]] == pred[links[:, 1]])
        a, b = rng.integers(0, h.n_sessions, (2, BASE_PAIRS_PER_HOUSEHOLD))
        keep = a != b
        base_true.append(h.person[a[keep]] == h.person[b[keep]])
        base_fit.append(pred[a[keep]] == pred[b[keep]])
    lt, lf, bt, bf = (np.concatenate(x) for x in (link_true, link_fit, base_true, base_fit))
    out: dict = {"links": int(lt.size), "fit_joins_link": round(float(lf.mean()), 3)}
    for name, split_l, split_b in (("fit_same", lf, bf), ("fit_split", ~lf, ~bf)):
        if not (split_l.any() and split_b.any()):
            out[name] = {"links": int(split_l.sum())}
            continue
        share, base = float(lt[split_l].mean()), float(bt[split_b].mean())
        odds = share / max(1 - share, 1e-9)
        out[name] = {"links": int(split_l.sum()), "same_person": round(share, 3), "base_same_person": round(base, 3),
                     "likelihood_ratio_same": round(odds / max(base / max(1 - base, 1e-9), 1e-9), 2)}
    return out


def _fit_answers(households: list[WorldHousehold], workers: int) -> list[np.ndarray]:
    from concurrent.futures import ProcessPoolExecutor

    from bench._worlds_eval import hearth_batch
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return [r[0] for r in pool.map(hearth_batch, households)]
    return [hearth_batch(h)[0] for h in households]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blind", action="store_true", help="also the blind worlds (report only)")
    ap.add_argument("--given-fit", action="store_true",
                    help="also the series links' same-person share given the batch fit's answers (TUNING)")
    ap.add_argument("--workers", type=int, default=1, help="processes for --given-fit's fits")
    ap.add_argument("--json", help="write the report here as well")
    args = ap.parse_args(argv)
    t0 = time.time()
    tuning = worlds.generate(worlds.TUNING)
    report = {"tuning": probe(tuning)}
    if args.given_fit:
        report["tuning"]["series_given_fit"] = given_fit(tuning, _fit_answers(tuning, args.workers))
    if args.blind:
        from bench import worlds_blind
        report["blind"] = probe([h for h in worlds_blind.generate() if h is not None])
    report["elapsed_s"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
