"""Feedback command line: ``report calibration`` (reliability diagram and table).

Usage::

    python -m services.feedback.cli report calibration --input PREDICTIONS.jsonl --output DIR
        [--bins 15] [--strategy uniform|quantile]

Input: one JSON object per line (blank lines ignored)::

    {"probabilities": [0.7, 0.2, 0.1],       # required, one entry per person
     "persons": ["p1", "p2", "p3"],          # optional names of those entries
     "label": "p2",                          # true person: a name from persons, or an index
     "correct": false,                       # or only whether the predicted person was right
     "weight": 1.0,                          # optional evidence weight (default 1)
     "variant": "kmeans"}                    # optional model variant (default "unspecified"; not "all")

Each line needs ``label`` or ``correct``. Vectors of different lengths are zero-padded.
Output in DIR: ``reliability.png`` (diagram: accuracy against confidence per bin with
the diagonal, and a histogram of confidences), ``reliability.csv`` (one row per bin,
for all rows and per variant) and ``summary.json`` (metrics, overall and per variant).
The table is also printed. Exit code 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common import errors as common_errors
from services.common import strict_json
from services.common.calibration import as_probability_matrix
from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import (
    BIN_STRATEGIES,
    DEFAULT_BINS,
    UNKNOWN_LABEL,
    ReliabilityTable,
    calibration_summary,
    pad_probabilities,
    reliability_table,
    resolve_outcomes,
    summaries_by_group,
    summaries_to_dict,
)

OVERALL = "all"                    # the group of every row in the table, CSV and diagram
UNSPECIFIED_VARIANT = "unspecified"  # a row without "variant"
CSV_COLUMNS = ("group", "bin", "lower", "upper", "count", "weight", "mean_confidence", "accuracy", "gap")


def _parse_line(number: int, line: str) -> tuple[list[float], int, float | None, float, str]:
    """(probabilities, label index or UNKNOWN_LABEL, correct or None, weight, variant) of one line."""
    where = f"line {number}"
    try:
        record = strict_json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(where, f"is not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise InvalidArgument(where, "must be a JSON object")
    probabilities = record.get("probabilities")
    if not isinstance(probabilities, list) or not probabilities:
        raise InvalidArgument(f"{where}: probabilities", "must be a non-empty list of numbers")
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in probabilities):
        raise InvalidArgument(f"{where}: probabilities", "must contain only numbers")
    # Checked here, not once the file is read: that refusal named a row index, not the line.
    as_probability_matrix(probabilities, f"{where}: probabilities")
    persons = record.get("persons")
    if persons is not None and (not isinstance(persons, list) or len(persons) != len(probabilities)
                                or not all(isinstance(p, str) for p in persons) or len(set(persons)) != len(persons)):
        raise InvalidArgument(f"{where}: persons", f"must name each of the {len(probabilities)} probabilities once "
                                                   f"(distinct strings, in their order), got {persons!r}")
    label = record.get("label")
    index = UNKNOWN_LABEL
    if label is not None:
        if isinstance(label, str):
            if not isinstance(persons, list) or label not in persons:
                raise InvalidArgument(f"{where}: label", f"{label!r} is not one of persons {persons!r}")
            index = persons.index(label)
        elif isinstance(label, int) and not isinstance(label, bool):
            index = label
        else:
            raise InvalidArgument(f"{where}: label", "must be a person name or an index")
        if not 0 <= index < len(probabilities):
            raise InvalidArgument(f"{where}: label", f"index {index} outside the {len(probabilities)} probabilities")
    correct = record.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise InvalidArgument(f"{where}: correct", "must be true or false")
    if label is None and correct is None:
        raise InvalidArgument(where, "needs a label or correct")
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
        raise InvalidArgument(f"{where}: weight", "must be a finite number >= 0")
    # A row without a variant is "unspecified" (the service's name for an empty model_variant).
    # "all" names the whole file's table: a variant called so (or, until session 19, the rows
    # without one in a file that also had variants) replaced the overall table with its own.
    variant = record.get("variant", UNSPECIFIED_VARIANT)
    if not isinstance(variant, str) or not variant:
        raise InvalidArgument(f"{where}: variant", "must be a non-empty string")
    if variant == OVERALL:
        raise InvalidArgument(f"{where}: variant", f"{OVERALL!r} names every row; choose another name")
    return [float(p) for p in probabilities], index, None if correct is None else float(correct), float(weight), variant


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """Read a predictions JSONL file into arrays: probs, labels, correct, weights, variants."""
    vectors: list[list[float]] = []
    labels: list[int] = []
    correct: list[float] = []
    weights: list[float] = []
    variants: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            probabilities, label, right, weight, variant = _parse_line(number, line)
            vectors.append(probabilities)
            labels.append(label)
            weights.append(weight)
            variants.append(variant)
            if right is None:
                # The label decides; the value is recomputed from it below.
                right = float(int(np.argmax(probabilities)) == label)
            correct.append(right)
    if not vectors:
        raise InvalidArgument("input", f"{path} holds no predictions")
    probs = pad_probabilities(vectors)
    labels_array = np.asarray(labels, dtype=np.int64)
    _, correct_array = resolve_outcomes(probs, labels_array, np.asarray(correct))
    return {
        "probs": probs,
        "labels": labels_array,
        "correct": correct_array,
        "weights": np.asarray(weights),
        "variants": np.asarray(variants),
    }


def _draw_diagram(tables: dict[str, ReliabilityTable], confidence: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6.0, 7.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    overall = tables[OVERALL]
    filled = overall.weight > 0
    top.bar(
        overall.lower[filled], overall.accuracy[filled], width=(overall.upper - overall.lower)[filled],
        align="edge", alpha=0.35, edgecolor="black", label=f"all (ECE {overall.ece:.3f})",
    )
    for name, table in tables.items():
        rows = table.weight > 0
        if name != OVERALL:
            top.plot(table.mean_confidence[rows], table.accuracy[rows], marker="o", label=f"{name} (ECE {table.ece:.3f})")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy (predicted person right)")
    top.set_ylim(0, 1)
    top.set_title("Reliability diagram")
    top.legend(loc="upper left", fontsize="small")
    bottom.hist(confidence, bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.7)
    bottom.set_xlabel("top-label confidence")
    bottom.set_ylabel("predictions")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def _format(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.4f}"


def report_calibration(input_path: Path, output_dir: Path, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> dict[str, Any]:
    """Write reliability.png, reliability.csv and summary.json; return the summary."""
    data = load_predictions(input_path)
    confidence = data["probs"].max(axis=1)
    weights = data["weights"]
    tables = {OVERALL: reliability_table(confidence, data["correct"], weights, n_bins, strategy)}  # type: ignore[arg-type]
    variants = sorted(set(data["variants"].tolist()))
    if variants != [UNSPECIFIED_VARIANT]:
        for variant in variants:
            rows = data["variants"] == variant
            if weights[rows].sum() > 0:
                tables[variant] = reliability_table(confidence[rows], data["correct"][rows], weights[rows], n_bins, strategy)  # type: ignore[arg-type]

    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "reliability.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for name, table in tables.items():
            for i in range(table.n_bins):
                writer.writerow([
                    name, i, f"{table.lower[i]:.6f}", f"{table.upper[i]:.6f}", int(table.count[i]),
                    f"{table.weight[i]:.6f}", _format(table.mean_confidence[i]), _format(table.accuracy[i]), _format(table.gap[i]),
                ])
    _draw_diagram(tables, confidence, output_dir / "reliability.png")

    summary = {
        "n": int(confidence.size),
        "strategy": strategy,
        "n_bins": n_bins,
        "overall": calibration_summary(data["probs"], data["labels"], data["correct"], weights, n_bins).to_dict(),
        "by_variant": summaries_to_dict(
            summaries_by_group(data["variants"], data["probs"], data["labels"], data["correct"], weights, n_bins)
        ),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    print(f"{'group':<12} {'bin':>3} {'lower':>7} {'upper':>7} {'count':>7} {'conf':>7} {'acc':>7} {'gap':>8}")
    for name, table in tables.items():
        for i in range(table.n_bins):
            print(
                f"{name:<12} {i:>3} {table.lower[i]:>7.3f} {table.upper[i]:>7.3f} {int(table.count[i]):>7} "
                f"{_format(table.mean_confidence[i]):>7} {_format(table.accuracy[i]):>7} {_format(table.gap[i]):>8}"
            )
    overall = summary["overall"]
    print(f"ECE {overall['ece']:.4f}  Brier (top-label) {overall['brier']:.4f}  n {summary['n']}")
    print(f"wrote {output_dir / 'reliability.png'}, {output_dir / 'reliability.csv'}, {output_dir / 'summary.json'}")
    return summary


def _run_report_calibration(args: argparse.Namespace) -> int:
    try:
        report_calibration(Path(args.input), Path(args.output), args.bins, args.strategy)
    except common_errors.InvalidArgument as exc:  # the domain raises the common one too (calibration)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``report calibration`` to a parent parser's subcommands (sets ``func`` on the namespace)."""
    report = subparsers.add_parser("report", help="feedback reports")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    calibration = report_commands.add_parser("calibration", help="reliability diagram and calibration table")
    calibration.add_argument("--input", required=True, help="predictions JSONL (see services/feedback/cli.py)")
    calibration.add_argument("--output", required=True, help="directory for reliability.png/.csv and summary.json")
    calibration.add_argument("--bins", type=_positive_int, default=DEFAULT_BINS, help="number of confidence bins")
    calibration.add_argument("--strategy", choices=BIN_STRATEGIES, default="uniform", help="equal-width or equal-mass bins")
    calibration.set_defaults(func=_run_report_calibration)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.feedback.cli", description="Hearth feedback tools")
    commands = parser.add_subparsers(dest="command", required=True)
    register(commands)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
