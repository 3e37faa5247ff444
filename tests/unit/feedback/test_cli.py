"""``report calibration`` writes a PNG diagram, a CSV table and a summary."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from services.feedback import cli
from services.feedback.domain.evaluation import synthetic_stream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_predictions(path: Path, n: int = 600) -> None:
    s = synthetic_stream(n, seed=5)
    with path.open("w") as handle:
        for i in range(n):
            size = int(s.household_size[i])
            persons = [f"p{j + 1}" for j in range(size)]
            record: dict = {"probabilities": s.probs[i, :size].tolist(), "persons": persons, "variant": str(s.variants[i])}
            if i % 3 == 0:
                record["correct"] = bool(s.probs[i].argmax() == s.labels[i])  # right/wrong only
                record["weight"] = 0.3
            else:
                record["label"] = persons[int(s.labels[i])]
            handle.write(json.dumps(record) + "\n")
        handle.write("\n")  # blank lines are ignored


def test_report_calibration_writes_png_csv_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "predictions.jsonl"
    write_predictions(source)
    out = tmp_path / "report"
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(out), "--bins", "10"]) == 0

    png = (out / "reliability.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    # PNG IHDR: width and height as big-endian uint32 at bytes 16..24 (6 x 7 in at 100 dpi).
    assert int.from_bytes(png[16:20], "big") == 600 and int.from_bytes(png[20:24], "big") == 700

    with (out / "reliability.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    groups = {r["group"] for r in rows}
    assert groups == {"all", "gmm", "kmeans"}
    overall = [r for r in rows if r["group"] == "all"]
    assert len(overall) == 10 and sum(int(r["count"]) for r in overall) == 600

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 600 and summary["overall"]["n_labeled"] == 400
    assert set(summary["by_variant"]) == {"gmm", "kmeans"}
    printed = capsys.readouterr().out
    assert "ECE" in printed and "reliability.png" in printed


def test_bad_input_exits_2_with_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"probabilities": [0.5, 0.5], "label": 0}\n{"probabilities": [0.5, 0.5]}\n')
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err
    source.write_text('{"probabilities": [0.9, 0.2], "label": 0}\n')
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(tmp_path / "o")]) == 2
    assert "sums to" in capsys.readouterr().err


def test_rows_without_a_variant_do_not_replace_the_whole_file_table(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Until session 19 such rows were the variant "all", whose table overwrote the table of
    # every row (CSV, printout and diagram then showed 1 row where the file had 4).
    source = tmp_path / "mixed.jsonl"
    rows = [{"probabilities": [0.9, 0.1], "correct": True, "variant": "gmm"},
            {"probabilities": [0.8, 0.2], "correct": False, "variant": "gmm"},
            {"probabilities": [0.7, 0.3], "correct": True, "variant": "kmeans"},
            {"probabilities": [0.6, 0.4], "correct": True}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(out), "--bins", "5"]) == 0
    with (out / "reliability.csv").open() as handle:
        counts: dict[str, int] = {}
        for r in csv.DictReader(handle):
            counts[r["group"]] = counts.get(r["group"], 0) + int(r["count"])
    assert counts == {"all": 4, "gmm": 2, "kmeans": 1, "unspecified": 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 4 and set(summary["by_variant"]) == {"gmm", "kmeans", "unspecified"}
    capsys.readouterr()
    source.write_text(json.dumps({**rows[0], "variant": "all"}) + "\n")
    assert cli.main(["report", "calibration", "--input", str(source), "--output", str(out)]) == 2
    assert "line 1: variant" in capsys.readouterr().err


def test_register_adds_the_command_to_a_parent_parser() -> None:
    parser = argparse.ArgumentParser(prog="hearth")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "calibration", "--input", "x", "--output", "y", "--strategy", "quantile"])
    assert args.func is not None and args.strategy == "quantile" and args.bins == 15
