"""The ECE population (issue #10, ece36): worlds.ECE_REPORTING shares no seed with any other
population, the benches that take a TUNING seed refuse it, and `python -m bench.accuracy
--ece-population` prints the ECE before and after feedback with its household noise — read
here on TUNING seeds only (the ECE population itself is the lead's to read)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import worlds as W

ROOT = Path(__file__).resolve().parents[3]


def _other_seeds() -> dict[str, int]:
    """Every seed a population of households is drawn from, but the ECE population's."""
    from bench import stream_tuning as S
    from bench import worlds_blind as B
    from bench import worlds_movielens as M
    from bench import worlds_movielens_latest as L
    seeds = {"TUNING": W.TUNING.seed, "REPORTING": W.REPORTING.seed, "change suite": S.SUITE_SEED,
             "blind": B.BLIND_SEED, "100K": M.MOVIELENS_SEED, "100K tuning": M.MOVIELENS_TUNING_SEED,
             "latest-small": L.LATEST_SEED, "latest-small tuning": L.LATEST_TUNING_SEED}
    # the fresh TUNING seeds benches were run on (--seed), as the docs record them (lines
    # about the ECE population itself aside)
    for line in (ROOT / "docs" / "benchmarks.md").read_text().splitlines():
        if "ece_reporting" in line.lower() or "ece population" in line.lower():
            continue
        for s in re.findall(r"\bseed[ =](\d{8})\b", line):
            seeds[f"docs seed {s}"] = int(s)
    return seeds


def test_the_ece_population_shares_no_seed_with_any_other_population():
    ece = W.ECE_REPORTING
    others = _other_seeds()
    assert ece.seed not in others.values(), [k for k, v in others.items() if v == ece.seed]
    # fresh TUNING seeds are drawn next to TUNING's (20_26x_xxx): the ECE seed is far from them
    assert not 20_260_000 <= ece.seed < 20_270_000
    assert ece.seed in W.REPORT_ONLY_SEEDS and W.REPORTING.seed in W.REPORT_ONLY_SEEDS
    assert W.TUNING.seed not in W.REPORT_ONLY_SEEDS
    # every family, like REPORTING, and large enough for the ECE's household noise (docs: ~300)
    assert set(ece.families) == set(W.FAMILIES)
    assert len(ece.families) * ece.worlds_per_family * ece.households_per_world >= 250
    # the seed is written once in the code (worlds.py) and nowhere else in bench/ or scripts/
    digits = re.compile(r"\b" + r"_?".join(str(ece.seed)) + r"\b")
    users = [p.relative_to(ROOT).as_posix() for d in ("bench", "scripts", "services") for p in (ROOT / d).rglob("*.py")
             if digits.search(p.read_text())]
    assert users == ["bench/worlds.py"], users


def test_the_ece_populations_households_are_none_of_the_others():
    # the first household of a family's first world under each split: different households
    first = {s.name: W.generate(s, families=("flatshare",) if "flatshare" in s.families else ("bingers",),
                                worlds_per_family=1, households_per_world=1)[0]
             for s in (W.ECE_REPORTING, W.REPORTING)}
    tuning = W.generate(W.TUNING, families=("bingers",), worlds_per_family=1, households_per_world=1)[0]
    ece_bingers = W.generate(W.ECE_REPORTING, families=("bingers",), worlds_per_family=1, households_per_world=1)[0]
    assert not np.array_equal(first["ece_reporting"].start_ts[:5], first["reporting"].start_ts[:5])
    assert not np.array_equal(ece_bingers.start_ts[:5], tuning.start_ts[:5])


def test_the_benches_that_take_a_tuning_seed_refuse_the_ece_seed():
    from bench import stream_tuning as S
    with pytest.raises(ValueError, match="report-only"):
        S.change_suite(1, W.ECE_REPORTING.seed)
    from bench import pair_model
    with pytest.raises(SystemExit):
        pair_model._tuning_worlds(W.ECE_REPORTING.seed, 0, 1)


def _run_cli(monkeypatch, capsys, *argv: str) -> dict:
    from bench import accuracy
    monkeypatch.setattr(sys, "argv", ["bench.accuracy", *argv])
    accuracy.main()
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1])


SMALL = ("--ece-population", "--ece-split", "tuning", "--ece-worlds", "1", "--ece-households", "2",
         "--feedback-draws", "2", "--workers", "1")


def test_the_ece_read_prints_both_figures_with_their_noise_and_parts_pool_to_the_one_run(
        monkeypatch, capsys, tmp_path):
    whole = _run_cli(monkeypatch, capsys, *SMALL)["ece_population"]
    assert whole["split"]["name"] == "tuning" and whole["split"]["households"] == 6
    batch = whole["batch"]
    for key in ("before_feedback", "after_feedback"):
        r = batch[key]
        for field in ("ece", "household_floor", "household_p025", "household_p975", "binning_floor"):
            assert isinstance(r[field], float) and 0.0 <= r[field] <= 1.0, (key, field, r)
        assert r["household_p025"] <= r["household_p975"]
    assert batch["before_feedback"]["households"] == 6
    assert batch["after_feedback"]["draws"] == 2 and len(batch["after_feedback"]["per_draw"]) == 2
    assert batch["after_feedback"]["ece"] == round(batch["mesh"]["mesh"], 4)
    assert "streaming" not in whole
    # the same read in two parts meeting in a cache: each part fits its own households, the
    # scoring run fits nothing and reads exactly the one run's figures
    cache = str(tmp_path / "parts")
    first = _run_cli(monkeypatch, capsys, *SMALL, "--part", "0/2", "--cache", cache)["ece_population"]
    assert first["fitted"] == 3 and first["households_left"] == 3 and "batch" not in first
    second = _run_cli(monkeypatch, capsys, *SMALL, "--part", "1/2", "--cache", cache)["ece_population"]
    assert second["fitted"] == 3 and second["households_left"] == 0
    pooled = _run_cli(monkeypatch, capsys, *SMALL, "--cache", cache)["ece_population"]
    assert pooled["batch"] == batch
    # a cache of other draws is refused, not mixed in
    with pytest.raises(SystemExit):
        _run_cli(monkeypatch, capsys, *SMALL[:-4], "--feedback-draws", "1", "--workers", "1", "--cache", cache)


def test_a_part_needs_a_cache_and_a_well_formed_spec():
    from bench import ece_population as P
    assert P.parse_part("1/3") == (1, 3) and P.parse_part(None) is None
    for bad in ("3/2", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            P.parse_part(bad)
    with pytest.raises(ValueError, match="--cache"):
        P.run(W.TUNING, part=(0, 2), worlds_per_family=1, households_per_world=1)
