"""Does the feedback calibrator carry over to the settled answers? (TUNING only.)

The feedback service fits its calibrator on the predictions clustering logs: answers at
arrival. ``GET /v1/household`` serves the settled answers (the model re-recording every
session it includes, through the "settled" confidence map). This scores, on TUNING-seed
worlds, the calibrator fitted as the service fits it on a random 3.75 % of the at-arrival
answers, applied to the other sessions' at-arrival answers (what it is for) and to
their settled answers at the end of each stream (with the final model's age), over
``--draws`` draws. docs/feedback.md, "The settled answers are not passed through the
calibrator", quotes it.

    python -m bench.settled_feedback [--first-world 12 --worlds 4 --households 5] [--draws 20]

(the confidence maps are fitted on TUNING worlds 0-11 since session 12, 0-3 before)
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import _worlds_eval as E
from bench._clustering_eval import ece
from bench.label_feedback import households
from bench.worlds import WorldHousehold


def _answers(h: WorldHousehold) -> tuple[np.ndarray, np.ndarray]:
    _, at_arrival, _, (_, settled) = E.hearth_stream(h, settled=True)
    return at_arrival, settled


def carry_over(hs: list[WorldHousehold], draws: int, workers: int = 2) -> dict:
    """ECE of the at-arrival and settled answers of the sessions without feedback, without
    and with the calibrator (mean and median over ``draws``)."""
    from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, feedback_mask
    with ProcessPoolExecutor(workers) as pool:
        outs = list(pool.map(_answers, hs))
    persons = [h.person for h in hs]
    Pa, ya, oka, age_a = E.pooled_answers(persons, [o[0] for o in outs], E.model_ages(hs, "stream"))
    Ps, _, oks, _ = E.pooled_answers(persons, [o[1] for o in outs])
    age_s = np.concatenate([np.full(h.n_sessions, h.n_sessions) for h in hs])
    rows: dict[str, list[float]] = {"arrival": [], "arrival_calibrated": [], "settled": [], "settled_calibrated": []}
    for d in range(draws):
        fed = feedback_mask(Pa.shape[0], DEFAULT_FEEDBACK_RATE, d)
        calibrator = E.service_calibrator(Pa, ya, oka, age_a, fed)
        held = ~fed
        rows["arrival"].append(ece(Pa[held].max(axis=1), oka[held]))
        rows["arrival_calibrated"].append(ece(calibrator.apply(Pa[held], age_a[held]).max(axis=1), oka[held]))
        rows["settled"].append(ece(Ps[held].max(axis=1), oks[held]))
        rows["settled_calibrated"].append(ece(calibrator.apply(Ps[held], age_s[held]).max(axis=1), oks[held]))
    return {"households": len(hs), "sessions": int(Pa.shape[0]), "draws": draws,
            "accuracy": {"arrival": float(oka.mean()), "settled": float(oks.mean())},
            "ece": {k: {"mean": round(float(np.mean(v)), 4), "median": round(float(np.median(v)), 4)}
                    for k, v in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first-world", type=int, default=12)   # bench.accuracy.CONFIDENCE_FIT_WORLDS: 0-11
    ap.add_argument("--worlds", type=int, default=4)
    ap.add_argument("--households", type=int, default=5, help="households per world")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    hs = households("tuning", args.first_world, args.worlds, args.households)
    print(json.dumps({"split": "tuning", "first_world": args.first_world, "worlds": args.worlds,
                      **carry_over(hs, args.draws, args.workers)}))


if __name__ == "__main__":
    main()
