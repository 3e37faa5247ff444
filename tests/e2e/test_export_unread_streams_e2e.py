"""A streamed household export holds a privacy worker (and one in each data holder) for
as long as its reader takes to read it: privacy's ExportHouseholdStream is a generator
that blocks on a reader that does not read. The gateway bounds its own callers (2 in
flight per principal, and the slow-reader floor), but a gRPC caller the mesh admits (the
Envoy edge forwards an API key's principal, as the gateway does) was not bounded: sixteen
unread exports held every privacy worker (HEARTH_MAX_WORKERS, 16), and every store's
GetDataKey, consent check and deletion waited behind them (review26: a new household's
first events answered 504). Now a privacy replica streams at most a few exports at once;
more are RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest

from hearth.common.v1 import common_pb2, common_pb2_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
from tests.helpers.waiting import SLOW_MACHINE_S

RUN = uuid.uuid4().hex[:6]


def _events(account: str, n: int) -> list[dict]:
    t0 = time.time() - 30 * 86400
    return [{"event_id": f"{account}-{i}", "account_id": account, "device_id": f"dev-{i % 3}", "device_type": "tv",
             "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 700 * i)), "kind": "heartbeat",
             "title_id": f"title-{i}-{'x' * 40}", "genres": ["drama"], "duration_s": 300} for i in range(n)]


@pytest.mark.parametrize("target", ["privacy", "clustering"])
def test_unread_export_streams_leave_the_service_serving(mesh, target):
    """privacy's ExportHouseholdStream, and a data holder's ExportAccountStream (clustering's:
    the same permission, the same worker held)."""
    account = f"unread-{target}-{RUN}"
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=SLOW_MACHINE_S) as client:
        r = client.post("/v1/events", json={"events": _events(account, 1500)})   # an export of ~1 MB
        assert r.status_code == 200, r.text
        officer = Principal(f"officer-{RUN}", Role.PRIVACY_OFFICER)
        metadata = [(PRINCIPAL_KEY, officer.id), (ROLE_KEY, officer.role.value),
                    (TOKEN_KEY, mesh.signer("gateway").sign(officer, audience=target))]
        # A reader that takes nothing: no window beyond HTTP/2's first 64 KiB.
        channel = grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports[target]}",
                                        options=[("grpc.http2.bdp_probe", 0)])
        if target == "privacy":
            calls = [ppb_grpc.DeletionStub(channel).ExportHouseholdStream(
                ppb.ExportHouseholdRequest(account_id=account), metadata=metadata, timeout=SLOW_MACHINE_S * 2)
                for _ in range(16)]
        else:
            calls = [common_pb2_grpc.DataHolderStub(channel).ExportAccountStream(
                common_pb2.ExportAccountRequest(account_id=account), metadata=metadata, timeout=SLOW_MACHINE_S * 2)
                for _ in range(16)]
        try:
            time.sleep(3)   # every call reached privacy and wrote what the window takes
            fresh = client.post("/v1/events", json={"events": _events(f"fresh-{RUN}", 1)}, timeout=20)
            assert fresh.status_code == 200, fresh.text
            ended = [call.code() if call.done() else None for call in calls]
            # at most HEARTH_MAX_WORKERS / 4 (4) streamed at once; the rest refused at once
            assert ended.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 12 and ended.count(None) == 4, ended
        finally:
            for call in calls:
                call.cancel()
            channel.close()
        # The cancelled streams gave their slots back: an export is served again (and the
        # tests after this one find the process as before).
        deadline = time.monotonic() + SLOW_MACHINE_S
        while (r := client.get(f"/v1/household/{account}/export")).status_code == 429 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["complete"] is True, r.text[:300]
