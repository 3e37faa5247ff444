"""UTC offset sensitivity: how much person resolution depends on the household's time zone.

``python -m bench.utc_offset --split tuning --workers 1 [--quick] [--shifts 0,3,...]``

Hearth's time features are in UTC (services/clustering/domain/features.py: the start hour
on the circle and the day of week; gmm.py: categorical (weekday/weekend, 2-hour bin)
cells), and events carry only a UTC timestamp. A household lives in local time: its
evening falls in another UTC hour and its weekend boundary moves. This harness takes
the TUNING worlds (bench/worlds.py) as households whose local time is the world's clock
and moves them to a UTC offset of ``h`` hours (UTC = local - h): every raw event's
timestamp moves by -h hours and the sessions are rebuilt by the service's session
builder (``shifted``), so the features are the ones the service would compute. Then
Hearth's batch fit and the baselines (bench/_worlds_eval.py: majority, device
heuristic, supervised oracle; the same functions as bench.accuracy) run on every
household and are summarised with ``_worlds_eval.summarise``, per world and pooled.

A measurement only (session 22): nothing here changes the model. TUNING split only (it
refuses any other). Cold starts follow the service's default strategy, as
bench.accuracy's do (``SERVICE_COLD_START_PRIOR``; with a population prior, the
world's established households are shifted too). The worlds' generator already draws
a world time zone (``hour_offset``, uniform in [-3, 3] h) into its clock, so h = 0 is
the worlds as every other benchmark sees them, and h is an offset on top of it.

Last line of stdout: one JSON object (as every bench module prints): ``by_shift`` ->
``"<h>"`` -> {``pooled``: per method the summary over every household, ``worlds``:
per world id per method the four figures, ``median`` / ``min`` / ``max`` over the
worlds per method per figure}, plus ``split``, ``shifts_h``, ``elapsed_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from bench import _worlds_eval as WE
from bench import worlds
from services.clustering.domain.sessions import build_sessions

SHIFTS_H = (0, 3, 6, 9, 12, 15, 18, 21)
HOUR_S = 3600.0
# Hearth's batch fit beside the baselines the brief asks for (the same functions as
# bench.accuracy's worlds block; GaussianMixture+BIC and k-means true k are left out
# to keep 8 shifts of the TUNING worlds within ~20 minutes on one core).
METHODS = {
    "hearth": None,   # WE.hearth_batch with the world's cold-start prior
    "majority": WE.majority,
    "device_heuristic": WE.device_heuristic,
    "supervised_oracle": WE.supervised_oracle,
}
FIGURES = ("session_accuracy", "household_size_exact", "single_person_kept", "ece")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shifted(h: worlds.WorldHousehold, offset_h: float) -> worlds.WorldHousehold:
    """``h`` as a household living at UTC offset ``offset_h`` hours sends it (its local
    time being the world's clock): every event's timestamp is local - offset, and the
    sessions are rebuilt from the moved events by the service's session builder per
    device (as make_household builds them). The sessions are the same (a common shift
    keeps every gap), so they stay in ``h``'s order with ``h``'s truth; only what the
    builder derives from the timestamps (start/end, session ids, the time features)
    changes. Needs ``h.events`` (``worlds.generate(..., keep_events=True)``)."""
    if h.events is None:
        raise ValueError("shifted needs the household's events (worlds.generate(keep_events=True))")
    d = float(offset_h) * HOUR_S
    events = tuple(replace(ev, ts=ev.ts - d) for ev in h.events)
    by_device: dict[str, list] = {}
    for ev in events:
        by_device.setdefault(ev.device_id, []).append(ev)
    n = h.n_sessions
    order = np.empty(n, dtype=np.int64)   # original session index of each rebuilt one
    rebuilt = []
    for dev, evs in by_device.items():
        sessions = build_sessions(evs)                       # sorted by start on this device
        original = np.flatnonzero(h.device_id == dev)      # h's sessions of the device, in time order
        if len(sessions) != original.size:
            raise AssertionError(f"{h.household_id} {dev}: {len(sessions)} sessions after the shift, "
                                 f"{original.size} before")
        for s, i in zip(sessions, original):
            if abs(s.start_ts + d - h.start_ts[i]) > 1e-3:
                raise AssertionError(f"{h.household_id} {dev}: session {i} moved by other than {offset_h} h")
            order[len(rebuilt)] = i
            rebuilt.append(s)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    ordered = [rebuilt[p] for p in pos]
    return replace(h, features=np.vstack([s.features for s in ordered]).astype(np.float32),
                   start_ts=np.array([s.start_ts for s in ordered]),
                   end_ts=np.array([s.end_ts for s in ordered]),
                   events=events, session_ids=tuple(s.session_id for s in ordered))


def _answers(h: worlds.WorldHousehold, prior) -> dict:
    """Every method's (labels, probabilities) on one household (a unit of work)."""
    out = {"hearth": WE.hearth_batch(h, population_prior=prior)}
    for name, fn in METHODS.items():
        if fn is not None:
            out[name] = fn(h)
    return out


def _figures(summary: dict) -> dict:
    return {k: summary.get(k) for k in FIGURES}


def evaluate(hs: list[worlds.WorldHousehold], priors: dict | None = None, workers: int = 1) -> dict:
    """Every method on ``hs`` (already shifted): pooled summaries (``summarise`` over every
    household, with ``gap_closed``), the four figures per world, and their median,
    min and max over the worlds."""
    prior_of = [(priors or {}).get(h.world_id) for h in hs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            outs = list(pool.map(_answers, hs, prior_of))
    else:
        outs = [_answers(h, p) for h, p in zip(hs, prior_of)]

    def block(idx: list[int]) -> dict:
        sub = [hs[i] for i in idx]
        return {name: WE.summarise(sub, [outs[i][name][0] for i in idx], [outs[i][name][1] for i in idx])
                for name in METHODS}

    pooled = block(list(range(len(hs))))
    maj, orc = pooled["majority"]["session_accuracy"], pooled["supervised_oracle"]["session_accuracy"]
    for s in pooled.values():
        s["gap_closed"] = WE.gap_closed(s["session_accuracy"], maj, orc)
    per_world = {w: {name: _figures(s) for name, s in block([i for i, h in enumerate(hs) if h.world_id == w]).items()}
                 for w in sorted({h.world_id for h in hs})}
    spread: dict[str, dict] = {"median": {}, "min": {}, "max": {}}
    for name in METHODS:
        for stat, fn in (("median", np.median), ("min", np.min), ("max", np.max)):
            spread[stat][name] = {}
            for k in FIGURES:
                vals = [pw[name][k] for pw in per_world.values() if pw[name][k] is not None]
                spread[stat][name][k] = float(fn(vals)) if vals else None
    return {"pooled": pooled, "worlds": per_world, **spread}


def generate(split: worlds.Split, quick: bool, n_house: int | None = None) -> list[worlds.WorldHousehold]:
    """The split's households with their events (--quick: 2 worlds of 6 households a family)."""
    return worlds.generate(split, worlds_per_family=2 if quick else None,
                           households_per_world=n_house or (6 if quick else None), keep_events=True)


def run(split: worlds.Split, shifts=SHIFTS_H, quick: bool = False, workers: int = 1,
        population_prior: bool = WE.SERVICE_COLD_START_PRIOR) -> dict:
    if split.name != worlds.TUNING.name:
        raise ValueError("bench.utc_offset measures on the TUNING split only")
    t0 = time.time()
    base = generate(split, quick)
    log(f"[utc_offset] {len(base)} households of {len({h.world_id for h in base})} {split.name} worlds "
        f"(seed {split.seed}) {time.time() - t0:.0f}s")
    report: dict = {"split": {"name": split.name, "seed": split.seed, "families": list(split.families),
                              "households": len(base), "worlds": len({h.world_id for h in base}),
                              "quick": quick},
                    "shifts_h": list(shifts), "population_prior": population_prior, "by_shift": {}}
    for h_off in shifts:
        t1 = time.time()
        hs = [shifted(h, h_off) for h in base]
        priors = None
        if population_prior:
            priors = WE.world_priors(hs, lambda n: [shifted(x, h_off) for x in generate(split, quick, n)])
        block = evaluate(hs, priors, workers)
        report["by_shift"][str(h_off)] = block
        p = block["pooled"]
        log(f"[utc_offset] h={h_off:>2}: hearth acc {p['hearth']['session_accuracy']:.3f} size "
            f"{p['hearth']['household_size_exact']:.3f} singles {p['hearth']['single_person_kept']} ece "
            f"{p['hearth']['ece']:.3f}; heuristic {p['device_heuristic']['session_accuracy']:.3f} oracle "
            f"{p['supervised_oracle']['session_accuracy']:.3f}; median over worlds hearth "
            f"{block['median']['hearth']['session_accuracy']:.3f} [{block['min']['hearth']['session_accuracy']:.3f}, "
            f"{block['max']['hearth']['session_accuracy']:.3f}] {time.time() - t1:.0f}s")
    report["elapsed_s"] = round(time.time() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="tuning", choices=["tuning"], help="TUNING worlds only")
    ap.add_argument("--shifts", default=",".join(map(str, SHIFTS_H)), help="UTC offsets in hours, comma-separated")
    ap.add_argument("--quick", action="store_true", help="2 worlds of 6 households per tuning family")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    shifts = tuple(float(s) if "." in s else int(s) for s in args.shifts.split(","))
    print(json.dumps(run(worlds.TUNING, shifts, args.quick, args.workers)))


if __name__ == "__main__":
    main()
