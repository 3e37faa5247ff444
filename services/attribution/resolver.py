"""Person resolution for attribution: which person of a household was behind each
touchpoint (and device-bound conversion), asked of the clustering service.

Only this module talks to clustering, through a ``Peer`` (services/common/client.py);
ResolvePersons is a read, so it is retried on UNAVAILABLE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common.client import Peer
from services.common.pbutil import float_to_ts

MAX_INSTANTS_PER_CALL = 10_000


class PersonResolver(Protocol):
    def resolve(self, instants: Sequence[tuple[str, str, float]]) -> list[dict[str, float]]: ...


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

    def close(self) -> None:
        self._peer.close()


class NoResolver:
    """Every touch belongs to the account's single unknown person (account level)."""

    def resolve(self, instants: Sequence[tuple[str, str, float]]) -> list[dict[str, float]]:
        return [{} for _ in instants]
