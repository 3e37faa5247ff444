"""`make bench-gateway`: the gateway's CPU per request beside the transport floor, in one run.

    python -m bench.gateway [--baseline REF] [--rounds 3] [--seconds 8] [--concurrency 16]
                            [--households 12] [--py-spy DIR] [--profile-seconds 15]

The gateway's view of the one harness, bench/assign_cpu.py (read it for what is measured
and how): these options are mapped onto ``python -m bench.assign_cpu --floor --days 20
[--baseline-gateway REF] [--profile DIR --profile-processes gateway]``, i.e. the floor,
this checkout's mesh and, with ``--baseline REF``, REF's gateway in front of the same
services, closed-loop assigns interleaved round by round. ``BENCH_PY_SPY_GIL=1`` profiles
with ``--gil``. The JSON printed last is bench.assign_cpu's (``targets``, ``over_floor``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench import assign_cpu


def assign_cpu_argv(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description="Gateway CPU per assign beside the transport floor")
    p.add_argument("--baseline", default="", help="git ref whose gateway runs beside this one")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--households", type=int, default=12)
    p.add_argument("--py-spy", type=Path, default=None, help="directory for py-spy profiles of each gateway")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = ["--floor", "--days", "20", "--households", str(a.households), "--repeats", str(a.rounds),
           "--seconds", str(a.seconds), "--concurrency", str(a.concurrency)]
    if a.baseline:
        out += ["--baseline-gateway", a.baseline]
    if a.py_spy is not None:
        out += ["--profile", str(a.py_spy), "--profile-processes", "gateway",
                "--profile-seconds", str(a.profile_seconds)]
        if os.environ.get("BENCH_PY_SPY_GIL"):
            out.append("--gil")
    if a.out is not None:
        out += ["--out", str(a.out)]
    return out


def main(argv: list[str] | None = None) -> dict:
    return assign_cpu.main(assign_cpu_argv(argv))


if __name__ == "__main__":
    main()
