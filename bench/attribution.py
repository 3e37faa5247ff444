"""Attribution benchmark: Hearth's exact Markov vs ChannelAttribution, Shapley, lift.

    python -m bench.attribution [--quick] [--rows N] [--repeats R] [--no-peer]

Prints progress on stderr and ONE JSON object as the last stdout line (keys of
/work/shared/BENCHMARKS.md plus extras). Exit status 0 whether or not targets are met.

* Speed/memory: a path file of ``rows`` paths over 15 channels is generated once;
  each (library, order) runs in a FRESH subprocess (so peak RSS is that run's own,
  measured as VmHWM from /proc/self/status) ``repeats`` times; times are medians.
  ``order1_s``/``order3_s`` are end to end from the file (Hearth: read_paths +
  markov_attribution; ChannelAttribution: pandas.read_csv + markov_model at its
  defaults); ``*_model_s`` exclude reading.
* Exactness: Hearth's default solver is compared with an independent solver path
  (per-channel sparse LU); ChannelAttribution with the exact answer under its own
  horizon convention (``horizon="data"``).
* Shapley: 1,000,000 paths x 50 channels, closed form, median of repeats.
* Lift: simulated households (2-4 persons with different channel mixes); accuracy =
  1 - L1(shares, true shares)/2 where truth is the same method on the TRUE person
  journeys; (a) account-level journeys, (b) person-level journeys with a simulated
  calibrated identity resolver (~0.9 accurate).
* Persona prior: attribution error of sparse person chains with and without the
  Dirichlet persona prior, against each person's true chain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def log(msg: str) -> None:
    print(f"[bench.attribution] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Peak RSS of THIS process image in MB.

    /proc's VmHWM belongs to the current address space; ru_maxrss is not usable in a
    child started by vfork+exec because Linux carries the parent's high-water mark
    across execve into it (both peers then showed the parent's peak).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- data ----------------------------------------------------------------------------


def generate_path_file(path: Path, rows: int, n_channels: int = 15, seed: int = 0) -> None:
    """Paths from a first-order chain with channel-specific conversion propensity."""
    rng = np.random.default_rng(seed)
    names = [f"ch{i:02d}" for i in range(n_channels)]
    lengths = np.minimum(rng.geometric(0.3, rows), 25)
    total = int(lengths.sum())
    popularity = rng.dirichlet(np.full(n_channels, 2.0))
    codes = rng.choice(n_channels, size=total, p=popularity)
    # Persistence: a touch repeats the previous channel 30 % of the time.
    repeat = rng.random(total) < 0.3
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    repeat[starts] = False
    idx = np.arange(total)
    last_fresh = np.maximum.accumulate(np.where(repeat, 0, idx))
    codes = codes[last_fresh]
    propensity = rng.uniform(0.02, 0.25, n_channels)
    row = np.repeat(np.arange(rows), lengths)
    log_no = np.bincount(row, weights=np.log1p(-propensity[codes]), minlength=rows)
    p_conv = 1.0 - np.exp(log_no)
    n_users = rng.integers(1, 6, rows)
    conv = rng.binomial(n_users, p_conv)
    nulls = n_users - conv
    value = np.round(conv * rng.gamma(2.0, 15.0, rows), 2)
    name_arr = np.array(names)
    labels = name_arr[codes]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("path;total_conversions;total_conversion_value;total_null\n")
        off = np.concatenate(([0], np.cumsum(lengths)))
        block = 100_000
        for b in range(0, rows, block):
            lines = []
            for i in range(b, min(rows, b + block)):
                lines.append(f"{' > '.join(labels[off[i]:off[i + 1]])};{conv[i]};{value[i]};{nulls[i]}")
            fh.write("\n".join(lines) + "\n")


# ---- workers (run in fresh subprocesses) ---------------------------------------------


def worker(kind: str, file: str, order: int, repeats: int) -> dict[str, Any]:
    base_rss = rss_mb()
    times, model_times = [], []
    credits: dict[str, float] = {}
    if kind == "hearth":
        from services.attribution.domain.markov import MarkovConventions, markov_attribution
        from services.attribution.domain.paths import read_paths

        base_rss = rss_mb()
        for _ in range(repeats):
            t0 = time.perf_counter()
            paths = read_paths(file)
            t1 = time.perf_counter()
            res = markov_attribution(paths, MarkovConventions(order=order))
            t2 = time.perf_counter()
            times.append(t2 - t0)
            model_times.append(t2 - t1)
            del paths
        credits = dict(zip(res.channel_names, res.conversions.tolist()))
        extra = {"solver": res.solver, "n_states": res.n_states}
    else:
        import pandas as pd
        from ChannelAttribution import markov_model

        base_rss = rss_mb()
        for _ in range(repeats):
            t0 = time.perf_counter()
            df = pd.read_csv(file, sep=";")
            t1 = time.perf_counter()
            out = markov_model(df, "path", "total_conversions", var_value="total_conversion_value",
                               var_null="total_null", order=order, verbose=False, flg_pro=False)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            model_times.append(t2 - t1)
            del df
        table = out.set_index("channel_name") if hasattr(out, "set_index") else out["result"].set_index("channel_name")
        credits = table["total_conversions"].astype(float).to_dict()
        extra = {}
    return {"times": times, "model_times": model_times, "peak_mb": rss_mb(),
            "peak_after_imports_mb": base_rss, "credits": credits, **extra}


def run_worker(kind: str, file: Path, order: int, repeats: int) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "bench.attribution", "--worker", kind, "--file", str(file),
           "--order", str(order), "--repeats", str(repeats)]
    log(f"{kind} order {order}: {repeats} run(s) in a fresh process")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        log(f"{kind} order {order} failed: {proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- exactness -----------------------------------------------------------------------


def exact_credits(file: Path, order: int, horizon: Any, solver: str) -> dict[str, float]:
    from services.attribution.domain.markov import MarkovConventions, markov_attribution
    from services.attribution.domain.paths import read_paths

    res = markov_attribution(read_paths(file), MarkovConventions(order=order, horizon=horizon, solver=solver))
    return dict(zip(res.channel_names, res.conversions.tolist()))


def max_abs(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in b)


def max_rel(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b if b[k] != 0)


# ---- shapley -------------------------------------------------------------------------


def shapley_timing(rows: int, n_channels: int, repeats: int) -> float:
    from services.attribution.domain.paths import Paths
    from services.attribution.domain.shapley import shapley_attribution

    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.geometric(0.25, rows), 30)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    paths = Paths(rng.integers(0, n_channels, offsets[-1]).astype(np.int32), offsets,
                  rng.integers(0, 3, rows).astype(float), rng.random(rows) * 20, rng.integers(0, 3, rows).astype(float))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        shapley_attribution(paths)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- lift from person-level journeys ---------------------------------------------------


def simulate_households(n_households: int, seed: int = 2) -> dict[str, Any]:
    """Touches and conversions of households whose members see different channel mixes.

    A touch of channel c makes its person convert within a day with probability
    ``beta_c``; only the person's own touches matter, so account-level journeys
    dilute the converting person's path with other members' touches.
    """
    rng = np.random.default_rng(seed)
    n_channels = 10
    beta = np.array([0.30, 0.22, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02, 0.01, 0.005])
    horizon_days = 90.0
    t_acc, t_ts, t_ch, t_person, t_size = [], [], [], [], []
    c_acc, c_ts, c_val, c_person, c_size = [], [], [], [], []
    for h in range(n_households):
        k = int(rng.integers(2, 5))
        for person in range(k):
            mix = rng.dirichlet(np.full(n_channels, 0.25))
            n_touch = int(rng.poisson(10))
            ts = np.sort(rng.uniform(0, horizon_days, n_touch))
            ch = rng.choice(n_channels, n_touch, p=mix)
            t_acc += [f"h{h}"] * n_touch
            t_ts += ts.tolist()
            t_ch += [f"c{c}" for c in ch]
            t_person += [person] * n_touch
            t_size += [k] * n_touch
            fires = rng.random(n_touch) < beta[ch]
            for t in ts[fires]:
                c_acc.append(f"h{h}")
                c_ts.append(float(t + rng.uniform(0.01, 1.0)))
                c_val.append(float(rng.gamma(2.0, 10.0)))
                c_person.append(person)
                c_size.append(k)
    return {"t_acc": t_acc, "t_ts": np.array(t_ts), "t_ch": t_ch, "t_person": np.array(t_person),
            "t_size": np.array(t_size), "c_acc": c_acc, "c_ts": np.array(c_ts), "c_val": np.array(c_val),
            "c_person": np.array(c_person), "c_size": np.array(c_size)}


def resolver_probabilities(true_person: np.ndarray, size: np.ndarray, accuracy: float, rng) -> tuple[np.ndarray, float]:
    """Calibrated person probabilities: confidence c ~ Beta with mean ``accuracy``; the
    predicted person is right with probability c; the rest (1-c) is spread evenly."""
    n = true_person.size
    conf = rng.beta(accuracy * 10, (1 - accuracy) * 10, n)
    right = rng.random(n) < conf
    offset = rng.integers(1, np.maximum(size, 2))  # a different member when wrong
    predicted = np.where(right, true_person, (true_person + offset) % size)
    probs = np.zeros((n, 4))
    for j in range(4):
        probs[:, j] = np.where(j < size, (1 - conf) / (size - 1), 0.0)
    probs[np.arange(n), predicted] = conf
    return probs, float(right.mean())


def lift(n_households: int) -> dict[str, Any]:
    from services.attribution.domain.journeys import build_journeys
    from services.attribution.domain.markov import MarkovConventions, markov_attribution
    from services.attribution.domain.shapley import shapley_attribution

    sim = simulate_households(n_households)
    rng = np.random.default_rng(3)
    one_hot_t = np.eye(4)[sim["t_person"]]
    one_hot_c = np.eye(4)[sim["c_person"]]
    lookback = 14.0
    common = dict(touch_account=sim["t_acc"], touch_ts=sim["t_ts"], touch_channel=sim["t_ch"],
                  conv_account=sim["c_acc"], conv_ts=sim["c_ts"], conv_value=sim["c_val"], lookback=lookback)
    truth = build_journeys(**common, level="person", touch_person_prob=one_hot_t, conv_person_prob=one_hot_c)
    account = build_journeys(**common, level="account")
    tp, touch_acc = resolver_probabilities(sim["t_person"], sim["t_size"], 0.9, rng)
    cp, conv_acc = resolver_probabilities(sim["c_person"], sim["c_size"], 0.9, rng)
    noisy = build_journeys(**common, level="person", touch_person_prob=tp, conv_person_prob=cp)
    names = truth.paths.channel_names
    out: dict[str, Any] = {"households": n_households, "touches": len(sim["t_acc"]),
                           "conversions": len(sim["c_acc"]), "resolver_touch_accuracy": touch_acc,
                           "resolver_conversion_accuracy": conv_acc, "lookback_days": lookback}

    def shares(js, method: str) -> np.ndarray:
        p = js.paths.with_channel_names(names)
        res = markov_attribution(p, MarkovConventions(order=1)) if method == "markov" else shapley_attribution(p)
        return res.shares

    for method in ("markov", "shapley"):
        true_s = shares(truth, method)
        acc_a = 1 - 0.5 * np.abs(shares(account, method) - true_s).sum()
        acc_p = 1 - 0.5 * np.abs(shares(noisy, method) - true_s).sum()
        if method == "markov":
            out["account_level_accuracy"] = float(acc_a)
            out["person_level_accuracy"] = float(acc_p)
            out["lift"] = float(acc_p - acc_a)
        out[method] = {"account_level_accuracy": float(acc_a), "person_level_accuracy": float(acc_p)}
    return out


# ---- persona prior -------------------------------------------------------------------


def persona_prior_effect(n_persons: int, journeys_per_person: int, kappas: list[float], seed: int = 4) -> dict[str, Any]:
    """Error of person-level Markov shares vs the person's TRUE chain, with/without prior."""
    import scipy.sparse as sp

    from services.attribution.domain.hybrid import smoothed_markov_attribution
    from services.attribution.domain.markov import markov_attribution, solve_removal_effects
    from services.attribution.domain.paths import Paths, concat_paths

    rng = np.random.default_rng(seed)
    n_ch = 6
    names = tuple(f"c{i}" for i in range(n_ch))

    def random_chain(base: np.ndarray | None) -> np.ndarray:
        # Rows: channels then start; columns: channels, conversion, null. No self-loops.
        out = np.zeros((n_ch + 1, n_ch + 2))
        for s in range(n_ch + 1):
            alpha = np.full(n_ch + 2, 0.8) if base is None else base[s] * 60 + 1e-3
            if s < n_ch:
                alpha[s] = 1e-9
            if s == n_ch:
                alpha[n_ch:] = 1e-9  # start never absorbs immediately
            row = rng.dirichlet(alpha)
            if s < n_ch:
                row[s] = 0.0
            if s == n_ch:
                row[n_ch:] = 0.0
            out[s] = row / row.sum()
        return out

    def true_shares(chain: np.ndarray) -> np.ndarray:
        probs = sp.csr_matrix(np.hstack((chain[:, :n_ch], np.zeros((n_ch + 1, 1)), chain[:, n_ch:])))
        eff = solve_removal_effects(probs, sp.identity(n_ch, format="csr", dtype=bool), np.zeros(n_ch + 1))
        re = np.clip(eff.removal_conversion, 0, None)
        return re / re.sum()

    def sample(chain: np.ndarray, n: int) -> Paths:
        paths, conv, nulls = [], [], []
        for _ in range(n):
            s, walk = n_ch, []
            while True:
                nxt = rng.choice(n_ch + 2, p=chain[s])
                if nxt >= n_ch or len(walk) > 30:
                    break
                walk.append(names[nxt])
                s = nxt
            paths.append(walk)
            conv.append(1.0 if nxt == n_ch else 0.0)
            nulls.append(0.0 if nxt == n_ch else 1.0)
        return Paths.from_lists(paths, conv, nulls=nulls, channel_names=names)

    n_personas = 4
    personas = [random_chain(None) for _ in range(n_personas)]
    members = [(p, random_chain(personas[p])) for p in range(n_personas) for _ in range(n_persons // n_personas)]
    data = [sample(chain, journeys_per_person) for _, chain in members]
    errors: dict[str, list[float]] = {str(k): [] for k in kappas}
    for i, (persona, chain) in enumerate(members):
        truth = true_shares(chain)
        others = [data[j] for j, (q, _) in enumerate(members) if q == persona and j != i]
        prior = concat_paths(others)
        for k in kappas:
            if k == 0:
                est = markov_attribution(data[i]).shares
            else:
                est = smoothed_markov_attribution(data[i], prior, k).shares
            if est.sum() == 0:  # no conversion observed: fall back to uniform shares
                est = np.full(n_ch, 1 / n_ch)
            errors[str(k)].append(float(0.5 * np.abs(est - truth).sum()))
    return {"persons": len(members), "journeys_per_person": journeys_per_person,
            "mean_half_l1_error_by_kappa": {k: float(np.mean(v)) for k, v in errors.items()}}


# ---- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attribution")
    ap.add_argument("--quick", action="store_true", help="small version (< 60 s)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip ChannelAttribution")
    ap.add_argument("--worker", choices=("hearth", "channelattribution"), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--order", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.file, args.order, args.repeats or 1)))
        return 0

    rows = args.rows or (50_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    n_channels = 15
    result: dict[str, Any] = {"rows": rows, "channels": n_channels, "quick": bool(args.quick),
                              "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-attr-") as tmp:
        file = Path(tmp) / "paths.csv"
        log(f"generating {rows} paths over {n_channels} channels")
        generate_path_file(file, rows, n_channels)
        result["file_mb"] = round(file.stat().st_size / 2**20, 1)
        hearth: dict[str, Any] = {}
        peer: dict[str, Any] = {}
        peaks_h, peaks_p = [], []
        for order in (1, 3):
            h = run_worker("hearth", file, order, repeats)
            if h:
                hearth[f"order{order}_s"] = statistics.median(h["times"])
                hearth[f"order{order}_model_s"] = statistics.median(h["model_times"])
                hearth[f"order{order}_peak_mb"] = h["peak_mb"]
                hearth[f"order{order}_states"] = h["n_states"]
                hearth[f"order{order}_solver"] = h["solver"]
                peaks_h.append(h["peak_mb"])
                log(f"exact reference for order {order} (sparse LU per channel)")
                ref = exact_credits(file, order, None, "sparse_lu")
                err = max_abs(h["credits"], ref)
                hearth["max_abs_error_vs_exact"] = max(hearth.get("max_abs_error_vs_exact", 0.0), err)
                hearth[f"order{order}_max_abs_error_vs_exact"] = err
            if not args.no_peer:
                p = run_worker("channelattribution", file, order, repeats)
                if p:
                    peer[f"order{order}_s"] = statistics.median(p["times"])
                    peer[f"order{order}_model_s"] = statistics.median(p["model_times"])
                    peer[f"order{order}_peak_mb"] = p["peak_mb"]
                    peaks_p.append(p["peak_mb"])
                    exact_ca = exact_credits(file, order, "data", "auto")
                    rel = max_rel(p["credits"], exact_ca)
                    peer["max_rel_error_vs_exact"] = max(peer.get("max_rel_error_vs_exact", 0.0), rel)
                    peer[f"order{order}_max_rel_error_vs_exact"] = rel
                    if h:
                        peer[f"order{order}_max_rel_error_vs_exact_infinite_horizon"] = max_rel(p["credits"], ref)
        if peaks_h:
            hearth["peak_mb"] = max(peaks_h)
        if peaks_p:
            peer["peak_mb"] = max(peaks_p)
        result["hearth"] = hearth
        result["channelattribution"] = peer if peer else None
        if hearth and peer:
            result["ratios"] = {
                "order1_speedup": peer["order1_s"] / hearth["order1_s"],
                "order3_speedup": peer["order3_s"] / hearth["order3_s"],
                "order1_model_speedup": peer["order1_model_s"] / hearth["order1_model_s"],
                "order3_model_speedup": peer["order3_model_s"] / hearth["order3_model_s"],
                "peak_mb_ratio": hearth["peak_mb"] / peer["peak_mb"],
            }
    sh_rows = 100_000 if args.quick else 1_000_000
    log(f"shapley {sh_rows} paths x 50 channels")
    result["shapley_rows"] = sh_rows
    result["shapley_1m_50ch_s"] = shapley_timing(sh_rows, 50, 3 if args.quick else 5)
    log("lift: simulated households")
    result["lift"] = lift(300 if args.quick else 3000)
    log("persona prior effect")
    result["persona_prior"] = persona_prior_effect(
        40 if args.quick else 200, 12, [0.0, 1.0, 5.0, 20.0, 100.0]
    )
    r = result.get("ratios", {})
    result["targets"] = {
        "order1_speedup_ge_1_5": (r.get("order1_speedup", 0) >= 1.5) if r else None,
        "order3_not_slower": (r.get("order3_speedup", 0) >= 1.0) if r else None,
        "peak_memory_below_peer": (r.get("peak_mb_ratio", 9) < 1.0) if r else None,
        "shapley_under_2s": result["shapley_1m_50ch_s"] < 2.0,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
