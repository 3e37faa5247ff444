"""`make bench-assign-cpu` / `make bench-gateway` keep working: the one harness
(bench/assign_cpu.py) starts the floor, this checkout's mesh, an older commit's whole mesh
and an older commit's gateway in front of this mesh's services, and measures CPU per assign
of every process of each. Its figures are not results (tiny and short); what is asserted is
that every target was measured, served without errors, and that the report's ratios are
the ratios of its own figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import assign_cpu
from bench.gateway import assign_cpu_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_one_harness_measures_floor_mesh_baseline_mesh_and_baseline_gateway(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.assign_cpu", "--floor", "--baseline", "HEAD",
                          "--baseline-gateway", "HEAD", "--households", "3", "--days", "10", "--seconds", "2",
                          "--repeats", "1", "--concurrency", "4", "--warmup-seconds", "1", "--idle-seconds", "1",
                          "--out", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    targets = report["targets"]
    assert list(targets) == ["floor", "baseline", "gateway-baseline", "candidate"]
    for label, t in targets.items():
        assert t["errors"] == 0 and t["assigns_per_s"] > 0, (label, t["runs"])
        assert len(t["runs"]) == 1
        assert t["cpu_ms_per_assign"]["gateway"] > 0, label
    for label in ("baseline", "gateway-baseline", "candidate"):
        cpu = targets[label]["cpu_ms_per_assign"]
        assert cpu["clustering"] > 0 and cpu["privacy"] > 0, (label, cpu)
        assert sum(targets[label]["threads_cpu_ms_per_assign"]["clustering"].values()) > 0
    assert set(targets["floor"]["cpu_ms_per_assign"]) == {"gateway", "echo"}
    # The old gateway runs in front of the candidate's services: the same households.
    cand, base = report["candidate"], report["baseline"]
    for name, ratio in report["ratio"].items():
        assert ratio == pytest.approx(cand["cpu_ms_per_assign"][name] / base["cpu_ms_per_assign"][name], abs=2e-3)
    floor = targets["floor"]
    assert report["over_floor"]["candidate"]["saturation"] == pytest.approx(
        cand["assigns_per_s"] / floor["assigns_per_s"], abs=2e-3)
    assert report["over_floor"]["gateway-baseline"]["gateway_cpu"] == pytest.approx(
        targets["gateway-baseline"]["cpu_ms_per_assign"]["gateway"] / floor["cpu_ms_per_assign"]["gateway"], abs=0.01)


def test_bench_gateway_is_the_harness_with_the_floor_and_an_old_gateway():
    argv = assign_cpu_argv(["--baseline", "abc123", "--rounds", "5", "--seconds", "8"])
    args = assign_cpu.parser().parse_args(argv)
    assert args.floor and args.baseline_gateway == "abc123" and not args.baseline
    assert (args.repeats, args.seconds, args.households, args.concurrency) == (5, 8.0, 12, 16)
    assert args.profile is None
    profiled = assign_cpu.parser().parse_args(assign_cpu_argv(["--py-spy", "/tmp/x"]))
    assert profiled.profile == Path("/tmp/x") and profiled.profile_processes == "gateway"


def test_profile_summary_shares_of_self_and_total_samples():
    raw = "main;serve;assign 6\nmain;serve;audit 3\nmain;idle 1\nnot a stack line\n"
    s = assign_cpu.profile_summary(raw)
    assert s["samples"] == 10
    assert s["self_pct"] == {"assign": 60.0, "audit": 30.0, "idle": 10.0}
    assert s["total_pct"]["main"] == 100.0 and s["total_pct"]["serve"] == 90.0
    assert assign_cpu.profile_summary("")["samples"] == 0


def test_candidate_env_is_parsed_and_a_malformed_pair_refused():
    assert assign_cpu.parse_env("MALLOC_ARENA_MAX=2, MALLOC_TRIM_THRESHOLD_=131072") == {
        "MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert assign_cpu.parse_env("") == {}
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        assign_cpu.parse_env("MALLOC_ARENA_MAX")
