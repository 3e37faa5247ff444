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
from services.common.pbutil import float_to_ts

log = logging.getLogger("hearth.attribution.resolver")
MAX_INSTANTS_PER_CALL = 10_000
# Person erasures that fenced without the person's own devices because clustering refused
# GetPersonDevices, by its status: ``unimplemented`` — a clustering without the RPC (a
# release before session 33); ``permission_denied`` — a clustering of 32 or older (its
# permission matrix refuses an RPC it does not list) or, once every clustering replica runs
# 33, attribution's identity without ``resolve_persons`` (a misconfiguration: the two give
# the same answer, so only the upgrade's end tells them apart; docs/operations.md,
# "Upgrading to session 33"). Created at 0 so a rate reads from the start.
PERSON_DEVICES_FALLBACKS = Counter("hearth_person_devices_fallbacks_total",
                                   "Person erasures fenced without the person's own devices "
                                   "(clustering refused GetPersonDevices)", ["reason"])
_FALLBACK_REASONS = {grpc.StatusCode.UNIMPLEMENTED: "unimplemented",
                     grpc.StatusCode.PERMISSION_DENIED: "permission_denied"}
for _reason in _FALLBACK_REASONS.values():
    PERSON_DEVICES_FALLBACKS.labels(_reason)


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
        """GetPersonDevices' (own, shared); both [] from a clustering of a release before session 33,
        which refuses the RPC it does not know (PERMISSION_DENIED: its permission matrix
        refuses an RPC it does not list, before gRPC could answer UNIMPLEMENTED): the person
        erasure then fences the devices of its own erased touchpoints only, as in session 32
        (docs/operations.md, "Upgrading to session 33", the person erasure's paragraph)."""
        request = cpb.GetPersonDevicesRequest(account_id=account_id, person_id=person_id)
        try:
            response = self._peer.call("GetPersonDevices", request, idempotent=True)
        except grpc.RpcError as exc:
            reason = _FALLBACK_REASONS.get(exc.code())
            if reason is None:
                raise
            PERSON_DEVICES_FALLBACKS.labels(reason).inc()
            log.warning("clustering has no GetPersonDevices (a release before session 33) or refuses it to this "
                        "service (%s: attribution's identity without resolve_persons once clustering runs 33): "
                        "this person erasure fences only the devices of the person's erased touchpoints",
                        exc.code().name)
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
