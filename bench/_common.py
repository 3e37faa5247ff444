"""Small helpers every benchmark shares: progress to stderr, the machine's CPU model."""

from __future__ import annotations

import platform
import sys


def log(msg: str) -> None:
    """Progress goes to stderr; stdout's last line is the benchmark's JSON."""
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
