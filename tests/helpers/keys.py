"""Data keys for store tests: a fetcher like the privacy service's GetDataKey over a real
KeyRing (no gRPC), so a store's FieldCipher sees keys created on first use and refused
once destroyed."""

from __future__ import annotations

from datetime import UTC, datetime

from services.common.errors import FailedPrecondition
from services.privacy.keys.domain import KeyDestroyedError, KeyRing

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ring_fetcher(ring: KeyRing, calls: list):
    """A fetcher like privacy's GetDataKey over a real KeyRing (creates the key on demand)."""

    def fetch(account: str, version: int) -> tuple[int, bytes]:
        calls.append((account, version))
        if version == 0 and not ring.has_dek(account):
            if ring.is_destroyed(account):
                raise FailedPrecondition("destroyed", "account_id")
            ring.create_dek(account, NOW)
        try:
            return ring.data_key(account, version or None)
        except KeyDestroyedError:
            raise FailedPrecondition("destroyed", "account_id") from None

    return fetch


def ring_batch_fetcher(ring: KeyRing, calls: list):
    """A batch fetcher like privacy's GetDataKeys over a real KeyRing: each household's
    newest key (created on demand), None for an erased one."""
    one = ring_fetcher(ring, [])

    def fetch_keys(accounts: list[str]) -> dict:
        calls.append(list(accounts))
        out = {}
        for account in accounts:
            try:
                out[account] = one(account, 0)
            except FailedPrecondition:
                out[account] = None
        return out

    return fetch_keys
