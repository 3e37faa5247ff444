"""Person resolution for attribution: which person of a household was behind each
touchpoint (and device-bound conversion), and which devices are a person's own (a person
erasure's fence), asked of the clustering service.

Only this module talks to clustering, through a ``Peer`` (services/common/client.py);
ResolvePersons and GetPersonDevices are reads, so they are retried on UNAVAILABLE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import grpc
from prometheus_client import Counter

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common.client import Peer
from services.common.errors import Unavailable
from services.common.pbutil import float_to_ts

log = logging.getLogger("hearth.attribution.resolver")
MAX_INSTANTS_PER_CALL = 10_000
# GetPersonDevices refused or failed, by what it means to an operator (session 34; until
# then only UNIMPLEMENTED and PERMISSION_DENIED were counted, and the docs took
# PERMISSION_DENIED for an older release):
#   unimplemented      UNIMPLEMENTED: a clustering without the RPC, a release before 33 —
#                      expected during a rolling upgrade. (Such a release answers UNIMPLEMENTED:
#                      its interceptor passes a method its generated code does not serve
#                      straight to gRPC. Session 33's test ran that release's code on this
#                      checkout's generated protos, whose servicer base does list the RPC, so
#                      its permission matrix answered PERMISSION_DENIED.)
#   permission_denied  PERMISSION_DENIED: a clustering that serves the RPC refuses it to
#                      attribution's identity — a misconfiguration (HearthPersonDevicesRefused;
#                      no shipped release answers it: see unimplemented);
#   unauthenticated    UNAUTHENTICATED: clustering refuses attribution's token (service keys,
#                      clocks) — a misconfiguration (HearthPersonDevicesRefused);
#   unavailable        UNAVAILABLE / DEADLINE_EXCEEDED after the retries — an outage.
# Only the first FALLS BACK (the erasure fences its own erased touchpoints' devices, session
# 32's rule, and completes; it cannot be redone later): the upgrade's answer. The other three
# do NOT: the erasure's attribution step fails and the deletion job retries it — an outage, a
# refused token or a refused permission must never narrow an erasure for good (review34,
# the lead's decision: until then PERMISSION_DENIED fell back too, a misconfiguration
# completing every person erasure without the person's own devices, unrepairably). Every
# reason created at 0 so a rate reads from the start. docs/operations.md, "Upgrading to
# session 33".
PERSON_DEVICES_FALLBACKS = Counter("hearth_person_devices_fallbacks_total",
                                   "GetPersonDevices refused or failed, by reason: unimplemented fell back "
                                   "(fenced without the person's own devices); permission_denied / "
                                   "unauthenticated / unavailable failed the erasure step, retried", ["reason"])
_FALLING_BACK = {grpc.StatusCode.UNIMPLEMENTED: "unimplemented"}
_RETRIED = {grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
            grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
            grpc.StatusCode.UNAVAILABLE: "unavailable",
            grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable"}
for _reason in ("unimplemented", "permission_denied", "unauthenticated", "unavailable"):
    PERSON_DEVICES_FALLBACKS.labels(_reason)
_MEANING = {
    "unimplemented": "clustering has no GetPersonDevices (a release before session 33: expected during a rolling "
                     "upgrade)",
    "permission_denied": "clustering serves GetPersonDevices but refuses it to this service (PERMISSION_DENIED: a "
                         "misconfiguration)",
    "unauthenticated": "clustering refuses this service's token (UNAUTHENTICATED: a misconfiguration of the service "
                       "keys or clocks)",
    "unavailable": "clustering did not answer (an outage)",
}


class PersonResolver(Protocol):
    def resolve(self, instants: Sequence[tuple[str, str, float]]) -> list[dict[str, float]]: ...

    def person_devices(self, account_id: str, person_id: str) -> tuple[list[str], list[str]]:
        """The person's own and shared devices (clustering's GetPersonDevices): a person
        erasure fences the touchpoints naming nobody recorded on the own ones; a shared one
        only if one of the person's erased touchpoints was on it (docs/privacy.md §6)."""
        ...


class ClusteringResolver:
    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        self._peer = Peer(address, "attribution", cpb_grpc.ClusteringServiceStub, timeout_s)

    def resolve(self, instants: Sequence[tuple[str, str, float]]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for lo in range(0, len(instants), MAX_INSTANTS_PER_CALL):
            chunk = instants[lo:lo + MAX_INSTANTS_PER_CALL]
            request = cpb.ResolvePersonsRequest(instants=[
                cpb.DeviceInstant(account_id=a, device_id=d, ts=float_to_ts(t)) for a, d, t in chunk])
            # Persons are resolved as the attribution service itself (Peer.call's default):
            # an analyst may run attribution but may not read who watched what (docs/security.md).
            response = self._peer.call("ResolvePersons", request, idempotent=True)
            out.extend({p.person_id: p.probability for p in r.probabilities} for r in response.persons)
        return out

    def person_devices(self, account_id: str, person_id: str) -> tuple[list[str], list[str]]:
        """GetPersonDevices' (own, shared); both [] from a release before session 33
        (UNIMPLEMENTED): the person erasure then fences the devices of its own erased
        touchpoints only, as in session 32 (docs/operations.md, "Upgrading to session 33").
        A misconfiguration (PERMISSION_DENIED: ``Unavailable``, not a traceback's INTERNAL;
        UNAUTHENTICATED) and an outage raise: the job retries. Each counted and logged by
        reason (``PERSON_DEVICES_FALLBACKS``)."""
        request = cpb.GetPersonDevicesRequest(account_id=account_id, person_id=person_id)
        try:
            response = self._peer.call("GetPersonDevices", request, idempotent=True)
        except grpc.RpcError as exc:
            code = exc.code()
            reason = _FALLING_BACK.get(code) or _RETRIED.get(code)
            if reason is None:
                raise
            PERSON_DEVICES_FALLBACKS.labels(reason).inc()
            if reason in _RETRIED.values():
                log.warning("GetPersonDevices failed (reason %s: %s, %s): this person erasure's attribution step fails "
                            "and the deletion job retries it", reason, _MEANING[reason], code.name,
                            extra={"fields": {"reason": reason, "code": code.name}})
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    # Raised as is it would be this Erase's INTERNAL with a traceback (the
                    # server maps only a peer's UNAVAILABLE and UNAUTHENTICATED): the job's
                    # step answers UNAVAILABLE, which privacy retries.
                    raise Unavailable(f"clustering refuses GetPersonDevices to this service (PERMISSION_DENIED: "
                                      "attribution's identity lacks resolve_persons; HearthPersonDevicesRefused)",
                                      "") from None
                raise
            log.warning("GetPersonDevices refused (reason %s: %s, %s): this person erasure fences only the devices "
                        "of the person's erased touchpoints", reason, _MEANING[reason], code.name,
                        extra={"fields": {"reason": reason, "code": code.name}})
            return [], []
        return list(response.own_device_ids), list(response.shared_device_ids)

    def close(self) -> None:
        self._peer.close()


class NoResolver:
    """Every touch belongs to the account's single unknown person (account level)."""

    def resolve(self, instants: Sequence[tuple[str, str, float]]) -> list[dict[str, float]]:
        return [{} for _ in instants]

    def person_devices(self, account_id: str, person_id: str) -> tuple[list[str], list[str]]:
        return [], []
