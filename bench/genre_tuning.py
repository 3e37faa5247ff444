"""Where unknown genre names land, measured on TUNING worlds (issue #10, "every genre a
caller sends counts"): the same households with their sessions built by a vocabulary
that hashes each unknown name into a genre slot (``hash``, schema 2) or pools them all
in ``other`` (``other``, schema 1), on the normal TUNING worlds and on the same worlds
with a raised share of unknown names (``bench.worlds.generate(unknown_genre_share=)``).

    OMP_NUM_THREADS=1 python -m bench.genre_tuning --share 0.6 --unknown hash other

One JSON line per (share, placement) and a last line with all of them. TUNING only: a
choice made here must never look at REPORTING or the blind worlds.
"""

from __future__ import annotations

import argparse
import json
import sys

import bench.worlds as worlds
from bench import _worlds_eval
from services.clustering.domain.features import GenreVocabulary


def households(share: float, unknown: str, n_worlds: int, n_households: int):
    """TUNING households whose sessions the ``unknown`` placement built."""
    placement, _, hashed = unknown.partition(":")
    vocabulary = GenreVocabulary(unknown=placement, **({"hashed_share": float(hashed)} if hashed else {}))
    return worlds.generate(worlds.TUNING, worlds_per_family=n_worlds, households_per_world=n_households,
                           unknown_genre_share=share, vocabulary=vocabulary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, nargs="+", default=[0.0, 0.6])
    ap.add_argument("--unknown", nargs="+", default=["hash", "other"],
                    help="hash | other | hash:S (S of an unknown name's time in its hashed slot, the rest in other)")
    ap.add_argument("--worlds", type=int, default=worlds.TUNING.worlds_per_family)
    ap.add_argument("--households", type=int, default=worlds.TUNING.households_per_world)
    ap.add_argument("--streaming", action="store_true", help="also the time-ordered stream (slower)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for share in args.share:
        for unknown in args.unknown:
            hs = households(share, unknown, args.worlds, args.households)
            rep = _worlds_eval.run(hs, streaming=args.streaming, periodic_baseline=False, workers=args.workers)
            a = rep["all"]
            row = {"share": share, "unknown": unknown, "households": len(hs),
                   "unknown_genre_share_mean": round(float(sum(h.unknown_genre_share for h in hs) / len(hs)), 3),
                   "hearth": {k: a.get(k) for k in ("session_accuracy", "household_size_exact",
                                                   "single_person_kept", "ece")},
                   "device_heuristic": a["baselines"]["device_heuristic"]["session_accuracy"],
                   "oracle": a["baselines"]["supervised_oracle"]["session_accuracy"],
                   "elapsed_s": rep["elapsed_s"]}
            if args.streaming:
                row["stream"] = {k: a["streaming"].get(k) for k in ("session_accuracy", "single_person_kept")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"genre_tuning": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
