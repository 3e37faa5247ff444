"""UTC offset sensitivity: how much person resolution depends on the household's time zone.

``python -m bench.utc_offset --split tuning --workers 1 [--quick] [--shifts 0,3,...] [--send-offset] [--anchor HOUR]``

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

``--send-offset`` (session 23): the events also carry the offset, as a client that knows
its device's time zone sends it (``utc_offset_minutes``; docs/clustering.md "Local
time"). A shift h is then sent as the real offset of the same hour, ``real_offset(h)`` in
[-12, 12) h (h = 21 is UTC-3: the timestamps move by +3 h, the events say -180 min), and
the session builder's local time is the worlds' clock again: every shift's features
equal h = 0's to the bit (checked here, ``assert_features_equal``), and so must its
figures.

``--anchor HOUR`` (session 23): a prototype of a model-side anchor for callers who send
no offset, applied to the features before the fit (``anchored``; docs/benchmarks.md
"Local time", where it is measured).

A measurement only (sessions 22, 23): nothing here changes the model. TUNING split only (it
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
from services.clustering.domain import features as F
from services.clustering.domain.events import MAX_UTC_OFFSET_MINUTES
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


def real_offset(shift_h: float) -> float:
    """The UTC offset in [-12, 12) hours with the same hour of day as ``shift_h`` (21 -> -3)."""
    return float((shift_h + 12.0) % 24.0 - 12.0)


def shifted(h: worlds.WorldHousehold, offset_h: float, send_offset: bool = False) -> worlds.WorldHousehold:
    """``h`` as a household living at UTC offset ``offset_h`` hours sends it (its local
    time being the world's clock): every event's timestamp is local - offset (and, with
    ``send_offset``, every event carries the offset in minutes, within +-14 h), and the
    sessions are rebuilt from the moved events by the service's session builder per
    device (as make_household builds them). The sessions are the same (a common shift
    keeps every gap), so they stay in ``h``'s order with ``h``'s truth; only what the
    builder derives from the timestamps (start/end, session ids, the time features)
    changes. Needs ``h.events`` (``worlds.generate(..., keep_events=True)``)."""
    if h.events is None:
        raise ValueError("shifted needs the household's events (worlds.generate(keep_events=True))")
    d = float(offset_h) * HOUR_S
    extra = {}
    if send_offset:
        minutes = round(60.0 * float(offset_h))
        if minutes != 60.0 * float(offset_h) or abs(minutes) > MAX_UTC_OFFSET_MINUTES:
            raise ValueError(f"a sent offset is whole minutes within +-14 h, not {offset_h} h")
        extra = {"utc_offset_minutes": minutes}
    events = tuple(replace(ev, ts=ev.ts - d, **extra) for ev in h.events)
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


# ---- a model-side anchor for callers who send no offset (session 23, measured) -----------
# The household's viewing day anchored to its quietest hour: every session's time features
# are rotated by the one amount that puts the household's quietest start hour (the minimum
# of a von Mises kernel density of its session starts, on a 15-minute grid) at
# ``target_h``; the weekday angle moves with it (a rotation by delta hours of the week
# circle), so the weekend boundary follows too. A prototype of what the model would do
# on a household's sessions, applied to the features before Hearth's batch fit.
ANCHOR_KAPPA = 15.0          # ~1 h kernel
_GRID = np.arange(96) * 0.25


def quiet_hour(X: np.ndarray, kappa: float = ANCHOR_KAPPA) -> float:
    """The hour (0 <= h < 24, 15-minute grid) of least viewing by session start."""
    angle = np.arctan2(X[:, F.HOUR.start], X[:, F.HOUR.start + 1]).astype(np.float64)
    grid = 2 * np.pi * _GRID / 24.0
    density = np.exp(kappa * np.cos(grid[:, None] - angle[None, :])).sum(axis=1)
    return float(_GRID[int(np.argmin(density))])


def anchored(h: worlds.WorldHousehold, target_h: float, kappa: float = ANCHOR_KAPPA) -> worlds.WorldHousehold:
    """``h`` with its time features rotated so that its quietest hour is ``target_h``."""
    X = h.features.astype(np.float64)
    delta = (target_h - quiet_hour(X, kappa) + 12.0) % 24.0 - 12.0
    out = X.copy()
    for block, turn in ((F.HOUR, 2 * np.pi * delta / 24.0), (F.DOW, 2 * np.pi * delta / 168.0)):
        a = np.arctan2(X[:, block.start], X[:, block.start + 1]) + turn
        out[:, block.start], out[:, block.start + 1] = np.sin(a), np.cos(a)
    return replace(h, features=out.astype(np.float32))


def assert_features_equal(hs: list[worlds.WorldHousehold], base: list[worlds.WorldHousehold]) -> None:
    """With the offset sent, a shifted household's features are its unshifted ones, to the bit."""
    for a, b in zip(hs, base):
        if a.features.tobytes() != b.features.tobytes():
            raise AssertionError(f"{a.household_id}: features moved with the offset although it was sent")


def run(split: worlds.Split, shifts=SHIFTS_H, quick: bool = False, workers: int = 1,
        population_prior: bool = WE.SERVICE_COLD_START_PRIOR, send_offset: bool = False,
        anchor_h: float | None = None) -> dict:
    if split.name != worlds.TUNING.name:
        raise ValueError("bench.utc_offset measures on the TUNING split only")
    t0 = time.time()
    base = generate(split, quick)
    log(f"[utc_offset] {len(base)} households of {len({h.world_id for h in base})} {split.name} worlds "
        f"(seed {split.seed}) {time.time() - t0:.0f}s")
    report: dict = {"split": {"name": split.name, "seed": split.seed, "families": list(split.families),
                              "households": len(base), "worlds": len({h.world_id for h in base}),
                              "quick": quick},
                    "shifts_h": list(shifts), "population_prior": population_prior, "send_offset": send_offset,
                    "by_shift": {}}
    if send_offset:
        report["sent_offset_h"] = {str(h_off): real_offset(h_off) for h_off in shifts}
    if anchor_h is not None:
        report["anchor_h"] = anchor_h

    def prepare(hh: list[worlds.WorldHousehold], move: float) -> list[worlds.WorldHousehold]:
        out = [shifted(x, move, send_offset) for x in hh]
        return [anchored(x, anchor_h) for x in out] if anchor_h is not None else out

    for h_off in shifts:
        t1 = time.time()
        move = real_offset(h_off) if send_offset else h_off
        hs = prepare(base, move)
        if send_offset and anchor_h is None:
            assert_features_equal(hs, base)
        priors = None
        if population_prior:
            priors = WE.world_priors(hs, lambda n: prepare(generate(split, quick, n), move))
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
    ap.add_argument("--send-offset", action="store_true",
                    help="the events carry the offset (utc_offset_minutes), a shift sent as its real offset in [-12, 12) h")
    ap.add_argument("--anchor", type=float, default=None, metavar="HOUR",
                    help="rotate each household's time features so that its quietest hour is HOUR (a prototype)")
    args = ap.parse_args(argv)
    shifts = tuple(float(s) if "." in s else int(s) for s in args.shifts.split(","))
    print(json.dumps(run(worlds.TUNING, shifts, args.quick, args.workers, send_offset=args.send_offset,
                         anchor_h=args.anchor)))


if __name__ == "__main__":
    main()
