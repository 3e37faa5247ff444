"""Use cases of the clustering service: what one RPC does, over the store and the
domain modules. Servicers call exactly one method here."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.clustering.domain.events import ViewingEvent, check_id
from services.clustering.store import ClusteringStore, HouseholdView, IngestResult
from services.common.consent import ConsentChecker
from services.common.erasure import ErasureOutcome, ErasureScope


@dataclass
class HouseholdExtras:
    persons: list = field(default_factory=list)
    drift_events: list = field(default_factory=list)
    model_version: int = 0
    model_variant: str = ""


class ClusteringApp:
    def __init__(self, store: ClusteringStore, consent: ConsentChecker | None = None) -> None:
        self.store = store
        # Consent (privacy service); None = not enforced (unit tests).
        self.consent = consent

    def require_processing(self, account_ids) -> None:
        """FAILED_PRECONDITION (field account_id) when an account withdrew consent to
        processing; called before anything is stored (ingest, assignment)."""
        if self.consent is not None:
            self.consent.require(account_ids, ("processing",))

    def ingest(self, events: list[ViewingEvent]) -> IngestResult:
        self.require_processing(e.account_id for e in events)
        return self.store.ingest(events)

    def export_account(self, account_id: str) -> dict:
        check_id(account_id, "account_id")
        return self.store.export_account(account_id)

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
