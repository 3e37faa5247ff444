"""A batch sent again (the retry after a 504 that docs/features.md calls always safe) is
answered with its events counted as duplicates — what they are, and what
``POST /v1/events/status`` says of them (``stored``) — through the real gateway and
clustering (review36, session 36).

Until session 36 ingest tested lateness before the duplicate check, so every stored event
older than its device's newest minus HEARTH_LATENESS_TOLERANCE_S (6 h) came back as
``rejected_late``: a resend of 40 stored events three hours apart answered
``duplicates: 3, rejected_late: 37`` — "refused, not stored" to a client whose events were
all stored. Both ingest paths: the per-device one (a household or a few devices) and the
set-wise one a batch of 64 or more known devices takes (``PREPARE_KNOWN_DEVICES_FROM``).
"""

from __future__ import annotations

import time

import httpx

from services.clustering.store import PREPARE_KNOWN_DEVICES_FROM
from tests.helpers.timestamps import iso_utc

T0 = time.time() - 20 * 86400


def _event(account: str, i: int, device: str = "tv-1") -> dict:
    return {"event_id": f"{account}-{device}-{i}", "account_id": account, "device_id": device, "device_type": "tv",
            "ts": iso_utc(T0 + i * 3 * 3600), "kind": "play_start", "title_id": "t1", "duration_s": 1200}


def test_a_stored_batch_sent_again_is_all_duplicates_not_rejected_late(mesh):
    account = "resend36"
    events = [_event(account, i) for i in range(40)]
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as client:
        first = client.post("/v1/events", json={"events": events})
        assert first.status_code == 200 and first.json()["accepted"] == 40, first.text
        again = client.post("/v1/events", json={"events": events})
        assert again.status_code == 200, again.text
        assert (again.json()["accepted"], again.json()["duplicates"], again.json()["rejected_late"]) == (0, 40, 0), \
            again.text
        status = client.post("/v1/events/status", json={"account_id": account,
                                                        "event_ids": [e["event_id"] for e in events]})
        assert status.json()["stored"] == [e["event_id"] for e in events], status.text
        # A truly late event (never stored, 9 h behind the device's newest) is still refused as late.
        late = dict(_event(account, 39), event_id=f"{account}-late", ts=iso_utc(T0 + 39 * 3 * 3600 - 9 * 3600))
        refused = client.post("/v1/events", json={"events": [late]})
        assert (refused.json()["accepted"], refused.json()["rejected_late"]) == (0, 1), refused.text


def test_a_big_batch_sent_again_with_new_events_counts_the_old_as_duplicates(mesh):
    """The set-wise path: the resend carries one new event per device, so every device has
    fresh events and the batch takes the prepared known-device path."""
    households = [f"resend36-big-{h}" for h in range(PREPARE_KNOWN_DEVICES_FROM)]
    old = [_event(a, i) for a in households for i in range(10)]
    new = [_event(a, 10) for a in households]
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as client:
        first = client.post("/v1/events", json={"events": old})
        assert first.status_code == 200 and first.json()["accepted"] == len(old), first.text
        again = client.post("/v1/events", json={"events": old + new})
        assert again.status_code == 200, again.text
        assert (again.json()["accepted"], again.json()["duplicates"], again.json()["rejected_late"]) == \
            (len(new), len(old), 0), again.text
