"""Command line: ``attribute PATHS.csv`` over a ChannelAttribution-format path file.

    hearth attribute PATHS.csv --order 2 --method markov
    hearth attribute PATHS.csv --order auto --bootstrap 200 --seed 7 --format json -o credit.json
    hearth attribute PATHS.csv --sequence "display > search" --plot credit.png
    hearth attribute PERSON.csv --prior PERSONA.csv --prior-strength 20

``register(subparsers)`` adds the subcommand to an existing argparse tree; ``main``
runs it standalone. Output: CSV (one row per channel, largest credit first, with the
heuristic baselines as extra columns; with ``--bootstrap N`` interval columns too; the
``--order auto`` choice and the ``--sequence`` effects on stderr) or the JSON of
``AttributionReport.to_dict()``; ``--plot FILE.png`` also draws the credit
with intervals per channel and method, and the transition graph (orders 1-2).
Exit status 0 on success, 2 on bad input (message ``error: field: reason`` on stderr).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from services.attribution.domain.api import METHODS, attribute
from services.attribution.domain.bootstrap import BootstrapSpec
from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.heuristics import DEFAULT_HALF_LIFE_DAYS, HeuristicParams
from services.attribution.domain.markov import MAX_ORDER, MarkovConventions
from services.attribution.domain.paths import read_paths

PROGRESS_MIN_BYTES = 8 << 20  # show a progress bar for files from 8 MB


def _horizon(text: str) -> int | str | None:
    if text in ("none", "None", ""):
        return None
    if text == "data":
        return "data"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer >= 1, 'data' or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _order(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_ORDER} or 'auto'") from None
    if not 1 <= value <= MAX_ORDER:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_ORDER} or 'auto'")
    return value


def _weights(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be three numbers FIRST,MIDDLE,LAST (e.g. 0.4,0.2,0.4)") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("must be three numbers FIRST,MIDDLE,LAST (e.g. 0.4,0.2,0.4)")
    return parts  # type: ignore[return-value]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``attribute`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "attribute",
        help="attribute conversions of a path file to channels",
        description=(
            "Attribute conversions and revenue of a ChannelAttribution-format path file "
            "(path;total_conversions;total_conversion_value;total_null) to channels."
        ),
    )
    p.add_argument("paths", metavar="PATHS.csv", help="path file (';'-separated, header line)")
    p.add_argument("--method", choices=METHODS, default="markov")
    p.add_argument("--order", type=_order, default=1, metavar="K",
                   help=f"Markov order 1..{MAX_ORDER}, or 'auto' (chosen by held-out conversion "
                        "log loss; the choice and margins are reported) (default 1)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of --order auto (default 5)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="bootstrap replicates for confidence intervals of every method (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of --order auto's folds")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--half-life-days", type=float, default=DEFAULT_HALF_LIFE_DAYS,
                   help="time-decay half-life in days (needs touch times; path files have none)")
    p.add_argument("--position-weights", type=_weights, default=(0.4, 0.2, 0.4), metavar="F,M,L",
                   help="position-based weights of first, middle, last touches (default 0.4,0.2,0.4)")
    p.add_argument("--sequence", action="append", default=[], metavar="'A > B'",
                   help="report the removal effect of this channel sequence (repeatable)")
    p.add_argument("--prior", metavar="PERSONA.csv",
                   help="path file of the persona's pooled journeys: Dirichlet prior on the Markov chain")
    p.add_argument("--prior-strength", type=float, default=20.0,
                   help="prior pseudo-journeys per state row (kappa; default 20 when --prior is given)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw credit with intervals and the transition graph")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="hybrid weight of Markov: alpha*markov + (1-alpha)*shapley (default 0.5)")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--output", "-o", help="write here instead of stdout")
    p.add_argument("--no-collapse", action="store_true",
                   help="keep repeated channels/states (self-loops); default merges repeated states")
    p.add_argument("--collapse", choices=("states", "channels"), default="states",
                   help="what to merge when collapsing: consecutive identical states "
                        "(ChannelAttribution) or channel runs before building states")
    p.add_argument("--no-nulls", action="store_true", help="ignore total_null (paths that did not convert)")
    p.add_argument("--warmup-states", action="store_true",
                   help="order k: states also at the first k-1 touches (growing prefixes)")
    p.add_argument("--horizon", type=_horizon, default=None,
                   help="max channel states before conversion: integer, 'data' "
                        "(ChannelAttribution's cut) or 'none' (default, exact)")
    p.add_argument("--revenue", choices=("value_chain", "conversion_share"), default="value_chain")
    p.add_argument("--sep", default=">", help="channel separator inside a path (default '>')")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(handler=run_attribute)
    return p


def _read_with_progress(path: str, sep: str, show: bool):  # type: ignore[no-untyped-def]
    size = os.path.getsize(path)
    if not show or size < PROGRESS_MIN_BYTES:
        return read_paths(path, sep=sep)
    from tqdm import tqdm

    with tqdm(total=size, unit="B", unit_scale=True, desc="reading paths", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return read_paths(path, sep=sep, progress=progress)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        buf.write("channel,share,conversions,revenue\n")
    return buf.getvalue()


def _csv_notes(details: dict[str, Any]) -> None:
    """What the CSV's one row per channel cannot carry, on stderr: ``--order auto``'s
    choice and each ``--sequence``'s removal effect. Until session 21 the CSV output
    dropped both silently (only ``--format json`` had them)."""
    chosen = details.get("order_selection")
    if chosen:
        print(f"order auto: chose order {chosen['chosen']} of {chosen['candidates']} by held-out log loss "
              f"(margin {chosen['margin']:.3g} ± {chosen['margin_se']:.3g}; --format json for the details)",
              file=sys.stderr)
    for seq in details.get("sequences") or ():
        print(f"sequence {seq['sequence']}: removal effect {seq['removal_effect']:.4g}, "
              f"conversions lost {seq['conversions_lost']:.4g}, value lost {seq['value_lost']:.4g}", file=sys.stderr)


def run_attribute(args: argparse.Namespace) -> int:
    """Handler of the ``attribute`` subcommand; returns the exit status."""
    try:
        if not os.path.isfile(args.paths):
            raise AttributionInputError("paths", f"no such file: {args.paths}")
        repeats = "keep" if args.no_collapse else (
            "collapse_channels" if args.collapse == "channels" else "collapse_states"
        )
        conventions = MarkovConventions(
            order=1 if args.order == "auto" else args.order,
            repeats=repeats,
            include_nulls=not args.no_nulls,
            warmup_states=args.warmup_states,
            horizon=args.horizon,
            revenue=args.revenue,
        )
        params = HeuristicParams(half_life_days=args.half_life_days, position_weights=args.position_weights)
        spec = BootstrapSpec(replicates=args.bootstrap, seed=args.seed, level=args.level)
        prior = None
        if args.prior:
            if not os.path.isfile(args.prior):
                raise AttributionInputError("prior", f"no such file: {args.prior}")
            prior = read_paths(args.prior, sep=args.sep)
        paths = _read_with_progress(args.paths, args.sep, not args.no_progress)
        report = attribute(
            paths, method=args.method, order=args.order, alpha=args.alpha, conventions=conventions,
            heuristic_params=params, bootstrap=spec, sequences=args.sequence or None,
            prior_paths=prior, prior_strength=args.prior_strength if prior is not None else 0.0,
            order_folds=args.folds, order_seed=args.seed,
        )
        if args.plot:
            from services.attribution.plot import plot_report

            plot_report(report, paths, args.plot)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = (
        json.dumps(report.to_dict(), indent=2) + "\n"
        if args.format == "json"
        else _csv_text(report.rows())
    )
    if args.format != "json":
        _csv_notes(report.to_dict().get("details", {}))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m services.attribution.cli attribute PATHS.csv``."""
    parser = argparse.ArgumentParser(prog="python -m services.attribution.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
