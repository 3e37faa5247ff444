"""CPU per event of ``ClusteringStore.ingest`` in process, by batch size and by how long
the device's open session already is (docs/benchmarks.md "Incremental sessions").

    python -m bench.ingest_cpu [--devices 4] [--events 600] [--batch 2,50] [--checkpoints 100,300,600]

A store with a ``FieldCipher`` (a real key ring, no gRPC) on SQLite in a temporary
directory; each device streams heartbeats 30 s apart (one open session), posted in
batches of ``--batch`` events, devices in turn. Prints one JSON object: per batch size,
the CPU µs per event (process time) of the batches that took each device's session from
one checkpoint to the next. Run it from another tree (``git archive REF | tar -x -C DIR``,
``cd DIR``, with this tree's generated ``hearth/``) for that commit's figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek

GENRES = (("drama", "crime"), ("kids", "animation"), ("scifi", "action"))


def _fetcher(ring: KeyRing):
    from datetime import UTC, datetime

    def fetch(account: str, version: int) -> tuple[int, bytes]:
        if version == 0 and not ring.has_dek(account):
            ring.create_dek(account, datetime.now(UTC))
        return ring.data_key(account, version or None)
    return fetch


def measure(devices: int, events: int, batch: int, checkpoints: list[int], root: Path) -> dict:
    store = ClusteringStore(SqliteDatabase(root / f"ingest-{batch}.db"),
                            cipher=FieldCipher(_fetcher(KeyRing([generate_kek("k1")], "k1"))))
    store.migrate()
    t0 = time.time() - 7 * 86400
    cpu = {c: 0.0 for c in checkpoints}
    counted = {c: 0 for c in checkpoints}
    for start in range(0, events, batch):
        for d in range(devices):
            evs = [ViewingEvent(event_id=f"d{d}-e{i}", account_id="acct-bench", device_id=f"dev-{d}",
                                device_type="tv", ts=t0 + 30.0 * i, kind="heartbeat", title_id=f"t-{i // 90}",
                                series_id="s-1", genres=GENRES[i % 3], duration_s=30.0, maturity="adult",
                                country="GB", profile_hint="p1")
                   for i in range(start, min(start + batch, events))]
            c0 = time.process_time()
            store.ingest(evs)
            spent = time.process_time() - c0
            reached = start + len(evs)
            bucket = next(c for c in checkpoints if reached <= c)
            cpu[bucket] += spent
            counted[bucket] += len(evs)
    store.db.close()
    return {f"up_to_{c}": round(1e6 * cpu[c] / counted[c], 1) for c in checkpoints if counted[c]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--events", type=int, default=600, help="events per device (one open session)")
    p.add_argument("--batch", default="2,50", help="batch sizes, comma-separated")
    p.add_argument("--checkpoints", default="100,300,600", help="session lengths the figures are split at")
    args = p.parse_args(argv)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    if checkpoints[-1] < args.events:
        checkpoints.append(args.events)
    with tempfile.TemporaryDirectory(prefix="hearth-ingest-cpu-") as tmp:
        out = {"devices": args.devices, "events_per_device": args.events,
               "cpu_us_per_event": {int(b): measure(args.devices, args.events, int(b), checkpoints, Path(tmp))
                                    for b in args.batch.split(",")}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
