"""Request streams left open do not hold a service's workers (attack25). Until
then forty ``IngestEvents`` streams opened on clustering's port by one service-role
principal the gateway vouches for — what the Envoy edge forwards for any service-role API
key (an ingest pipeline's) — and left silent held every clustering worker: household reads
through the gateway answered 504 until the connections aged out (5 min), and the client
could open them again. Now a caller keeps at most ``STREAMS_PER_CALLER`` request streams
open for sending longer than ``STREAM_GRACE_S`` in a service process (silent or sending a
message now and then: both hold a worker); the newer ones are cancelled."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
from services.common.server import STREAMS_PER_CALLER
from tests.helpers.mesh_calls import ingest_heartbeats
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

STREAMS = 40


@pytest.mark.parametrize("sending", ["nothing", "an empty message every 0.5 s"])
def test_ingest_streams_one_caller_keeps_open_leave_the_service_serving(mesh, sending):
    ingest_heartbeats(mesh, "idle-streams-1")
    pipeline = Principal("idle-stream-pipeline", Role.SERVICE)
    metadata = [(PRINCIPAL_KEY, pipeline.id), (ROLE_KEY, pipeline.role.value),
                (TOKEN_KEY, mesh.signer("gateway").sign(pipeline, audience="clustering"))]
    release = threading.Event()

    def requests():
        while not release.wait(0.5 if sending != "nothing" else None):
            yield cpb.IngestEventsRequest()

    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}")
    try:
        stub = cpb_grpc.ClusteringServiceStub(channel)
        calls = [stub.IngestEvents.future(requests(), metadata=metadata, timeout=SLOW_MACHINE_S * 2)
                 for _ in range(STREAMS)]
        time.sleep(3)   # the streams are open and waiting
        started = time.monotonic()
        r = httpx.get(mesh.url + "/v1/household/idle-streams-1", headers={"X-API-Key": mesh.api_key},
                      timeout=SLOW_MACHINE_S)
        assert r.status_code == 200, f"{r.status_code} after {time.monotonic() - started:.1f} s: {r.text}"
        cancelled = wait_for(lambda: [c for c in calls if c.done()] if sum(c.done() for c in calls)
                             >= STREAMS - STREAMS_PER_CALLER else None,
                             what="the silent streams over the bound cancelled")
        assert all(c.exception() is not None and c.exception().code() == grpc.StatusCode.CANCELLED
                   for c in cancelled), [c.exception() for c in cancelled[:3]]
        assert sum(not c.done() for c in calls) <= STREAMS_PER_CALLER
    finally:
        release.set()
        channel.close()
