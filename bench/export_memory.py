"""Peak memory of a large household's export, streamed (this tree) vs one message
(``--baseline REF``, the tree before session 26), in one run:
``python -m bench.export_memory [--events 100000] [--baseline d3fbe5f] [--repeats 2]``.

Until session 26 ``GET /v1/household/{id}/export`` was one gRPC message per hop: each data
holder's part one ``ExportAccount`` answer, which privacy parsed, merged and serialised
again into one ``ExportHousehold`` answer, which the gateway parsed and serialised again
into its response. Privacy and the gateway each held the whole household, several times
over, and a household whose export passed 64 MiB could not be exported at all. Now every
hop streams chunks (services/common/export_stream.py).

One household of ``--events`` events (on four devices, posted through the gateway) is
written once into one data directory; then a mesh of each tree is started on it in turn
(``--baseline``'s tree from ``git archive``, with this checkout's generated protos, as
bench.assign_cpu does) and the household exported ``--repeats`` times through the
gateway by a client that reads the body as it comes and keeps only its digest. Before each
export the peak-RSS counter of every process is reset (``/proc/<pid>/clear_refs`` 5), so
``VmHWM`` afterwards is the peak during that export. Reported per tree and process: the
RSS before, the peak during the export (the largest over the repeats) and the growth;
the export's status, bytes, seconds and the end of its body (a whole document ends with
``"complete": true}`` in this tree, ``"v":1}`` in the baseline; a household past 64 MiB
gets the baseline's error JSON there). The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench._common import cpu_model, log
from bench.assign_cpu import extract
from services.testing.mesh import ROOT, Mesh, write_api_key

PROCESSES = ("gateway", "privacy", "clustering")
ACCOUNT = "bench-export-hh"
DEVICES = (("tv-1", "tv"), ("tab-1", "tablet"), ("ph-1", "mobile"), ("pc-1", "desktop"))


def rss_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux >= 4.0)


def start(label: str, root: Path, data_dir: Path, logs: Path) -> tuple[Mesh, str]:
    mesh = Mesh.on_free_ports(data_dir, log_dir=logs / label, root=root, extra_env={
        "HEARTH_LOG_LEVEL": "WARNING", "HEARTH_RETENTION_CHECK_S": "0",
        "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1_000_000, "burst": 1_000_000})})
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = write_api_key(data_dir / "gateway-keys.json", "bench-admin", "admin")
    mesh.start_healthy(180)
    return mesh, key


def seed(mesh: Mesh, key: str, events: int) -> None:
    started = time.monotonic()
    t0 = time.time() - 60 * 86400.0
    step = 50 * 86400.0 / max(1, events // len(DEVICES))
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=300) as c:
        batch, sent = [], 0
        for i in range(events):
            device, kind = DEVICES[i % len(DEVICES)]
            ts = t0 + (i // len(DEVICES)) * step
            batch.append({"event_id": f"e-{i}", "account_id": ACCOUNT, "device_id": device, "device_type": kind,
                          "ts": datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                          "kind": "heartbeat", "title_id": f"title-{i % 5000}", "series_id": f"show-{i % 300}",
                          "genres": ["drama", "comedy"][: 1 + i % 2], "duration_s": 300, "maturity": "adult",
                          "country": "FR"})
            if len(batch) == 10_000 or i == events - 1:
                r = c.post("/v1/events", json={"events": batch})
                r.raise_for_status()
                sent += len(batch)
                batch = []
    log(f"seeded {events} events in {time.monotonic() - started:.0f}s")


def export_once(mesh: Mesh, key: str) -> dict:
    pids = {name: mesh.processes[name].pid for name in PROCESSES}
    before = {name: rss_kb(pid, "VmRSS") for name, pid in pids.items()}
    for pid in pids.values():
        reset_peak(pid)
    digest, size, tail = hashlib.sha256(), 0, b""
    started = time.perf_counter()
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=600) as c:
        with c.stream("GET", f"/v1/household/{ACCOUNT}/export") as r:
            status = r.status_code
            for chunk in r.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
                tail = (tail + chunk)[-160:]   # an error's whole JSON body, or the document's end
    seconds = time.perf_counter() - started
    peak = {name: rss_kb(pid, "VmHWM") for name, pid in pids.items()}
    return {"status": status, "bytes": size, "seconds": round(seconds, 2), "sha256": digest.hexdigest(),
            "tail": tail.decode("utf-8", "replace"),
            "rss_before_mb": {n: round(v / 1024, 1) for n, v in before.items()},
            "peak_mb": {n: round(v / 1024, 1) for n, v in peak.items()}}


def count_events(mesh: Mesh, key: str) -> int:
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=600) as c:
        return len(c.get(f"/v1/household/{ACCOUNT}/export").json()["services"]["clustering"]["events"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--baseline", default="d3fbe5f", help="the one-message tree (before session 26)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="", help="directory for the data and logs (default: a temporary one)")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="export26-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir, logs = work / "var", work / "logs"
    baseline_tree = extract(args.baseline, work / "baseline-tree")
    trees = {"streamed": ROOT, "one_message": baseline_tree}
    results: dict[str, dict] = {}
    try:
        mesh, key = start("seed", ROOT, data_dir, logs)
        try:
            seed(mesh, key, args.events)
        finally:
            mesh.stop()
        for label, root in trees.items():
            mesh, key = start(label, root, data_dir, logs)
            try:
                runs = [export_once(mesh, key) for _ in range(args.repeats)]
                events = count_events(mesh, key) if label == "streamed" and runs[0]["status"] == 200 else None
            finally:
                mesh.stop()
            peak = {n: max(r["peak_mb"][n] for r in runs) for n in PROCESSES}
            before = {n: min(r["rss_before_mb"][n] for r in runs) for n in PROCESSES}
            results[label] = {"runs": runs, "peak_mb": peak, "rss_before_mb": before,
                              "growth_mb": {n: round(peak[n] - before[n], 1) for n in PROCESSES},
                              "bytes": runs[0]["bytes"], "seconds": sorted(r["seconds"] for r in runs)}
            if events is not None:
                results[label]["events_exported"] = events
            log(f"{label}: {json.dumps({k: v for k, v in results[label].items() if k != 'runs'})}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ratio = {n: round(results["streamed"]["growth_mb"][n] / max(0.1, results["one_message"]["growth_mb"][n]), 3)
             for n in PROCESSES}
    print(json.dumps({"events": args.events, "baseline": args.baseline, "repeats": args.repeats,
                      "cpu": cpu_model(), "cores": os.cpu_count(), "load_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                      "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                      "streamed": results["streamed"], "one_message": results["one_message"],
                      "growth_ratio_streamed_to_one_message": ratio}))


if __name__ == "__main__":
    main()
