"""Tuning harness for batch placement (who watched each session once the persons exist),
on the TUNING worlds only.

``python -m bench.place_tuning [--worlds W] [--households H] [--workers N]`` fits Hearth
once per TUNING household (bench/worlds.py, seed 20260001; W worlds x H households of
each tuning family) exactly as ``bench/_worlds_eval.hearth_batch`` does and prints, per
family and overall, batch session accuracy beside majority, the device heuristic and the
supervised oracle on the same sessions, the share of the majority -> oracle gap closed,
and accuracy split by personal vs shared-device sessions (where placement decides).
The baselines do not depend on the model, so they are cached per split/size in
``--cache`` (default /tmp). Last stdout line: one JSON object. It never reads the
REPORTING split: choices are made here, figures are reported by
``python -m bench.accuracy --worlds-only``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import _worlds_eval as E, worlds  # noqa: E402
from bench._clustering_eval import matched_correct  # noqa: E402
from bench.worlds import PERSONAL_TYPES  # noqa: E402

BASELINES = ("majority", "device_heuristic", "supervised_oracle")


def _baselines(h: worlds.WorldHousehold) -> dict[str, np.ndarray]:
    return {name: matched_correct(h.person, E.BASELINES[name](h)[0]) for name in BASELINES}


def _hearth(h: worlds.WorldHousehold) -> tuple[np.ndarray, int]:
    pred, _ = E.hearth_batch(h)
    return matched_correct(h.person, pred), int(np.unique(pred).size)


def _summary(hs, idx, correct, base) -> dict:
    acc = lambda cs: float(np.concatenate([cs[i] for i in idx]).mean())  # noqa: E731
    out = {"households": len(idx), "hearth": acc(correct)}
    for name in BASELINES:
        out[name] = acc(base[name])
    out["gap_closed"] = E.gap_closed(out["hearth"], out["majority"], out["supervised_oracle"])
    shared = [~np.isin(hs[i].device_type, PERSONAL_TYPES) for i in idx]
    c = np.concatenate([correct[i] for i in idx])
    s = np.concatenate(shared)
    d = np.concatenate([base["device_heuristic"][i] for i in idx])
    o = np.concatenate([base["supervised_oracle"][i] for i in idx])
    out["shared_sessions"] = {"share": float(s.mean()), "hearth": float(c[s].mean()) if s.any() else None,
                              "device_heuristic": float(d[s].mean()) if s.any() else None,
                              "oracle": float(o[s].mean()) if s.any() else None}
    out["personal_sessions"] = {"hearth": float(c[~s].mean()) if (~s).any() else None,
                                "device_heuristic": float(d[~s].mean()) if (~s).any() else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, default=worlds.TUNING.worlds_per_family)
    ap.add_argument("--households", type=int, default=worlds.TUNING.households_per_world)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", default="/tmp")
    ap.add_argument("--per-household", action="store_true", help="also print every household's figures")
    args = ap.parse_args()
    t0 = time.time()
    hs = worlds.generate(worlds.TUNING, worlds_per_family=args.worlds, households_per_world=args.households)
    cache = Path(args.cache) / f"hearth_place_baselines_{worlds.TUNING.seed}_{args.worlds}x{args.households}.pkl"
    if cache.exists():
        base_list = pickle.loads(cache.read_bytes())
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            base_list = list(pool.map(_baselines, hs))
        cache.write_bytes(pickle.dumps(base_list))
    base = {name: [b[name] for b in base_list] for name in BASELINES}
    with ProcessPoolExecutor(args.workers) as pool:
        outs = list(pool.map(_hearth, hs))
    correct = [o[0] for o in outs]
    report = {"all": _summary(hs, list(range(len(hs))), correct, base)}
    for fam in sorted({h.family for h in hs}):
        report[fam] = _summary(hs, [i for i, h in enumerate(hs) if h.family == fam], correct, base)
    report["size_exact"] = float(np.mean([o[1] == h.n_persons for o, h in zip(outs, hs)]))
    report["single_person_kept"] = float(np.mean([o[1] == 1 for o, h in zip(outs, hs) if h.n_persons == 1]))
    if args.per_household:
        for i, h in enumerate(hs):
            print(f"{h.household_id:10s} n={h.n_persons} k={outs[i][1]} sessions={h.n_sessions} "
                  f"hearth={correct[i].mean():.3f} dev={base['device_heuristic'][i].mean():.3f} "
                  f"oracle={base['supervised_oracle'][i].mean():.3f}")
    report["elapsed_s"] = round(time.time() - t0, 1)
    for name in ("all", *sorted({h.family for h in hs})):
        r = report[name]
        print(f"{name:13s} hearth {r['hearth']:.3f} dev {r['device_heuristic']:.3f} oracle "
              f"{r['supervised_oracle']:.3f} maj {r['majority']:.3f} gap {r['gap_closed']:.3f} | shared "
              f"{r['shared_sessions']['share']:.2f}: hearth {r['shared_sessions']['hearth']} "
              f"dev {r['shared_sessions']['device_heuristic']} oracle {r['shared_sessions']['oracle']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
