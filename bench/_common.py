"""Small helpers every benchmark shares: progress to stderr, the machine's CPU model."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    """Progress goes to stderr; stdout's last line is the benchmark's JSON."""
    print(msg, file=sys.stderr, flush=True)


def cpu_times_s(stat: str) -> tuple[float, float]:
    """(user, system) CPU seconds from the text of a /proc ``stat`` file (Linux): a
    process's (``/proc/<pid>/stat``) or one thread's (``/proc/<pid>/task/<tid>/stat``)."""
    import os

    fields = stat.rsplit(")", 1)[1].split()   # after the name, which may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc (Linux)."""
    from pathlib import Path

    return sum(cpu_times_s(Path(f"/proc/{pid}/stat").read_text()))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def answers_health(url: str, timeout_s: float = 120.0) -> bool:
    """Poll ``url``/health until it answers 200; False when ``timeout_s`` runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def run_window(started: float, load_before: float) -> dict:
    """When a bench ran (UTC, from ``started``: time.time()) and the 1-minute load before and
    after: what docs/benchmarks.md quotes beside its figures."""
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return {"started_utc": time.strftime(stamp, time.gmtime(started)), "ended_utc": time.strftime(stamp, time.gmtime()),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def emit(result: dict, out: str | None) -> dict:
    """Print a bench's JSON result, and write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return result
