"""Composition change without the fitted persons: change points on the session stream.

Every earlier join/leave test reads the fitted persons' shares (model.py
``_detect_composition``), and even on the *true* persons that share test tops out at 0.74
within 30 sessions on TUNING (docs/benchmarks.md, "Streaming persons: the ceiling"). This
bench measures evidence that does not go through the persons: at each of the stream's
checks (every ``model.RESELECT_EVERY`` sessions from ``2 * MIN_SESSIONS``), the last r
sessions (r in ``LOOKBACK``) against the sessions before them (at least ``MIN_HISTORY``,
at most ``REFERENCE_CAP``), one two-segment log-likelihood ratio per feature group
(``GROUPS``), the largest over r:

- ``hour``: the local start hour in 6 four-hour bins (multinomial);
- ``weekday``: the local weekday, 7 bins (multinomial);
- ``genre``: the genre mix, the sessions' genre shares as soft counts (multinomial);
- ``kids``: the kids share of watch time (Gaussian mean shift, pooled variance);
- ``rate``: the gaps between session starts (exponential: a member more or less watching
  changes the household's session rate);
- ``device``: the device a session is on, every personal device id its own category and
  every shared device one (multinomial: a personal device first seen, or gone silent);
- ``all_sum``: the sum of the six above (one joint change, the groups independent);
- ``energy``: the energy distance between the window's and the reference's sessions, on the
  session vectors (hours, weekday, device type, genres, kids/teen share, length, binge,
  titles) standardised by the reference, times r n_ref / (r + n_ref) (a two-sample
  statistic in the joint feature space: a newcomer's sessions far from every old one);
- ``new_device``: a personal device first seen in the window with at least k sessions there
  (k is the bar; a join);
- ``silent_device``: a personal device with a share of at least 1/(bar) of the reference
  and no session in the window of 30 (a leave).

A detector fires when a group's statistic reaches its bar; it then restarts (the next
tests only look at sessions from the change point it fired at), so one change is one
event. The bars are chosen for an expected run length of at least one quarter per
stable household: on stable households of one TUNING seed, the lowest bar whose false
alarms per household-quarter are within the budget; then checked on the other seed.
An event's kind is the rate's direction (more sessions: a join) for the multinomial
groups, the device's for the device tests; detection counts an event of any kind, as
``_worlds_eval.composition_scores`` does.

``python -m bench.composition_free --seed S --households 80 [--stream-trace F]`` prints
one JSON object: per group and bar the detection within 30 sessions (by kind, delay) and
false alarms per household-quarter on the seed's households (changed ones, then stable
ones up to --households, as ``bench.stream_tuning`` selects them; ``--all-stable`` uses
every stable household for the false alarms), the no-change and periodic-refit
baselines (``--periodic``), and with ``--stream-trace`` (a ``bench.stream_tuning --out``
file of the same seed and households) the real stream's events alone and in union with
each group at its bar. ``--choose-on F`` takes the bars from another seed's output (the
lowest within the budget there) and reports them here. TUNING seeds only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench import _worlds_eval as E
from bench import worlds
from bench.stream_tuning import SUITE_SEED, change_suite, oracle_events, select
from services.clustering.domain import features as F
from services.clustering.domain import model as model_module

LOOKBACK = (10, 15, 20, 25, 30)
MIN_HISTORY = 20          # sessions before a change point (a reference to compare with)
REFERENCE_CAP = 200       # the newest sessions before the window make the reference
HOUR_BINS = 6
SMOOTH = 1.0              # pseudo-sessions added to each segment, spread as the pooled counts are
GROUPS = ("hour", "weekday", "genre", "kids", "rate", "device", "new_device", "silent_device", "all_sum", "energy")
# Bars swept per group (nats; for new_device the sessions on the new device; for
# silent_device the reciprocal of the old share)
BARS = {g: tuple(float(x) for x in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 70, 100))
        for g in ("hour", "weekday", "genre", "kids", "rate", "device", "all_sum")}
BARS["energy"] = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0)
BARS["new_device"] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
BARS["silent_device"] = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
BUDGET = 1.0              # false alarms per household-quarter (issue #10)


def session_table(h: worlds.WorldHousehold) -> dict:
    """What the detectors read of each session, from the features the service keeps
    (local hour and weekday are the features' angles) and the device ids."""
    X = h.features.astype(np.float64)
    hour = np.mod(np.arctan2(X[:, F.HOUR.start], X[:, F.HOUR.start + 1]) * 24 / (2 * np.pi), 24.0)
    dow = np.mod(np.arctan2(X[:, F.DOW.start], X[:, F.DOW.start + 1]) * 7 / (2 * np.pi), 7.0)
    personal = np.isin(h.device_type, worlds.PERSONAL_TYPES)
    dev_names = sorted(set(h.device_id[personal].tolist()))
    code = {d: i + 1 for i, d in enumerate(dev_names)}      # 0: every shared device
    device = np.array([code.get(d, 0) if p else 0 for d, p in zip(h.device_id.tolist(), personal)])
    return {"hour": np.minimum((hour * HOUR_BINS / 24).astype(int), HOUR_BINS - 1),
            "weekday": np.minimum(dow.astype(int), 6),
            "genre": X[:, F.GENRE], "kids": X[:, F.KIDS_SHARE],
            "gap": np.diff(h.start_ts, prepend=h.start_ts[0]) / 3600.0 + 1e-3,
            "device": device, "n_devices": len(dev_names) + 1,
            "vectors": np.delete(X, [F.VPN_SHARE], axis=1)}


def _energy(ref: np.ndarray, win: np.ndarray) -> float:
    """Energy two-sample statistic n1 n2 / (n1 + n2) (2 E|X-Y| - E|X-X'| - E|Y-Y'|), the
    columns standardised by the reference's spread."""
    scale = np.maximum(ref.std(axis=0), 0.05)
    a, b = ref / scale, win / scale
    d = lambda x, y: float(np.sqrt(np.maximum(  # noqa: E731
        (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)).mean())
    n1, n2 = a.shape[0], b.shape[0]
    return max(n1 * n2 / (n1 + n2) * (2 * d(a, b) - d(a, a) - d(b, b)), 0.0)


def _multinomial_llr(old: np.ndarray, new: np.ndarray) -> float:
    """Two-segment multinomial log-likelihood ratio (nats) of soft counts, against one
    distribution for both. Each segment gets ``SMOOTH`` pseudo-sessions spread as the
    pooled counts are (a category one segment lacks is not infinitely unlikely there;
    a flat pseudo-count per category would make a short window look spread out, and
    its ratio grow with the number of categories when nothing changed)."""
    pooled = (old + new + 1e-9) / float((old + new).sum() + 1e-9 * old.size)
    a, b = old + SMOOTH * pooled, new + SMOOTH * pooled
    pool = a + b
    ll = lambda c: float((c * np.log(c / c.sum())).sum())  # noqa: E731
    return max(ll(a) + ll(b) - ll(pool), 0.0)


def _gauss_llr(old: np.ndarray, new: np.ndarray) -> float:
    """Mean shift of a Gaussian with a pooled variance (nats): n1 n2 / (n1 + n2) d^2 / (2 s^2)."""
    n1, n2 = old.size, new.size
    var = max(float(np.concatenate((old, new)).var()), 1e-3)
    d = float(new.mean() - old.mean())
    return n1 * n2 / (n1 + n2) * d * d / (2 * var)


def _rate_llr(old: np.ndarray, new: np.ndarray) -> tuple[float, int]:
    """Exponential gaps, two rates against one (nats), and the direction (+1: more sessions
    in the window, a join)."""
    m1, m2 = float(old.mean()), float(new.mean())
    m = float(np.concatenate((old, new)).mean())
    llr = old.size * np.log(m / m1) + new.size * np.log(m / m2)
    return max(float(llr), 0.0), (1 if m2 < m1 else -1)


def statistics(tab: dict, start: int, n: int) -> list[dict]:
    """At a check with ``n`` sessions, the sessions from ``start`` on usable (a detector's
    restart): per lookback r with a reference of >= MIN_HISTORY sessions, every group's
    statistic (and the rate's direction, the new / silent devices)."""
    out = []
    for r in LOOKBACK:
        w0 = n - r
        if w0 - max(start, 0) < MIN_HISTORY:
            continue
        r0 = max(start, w0 - REFERENCE_CAP)
        ref, win = slice(r0, w0), slice(w0, n)
        s = {"r": r}
        for g, k in (("hour", HOUR_BINS), ("weekday", 7), ("device", tab["n_devices"])):
            s[g] = _multinomial_llr(np.bincount(tab[g][ref], minlength=k).astype(float),
                                    np.bincount(tab[g][win], minlength=k).astype(float))
        s["genre"] = _multinomial_llr(tab["genre"][ref].sum(axis=0), tab["genre"][win].sum(axis=0))
        s["kids"] = _gauss_llr(tab["kids"][ref], tab["kids"][win])
        # the first gap of the reference reaches back before it: dropped
        s["rate"], s["direction"] = _rate_llr(tab["gap"][r0 + 1:w0], tab["gap"][w0:n])
        s["energy"] = _energy(tab["vectors"][ref], tab["vectors"][win])
        s["all_sum"] = sum(s[g] for g in ("hour", "weekday", "genre", "kids", "rate", "device"))
        seen_before = set(np.unique(tab["device"][:w0]).tolist())
        new_counts = np.bincount(tab["device"][win], minlength=tab["n_devices"])
        s["new_device"] = float(max((new_counts[d] for d in range(1, tab["n_devices"])
                                     if d not in seen_before), default=0))
        if r == 30:
            old_counts = np.bincount(tab["device"][ref], minlength=tab["n_devices"])
            share = old_counts[1:] / max(w0 - r0, 1)
            silent = (new_counts[1:] == 0) & (share > 0)
            # the bar is the reciprocal of the old share: share >= 1/bar, silent for 30
            s["silent_device"] = float(1.0 / share[silent].max()) if silent.any() else float("inf")
        out.append(s)
    return out


def check_points(n_sessions: int) -> range:
    return range(2 * model_module.MIN_SESSIONS, n_sessions + 1, model_module.RESELECT_EVERY)


def fires(g: str, s: dict, bar: float) -> bool:
    if g == "silent_device":
        return s.get("silent_device", float("inf")) <= bar
    return s[g] >= bar


def kind_of(g: str, s: dict) -> str:
    if g == "new_device":
        return "join"
    if g == "silent_device":
        return "leave"
    return "join" if s["direction"] > 0 else "leave"


def events(h: worlds.WorldHousehold, g: str, bar: float, tab: dict | None = None,
           cached: list | None = None) -> list[tuple[int, str]]:
    """The events group ``g`` at ``bar`` raises along the stream, with the restart."""
    tab = tab if tab is not None else session_table(h)
    start, out = 0, []
    for i, n in enumerate(check_points(h.n_sessions)):
        stats = cached[i][1] if (cached is not None and start == 0) else statistics(tab, start, n)
        hit = [s for s in stats if fires(g, s, bar)]
        if hit:
            s = max(hit, key=lambda s: s["r"])   # the earliest change point that fires
            out.append((n, kind_of(g, s)))
            start = n - s["r"]
    return out


def score(hs, evs) -> dict:
    sc = E.composition_scores(hs, evs)
    return {k: sc[k] for k in ("detection_rate", "detection_rate_by_kind", "mean_delay_sessions",
                               "false_alarms_per_household_quarter", "false_alarms_per_household_quarter_by_kind",
                               "changes", "stable_household_quarters")}


def union(a: list, b: list) -> list:
    return sorted(set(map(tuple, a)) | set(map(tuple, b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=worlds.TUNING.seed)
    ap.add_argument("--households", type=int, default=80)
    ap.add_argument("--all-stable", action="store_true",
                    help="false alarms over every stable household of the seed's TUNING split")
    ap.add_argument("--stream-trace", default=None, help="a bench.stream_tuning --out file (same seed, households)")
    ap.add_argument("--change-suite", type=int, default=None, metavar="W",
                    help="the join/leave suite of bench.stream_tuning (W worlds per TUNING family, its own seed)")
    ap.add_argument("--periodic", action="store_true", help="also the periodic-refit baseline (slow)")
    ap.add_argument("--choose-on", default=None, help="this bench's output on another seed: take its bars")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.change_suite and args.seed == worlds.TUNING.seed:
        args.seed = SUITE_SEED
    if args.seed in worlds.REPORT_ONLY_SEEDS:
        raise SystemExit(f"--seed: {args.seed} is a report-only seed (worlds.REPORT_ONLY_SEEDS), never used for tuning")
    t0 = time.time()
    split = worlds.TUNING if args.seed == worlds.TUNING.seed else worlds.Split(
        **{**worlds.TUNING.__dict__, "seed": args.seed})
    hs = change_suite(args.change_suite, args.seed) if args.change_suite else select(
        worlds.generate(split), None if args.all_stable else args.households)
    tabs = [session_table(h) for h in hs]
    cached = [[(n, statistics(t, 0, n)) for n in check_points(h.n_sessions)] for h, t in zip(hs, tabs)]
    doc: dict = {"seed": args.seed, "households": len(hs), "change_suite": args.change_suite, "limit": None if args.all_stable else args.households,
                 "baselines": {"no_change": score(hs, [[] for _ in hs]),
                               # the share test on the TRUE persons (its ceiling, bench.stream_tuning)
                               "share_test_true_persons": score(hs, [oracle_events(h) for h in hs])}}
    if args.periodic:
        doc["baselines"]["periodic_refit"] = score(hs, [E.periodic_refit_stream(h) for h in hs])
    per_group: dict = {}
    evs_at: dict = {}
    for g in GROUPS:
        rows = []
        for bar in BARS[g]:
            evs = [events(h, g, bar, t, c) for h, t, c in zip(hs, tabs, cached)]
            evs_at[(g, bar)] = evs
            rows.append({"bar": bar, **score(hs, evs)})
        within = [r for r in rows if (r["false_alarms_per_household_quarter"] or 0) <= BUDGET]
        best = max(within, key=lambda r: (r["detection_rate"], -r["bar"] if g != "silent_device" else r["bar"]),
                   default=None)
        per_group[g] = {"rows": rows, "best_within_budget": best}
    doc["groups"] = per_group
    # either of two detectors (each at a bar of its own): the best pair within the budget
    keys = [k for k in evs_at if any(evs_at[k])]
    best_pair = None
    for i, k1 in enumerate(keys):
        for k2 in keys[i + 1:]:
            if k1[0] == k2[0]:
                continue
            sc = score(hs, [union(a, b) for a, b in zip(evs_at[k1], evs_at[k2])])
            if (sc["false_alarms_per_household_quarter"] or 0) <= BUDGET and (
                    best_pair is None or sc["detection_rate"] > best_pair["detection_rate"]):
                best_pair = {"pair": [list(k1), list(k2)], **sc}
    doc["best_pair_within_budget"] = best_pair
    chosen = None
    if args.choose_on:
        other = json.load(open(args.choose_on))
        chosen = {g: (v["best_within_budget"] or {}).get("bar") for g, v in other["groups"].items()}
        doc["chosen_on"] = {"seed": other["seed"], "bars": chosen,
                            "here": {g: next((r for r in per_group[g]["rows"] if r["bar"] == b), None)
                                     for g, b in chosen.items() if b is not None}}
        pair = (other.get("best_pair_within_budget") or {}).get("pair")
        if pair:
            k1, k2 = (tuple(k) for k in pair)
            doc["chosen_on"]["pair_here"] = {"pair": pair, **score(hs, [union(a, b) for a, b in zip(
                evs_at[k1], evs_at[k2])])}
    if args.stream_trace:
        st = json.load(open(args.stream_trace))
        by_id = {o["id"]: [tuple(e) for e in o["events"]] for o in st["households_detail"]}
        missing = [h.household_id for h in hs if h.household_id not in by_id]
        stream = [by_id.get(h.household_id) for h in hs]
        doc["stream"] = {"missing": len(missing), "alone": score(hs, stream)}
        bars = chosen or {g: (v["best_within_budget"] or {}).get("bar") for g, v in per_group.items()}
        doc["stream"]["union_at_bars"] = {
            g: {"bar": b, **score(hs, [None if s is None else union(s, e) for s, e in zip(stream, evs_at[(g, b)])])}
            for g, b in bars.items() if b is not None}
        # each group at every bar in union with the stream: the best union within the budget
        best_union, union_rows = {}, {}
        for g in GROUPS:
            rows = [{"bar": bar, **score(hs, [None if s is None else union(s, e)
                                              for s, e in zip(stream, evs_at[(g, bar)])])} for bar in BARS[g]]
            within = [r for r in rows if (r["false_alarms_per_household_quarter"] or 0) <= BUDGET]
            best_union[g] = max(within, key=lambda r: r["detection_rate"], default=None)
            union_rows[g] = rows
        doc["stream"]["union_best_within_budget"] = best_union
        doc["stream"]["union_rows"] = union_rows
        # the stream and two detectors (either fires): the best within the budget
        best3 = None
        for i, k1 in enumerate(keys):
            for k2 in keys[i + 1:]:
                if k1[0] == k2[0]:
                    continue
                sc = score(hs, [None if s is None else union(union(s, a), b)
                                for s, a, b in zip(stream, evs_at[k1], evs_at[k2])])
                if (sc["false_alarms_per_household_quarter"] or 0) <= BUDGET and (
                        best3 is None or sc["detection_rate"] > best3["detection_rate"]):
                    best3 = {"pair": [list(k1), list(k2)], **sc}
        doc["stream"]["union_pair_best_within_budget"] = best3
        if args.choose_on and "stream" in other:
            # the other seed's best unions, at its bars, here
            doc["stream"]["union_chosen_on_other_seed"] = {
                g: {"bar": r["bar"], **score(hs, [None if s is None else union(s, e)
                                                  for s, e in zip(stream, evs_at[(g, r["bar"])])])}
                for g, r in other["stream"]["union_best_within_budget"].items() if r}
            p3 = (other["stream"].get("union_pair_best_within_budget") or {}).get("pair")
            if p3:
                k1, k2 = (tuple(k) for k in p3)
                doc["stream"]["union_pair_chosen_on_other_seed"] = {"pair": p3, **score(hs, [
                    None if s is None else union(union(s, a), b) for s, a, b in zip(stream, evs_at[k1], evs_at[k2])])}
    doc["elapsed_s"] = round(time.time() - t0, 1)
    text = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
