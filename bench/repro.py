"""Is a household's model the same whatever the process did before it? (TUNING only.)

``python -m bench.repro [--households N] [--seed S] [--shuffle-seed R] [--no-alone] [--out F]``
streams TUNING households (bench/worlds.py; ``bench.stream_tuning``'s selection: every
household with a member joining or leaving, then stable ones up to N) through
``_worlds_eval.ServiceStream`` — the clustering service's own refresh decision, one
session per arrival — and fits each once in full (``HouseholdModel.fit``, the batch fit),
in four process contexts:

* ``alone``: each household in a fresh interpreter of its own (a ``spawn`` pool, one
  task per child: nothing ran before it but the imports; ``--alone-start fork``: a child
  forked per household from the parent, which has fitted nothing at that point);
* ``batch``: every household one after another in one process, in selection order;
* ``reversed``: the same in reverse order, in another process;
* ``shuffled``: the same in a seeded random order (``--shuffle-seed``), in another process.

For each household and context it records everything the model answers and every score
a decision read: the person id answered at arrival and the probabilities (every session),
the settled answers (what GET /v1/household shows at the end), the final person count, the
stored model's bytes (``HouseholdModel.to_bytes``, SHA-256), the service's drift alarms and
refits, every person-count selection's BIC scores (``fit_select_k``, wrapped while the
household runs) and the batch fit's answers, count and scores. The last line is a JSON
object: per context, the households whose record differs from ``alone``'s in anything, and
for those the largest probability and score differences and the sessions answered with
another id. Heavy: ``OMP_NUM_THREADS=1 nice -n 10``.

Written in session 35 (repro35) for the reproducibility question count34 raised (docs/benchmarks.md,
"A household's model does not depend on the process's history").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time

import numpy as np

from bench import _worlds_eval as E
from bench._common import emit
from bench import worlds
from bench.stream_tuning import select
from services.clustering.domain import model as model_module

CONTEXTS = ("alone", "batch", "reversed", "shuffled")


class _Scores:
    """Every ``fit_select_k`` the model module calls while installed: its BIC scores."""

    def __init__(self) -> None:
        self.calls: list[dict[int, float]] = []
        self._orig = None

    def __enter__(self) -> _Scores:
        self._orig = orig = model_module.fit_select_k

        def recorded(*a, **kw):
            sel = orig(*a, **kw)
            self.calls.append({int(k): float(v) for k, v in sel.scores.items()})
            return sel
        model_module.fit_select_k = recorded
        return self

    def __exit__(self, *exc) -> None:
        model_module.fit_select_k = self._orig


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def record(h: worlds.WorldHousehold) -> dict:
    """One household streamed and batch-fitted: everything it answers and every score."""
    ids: list[str] = []
    probs: list[dict[str, float]] = []
    with _Scores() as stream_scores:
        stream = E.ServiceStream(h)
        for _a, _b, m, out, _ev in stream.arrivals():
            probs += [{pid: float(p) for pid, p in zip(out.person_ids, row)} for row in out.probabilities]
            ids += [out.person_ids[int(i)] for i in out.person_index]
            m.birth_statistics = None
        settled = stream.settled()
    names = sorted({k for p in probs for k in p})
    with _Scores() as batch_scores:
        bm = model_module.HouseholdModel().fit(h.features, device_ids=h.device_id)
        b = bm.assign_batch(h.features, device_ids=h.device_id, included=True)
    return {"id": h.household_id,
            "ids": ids, "names": names, "probs": E.columns(probs, names).tolist(),
            "settled_index": np.asarray(settled.person_index).tolist(),
            "settled_probs": np.asarray(settled.probabilities).tolist(),
            "final_persons": int(stream.envelope.model.n_persons),
            "model_sha": hashlib.sha256(stream.envelope.model.to_bytes()).hexdigest()[:16],
            "drift": stream.drift, "refits": stream.refits,
            "scores": stream_scores.calls,
            "batch_index": np.asarray(b.person_index).tolist(),
            "batch_probs": np.asarray(b.probabilities).tolist(),
            "batch_persons": int(bm.n_persons),
            "batch_model_sha": hashlib.sha256(bm.to_bytes()).hexdigest()[:16],
            "batch_scores": batch_scores.calls}


def _in_order(hs: list[worlds.WorldHousehold], order: list[int]) -> dict[str, dict]:
    return {hs[i].household_id: record(hs[i]) for i in order}


def run_context(hs: list[worlds.WorldHousehold], order: list[int]) -> dict[str, dict]:
    """The households of ``order`` one after another in one fresh process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_order, (hs, order))


def run_alone(hs: list[worlds.WorldHousehold], start: str = "spawn") -> dict[str, dict]:
    """Each household in a fresh process of its own: a new interpreter (``spawn``), or
    (``fork``, ~10 s less per household) a child forked from this process, which has fitted
    nothing yet when ``main`` runs this first."""
    with multiprocessing.get_context(start).Pool(1, maxtasksperchild=1) as pool:
        return {r["id"]: r for r in pool.map(record, hs, chunksize=1)}


def _max_abs(a, b) -> float | None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else (None if a.shape != b.shape else 0.0)


def _score_diff(a: list[dict], b: list[dict]) -> float | None:
    if len(a) != len(b) or any(x.keys() != y.keys() for x, y in zip(a, b)):
        return None   # another sequence of selections: not comparable score by score
    d = [abs(x[k] - y[k]) for x, y in zip(a, b) for k in x]
    return max(d) if d else 0.0


def compare(ref: dict, other: dict) -> dict | None:
    """What differs between two records of one household (None: nothing, to the bit)."""
    fields = ("ids", "names", "probs", "settled_index", "settled_probs", "final_persons", "model_sha", "drift",
              "refits", "scores", "batch_index", "batch_probs", "batch_persons", "batch_model_sha", "batch_scores")
    differ = [f for f in fields if json.dumps(ref[f]) != json.dumps(other[f])]
    if not differ:
        return None
    return {"fields": differ,
            "sessions_other_id_at_arrival": int(sum(x != y for x, y in zip(ref["ids"], other["ids"]))),
            "max_abs_prob_at_arrival": _max_abs(ref["probs"], other["probs"]),
            "max_abs_prob_settled": _max_abs(ref["settled_probs"], other["settled_probs"]),
            "final_persons": [ref["final_persons"], other["final_persons"]],
            "max_abs_score": _score_diff(ref["scores"], other["scores"]),
            "max_abs_batch_prob": _max_abs(ref["batch_probs"], other["batch_probs"]),
            "max_abs_batch_score": _score_diff(ref["batch_scores"], other["batch_scores"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--households", type=int, default=None, help="at most this many (stream_tuning's selection)")
    ap.add_argument("--seed", type=int, default=worlds.TUNING.seed, help="a TUNING-seed world set")
    ap.add_argument("--shuffle-seed", type=int, default=35)
    ap.add_argument("--no-alone", action="store_true", help="skip the fresh process per household")
    ap.add_argument("--alone-start", choices=("spawn", "fork"), default="spawn",
                    help="alone: a new interpreter per household, or a fork of this process before it fits anything")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    if args.seed in worlds.REPORT_ONLY_SEEDS:
        raise SystemExit(f"--seed: {args.seed} is a report-only seed (worlds.REPORT_ONLY_SEEDS), never read here")
    split = worlds.TUNING if args.seed == worlds.TUNING.seed else worlds.Split(
        **{**worlds.TUNING.__dict__, "seed": args.seed})
    hs = select(worlds.generate(split), args.households)
    n = len(hs)
    orders = {"batch": list(range(n)), "reversed": list(range(n))[::-1],
              "shuffled": [int(i) for i in np.random.default_rng(args.shuffle_seed).permutation(n)]}
    runs: dict[str, dict[str, dict]] = {}
    elapsed: dict[str, float] = {}
    for ctx in CONTEXTS:
        if ctx == "alone" and args.no_alone:
            continue
        t = time.time()
        runs[ctx] = run_alone(hs, args.alone_start) if ctx == "alone" else run_context(hs, orders[ctx])
        elapsed[ctx] = round(time.time() - t, 1)
    ref_ctx = "alone" if "alone" in runs else "batch"
    ref = runs[ref_ctx]
    result = {}
    for ctx, recs in runs.items():
        if ctx == ref_ctx:
            continue
        diffs = {hid: d for hid in ref if (d := compare(ref[hid], recs[hid])) is not None}
        result[ctx] = {"households_differing": len(diffs), "differing": diffs}
    doc = {"split": "tuning", "seed": args.seed, "households": n, "reference": ref_ctx,
           "alone_start": None if args.no_alone else args.alone_start,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "shuffle_seed": args.shuffle_seed,
           "compared": result,
           "stream_persons": {hid: r["final_persons"] for hid, r in ref.items()},
           "elapsed_s": {**elapsed, "total": round(time.time() - t0, 1)}}
    emit(doc, args.out)


if __name__ == "__main__":
    main()
