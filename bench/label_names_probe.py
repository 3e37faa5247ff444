"""Do streams keep the persons labels name? (TUNING only.)

Streams re-select their persons once labels exist (session 11). A refit or re-selection
that merged away a person a label names would drop a person the caller named; the model
skips such refits (``HouseholdModel._drops_kept_person``). This streams the multi-person
households of TUNING worlds, with a random ``--share`` of sessions labelled by their true
person's name (as profile hints are), and counts at the end the label names bound to a
person that is gone, the names never bound (a name first seen after the stream's first fit
waits for a full refit), and the final model's accuracy. ``--no-reselect-labelled`` runs
the rule before session 11 (no re-selection once the model has labels) beside it.
docs/clustering.md ("in a stream") quotes it.

    python -m bench.label_names_probe [--worlds 2 --households 6 --share 0.1] [--no-reselect-labelled]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import worlds
from bench._clustering_eval import matched_correct
from bench.worlds import WorldHousehold
from services.clustering.domain.model import HouseholdModel


# Sessions per update: the streaming harness's arrival before session 12 (this probe
# follows the model's own update, not the service's refresh; its figures were taken so).
STREAM_BATCH = 5


def stream_with_names(h: WorldHousehold, names: list[str | None], reselect_labelled: bool = True) -> HouseholdModel:
    """The household's time-ordered stream with ``names`` as labels, as the service folds it in."""
    m = HouseholdModel()
    for a in range(0, h.n_sessions, STREAM_BATCH):
        b = min(a + STREAM_BATCH, h.n_sessions)
        if not reselect_labelled and m.label_map:
            m.reselect = False
        m.update(h.features[a:b], labels=names[a:b], device_ids=h.device_id[a:b])
    return m


def probe(hs: list[WorldHousehold], share: float, reselect_labelled: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    bound_lost = never_bound = named = 0
    accuracy = []
    for h in hs:
        labelled = rng.random(h.n_sessions) < share
        names = [f"name{p}" if on else None for p, on in zip(h.person, labelled)]
        m = stream_with_names(h, names, reselect_labelled)
        ids = [m.label_map.get(n) for n in sorted({n for n in names if n})]
        named += len(ids)
        never_bound += sum(i is None for i in ids)
        bound_lost += sum(i is not None and i not in m.person_ids for i in ids)
        accuracy.append(float(matched_correct(h.person, m.assign_batch(h.features, device_ids=h.device_id)
                                              .person_index).mean()))
    return {"households": len(hs), "label_names": named, "bound_but_lost": bound_lost,
            "never_bound": never_bound, "final_model_accuracy": round(float(np.mean(accuracy)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, default=2, help="TUNING worlds per family")
    ap.add_argument("--households", type=int, default=6, help="households per world")
    ap.add_argument("--share", type=float, default=0.1, help="share of sessions labelled by name")
    ap.add_argument("--no-reselect-labelled", action="store_true",
                    help="also the rule before session 11: no re-selection once the model has labels")
    args = ap.parse_args()
    hs = [h for h in worlds.generate(worlds.TUNING, worlds_per_family=args.worlds,
                                     households_per_world=args.households) if h.n_persons >= 2]
    report = {"split": "tuning", "share": args.share, "now": probe(hs, args.share)}
    if args.no_reselect_labelled:
        report["no_reselect_once_labelled"] = probe(hs, args.share, reselect_labelled=False)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
