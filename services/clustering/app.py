"""Use cases of the clustering service: what one RPC does, over the store and the
domain modules. Servicers call exactly one method here."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.clustering.domain.events import ViewingEvent, check_id
from services.clustering.store import ClusteringStore, HouseholdView, IngestResult
from services.common.erasure import ErasureOutcome, ErasureScope


@dataclass
class HouseholdExtras:
    persons: list = field(default_factory=list)
    drift_events: list = field(default_factory=list)
    model_version: int = 0
    model_variant: str = ""


class ClusteringApp:
    def __init__(self, store: ClusteringStore) -> None:
        self.store = store

    def ingest(self, events: list[ViewingEvent]) -> IngestResult:
        return self.store.ingest(events)

    def household(self, account_id: str, max_sessions: int) -> tuple[HouseholdView, HouseholdExtras]:
        check_id(account_id, "account_id")
        view = self.store.household(account_id, max_sessions)
        return view, HouseholdExtras()

    def resolve_persons(self, instants: list[tuple[str, str, float]]) -> list[tuple[str, dict[str, float]]]:
        for n, (account, device, _) in enumerate(instants):
            check_id(account, f"instants[{n}].account_id")
            check_id(device, f"instants[{n}].device_id")
        return self.store.resolve_persons(instants)

    def erase(self, scope: ErasureScope) -> ErasureOutcome:
        return self.store.erase(scope)
