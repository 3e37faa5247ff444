"""What explicit feedback does to a household's answers in the mesh, on the randomized worlds.

In the mesh, explicit feedback (a confirmed or corrected person) does two things: the
feedback service fits a calibrator on the fed sessions' answers (clustering applies it,
GetCalibrator), and the label reaches clustering (forward_label -> RecordLabels), which
refits a household fitted at once with every label so far and binds a stream's labels to
its persons. This scores the whole loop
(``bench._worlds_eval.mesh_after_feedback``: the same code as ``bench.accuracy``'s
``after_feedback`` ``mesh`` block) on the sessions without feedback, for a batch fit (a
household imported at once, then fed) and a time-ordered stream (each session answered
at arrival; each feedback reaches the model before the next arrival), beside no
feedback, the labels alone and the calibrator alone; mean over ``--draws`` random 3.75 %
feedback samples (``feedback_draws``: the pooled draws of ``after_feedback``).

Cold starts answer as the service's default does (E.SERVICE_COLD_START_PRIOR: the account
strategy since session 16); ``--population-prior`` gives each world's population prior
(``priors``: E.world_priors), as a service with HEARTH_COLD_START=population_prior answers.

``python -m bench.label_feedback [--split tuning|reporting|movielens-tuning|movielens-latest-tuning] [--first-world W --worlds N
--households H] [--draws D] [--workers W] [--batch-only | --stream-only] [--[no-]population-prior]`` prints one
JSON object on its last line. Choices are made on ``tuning`` (worlds from 12 on have never been seen by the
confidence maps, which are fitted on TUNING worlds 0-11 since session 12, 0-3 before); ``reporting`` is read to
report only.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import _worlds_eval as E
from bench import worlds, worlds_movielens, worlds_movielens_latest


def _one(args: tuple) -> dict:
    """One household's answers without and with each draw's feedback; ``args``: (household,
    draws, streaming, batch[, its world's population prior]) — the prior every Hearth path's
    cold start uses, as bench.accuracy's (E._one_household)."""
    h, fed, streaming, batch, *rest = args
    kw = {"population_prior": rest[0]} if rest else {}
    out = {"batch": E.hearth_batch(h, **kw)[1], "fed_batch": [E.hearth_batch_fed(h, f, **kw) for f in fed]} \
        if batch else {}
    if streaming:
        out["stream"] = E.hearth_stream(h, **kw)[1]
        out["fed_stream"] = [E.hearth_stream_fed(h, f, **kw) for f in fed]
    return out


# The real viewers' TUNING halves, by split name: MovieLens 100K's (bench/worlds_movielens.py)
# and the second population's, MovieLens latest-small (bench/worlds_movielens_latest.py).
REAL_VIEWERS_TUNING = {"movielens-tuning": worlds_movielens, "movielens-latest-tuning": worlds_movielens_latest}


def _generator(split: str, first_world: int, n_worlds: int | None):
    """(generate(households_per_world), worlds per family) of the split's worlds 0 ..
    ``first_world + n_worlds - 1`` (REAL_VIEWERS_TUNING: real viewers of a tuning half);
    every generator gives a prefix of the same households for fewer per world, which
    ``priors`` relies on."""
    if split in REAL_VIEWERS_TUNING:
        n_worlds, module = n_worlds or 3, REAL_VIEWERS_TUNING[split]
        return (lambda n: module.generate(worlds_per_family=first_world + n_worlds,
                                          households_per_world=n, split="tuning")), n_worlds
    s = worlds.TUNING if split == "tuning" else worlds.REPORTING
    n_worlds = n_worlds or s.worlds_per_family
    return (lambda n: worlds.generate(s, worlds_per_family=first_world + n_worlds, households_per_world=n)), n_worlds


def priors(split: str, first_world: int, n_worlds: int | None, hs: list[worlds.WorldHousehold]) -> dict:
    """Per world of ``hs``, its population prior (E.world_priors over the world's other
    households, as bench.accuracy's cold_start_priors)."""
    return E.world_priors(hs, _generator(split, first_world, n_worlds)[0])


def households(split: str, first_world: int, n_worlds: int | None, n_house: int | None) -> list[worlds.WorldHousehold]:
    """The split's households of worlds ``first_world`` .. ``first_world + n_worlds - 1``
    (REAL_VIEWERS_TUNING: real viewers of a tuning half)."""
    generate, n_worlds = _generator(split, first_world, n_worlds)
    n_house = n_house or (4 if split in REAL_VIEWERS_TUNING
                          else (worlds.TUNING if split == "tuning" else worlds.REPORTING).households_per_world)
    if split not in REAL_VIEWERS_TUNING:   # only the worlds asked for (world w is the same households either way)
        return worlds.generate(worlds.TUNING if split == "tuning" else worlds.REPORTING, households_per_world=n_house,
                               world_indices=range(first_world, first_world + n_worlds))
    hs = generate(n_house)
    per_family = (first_world + n_worlds) * n_house   # generate's order: family, world, household
    return [h for i, h in enumerate(hs) if i % per_family >= first_world * n_house]


def run(hs: list[worlds.WorldHousehold], draws: int, workers: int, streaming: bool = True, batch: bool = True,
        world_prior: dict | None = None, cache: str | None = None) -> dict:
    """``world_prior``: per world, its population prior (``priors``); None: no prior (the
    account cold start, this tool's until session 16). ``cache``: a pickle of the
    households' answers (written when absent, read when present: later scorings of the
    same fits, e.g. ``mesh_after_feedback``'s per-world rows, without refitting)."""
    fed = E.feedback_draws(hs, draws)
    outs = _cached(cache, [h.household_id for h in hs], draws, streaming, batch)
    if outs is None:
        work = [(h, f, streaming, batch, *((world_prior.get(h.world_id),) if world_prior is not None else ()))
                for h, f in zip(hs, fed)]
        with ProcessPoolExecutor(workers) as pool:
            outs = list(pool.map(_one, work))
        if cache:
            with open(cache, "wb") as fh:
                pickle.dump({"households": [h.household_id for h in hs], "draws": draws, "streaming": streaming,
                             "batch": batch, "outs": outs}, fh)
    report = {}
    for mode, before, key, ages, sample_before in (("batch", "batch", "fed_batch", "batch", True),
                                                   ("streaming", "stream", "fed_stream", "stream", False)):
        if (batch, streaming)[mode == "streaming"]:
            # each fed answer set is E.FedAnswers (answers, where the service applies the
            # calibrator, the group it stamps on each)
            report[mode] = E.mesh_after_feedback(hs, [o[before] for o in outs], [o[key] for o in outs], fed,
                                                 E.model_ages(hs, ages), sample_before)
    return report


def _cached(cache: str | None, ids: list[str], draws: int, streaming: bool, batch: bool) -> list[dict] | None:
    """The answers a ``cache`` file holds for exactly these households, draws and modes
    (None: no file; a file of other fits is refused rather than scored as these)."""
    if not cache or not os.path.exists(cache):
        return None
    with open(cache, "rb") as fh:
        held = pickle.load(fh)
    if (held["households"], held["draws"], held["streaming"], held["batch"]) != (ids, draws, streaming, batch):
        raise SystemExit(f"--cache {cache}: holds other households, draws or modes than asked for")
    return held["outs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tuning", "reporting", *REAL_VIEWERS_TUNING), default="tuning")
    ap.add_argument("--first-world", type=int, default=0)
    ap.add_argument("--worlds", type=int, default=None, help="worlds per family (default: the split's)")
    ap.add_argument("--households", type=int, default=None, help="households per world (default: the split's)")
    ap.add_argument("--draws", type=int, default=E.FEEDBACK_MESH_DRAWS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-only", action="store_true", help="no streams (a fifth of the time)")
    ap.add_argument("--stream-only", action="store_true", help="no batch fits (the stream side's choices)")
    ap.add_argument("--population-prior", action=argparse.BooleanOptionalAction, default=E.SERVICE_COLD_START_PRIOR,
                    help="cold starts from the world's population prior (HEARTH_COLD_START=population_prior); "
                         "default: the service's default cold start")
    ap.add_argument("--cache", default=None,
                    help="pickle of the fits' answers: written when absent, scored again when present")
    args = ap.parse_args()
    t0 = time.time()
    hs = households(args.split, args.first_world, args.worlds, args.households)
    world_prior = None if not args.population_prior else priors(args.split, args.first_world, args.worlds, hs)
    report = {"split": args.split, "first_world": args.first_world, "households": len(hs),
              "sessions": int(sum(h.n_sessions for h in hs)), "draws": args.draws,
              "population_prior": world_prior is not None,
              **run(hs, args.draws, args.workers, streaming=not args.batch_only, batch=not args.stream_only,
                    world_prior=world_prior, cache=args.cache)}
    report["elapsed_s"] = round(time.time() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
