"""Shared test data for the privacy unit tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.privacy.audit.domain import AuditEntry, EventType, Outcome, Role

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_entries(n: int, start_seq: int = 0) -> list[AuditEntry]:
    """A varied, deterministic stream of entries (every event type and role appears)."""
    kinds = list(EventType)
    roles = list(Role)
    out = []
    for i in range(start_seq, start_seq + n):
        out.append(AuditEntry(
            seq=i,
            ts=T0 + timedelta(seconds=i),
            event_type=kinds[i % len(kinds)],
            principal=f"user-{i % 7}",
            role=roles[i % len(roles)],
            resource=f"household:{i % 13}",
            outcome=Outcome.SUCCESS if i % 5 else Outcome.DENIED,
            trace_id=f"{i:032x}",
            details={"n": i, "tags": ["a", "ü"], "nested": {"z": 1, "a": None}},
        ))
    return out
