"""What feedback labels do to a household's answers, on the randomized worlds.

In the mesh, explicit feedback (a confirmed or corrected person) is forwarded to
clustering as a label (``RecordLabels``) and the household is refitted with it. This
fits every household of a split twice — without labels, and with the true person as the
label of a random ``--rate`` of its sessions (3.75 % by default, the issue's feedback
share) — and scores the *other* sessions of each: accuracy (matched persons) and ECE. ``after_feedback`` is the whole of
what the mesh does with that feedback: the feedback service's calibrator
(``fit_feedback_calibrator``), fitted on the answers the fed sessions had *before* the
feedback, applied to the answers of the households refitted with the labels — beside the
calibrator alone (what ``bench.accuracy``'s ``after_feedback`` scores) and the labels alone.
One feedback draw (seed 7 + household index).

``python -m bench.label_feedback [--split tuning|reporting] [--rate R] [--workers W]``
prints one JSON object on its last line. Choices are made on ``tuning``; ``reporting``
is read to report only.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import worlds
from bench._clustering_eval import ece, matched_correct
from services.clustering.domain.model import HouseholdModel


def _one(args: tuple[worlds.WorldHousehold, int, float]) -> dict:
    h, seed, rate = args
    fed = np.random.default_rng(seed).random(h.n_sessions) < rate
    out: dict = {"fed": fed}
    for name, labels in (("without_labels", None),
                         ("with_labels", [f"m{p}" if f else None for p, f in zip(h.person, fed)])):
        m = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
        b = m.assign_batch(h.features, device_ids=h.device_id)
        rest = ~fed
        out[name] = (matched_correct(h.person[rest], b.person_index[rest]), b.probabilities[rest].max(axis=1))
        out[name + "_P"] = b.probabilities
    return out


def _after_feedback(hs: list[worlds.WorldHousehold], outs: list[dict]) -> dict[str, float]:
    from bench._worlds_eval import pooled_answers
    from services.feedback.domain.recalibration import FeedbackSample, fit_feedback_calibrator
    fed = np.concatenate([o["fed"] for o in outs])
    ages = [np.full(h.n_sessions, h.n_sessions) for h in hs]   # batch fits: every session seen
    persons = [h.person for h in hs]
    P0, y0, ok0, age = pooled_answers(persons, [o["without_labels_P"] for o in outs], ages)
    P1, _, ok1, _ = pooled_answers(persons, [o["with_labels_P"] for o in outs], ages)
    calibrator = fit_feedback_calibrator(FeedbackSample.create(P0[fed], labels=y0[fed], correct=ok0[fed].astype(float)),
                                         age[fed])
    rest = ~fed
    return {"no_feedback": ece(P0[rest].max(axis=1), ok0[rest]),
            "calibrator_only": ece(calibrator.apply(P0[rest], age[rest]).max(axis=1), ok0[rest]),
            "labels_only": ece(P1[rest].max(axis=1), ok1[rest]),
            "labels_and_calibrator": ece(calibrator.apply(P1[rest], age[rest]).max(axis=1), ok1[rest])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tuning", "reporting"), default="tuning")
    ap.add_argument("--rate", type=float, default=0.0375)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    split = worlds.TUNING if args.split == "tuning" else worlds.REPORTING
    hs = worlds.generate(split)
    with ProcessPoolExecutor(args.workers) as pool:
        outs = list(pool.map(_one, [(h, 7 + i, args.rate) for i, h in enumerate(hs)]))
    report: dict = {"split": args.split, "households": len(hs), "label_rate": args.rate}
    for name in ("without_labels", "with_labels"):
        correct = np.concatenate([o[name][0] for o in outs]).astype(float)
        conf = np.concatenate([o[name][1] for o in outs])
        report[name] = {"session_accuracy": float(correct.mean()), "mean_confidence": float(conf.mean()),
                        "ece": ece(conf, correct), "sessions": int(correct.size)}
    report["after_feedback_ece"] = _after_feedback(hs, outs)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
