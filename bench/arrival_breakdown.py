"""Where the answers at arrival lose to the device heuristic, session by session (issue #10,
arrival36; TUNING only: the real viewers' TUNING halves or the synthetic TUNING worlds —
never a REPORTING half, REPORTING worlds or blind worlds).

Each household is streamed as ``bench.stream_tuning`` streams it (``_worlds_eval.ServiceStream``,
one session per arrival, the service's refresh decision) and each session's answer at arrival
is kept with the state it was answered in: cold start or fitted, the answering model's persons,
whether the model knew the session's device, the device's earlier sessions, the model's next
new person id. Beside it, on the same sessions: the device heuristic as ``bench.accuracy``
scores it (``_worlds_eval.device_heuristic``: a batch answer, its shared-device centroids from
every session of the household, future ones included) and the same rule at arrival
(``causal_heuristic``: only the sessions before). Every answer set is scored the one way the
benchmark scores (``matched_correct``: one match of ids to members over the household), and
also read with each id as its majority member (what renames and extra ids cost).

The breakdown classes: device kind (personal / shared); cold start / the model's device
unknown / the device's earlier sessions (< 5, 5-19, 20+); position in the stream (cold, the
first fit to the first device refit, after); persons of the answering model against the
members seen so far with >= 3 sessions; household size; family. ``--replay-young-device``
re-scores the same streams with the answers of one rule changed (``replay_young_device``:
a session on a personal device with fewer than MIN_DEVICE_SESSIONS sessions folded in, answered
by a fitted model, named as the model's next new person), exact without re-streaming because
the rule changes only names of answers at arrival, never what the model folds in.

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.arrival_breakdown --population movielens-tuning \\
        --trace-out /tmp/x-100k.pkl --out /tmp/x-100k.json
    python -m bench.arrival_breakdown --from /tmp/x-100k.pkl --replay-young-device 1
"""

from __future__ import annotations

import argparse
import pickle
import re
import time

import numpy as np

from bench import _worlds_eval as E
from bench import worlds
from bench._clustering_eval import matched_correct
from bench._common import emit
from bench.stream_tuning import majority_correct, real_viewers_tuning
from bench.worlds import PERSONAL_TYPES, WorldHousehold
from services.clustering.domain import features as F
from services.clustering.domain.model import BUFFER_CAP
from services.clustering.domain.persons import MIN_DEVICE_SESSIONS

POPULATIONS = ("movielens-latest-tuning", "movielens-tuning", "worlds")
_PERSON_ID = re.compile(r"p(\d+)")


def causal_heuristic(h: WorldHousehold) -> np.ndarray:
    """The device heuristic answered at arrival: each personal device seen so far is one
    person (its device id); a shared-device session goes to the nearest centroid of the
    personal devices' sessions so far (features without the device block, standardised by
    the spread of the sessions so far); before any personal device, one person ("_one").
    A session's answer reads only the sessions before it."""
    keep = np.ones(F.FEATURE_DIM, dtype=bool)
    keep[F.DEVICE] = False
    X = h.features[:, keep].astype(np.float64)
    personal = np.isin(h.device_type, PERSONAL_TYPES)
    labels = np.empty(h.n_sessions, dtype=object)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    s1, s2 = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for i in range(h.n_sessions):
        d = str(h.device_id[i])
        if personal[i]:
            labels[i] = d
        elif sums:
            mu = s1 / max(i, 1)
            sd = np.maximum(np.sqrt(np.maximum(s2 / max(i, 1) - mu ** 2, 0.0)), 1e-3)
            order = list(sums)
            C = np.array([sums[k] / counts[k] for k in order])
            labels[i] = order[int((((X[i] - C) / sd) ** 2).sum(axis=1).argmin())]
        else:
            labels[i] = "_one"
        s1 += X[i]
        s2 += X[i] * X[i]
        if personal[i]:
            sums[d] = sums.get(d, 0.0) + X[i]
            counts[d] = counts.get(d, 0) + 1
    return labels


def trace_household(h: WorldHousehold) -> dict:
    """The household streamed as the service sees it; per session its answer at arrival
    and the state it was answered in."""
    stream = E.ServiceStream(h)
    rows, seen = [], {}
    for a, _b, m, out, _events in stream.arrivals(1):
        d = str(h.device_id[a])
        cold = m.active_variant == "cold_start"
        rows.append({"id": out.person_ids[int(out.person_index[0])], "cold": cold,
                     "persons": 0 if cold else m.n_persons, "known": d in m.device_ids,
                     "device_before": seen.get(d, 0), "folded": int(m.n_sessions),
                     "next_person": int(m.next_person)})
        seen[d] = seen.get(d, 0) + 1
    return {"id": h.household_id, "family": h.family, "n_persons": h.n_persons, "person": h.person,
            "device_id": np.asarray(h.device_id).astype(str), "device_type": np.asarray(h.device_type).astype(str),
            "rows": rows, "settled": np.asarray(stream.settled().person_index),
            "heuristic_batch": np.asarray(E.device_heuristic(h)[0]), "heuristic_arrival": causal_heuristic(h)}


def replay_young_device(t: dict, min_persons: int = 1) -> list[str]:
    """The answers at arrival with one rule changed: a session on a personal device that
    the answering model (fitted, at least ``min_persons`` persons) has folded fewer than
    MIN_DEVICE_SESSIONS sessions of (in its buffer of the newest BUFFER_CAP), or does not
    know, is named as the model's next new person (``p{next_person}``) — the device
    heuristic's "each personal device is one person" while the model has next to no
    evidence of the device."""
    out = [r["id"] for r in t["rows"]]
    personal = np.isin(t["device_type"], PERSONAL_TYPES)
    for i, r in enumerate(t["rows"]):
        if r["cold"] or r["persons"] < min_persons or not personal[i]:
            continue
        f = r["folded"]
        folded = int((t["device_id"][max(0, f - BUFFER_CAP):f] == t["device_id"][i]).sum()) if r["known"] else 0
        if folded < MIN_DEVICE_SESSIONS:
            out[i] = f"p{r['next_person']}"
    return out


def _codes(labels) -> np.ndarray:
    return np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)[1]


def breakdown(traces: list[dict], answers: list[list[str]] | None = None) -> dict:
    """Accuracy at arrival (Hearth's, or ``answers`` instead), settled, the heuristic in batch
    and at arrival — overall, by class, and read by majority."""
    cols: dict[str, list] = {k: [] for k in ("hearth", "hearth_majority", "settled", "heuristic", "heuristic_majority",
                                              "heuristic_arrival", "personal", "cold", "known", "before", "position",
                                              "size", "family", "count")}
    singles, sizes = [], []
    for j, t in enumerate(traces):
        truth = t["person"]
        ids = _codes(answers[j] if answers is not None else [r["id"] for r in t["rows"]])
        cols["hearth"].append(matched_correct(truth, ids))
        cols["hearth_majority"].append(majority_correct(truth, ids))
        cols["settled"].append(matched_correct(truth, t["settled"]))
        cols["heuristic"].append(matched_correct(truth, t["heuristic_batch"]))
        cols["heuristic_majority"].append(majority_correct(truth, t["heuristic_batch"]))
        cols["heuristic_arrival"].append(matched_correct(truth, _codes(t["heuristic_arrival"])))
        cols["personal"].append(np.isin(t["device_type"], PERSONAL_TYPES))
        for key, field in (("cold", "cold"), ("known", "known"), ("before", "device_before")):
            cols[key].append(np.array([r[field] for r in t["rows"]]))
        n = truth.size
        cols["position"].append(np.arange(n))
        cols["size"].append(np.full(n, t["n_persons"]))
        cols["family"].append(np.full(n, t["family"], dtype=object))
        # the answering model's persons against the members seen so far (>= 3 sessions)
        seen, count = np.zeros(int(truth.max()) + 1, dtype=int), np.zeros(n, dtype=int)
        for i, r in enumerate(t["rows"]):
            members = int((seen >= 3).sum())
            count[i] = 0 if r["cold"] else (1 if r["persons"] < members else 2 if r["persons"] == members else 3)
            seen[truth[i]] += 1
        cols["count"].append(count)
        sizes.append(np.unique(ids).size == t["n_persons"])
        if t["n_persons"] == 1:
            singles.append(np.unique(ids).size == 1)
    c = {k: np.concatenate(v) for k, v in cols.items()}
    n = c["hearth"].size

    def figures(sel: np.ndarray) -> dict | None:
        if not sel.any():
            return None
        return {"share": round(float(sel.mean()), 4), "hearth": round(float(c["hearth"][sel].mean()), 4),
                "heuristic": round(float(c["heuristic"][sel].mean()), 4),
                "heuristic_arrival": round(float(c["heuristic_arrival"][sel].mean()), 4),
                "settled": round(float(c["settled"][sel].mean()), 4),
                # the class's part of the gap to the heuristic, as a share of all sessions
                "loss_vs_heuristic": round(float((c["heuristic"][sel].sum() - c["hearth"][sel].sum()) / n), 4)}

    P, cold, pos, before = c["personal"], c["cold"], c["position"], c["before"]
    classes = {
        "personal": P, "shared": ~P,
        "cold start": cold, "personal, cold start": cold & P, "shared, cold start": cold & ~P,
        "personal, device unknown to the fitted model": P & ~c["known"] & ~cold,
        "personal, known device, < 5 earlier sessions": P & c["known"] & ~cold & (before < 5),
        "personal, 5-19 earlier sessions": P & ~cold & (before >= 5) & (before < 20),
        "personal, 20+ earlier sessions": P & ~cold & (before >= 20),
        "fitted, 10-49 (first fit to first device refit)": ~cold & (pos >= 10) & (pos < 50),
        "fitted, 50+": ~cold & (pos >= 50),
        "fewer persons than members seen": c["count"] == 1, "as many persons as members seen": c["count"] == 2,
        "more persons than members seen": c["count"] == 3,
    }
    for lo, hi in ((0, 10), (10, 20), (20, 40), (40, 80), (80, 160), (160, 320), (320, None)):
        classes[f"position {lo}-{hi or ''}"] = (pos >= lo) & (pos < (hi or n + 1))
    for s in sorted(set(c["size"].tolist())):
        classes[f"household size {s}"] = c["size"] == s
    for f in sorted(set(c["family"].tolist())):
        classes[f"family {f}"] = c["family"] == f
    return {"households": len(traces), "sessions": int(n),
            "at_arrival": round(float(c["hearth"].mean()), 4), "settled": round(float(c["settled"].mean()), 4),
            "heuristic": round(float(c["heuristic"].mean()), 4),
            "heuristic_at_arrival": round(float(c["heuristic_arrival"].mean()), 4),
            "majority_reading": {"at_arrival": round(float(c["hearth_majority"].mean()), 4),
                                 "heuristic": round(float(c["heuristic_majority"].mean()), 4)},
            "size_exact_at_arrival": round(float(np.mean(sizes)), 4),
            "singles_kept_at_arrival": f"{sum(singles)}/{len(singles)}",
            "classes": {k: figures(v) for k, v in classes.items()}}


def households(population: str, limit: int | None) -> list[WorldHousehold]:
    if population == "worlds":
        hs = worlds.generate(worlds.TUNING)
    else:
        hs = real_viewers_tuning(population, None)
    return hs[:limit] if limit else hs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", choices=POPULATIONS, default="movielens-tuning",
                    help="a real population's TUNING half or the synthetic TUNING worlds (never REPORTING)")
    ap.add_argument("--households", type=int, default=None, help="the first N households only")
    ap.add_argument("--trace-out", default=None, help="also pickle the traces here (for --from)")
    ap.add_argument("--from", dest="from_", default=None, help="read traces pickled by --trace-out instead of streaming")
    ap.add_argument("--replay-young-device", type=int, default=None, metavar="MIN_PERSONS",
                    help="also score replay_young_device's answers (models with at least MIN_PERSONS persons)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    if args.from_:
        with open(args.from_, "rb") as f:
            traces = pickle.load(f)
    else:
        traces = [trace_household(h) for h in households(args.population, args.households)]
        if args.trace_out:
            with open(args.trace_out, "wb") as f:
                pickle.dump(traces, f)
    result = {"population": args.population if not args.from_ else args.from_, "split": "tuning",
              "base": breakdown(traces)}
    if args.replay_young_device is not None:
        result["replay_young_device"] = {
            "min_persons": args.replay_young_device,
            **breakdown(traces, [replay_young_device(t, args.replay_young_device) for t in traces])}
    result["elapsed_s"] = round(time.time() - t0, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
