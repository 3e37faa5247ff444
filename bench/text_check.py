"""CPU of the one text check (services/common/text.check_text_fields, run by the server
interceptor on every request message) beside the work the clustering servicer does with
an ingest batch before its store: parse, ``event_from_pb``, ``validate_batch``
(docs/benchmarks.md "The text check").

    OMP_NUM_THREADS=1 python -m bench.text_check [--events 10000] [--rounds 9]

Each round parses the same serialised IngestEventsRequest afresh (as the server does per
call: the check pays for reading each field of a new message) and times, in process CPU
time, the servicer's front half without and then with the check, alternating; prints one
JSON object with the medians per event and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench._common import emit, log, run_window
from hearth.clustering.v1 import clustering_pb2 as cpb
from services.clustering.domain.events import validate_batch
from services.clustering.servicer import event_from_pb
from services.common import text
from services.common.pbutil import float_to_ts


def batch(n: int) -> bytes:
    now = time.time()
    request = cpb.IngestEventsRequest()
    for i in range(n):
        e = request.events.add(event_id=f"evt-{i:08d}", account_id=f"acct-{i % 50:04d}", device_id=f"tv-{i % 7}",
                               device_type=cpb.DEVICE_TYPE_TV, ts=float_to_ts(now - 3600 + i * 0.01),
                               kind=cpb.EVENT_KIND_HEARTBEAT, title_id=f"title-{i % 300}",
                               genres=["drama", "crime"], duration_s=30.0, maturity=cpb.MATURITY_ADULT)
        e.series_id = f"series-{i % 40}"
        e.country = "GB"
        e.profile_hint = "Kids"
    return request.SerializeToString()


def front_half(data: bytes, check: bool) -> float:
    started = time.process_time()
    request = cpb.IngestEventsRequest.FromString(data)
    if check:
        text.check_text_fields(request)
    validate_batch([event_from_pb(e, f"events[{i}]") for i, e in enumerate(request.events)])
    return time.process_time() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started, load = time.time(), os.getloadavg()[0]
    data = batch(args.events)
    front_half(data, True)   # warm: the check's per-type plan, imports
    without, with_check = [], []
    for r in range(args.rounds):
        without.append(front_half(data, False))
        with_check.append(front_half(data, True))
        log(f"round {r + 1}: {without[-1] * 1e3:.1f} ms without, {with_check[-1] * 1e3:.1f} ms with")
    per_event = 1e6 / args.events
    a, b = statistics.median(without) * per_event, statistics.median(with_check) * per_event
    return emit({"bench": "text_check", "events": args.events, "rounds": args.rounds,
                 "front_half_us_per_event": round(a, 2), "with_text_check_us_per_event": round(b, 2),
                 "text_check_us_per_event": round(b - a, 2), "ratio": round(b / a, 3),
                 **run_window(started, load)}, args.out)


if __name__ == "__main__":
    main()
