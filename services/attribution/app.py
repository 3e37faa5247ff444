"""Use cases of the attribution service."""

from __future__ import annotations

from services.attribution.domain.records import (
    Conversion, Touchpoint, validate_conversions, validate_touchpoints)
from services.attribution.store import AttributionStore


class AttributionApp:
    def __init__(self, store: AttributionStore) -> None:
        self.store = store

    def record_touchpoints(self, items: list[Touchpoint]) -> tuple[int, int]:
        return self.store.record_touchpoints(validate_touchpoints(items))

    def record_conversions(self, items: list[Conversion]) -> tuple[int, int]:
        return self.store.record_conversions(validate_conversions(items))
