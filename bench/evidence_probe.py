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

    python -m bench.evidence_probe [--blind] [--json out.json]
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blind", action="store_true", help="also the blind worlds (report only)")
    ap.add_argument("--json", help="write the report here as well")
    args = ap.parse_args(argv)
    t0 = time.time()
    report = {"tuning": probe(worlds.generate(worlds.TUNING))}
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
