"""Tuning harness for streaming and composition change, on the TUNING worlds only.

``python -m bench.stream_tuning [--households N] [--workers W] [--trace]`` streams the
TUNING split's households (bench/worlds.py, seed 20260001; every household with a
member joining or leaving, then stable ones up to N) through ``HouseholdModel.update``
five sessions at a time, as ``bench/_worlds_eval.hearth_stream`` does, and prints on the
last line a JSON object: streaming session accuracy, single-person kept, and join/leave
detection within 30 sessions with false alarms per household-quarter
(``_worlds_eval.composition_scores``), plus per-household traces. ``--trace`` also
records, at every check of the persons, the newcomer test's figures
(``HouseholdModel.birth_statistics``) and the share test's largest join and leave
ratios, so thresholds can be swept offline (``sweep``): up to the first event of a
household the stream does not depend on them. It never reads the REPORTING split:
choices are made here, figures are reported by ``python -m bench.accuracy --worlds-only``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import _worlds_eval as E
from bench import worlds
from bench._clustering_eval import matched_correct
from services.clustering.domain.model import HouseholdModel


def _stream(h: worlds.WorldHousehold, trace: bool) -> tuple[np.ndarray, list, list]:
    m = HouseholdModel()
    ids, events, checks = [], [], []
    for a in range(0, h.n_sessions, E.STREAM_BATCH):
        b = min(a + E.STREAM_BATCH, h.n_sessions)
        before = len(m.composition_events)
        m.birth_statistics = None
        m.update(h.features[a:b], device_ids=h.device_id[a:b])
        events += [(b, ev["kind"]) for ev in m.composition_events[before:]]
        if trace and m.mixture is not None and m.since_check == 0:
            stats = m._composition_statistics()
            checks.append({"at": b, "persons": m.n_persons, "birth": m.birth_statistics,
                           "join": float(stats[0].max()) if stats else 0.0,
                           "leave": float(stats[1].max()) if stats else 0.0})
        out = m.assign_batch(h.features[a:b], device_ids=h.device_id[a:b])
        ids += [out.person_ids[int(i)] for i in out.person_index]
    names = {n: i for i, n in enumerate(sorted(set(ids)))}
    return np.array([names[i] for i in ids]), events, checks


def _one(h: worlds.WorldHousehold, trace: bool = False) -> dict:
    labels, events, checks = _stream(h, trace)
    change = h.changes[0] if h.changes else None
    t = h.start_ts
    quarters = (t[-1] - t[E.WARMUP_SESSIONS]) / E.QUARTER_S if h.n_sessions > E.WARMUP_SESSIONS else 0.0
    return {"id": h.household_id, "family": h.family, "persons": h.n_persons, "sessions": h.n_sessions,
            "change": (change.kind, change.session_index) if change else None, "quarters": quarters,
            "correct": matched_correct(h.person, labels).tolist(),
            "accuracy": float(matched_correct(h.person, labels).mean()),
            "ids_used": int(np.unique(labels).size), "events": events, "checks": checks}


def select(hs: list[worlds.WorldHousehold], limit: int | None) -> list[worlds.WorldHousehold]:
    changed = [h for h in hs if h.changes]
    stable = [h for h in hs if not h.changes]
    if limit is not None:
        stable = stable[:max(limit - len(changed), 0)]
    return changed + stable


def sweep(outs: list[dict], join_h: float, min_gain: float, leave_h: float, gain_key: str = "gain",
          share_join_h: float = 4.0) -> dict:
    """Detection and false alarms had the thresholds been these (first event per household
    exact; later events of a household approximated by the recorded checks)."""
    hit, kinds, alarms, quarters = [], {"join": [], "leave": []}, 0, 0.0
    for o in outs:
        fired = [c["at"] for c in o["checks"]
                 if (c["birth"] and c["birth"]["llr"] >= join_h and c["birth"][gain_key] >= min_gain)
                 or c["leave"] >= leave_h or c["join"] >= share_join_h]
        if o["change"]:
            kind, at = o["change"]
            ok = any(at <= f <= at + E.DETECTION_WINDOW for f in fired)
            hit.append(ok)
            kinds[kind].append(ok)
        else:
            alarms += min(len([f for f in fired if f > E.WARMUP_SESSIONS]), 1 + int(o["quarters"]))
            quarters += o["quarters"]
    return {"join_h": join_h, "min_gain": min_gain, "leave_h": leave_h, "detected": float(np.mean(hit)),
            "join": float(np.mean(kinds["join"])), "leave": float(np.mean(kinds["leave"])),
            "false_alarms_per_household_quarter": alarms / quarters}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--households", type=int, default=None,
                    help="changed households plus stable ones up to this many (default: all 144)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    hs = select(worlds.generate(worlds.TUNING), args.households)
    traces = [args.trace] * len(hs)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            outs = list(pool.map(_one, hs, traces, chunksize=1))
    else:
        outs = [_one(h, t) for h, t in zip(hs, traces)]
    scores = E.composition_scores(hs, [o["events"] for o in outs])
    correct = np.concatenate([o["correct"] for o in outs])
    single = [o["ids_used"] == 1 for o in outs if o["persons"] == 1]
    print(json.dumps({"split": "tuning", "households": len(hs), "streaming_accuracy": float(correct.mean()),
                      "single_person_kept": float(np.mean(single)) if single else None,
                      "composition_change": scores,
                      "households_detail": [{k: v for k, v in o.items() if k != "correct"} for o in outs],
                      "elapsed_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
