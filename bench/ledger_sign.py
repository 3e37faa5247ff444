"""Cost of the signed off-site deletion ledger: ``python -m bench.ledger_sign [--households 10000]``.

Signs a ledger of N completed household deletion jobs and N shredded accounts (2N entries,
``backup.sign_ledger``: what ``hearth ledger export`` adds since session 32), writes it, and
reads it back as ``hearth restore --ledger`` does (every signature verified, every entry
parsed). Wall times; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model


def main(argv: list[str] | None = None) -> dict:
    from services.common.erasure import ErasureScope
    from services.privacy.backup import Ledger, read_ledger_file, write_ledger_file
    from services.privacy.deletion.domain import JobState, job_to_dict, new_job
    from services.privacy.keys.signing import generate_private_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--households", type=int, default=10_000)
    args = parser.parse_args(argv)
    key = generate_private_key()
    jobs = {}
    for i in range(args.households):
        job = new_job(f"job-{i:07d}", ErasureScope.from_dict({"kind": "household", "account_id": f"acc-{i}"}),
                      "officer", "privacy_officer", datetime(2026, 1, 1, tzinfo=UTC))
        jobs[job.job_id] = job_to_dict(dataclasses.replace(job, state=JobState.COMPLETED))
    ledger = Ledger(jobs, {f"acc-{i}" for i in range(args.households)})
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ledger-sign-") as tmp:
        path = Path(tmp) / "ledger.json"
        started = time.perf_counter()
        write_ledger_file(ledger, path, key)
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        read = read_ledger_file(path, [key.public_key()])
        read_s = time.perf_counter() - started
        size = path.stat().st_size
    assert read.jobs == ledger.jobs and read.shredded_accounts == ledger.shredded_accounts
    entries = 2 * args.households
    report = {"households": args.households, "entries": entries, "file_mb": round(size / 2**20, 2),
              "export_s": round(export_s, 2), "export_us_per_entry": round(1e6 * export_s / entries),
              "read_verify_s": round(read_s, 2), "read_us_per_entry": round(1e6 * read_s / entries),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_at_start": [round(x, 2) for x in load_start],
              "load_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
