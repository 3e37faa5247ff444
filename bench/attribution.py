"""Attribution benchmark: Hearth's exact Markov vs ChannelAttribution, Shapley, lift.

    python -m bench.attribution [--quick] [--rows N] [--repeats R] [--no-peer]
                                [--lift-households N] [--lift-only]

Prints progress on stderr and ONE JSON object as the last stdout line (keys of
the benchmark conventions, docs/benchmarks.md plus extras). Exit status 0 whether or not targets are met.

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
* Lift: households, sessions and true persons from the clustering simulator (default
  difficulty); each true person gets a channel mix, touches happen during that
  person's sessions and drive that person's conversions. Accuracy = 1 - L1(shares,
  true shares)/2 where truth is the same method on the TRUE person journeys; (a)
  account-level journeys, (b) person-level journeys with Hearth's identity
  resolution (HouseholdModel(variant="gmm") fitted per household, each event taking
  its session's assignment probabilities). ``lift.simulated_resolver`` keeps the
  earlier synthetic variant (2-4 person households, simulated ~0.9-accurate
  calibrated resolver) for comparison. ``--lift-only`` runs just this part.
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
        by_seed = []
        for rep in range(repeats):
            # A different seed per repeat: the repeats also measure the run-to-run spread
            # of its simulated credit (the timing is unaffected by the seed). Seeds 0 and
            # 1 give identical results in 2.2.5 (both the generator's default state), so
            # the seeds are 11, 22, 33, ...
            seed = 11 * (rep + 1)
            t0 = time.perf_counter()
            df = pd.read_csv(file, sep=";")
            t1 = time.perf_counter()
            out = markov_model(df, "path", "total_conversions", var_value="total_conversion_value",
                               var_null="total_null", order=order, verbose=False, flg_pro=False, seed=seed)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            model_times.append(t2 - t1)
            del df
            table = out.set_index("channel_name") if hasattr(out, "set_index") else out["result"].set_index("channel_name")
            by_seed.append(table["total_conversions"].astype(float).to_dict())
        credits = by_seed[0]
        extra = {"credits_by_seed": by_seed}
    return {"times": times, "model_times": model_times, "peak_mb": rss_mb(),
            "peak_after_imports_mb": base_rss, "credits": credits, **extra}


def intervals_worker(file: str, replicates: int) -> dict[str, Any]:
    """Bootstrap cost against the point estimate (order 1, same process, same data),
    the intervals of every method, and the auto order."""
    from services.attribution.domain.api import attribute
    from services.attribution.domain.bootstrap import BootstrapSpec, bootstrap_replicates
    from services.attribution.domain.markov import MarkovConventions, markov_attribution
    from services.attribution.domain.order_selection import choose_order
    from services.attribution.domain.paths import read_paths

    paths = read_paths(file)
    spec = BootstrapSpec(replicates=replicates, seed=0)
    conv = MarkovConventions(order=1)
    t_point, t_boot, t_report, t_report_boot = [], [], [], []
    # Point estimates timed around the (single) bootstrap run, so both see the same load.
    for i in range(2):
        t0 = time.perf_counter()
        markov_attribution(paths, conv)
        t_point.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        attribute(paths, "hybrid", order=1)
        t_report.append(time.perf_counter() - t0)
        if i == 0:
            t0 = time.perf_counter()
            markov_rep, _ = bootstrap_replicates(paths, ["markov"], spec, conventions=conv)["markov"]
            t_boot.append(time.perf_counter() - t0)
    # The same interval under ChannelAttribution's horizon (walks cut after the longest
    # observed walk + 1 states; docs/attribution.md): the one to hold its credit against.
    conv_data = MarkovConventions(order=1, horizon="data")
    data_rep, _ = bootstrap_replicates(paths, ["markov"], spec, conventions=conv_data)["markov"]
    t0 = time.perf_counter()
    report = attribute(paths, "hybrid", order=1, bootstrap=spec)
    t_report_boot.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    selection = choose_order(paths)
    t_auto = time.perf_counter() - t0
    names = report.channel_names
    iv = {m: {n: [float(i.conversions_lower[k]), float(i.conversions_upper[k])] for k, n in enumerate(names)}
          for m, i in report.intervals.items()}
    markov_iv = {n: [float(np.percentile(markov_rep[:, k], 2.5)), float(np.percentile(markov_rep[:, k], 97.5))]
                 for k, n in enumerate(names)}
    data_iv = {n: [float(np.percentile(data_rep[:, k], 2.5)), float(np.percentile(data_rep[:, k], 97.5))]
               for k, n in enumerate(names)}
    point = {"markov": dict(zip(names, markov_attribution(paths, conv).conversions.tolist())),
             "markov_horizon_data": dict(zip(names, markov_attribution(paths, conv_data).conversions.tolist())),
             "hybrid": dict(zip(names, report.conversions.tolist())),
             **{m: dict(zip(names, b["conversions"].tolist())) for m, b in report.baselines.items()}}
    return {
        "replicates": replicates,
        "markov_point_s": statistics.median(t_point),
        "markov_bootstrap_s": statistics.median(t_boot),
        "markov_bootstrap_ratio": statistics.median(t_boot) / statistics.median(t_point),
        "report_point_s": statistics.median(t_report),
        "report_bootstrap_s": t_report_boot[0],
        "report_bootstrap_ratio": t_report_boot[0] / statistics.median(t_report),
        "report_methods": [report.method, *report.baselines],
        "point": point,
        "intervals": {**iv, "markov": markov_iv, "markov_horizon_data": data_iv},
        "auto_order": {**selection.to_dict(), "seconds": t_auto},
        "peak_mb": rss_mb(),
    }


def ca_choose_order(file: Path, rows: int) -> dict[str, Any] | None:
    """ChannelAttribution's choose_order (in-sample penalised ROC AUC) on the first
    ``rows`` paths of the file, beside Hearth's held-out choice on the same rows."""
    sub = file.with_name(f"sub{rows}.csv")
    with open(file, encoding="utf-8") as src, open(sub, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    code = (
        "import json, sys, time\n"
        "import pandas as pd\n"
        "from ChannelAttribution import choose_order\n"
        "df = pd.read_csv(sys.argv[1], sep=';')\n"
        "t = time.perf_counter()\n"
        "res = choose_order(df, 'path', 'total_conversions', 'total_null', max_order=4, plot=False, flg_pro=False)\n"
        "s = time.perf_counter() - t\n"
        "print(json.dumps({'chosen': int(res[2]), 'auc': dict(zip(map(str, res[0]['order'].astype(int)), "
        "res[0]['auc'].astype(float))), 'penalised_auc': dict(zip(map(str, res[0]['order'].astype(int)), "
        "res[0]['pauc'].astype(float))), 'seconds': s}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(sub)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        log(f"ChannelAttribution choose_order failed: {proc.stderr[-1000:]}")
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from services.attribution.domain.order_selection import choose_order
    from services.attribution.domain.paths import read_paths

    t0 = time.perf_counter()
    ours = choose_order(read_paths(sub))
    out = {"rows": rows, "channelattribution": out,
           "hearth": {**ours.to_dict(), "seconds": time.perf_counter() - t0}}
    return out


def seed_spread(by_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Run-to-run spread of ChannelAttribution's credit across seeds, per channel."""
    names = sorted(by_seed[0])
    arr = np.array([[d[n] for n in names] for d in by_seed])
    mean = arr.mean(axis=0)
    rel_range = (arr.max(axis=0) - arr.min(axis=0)) / np.where(mean > 0, mean, 1)
    rel_sd = arr.std(axis=0, ddof=1) / np.where(mean > 0, mean, 1) if len(by_seed) > 1 else np.zeros(len(names))
    return {"seeds": len(by_seed), "max_rel_range": float(rel_range.max()),
            "median_rel_range": float(np.median(rel_range)), "max_rel_sd": float(rel_sd.max()),
            "median_rel_sd": float(np.median(rel_sd)),
            "by_seed": [{n: d[n] for n in names} for d in by_seed]}


def run_worker(kind: str, file: Path, order: int, repeats: int) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "bench.attribution", "--worker", kind, "--file", str(file),
           "--order", str(order), "--repeats", str(repeats)]
    log(f"{kind} order {order}: {repeats} run(s) in a fresh process")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        log(f"{kind} order {order} failed: {proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ca_against_intervals(intervals: dict[str, Any], ca_by_seed: list[dict[str, float]]) -> dict[str, Any]:
    """How ChannelAttribution's order-1 credit (one dict per seed) sits against Hearth's
    95 % bootstrap intervals. Like with like: ChannelAttribution cuts its simulated walks
    after the longest observed walk + 1 states, which is Hearth's ``horizon="data"``;
    the infinite-horizon interval (Hearth's default) is kept beside it for reference
    (until session 18 the only one compared: horizon bias and simulation noise mixed)."""
    out: dict[str, Any] = {"seeds": len(ca_by_seed)}
    for key, label in (("markov_horizon_data", "horizon_data"), ("markov", "infinite_horizon")):
        ci, point = intervals["intervals"][key], intervals["point"][key]
        inside = [[ci[n][0] <= credit[n] <= ci[n][1] for n in ci] for credit in ca_by_seed]
        rel = [[abs(credit[n] - point[n]) / point[n] for n in ci if point[n]] for credit in ca_by_seed]
        half = [(ci[n][1] - ci[n][0]) / 2 / point[n] for n in ci if point[n]]
        out[label] = {"inside_ci_fraction_by_seed": [float(np.mean(i)) for i in inside],
                      "inside_ci_fraction": float(np.mean(inside)),
                      "median_rel_distance_to_point": float(np.median(rel)),
                      "max_rel_distance_to_point": float(np.max(rel)),
                      "median_rel_ci_half_width": float(np.median(half))}
    return out


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

LIFT_CHANNEL_BETA = np.array([0.30, 0.22, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02, 0.01, 0.005])


def simulate_households(n_households: int, seed: int = 2) -> dict[str, Any]:
    """Touches and conversions of households whose members see different channel mixes.

    A touch of channel c makes its person convert within a day with probability
    ``beta_c``; only the person's own touches matter, so account-level journeys
    dilute the converting person's path with other members' touches.
    (Used by the ``simulated_resolver`` extra; the main lift uses real sessions.)
    """
    rng = np.random.default_rng(seed)
    n_channels = 10
    beta = LIFT_CHANNEL_BETA
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


def _share_accuracy(truth, candidates: dict[str, Any]) -> dict[str, dict[str, float]]:
    """1 - ½·L1 between each candidate's channel shares and the truth's, per method
    (Markov order 1 and Shapley, both on the truth's channel list)."""
    from services.attribution.domain.markov import MarkovConventions, markov_attribution
    from services.attribution.domain.shapley import shapley_attribution

    names = truth.paths.channel_names

    def shares(js, method: str) -> np.ndarray:
        p = js.paths.with_channel_names(names)
        res = markov_attribution(p, MarkovConventions(order=1)) if method == "markov" else shapley_attribution(p)
        return res.shares

    out: dict[str, dict[str, float]] = {}
    for method in ("markov", "shapley"):
        true_s = shares(truth, method)
        out[method] = {key: float(1 - 0.5 * np.abs(shares(js, method) - true_s).sum())
                       for key, js in candidates.items()}
    return out


def lift_simulated_resolver(n_households: int) -> dict[str, Any]:
    """The earlier lift: synthetic 2-4 person households, a simulated ~0.9-accurate
    calibrated resolver instead of Hearth's model (kept for comparison)."""
    from services.attribution.domain.journeys import build_journeys

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
    acc = _share_accuracy(truth, {"account_level_accuracy": account, "person_level_accuracy": noisy})
    return {"households": n_households, "touches": len(sim["t_acc"]), "conversions": len(sim["c_acc"]),
            "resolver_touch_accuracy": touch_acc, "resolver_conversion_accuracy": conv_acc,
            "lookback_days": lookback, **acc}


def simulate_touches_on_sessions(households: list, seed: int = 5, touches_per_session: float = 0.2,
                                 conversion_window_days: float = 3.0) -> dict[str, Any]:
    """Touchpoints and conversions attached to the sessions of simulated households.

    Every true person gets a channel mix (Dirichlet(0.25) over 10 channels). A session
    carries Poisson(``touches_per_session``) touches of its person's channels, at times
    within its first 30 minutes (a touch happens during a session, so its identity is
    that session's). A touch of channel c makes its person convert with probability
    ``beta_c`` (:data:`LIFT_CHANNEL_BETA`); the conversion happens in that person's next
    session within ``conversion_window_days`` (a device-bound purchase), or later in the
    same session when there is none. Times are in days since the simulator's epoch.

    Returns column arrays (``t_*`` per touch, ``c_*`` per conversion: account, time,
    channel or value, true person) plus ``*_hh``/``*_sess`` (household index, session
    index) so that the caller can look up each event's identity-resolution answer.
    """
    from services.clustering.domain.simulator import BASE_EPOCH, DAY_S

    rng = np.random.default_rng(seed)
    n_channels = LIFT_CHANNEL_BETA.size
    cols: dict[str, list] = {k: [] for k in ("t_acc", "t_ts", "t_ch", "t_person", "t_hh", "t_sess",
                                              "c_acc", "c_ts", "c_val", "c_person", "c_hh", "c_sess")}
    for hi, h in enumerate(households):
        days = (h.timestamps - BASE_EPOCH) / DAY_S
        mixes = rng.dirichlet(np.full(n_channels, 0.25), size=int(h.person.max()) + 1)
        n_touch = rng.poisson(touches_per_session, h.n_sessions)
        sess = np.repeat(np.arange(h.n_sessions), n_touch)
        person = h.person[sess]
        ts = days[sess] + rng.uniform(0.0, 30.0 / 1440.0, sess.size)
        ch = _categorical(rng, mixes[person])
        fires = rng.random(sess.size) < LIFT_CHANNEL_BETA[ch]
        for s, p, t in zip(sess[fires], person[fires], ts[fires]):
            later = np.flatnonzero((h.person == p) & (days > t) & (days <= t + conversion_window_days))
            if later.size:
                cs = int(later[rng.integers(later.size)])
                ct = float(days[cs] + rng.uniform(0.0, 30.0 / 1440.0))
            else:
                cs, ct = int(s), float(t + rng.uniform(1.0, 60.0) / 1440.0)
            cols["c_acc"].append(h.household_id)
            cols["c_ts"].append(ct)
            cols["c_val"].append(float(rng.gamma(2.0, 10.0)))
            cols["c_person"].append(int(p))
            cols["c_hh"].append(hi)
            cols["c_sess"].append(cs)
        cols["t_acc"] += [h.household_id] * sess.size
        cols["t_ts"] += ts.tolist()
        cols["t_ch"] += [f"c{c}" for c in ch]
        cols["t_person"] += person.tolist()
        cols["t_hh"] += [hi] * sess.size
        cols["t_sess"] += sess.tolist()
    out = {k: (v if k in ("t_acc", "t_ch", "c_acc") else np.asarray(v)) for k, v in cols.items()}
    for k in ("t_person", "t_hh", "t_sess", "c_person", "c_hh", "c_sess"):
        out[k] = out[k].astype(np.int64)
    return out


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (n, C)."""
    if probs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((u[:, None] > cdf).sum(axis=1), probs.shape[1] - 1)


def _ranges_of(order: np.ndarray, bounds: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Event indices of the drawn households (``order`` sorts events by household,
    ``bounds[h]:bounds[h+1]`` is household h's slice) and an account label per event
    that is unique per draw position."""
    lo, hi = bounds[draw], bounds[draw + 1]
    lengths = hi - lo
    pos = np.repeat(np.arange(draw.size), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = order[np.repeat(lo, lengths) + within]
    return idx, [f"b{p}" for p in pos]


def resolve_households(households: list, seed: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Hearth's identity resolution on each household, as the clustering service does
    it: one ``HouseholdModel(variant="gmm")`` fitted on all of the household's sessions,
    then ``assign_batch`` on those sessions. Returns the per-session probability
    matrices (columns = the model's persons, in its ``person_ids`` order) and the
    session accuracy (argmax person, Hungarian-matched to the true persons per
    household, pooled over sessions)."""
    from bench._clustering_eval import matched_correct
    from services.clustering.domain.model import HouseholdModel

    probs: list[np.ndarray] = []
    correct = 0
    sessions = 0
    k_right = 0
    strategies: dict[str, int] = {}
    for h in households:
        batch = HouseholdModel(variant="gmm", seed=seed).fit(h.features).assign_batch(h.features)
        P = np.asarray(batch.probabilities, dtype=np.float64)
        P = P / P.sum(axis=1, keepdims=True)  # exact row sums for build_journeys
        probs.append(P)
        correct += int(matched_correct(h.person, P.argmax(axis=1)).sum())
        sessions += h.n_sessions
        k_right += int(P.shape[1] == h.n_persons)
        strategies[batch.strategy] = strategies.get(batch.strategy, 0) + 1
    return probs, {"session_accuracy": correct / max(sessions, 1),
                   "persons_count_exact_fraction": k_right / max(len(households), 1),
                   "strategies": strategies}


def lift(n_households: int, simulated_resolver_households: int = 3000, seed: int = 11,
         bootstrap: int = 100) -> dict[str, Any]:
    """Attribution lift from Hearth's identity resolution on simulated households.

    Households, sessions and true persons come from the clustering simulator (default
    difficulty, its default drift mix, all household sizes 1-6); touches and
    conversions from :func:`simulate_touches_on_sessions`. Three journey sets over the
    same events (lookback 14 days):

    * reference: person-level journeys with the TRUE person of every event (one-hot);
    * (a) account-level journeys;
    * (b) person-level journeys with Hearth's probabilities: every touch and
      conversion takes the model's assignment probabilities of its session.

    Accuracy = 1 - ½·L1 between a set's channel shares and the reference's, for Markov
    order 1 and Shapley; ``lift`` = (b) - (a) for Markov.
    """
    from services.attribution.domain.journeys import build_journeys
    from services.clustering.domain.simulator import simulate_population

    if n_households < 1:
        raise ValueError(f"n_households must be >= 1, got {n_households}")
    t0 = time.perf_counter()
    households = simulate_population(n_households, seed=seed)
    sim = simulate_touches_on_sessions(households)
    log(f"lift: fitting HouseholdModel on {n_households} households")
    t1 = time.perf_counter()
    session_probs, resolution = resolve_households(households)
    fit_s = time.perf_counter() - t1
    k = max(max(P.shape[1] for P in session_probs), int(max(h.person.max() for h in households)) + 1)

    def model_matrix(hh: np.ndarray, sess: np.ndarray) -> np.ndarray:
        out = np.zeros((hh.size, k))
        for i, (a, s) in enumerate(zip(hh, sess)):
            row = session_probs[a][s]
            out[i, : row.size] = row
        return out

    lookback = 14.0
    tp = model_matrix(sim["t_hh"], sim["t_sess"])
    cp = model_matrix(sim["c_hh"], sim["c_sess"])
    t_true, c_true = np.eye(k)[sim["t_person"]], np.eye(k)[sim["c_person"]]
    t_by_hh = np.argsort(sim["t_hh"], kind="stable")
    c_by_hh = np.argsort(sim["c_hh"], kind="stable")
    t_bounds = np.searchsorted(sim["t_hh"][t_by_hh], np.arange(n_households + 1))
    c_bounds = np.searchsorted(sim["c_hh"][c_by_hh], np.arange(n_households + 1))

    def accuracies(draw: np.ndarray) -> dict[str, dict[str, float]]:
        """Accuracies on the households ``draw`` (indices, repeats allowed: each draw is
        its own account, so a bootstrap resample keeps duplicated households apart)."""
        ti, t_acc = _ranges_of(t_by_hh, t_bounds, draw)
        ci, c_acc = _ranges_of(c_by_hh, c_bounds, draw)
        t_ch = [sim["t_ch"][i] for i in ti]
        common = dict(touch_account=t_acc, touch_ts=sim["t_ts"][ti], touch_channel=t_ch,
                      conv_account=c_acc, conv_ts=sim["c_ts"][ci], conv_value=sim["c_val"][ci],
                      lookback=lookback)
        truth = build_journeys(**common, level="person", touch_person_prob=t_true[ti],
                               conv_person_prob=c_true[ci])
        account = build_journeys(**common, level="account")
        person = build_journeys(**common, level="person", touch_person_prob=tp[ti], conv_person_prob=cp[ci])
        return _share_accuracy(truth, {"account_level_accuracy": account, "person_level_accuracy": person})

    acc = accuracies(np.arange(n_households))
    # Household bootstrap: 95 % intervals of the accuracies and the lift (the events
    # and the resolution are fixed; households are resampled with replacement).
    boot_rng = np.random.default_rng(seed + 1)
    boot: dict[str, list[float]] = {}
    for _ in range(bootstrap):
        b = accuracies(boot_rng.integers(0, n_households, n_households))
        for method, d in b.items():
            for key, v in d.items():
                boot.setdefault(f"{method}.{key}", []).append(v)
            boot.setdefault(f"{method}.lift", []).append(d["person_level_accuracy"] - d["account_level_accuracy"])
    ci95 = {key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for key, v in boot.items()}

    # Touch-level resolution accuracy: argmax person of the touch's session, mapped to a
    # true person by the household's Hungarian match of sessions.
    from bench._clustering_eval import match
    maps = [match(h.person, P.argmax(axis=1), P.shape[1]) for h, P in zip(households, session_probs)]
    touch_right = np.array([maps[a][int(session_probs[a][s].argmax())] == p
                            for a, s, p in zip(sim["t_hh"], sim["t_sess"], sim["t_person"])], dtype=bool)
    sizes = np.array([h.n_persons for h in households])
    log("lift: persona prior on person-level credit")
    persona_block = persona_prior_on_lift(households, sim, tp, cp, t_true, c_true, maps, lookback)
    out: dict[str, Any] = {
        "account_level_accuracy": acc["markov"]["account_level_accuracy"],
        "person_level_accuracy": acc["markov"]["person_level_accuracy"],
        "lift": acc["markov"]["person_level_accuracy"] - acc["markov"]["account_level_accuracy"],
        "markov": acc["markov"],
        "shapley": acc["shapley"],
        "bootstrap_ci95": ci95,
        "bootstrap_resamples": bootstrap,
        "identity_resolution": {**resolution,
                                "touch_accuracy": float(touch_right.mean()) if touch_right.size else None,
                                "fit_s_per_household": fit_s / max(n_households, 1)},
        "households": n_households,
        "multi_person_households": int((sizes >= 2).sum()),
        "mean_persons": float(sizes.mean()),
        "sessions": int(sum(h.n_sessions for h in households)),
        "touches": len(sim["t_acc"]),
        "conversions": len(sim["c_acc"]),
        "lookback_days": lookback,
        "resolver": "HouseholdModel(variant='gmm') per household, default difficulty",
        "persona_prior": persona_block,
    }
    log("lift: simulated-resolver comparison (the earlier synthetic lift)")
    out["simulated_resolver"] = lift_simulated_resolver(simulated_resolver_households)
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---- persona prior -------------------------------------------------------------------


def persona_prior_on_lift(households, sim, tp, cp, t_true, c_true, maps, lookback,
                          kappas=(0.0, 5.0, 20.0)) -> dict[str, Any]:
    """Per-person Markov credit on the lift households, with and without the persona prior.

    Each resolved person (matched to a true person by the household's Hungarian map)
    gets order-1 Markov shares from their resolved journeys, raw (kappa 0) or smoothed
    toward the pooled resolved journeys of every OTHER person whose matched true person
    has the same simulator archetype (the persona). Error = ½·L1 against the same
    method on that true person's TRUE journeys; persons with a true conversion only.
    In this simulation a person's channel mix is drawn independently of the archetype
    (only the conversion effects beta_c are shared), so the persona carries no channel
    information: this measures the prior where personas do not predict channel use.
    """
    from services.attribution.domain.hybrid import smoothed_markov_attribution
    from services.attribution.domain.journeys import build_journeys
    from services.attribution.domain.markov import markov_attribution

    common = dict(touch_account=sim["t_acc"], touch_ts=sim["t_ts"], touch_channel=sim["t_ch"],
                  conv_account=sim["c_acc"], conv_ts=sim["c_ts"], conv_value=sim["c_val"], lookback=lookback)
    truth = build_journeys(**common, level="person", touch_person_prob=t_true, conv_person_prob=c_true)
    resolved = build_journeys(**common, level="person", touch_person_prob=tp, conv_person_prob=cp)
    names = truth.paths.channel_names
    r_paths = resolved.paths.with_channel_names(names)
    hh_of = {h.household_id: i for i, h in enumerate(households)}
    r_hh = np.array([hh_of[str(resolved.accounts[a])] for a in resolved.path_account])
    t_hh = np.array([hh_of[str(truth.accounts[a])] for a in truth.path_account])
    # Persona (archetype) of each resolved journey's matched true person.
    archetypes = sorted({a for h in households for a in h.personas})

    def persona(hi: int, person: int) -> int:
        return archetypes.index(households[hi].personas[person]) if person >= 0 else -1

    r_true = np.array([maps[hi][j] if j < len(maps[hi]) else -1 for hi, j in zip(r_hh, resolved.path_person)])
    r_persona = np.array([persona(hi, p) for hi, p in zip(r_hh, r_true)])
    errors: dict[str, list[float]] = {str(k): [] for k in kappas}
    uniform = np.full(len(names), 1.0 / len(names))
    for hi, j in sorted(set(zip(r_hh.tolist(), resolved.path_person.tolist()))):
        p = maps[hi][j] if j < len(maps[hi]) else -1
        if p < 0:
            continue
        true_sel = (t_hh == hi) & (truth.path_person == p)
        true_paths = truth.paths.select(true_sel).with_channel_names(names)
        if true_paths.conversions.sum() <= 0:
            continue
        target = markov_attribution(true_paths).shares
        mine = (r_hh == hi) & (resolved.path_person == j)
        own = r_paths.select(mine)
        prior = r_paths.select((r_persona == persona(hi, p)) & ~mine)
        for k in kappas:
            est = (markov_attribution(own) if k == 0 or prior.n_paths == 0
                   else smoothed_markov_attribution(own, prior, k)).shares
            est = est if est.sum() > 0 else uniform
            errors[str(k)].append(float(0.5 * np.abs(est - target).sum()))
    return {"persons": len(errors[str(kappas[0])]), "personas": len(archetypes),
            "mean_half_l1_error_by_kappa": {k: float(np.mean(v)) if v else None for k, v in errors.items()}}



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
    ap.add_argument("--lift-households", type=int, default=None,
                    help="households for the identity-resolution lift (default 240; --quick 30)")
    ap.add_argument("--lift-only", action="store_true", help="run only the lift part")
    ap.add_argument("--ca-interval-only", action="store_true",
                    help="run only ChannelAttribution's order-1 credit (--repeats seeds) against Hearth's "
                         "95 %% bootstrap intervals, horizon=\"data\" and infinite")
    ap.add_argument("--replicates", type=int, default=None, help="bootstrap replicates (default 100; --quick 50)")
    ap.add_argument("--worker", choices=("hearth", "channelattribution", "intervals"), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--order", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "intervals":
        print(json.dumps(intervals_worker(args.file, args.repeats or 100)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.file, args.order, args.repeats or 1)))
        return 0

    lift_households = args.lift_households or (30 if args.quick else 240)
    lift_args = dict(n_households=lift_households, simulated_resolver_households=300 if args.quick else 3000,
                     bootstrap=20 if args.quick else 100)
    if args.lift_only:
        log("lift: simulated households with Hearth's identity resolution")
        lift_result = lift(**lift_args)
        print(json.dumps({"quick": bool(args.quick), "lift": lift_result}))
        return 0

    rows = args.rows or (50_000 if args.quick else 1_000_000)
    repeats = args.repeats or (2 if args.quick else 3)
    replicates = args.replicates or (50 if args.quick else 100)
    n_channels = 15
    if args.ca_interval_only:
        return ca_interval_only(rows, n_channels, repeats, replicates)
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
                    peer[f"order{order}_seed_spread"] = seed_spread(p["credits_by_seed"])
                    peer[f"order{order}_credits"] = p["credits"]
            if h:
                hearth[f"order{order}_credits"] = h["credits"]
        log(f"intervals: bootstrap ({replicates} replicates) vs point estimate, auto order")
        iv_cmd = [sys.executable, "-m", "bench.attribution", "--worker", "intervals", "--file", str(file),
                  "--repeats", str(replicates)]
        proc = subprocess.run(iv_cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode == 0:
            result["intervals"] = json.loads(proc.stdout.strip().splitlines()[-1])
            if peer.get("order1_credits"):
                result["intervals"]["channelattribution_order1_vs_markov_ci"] = ca_against_intervals(
                    result["intervals"], peer["order1_seed_spread"]["by_seed"])
        else:
            log(f"intervals worker failed: {proc.stderr[-2000:]}")
        if not args.no_peer:
            log("auto order: ChannelAttribution choose_order vs Hearth on a subsample")
            result["order_choice"] = ca_choose_order(file, 20_000 if args.quick else 100_000)
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
    log("lift: simulated households with Hearth's identity resolution")
    result["lift"] = lift(**lift_args)
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
        "intervals_within_10x_point": (result["intervals"]["markov_bootstrap_ratio"] <= 10.0)
        if result.get("intervals") else None,
    }
    print(json.dumps(result))
    return 0


def ca_interval_only(rows: int, n_channels: int, seeds: int, replicates: int) -> int:
    with tempfile.TemporaryDirectory(prefix="hearth-bench-attr-") as tmp:
        file = Path(tmp) / "paths.csv"
        log(f"generating {rows} paths over {n_channels} channels")
        generate_path_file(file, rows, n_channels)
        p = run_worker("channelattribution", file, 1, seeds)
        log(f"intervals: bootstrap ({replicates} replicates), infinite horizon and horizon=data")
        proc = subprocess.run([sys.executable, "-m", "bench.attribution", "--worker", "intervals", "--file",
                               str(file), "--repeats", str(replicates)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        if p is None or proc.returncode != 0:
            log(f"failed: {proc.stderr[-2000:]}")
            return 1
        intervals = json.loads(proc.stdout.strip().splitlines()[-1])
        exact_data = exact_credits(file, 1, "data", "auto")
        exact_infinite = exact_credits(file, 1, None, "auto")
    print(json.dumps({"rows": rows, "channels": n_channels, "replicates": replicates,
                      "channelattribution_order1_vs_markov_ci": ca_against_intervals(intervals, p["credits_by_seed"]),
                      "channelattribution_seed_spread": {k: v for k, v in seed_spread(p["credits_by_seed"]).items()
                                                         if k != "by_seed"},
                      "channelattribution_max_rel_error_vs_exact_horizon_data": max(
                          max_rel(c, exact_data) for c in p["credits_by_seed"]),
                      # How much the horizon cut itself moves the exact answer on this data.
                      "exact_horizon_data_vs_infinite_max_rel": max_rel(exact_data, exact_infinite)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
