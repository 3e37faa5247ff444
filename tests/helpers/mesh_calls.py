"""Calls a test makes into a running mesh as one of its services would, signed with that
service's own key (what the permission interceptor checks), for the parts of the system
that only services may call (e.g. RecordPrediction, which clustering makes)."""

from __future__ import annotations

import time

import grpc

from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
from services.common.service_keys import COMPONENTS
from services.common.pbutil import float_to_ts


def acting_as_service(mesh, service: str, audience: str) -> list[tuple[str, str]]:
    """gRPC metadata of a call made as ``svc:<service>`` to the component ``audience``."""
    principal = Principal(f"svc:{service}", Role.SERVICE)
    token = mesh.signer(service).sign(principal, audience=audience)
    return [(PRINCIPAL_KEY, principal.id), (ROLE_KEY, principal.role.value), (TOKEN_KEY, token)]


class VouchingSigner:
    """Signs each principal with the key of the component that may vouch for it
    (``service_keys.may_vouch``): ``svc:<component>`` with that component's own key, any
    other principal with the gateway's (which forwards the HTTP caller's)."""

    def __init__(self, mesh) -> None:
        self._signers = {component: mesh.signer(component) for component in COMPONENTS}

    def sign(self, principal: Principal, exp: int | None = None, *, audience: str) -> str:
        name = principal.id[len("svc:"):] if principal.id.startswith("svc:") else ""
        return self._signers[name if name in COMPONENTS else "gateway"].sign(principal, exp, audience=audience)


def prediction(prediction_id: str, account: str, *, session_id: str = "s", variant: str = "kmeans",
               probabilities: dict[str, float] | None = None, age_s: float = 600) -> fpb.Prediction:
    """A logged prediction of person p1 in a 2-person household, made ``age_s`` ago."""
    return fpb.Prediction(prediction_id=prediction_id, account_id=account, session_id=session_id, person_id="p1",
                          probabilities=probabilities or {"p1": 0.7, "p2": 0.3}, model_variant=variant,
                          model_version=1, ts=float_to_ts(time.time() - age_s), household_size=2)


def log_predictions(mesh, predictions: list[fpb.Prediction]) -> None:
    """RecordPrediction as svc:clustering, as the clustering service logs what it answered."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['feedback']}") as channel:
        fpb_grpc.FeedbackServiceStub(channel).RecordPrediction(
            fpb.RecordPredictionRequest(predictions=predictions), metadata=acting_as_service(mesh, "clustering", "feedback"),
            timeout=30)


def ingest_heartbeats(mesh, account: str, n: int = 1) -> None:
    """``n`` heartbeat events of ``account`` on one TV, through the mesh's gateway with its
    admin key (a household with a data key and sessions, for tests that look at what the
    mesh stores about it)."""
    import httpx

    from tests.helpers.waiting import SLOW_MACHINE_S

    events = [{"event_id": f"{account}-e{i}", "account_id": account, "device_id": "tv", "device_type": "tv",
               "ts": f"2026-11-0{i + 1}T20:00:00Z", "kind": "heartbeat", "title_id": "t", "genres": ["drama"],
               "duration_s": 300} for i in range(n)]
    r = httpx.post(mesh.url + "/v1/events", json={"events": events}, headers={"X-API-Key": mesh.api_key},
                   timeout=SLOW_MACHINE_S)
    assert r.status_code == 200, r.text


def restart_service(mesh, service: str, tree=None, env: dict | None = None) -> None:
    """Restart one process of the mesh from ``tree`` (another commit's tree, for a rolling
    upgrade; default this checkout) with ``env`` added to its settings, waiting until the
    mesh is healthy; the mesh's root and settings are put back after."""
    from services.testing.mesh import ROOT

    mesh.stop_process(service)
    mesh.root = tree or ROOT
    saved = mesh.process_env.get(service)
    if env is not None:
        mesh.process_env[service] = {**(saved or {}), **env}
    try:
        mesh.start_service(service)
        mesh.wait_healthy(120)
    finally:
        mesh.root = ROOT
        if env is not None:
            if saved is None:
                mesh.process_env.pop(service, None)
            else:
                mesh.process_env[service] = saved


def privacy_calls(mesh) -> dict[str, float]:
    """The privacy process's answered calls a store's write makes — GetDataKey(s),
    GetConsent(s) — (its RED counter), by method; a restart of privacy starts them at 0."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports['privacy']}/metrics", timeout=10).text
    calls = {"GetDataKey": 0.0, "GetDataKeys": 0.0, "GetConsent": 0.0, "GetConsents": 0.0}
    for line in text.splitlines():
        if line.startswith("hearth_rpc_requests_total{"):
            for method in calls:
                if f'method="{method}"' in line:
                    calls[method] += float(line.rsplit(" ", 1)[1])
    return calls


def data_key_fetches(mesh, service: str) -> dict[str, float]:
    """A store process's ``hearth_data_key_fetches_total`` by ``when`` (warm, on_use)."""
    import re

    import httpx

    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports[service]}/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^hearth_data_key_fetches_total\{when="(\w+)"\} (\S+)$',
                                                    text, re.M)}
