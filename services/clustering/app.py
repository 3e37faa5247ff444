"""Use cases of the clustering service: what one RPC does, over the store and the
domain modules. Servicers call exactly one method here."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.clustering.domain.events import ViewingEvent, check_id
from services.clustering.store import ClusteringStore, HouseholdView, IngestResult


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
