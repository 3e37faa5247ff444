"""A rolling upgrade to session 28's batched data keys and consent checks (privacy's
GetDataKeys and GetConsents, docs/privacy.md §10 and §8) with a process of the release before it, run from commit 43a5077's tree in the mesh of
this one, both ways:

- a privacy of the release before, run on its own generated protos as it shipped (it
  serves neither: UNIMPLEMENTED, nothing audited or counted), behind this tree's stores:
  a store's warming falls back to GetDataKey and its consent check to GetConsent, one
  household a call, before the write;
- a clustering of the release before behind this tree's privacy: it keeps calling GetDataKey
  and GetConsent and is answered as before.

In both, a household erased before stays erased (its events 412, no key made for it). With
every process upgraded, the batch's keys and consents come in batch calls."""

from __future__ import annotations

import time
import uuid

import httpx

from bench.assign_cpu import extract
from services.common.field_crypto import WARM_BATCH
from tests.helpers.history import require_commit
from tests.helpers.mesh_calls import data_key_fetches, privacy_calls, restart_service
from tests.helpers.timestamps import iso_utc
from tests.helpers.waiting import deletion_job

BEFORE_BATCHED_KEYS = "43a5077"   # session 27's end: GetDataKey only
RUN = uuid.uuid4().hex[:6]
HOUSEHOLDS = 120


def _batch(tag: str, t0: float) -> dict:
    return {"events": [{"event_id": f"dkb-{RUN}-{tag}-{i}", "account_id": f"dkb-{RUN}-{tag}-{i}",
                        "device_id": "tv-1", "device_type": "tv", "ts": iso_utc(t0), "kind": "heartbeat",
                        "title_id": "title-1", "genres": ["drama"], "duration_s": 300} for i in range(HOUSEHOLDS)]}


def _ingest_new_households(c, mesh, tag: str, t0: float) -> dict[str, float]:
    """A batch of new households posted and stored; privacy's key calls it took, and the
    keys clustering fetched before its write ("warm") and inside it ("on_use")."""
    before, fetched_before = privacy_calls(mesh), data_key_fetches(mesh, "clustering")
    r = c.post("/v1/events", json=_batch(tag, t0))
    assert r.status_code == 200 and r.json()["accepted"] == HOUSEHOLDS, r.text
    after, fetched = privacy_calls(mesh), data_key_fetches(mesh, "clustering")
    return {**{method: after[method] - before[method] for method in after},
            **{when: fetched.get(when, 0.0) - fetched_before.get(when, 0.0) for when in ("warm", "on_use")}}


def _refused(c, acct: str, t0: float) -> None:
    r = c.post("/v1/events", json={"events": [{"event_id": f"{acct}-after-{uuid.uuid4().hex[:6]}",
                                               "account_id": acct, "device_id": "tv-1", "device_type": "tv",
                                               "ts": iso_utc(t0), "kind": "heartbeat", "title_id": "title-1",
                                               "genres": ["drama"], "duration_s": 300}]})
    assert r.status_code == 412, r.text


def test_stores_and_privacy_of_either_release_give_new_households_keys_and_erased_ones_none(mesh, tmp_path):
    require_commit(BEFORE_BATCHED_KEYS)
    old_tree = extract(BEFORE_BATCHED_KEYS, tmp_path / "tree", own_protos=True)
    t0 = time.time() - 3600
    erased = f"dkb-{RUN}-erased"
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=120) as c:
        r = c.post("/v1/events", json=_batch("first", t0) | {"events": [
            {**_batch("x", t0)["events"][0], "event_id": f"{erased}-0", "account_id": erased}]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/delete", json={"scope": {"kind": "household", "account_id": erased}, "reason": "gdpr_art17"})
        assert r.status_code == 202, r.text
        assert deletion_job(c, r.json()["job_id"])["state"] == "completed"

        # (a) privacy of the release before, as it shipped (its own generated protos): it
        # serves neither GetDataKeys nor GetConsents, so gRPC answers UNIMPLEMENTED before its
        # interceptor — no refusal audited or counted (until session 34 this test ran it on
        # this checkout's protos, whose servicer base lists both: its permission check then
        # answered PERMISSION_DENIED, audited and counted, 1 here). The store's warming
        # fetches one key a call before its write, and its consent check one account a call.
        restart_service(mesh, "privacy", old_tree)
        try:
            first = _ingest_new_households(c, mesh, "old-privacy", t0)
            second = _ingest_new_households(c, mesh, "old-privacy-2", t0)
            for calls in (first, second):
                assert calls["GetDataKey"] >= HOUSEHOLDS and calls["warm"] == HOUSEHOLDS, calls
                assert calls["on_use"] < HOUSEHOLDS // 4, calls
                assert calls["GetConsent"] >= HOUSEHOLDS, calls   # consent: one account a call
            assert first["GetDataKeys"] + second["GetDataKeys"] == 0, (first, second)   # not served
            assert first["GetConsents"] + second["GetConsents"] == 0, (first, second)
            _refused(c, erased, t0)
        finally:
            restart_service(mesh, "privacy")

        # (b) clustering of the release before behind this privacy: GetDataKey as before.
        restart_service(mesh, "clustering", old_tree)
        try:
            calls = _ingest_new_households(c, mesh, "old-clustering", t0)
            assert calls["GetDataKey"] >= HOUSEHOLDS and calls["GetDataKeys"] == 0, calls
            assert calls["GetConsent"] >= HOUSEHOLDS and calls["GetConsents"] == 0, calls
            _refused(c, erased, t0)
        finally:
            restart_service(mesh, "clustering")

        # Every process upgraded: the batch's keys in GetDataKeys calls of WARM_BATCH households.
        calls = _ingest_new_households(c, mesh, "upgraded", t0)
        assert calls["GetDataKeys"] == -(-HOUSEHOLDS // WARM_BATCH), calls
        assert calls["GetDataKey"] < HOUSEHOLDS // 4, calls
        assert calls["GetConsents"] == 1 and calls["GetConsent"] < HOUSEHOLDS // 4, calls
        _refused(c, erased, t0)
