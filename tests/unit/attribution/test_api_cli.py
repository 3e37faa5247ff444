"""The servicer-facing attribute() and the CLI."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest

from services.attribution.cli import main
from services.attribution.domain.api import METHODS, attribute
from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths

PATHS = Paths.from_lists(
    [["a", "b"], ["b", "c"], ["a"], ["c", "a", "b"], []], [1, 2, 0, 1, 4], [5, 8, 0, 2, 9], [2, 1, 3, 0, 0]
)


AGES = np.arange(PATHS.n_touches, dtype=float)  # days before each journey's end


@pytest.mark.parametrize("method", METHODS)
def test_every_method_credits_all_attributable_conversions(method: str) -> None:
    r = attribute(PATHS, method=method, order=2, touch_ages=AGES)
    assert r.conversions.sum() == pytest.approx(4.0)
    # Value: every method credits the value of the converting non-empty paths (5+8+2).
    assert r.revenue.sum() == pytest.approx(15.0)
    assert r.total_value == 15.0
    assert r.shares.sum() == pytest.approx(1.0)
    assert r.unattributed_conversions == 4.0
    assert np.all(r.conversions >= -1e-12)
    assert set(r.baselines) == {"first_touch", "last_touch", "linear", "time_decay", "position_based"}
    json.dumps(r.to_dict())


def test_time_decay_is_only_offered_with_touch_ages() -> None:
    assert "time_decay" not in attribute(PATHS).baselines
    with pytest.raises(AttributionInputError) as exc:
        attribute(PATHS, method="time_decay")
    assert exc.value.field == "method"


def test_hybrid_is_the_mix() -> None:
    m = attribute(PATHS, "markov").conversions
    s = attribute(PATHS, "shapley").conversions
    np.testing.assert_allclose(attribute(PATHS, "hybrid", alpha=0.3).conversions, 0.3 * m + 0.7 * s)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"method": "magic"}, "method"), ({"order": 7}, "order"), ({"alpha": 2.0}, "alpha"),
     ({"conventions": {"bogus": 1}}, "conventions")],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(AttributionInputError) as exc:
        attribute(PATHS, **kwargs)
    assert exc.value.field == field


def test_cli_csv_and_json(tmp_path, capsys) -> None:
    f = tmp_path / "p.csv"
    f.write_text("path;total_conversions;total_conversion_value;total_null\n"
                 "a > b;1;5;2\nb > c;2;8;1\na;0;0;3\nc > a > b;1;2;0\n")
    assert main(["attribute", str(f), "--order", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("channel,share,conversions,revenue,first_touch_conversions")
    assert len(out) == 4
    total = sum(float(line.split(",")[2]) for line in out[1:])
    assert total == pytest.approx(4.0)
    target = tmp_path / "out.json"
    assert main(["attribute", str(f), "--method", "shapley", "--format", "json", "--output", str(target)]) == 0
    doc = json.loads(target.read_text())
    assert doc["method"] == "shapley" and {c["channel"] for c in doc["channels"]} == {"a", "b", "c"}
    assert main(["attribute", str(f), "--no-collapse", "--no-nulls", "--horizon", "data"]) == 0
    capsys.readouterr()


def test_cli_bad_input_exits_2(tmp_path, capsys) -> None:
    assert main(["attribute", str(tmp_path / "missing.csv")]) == 2
    f = tmp_path / "bad.csv"
    f.write_text("path;total_conversions\na;x\n")
    assert main(["attribute", str(f)]) == 2
    assert "total_conversions" in capsys.readouterr().err


def test_cli_auto_order_intervals_sequences_prior_and_plot(tmp_path, capsys) -> None:
    f = tmp_path / "p.csv"
    f.write_text("path;total_conversions;total_conversion_value;total_null\n"
                 "a > b;3;15;2\nb > c;2;8;4\na;0;0;3\nc > a > b;1;2;1\nb > a;2;6;2\n")
    prior = tmp_path / "persona.csv"
    prior.write_text("path;total_conversions;total_conversion_value;total_null\n"
                     "a > c;5;20;1\nc;1;3;6\nb > a;2;6;2\n")
    out = tmp_path / "o.json"
    png = tmp_path / "o.png"
    assert main(["attribute", str(f), "--order", "auto", "--bootstrap", "30", "--seed", "2",
                 "--sequence", "a > b", "--format", "json", "-o", str(out), "--plot", str(png),
                 "--prior", str(prior), "--prior-strength", "5"]) == 0
    doc = json.loads(out.read_text())
    assert doc["details"]["order_selection"]["chosen"] == doc["details"]["order"]
    assert doc["bootstrap"]["replicates"] == 30
    assert all(c["conversions_lower"] <= c["conversions_upper"] for c in doc["channels"])
    assert doc["details"]["sequences"][0]["sequence"] == "a > b"
    assert doc["details"]["persona_prior"]["strength"] == 5.0
    assert {c["channel"] for c in doc["channels"]} == {"a", "b", "c"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # CSV carries the interval columns.
    assert main(["attribute", str(f), "--bootstrap", "10"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"conversions_lower", "conversions_upper", "linear_conversions_lower"} <= set(header)
    for bad in (["--order", "5"], ["--position-weights", "1,2"], ["--bootstrap", "1"], ["--half-life-days", "0"]):
        with pytest.raises(SystemExit) if bad[0] in ("--order", "--position-weights") else nullcontext():
            code = main(["attribute", str(f), *bad])
            assert code == 2



def test_cli_csv_reports_the_chosen_order_and_the_sequences_on_stderr(tmp_path, capsys) -> None:
    # The CSV has a row per channel only; until session 21 `--sequence` and `--order auto`
    # printed nothing of theirs unless --format json (the README offers both with the CSV).
    f = tmp_path / "p.csv"
    f.write_text("path;total_conversions;total_conversion_value;total_null\n"
                 "a > b;3;15;2\nb > c;2;8;4\na;0;0;3\nc > a > b;1;2;1\nb > a;2;6;2\n")
    assert main(["attribute", str(f), "--order", "auto", "--sequence", "a > b", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("channel,share,conversions,revenue")
    assert "order auto: chose order " in captured.err
    assert "sequence a > b: removal effect " in captured.err
    assert main(["attribute", str(f), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
