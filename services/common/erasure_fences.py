"""Erasure fences (session 31): what a device, person or window erasure fenced off — the data
its scope recorded up to the erasure that a store did not hold yet (a batch in flight during
the erasure, a retry of one, a device's backlog). Each data store that erases by device or
window keeps them in its own ``erasure_fences`` table and refuses, under the household's lock,
a record that one covers (docs/privacy.md §6, "What an erased scope recorded before its
erasure stays out"). A row: the account id, the keyed digest of a subject — a device id, or in
attribution a person id or "a device's touchpoints naming no person" (None: every record) —
and a span of event time (lo None: from the beginning) — never a record's id or time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

from services.common.storage.sql import Tx

# The table (a migration of each store that keeps fences).
ERASURE_FENCES_SQL = """
CREATE TABLE IF NOT EXISTS erasure_fences (
    account_id TEXT NOT NULL,
    device_digest {blob},
    lo {double},
    hi {double} NOT NULL
);
CREATE INDEX IF NOT EXISTS erasure_fences_account ON erasure_fences (account_id);
CREATE INDEX IF NOT EXISTS erasure_fences_hi ON erasure_fences (hi)
"""
# A fence: (the device's digest or None for every device, first and last instant fenced).
Fence = tuple[bytes | None, float, float]


def read_fences(tx: Tx, accounts: Sequence[str]) -> dict[str, list[Fence]]:
    """Account -> its fences; one read per 500 households."""
    fences: dict[str, list[Fence]] = defaultdict(list)
    for start in range(0, len(accounts), 500):
        chunk = tuple(accounts[start:start + 500])
        for account, digest, lo, hi in tx.query(
                "SELECT account_id, device_digest, lo, hi FROM erasure_fences "
                f"WHERE account_id IN ({', '.join('?' * len(chunk))})", chunk):
            fences[account].append((None if digest is None else bytes(digest),
                                    float("-inf") if lo is None else float(lo), float(hi)))
    return fences


def write_fences(tx: Tx, account: str, digests: Sequence[bytes | None], lo: float | None, hi: float) -> None:
    """Fence off what the subjects of ``digests`` (None: every record) recorded from ``lo`` to
    ``hi``. A fence one of the household's covers already is not written, and one the new
    fence covers is deleted: a device or person erased again (or an Erase a deletion job
    retried) keeps one row, a window inside an erased one adds none (session 32)."""
    for digest in digests:
        same_subject, subject = ("1 = 1", ()) if digest is None else ("device_digest = ?", (digest,))
        if tx.query("SELECT 1 FROM erasure_fences WHERE account_id = ? AND hi >= ? "
                    "AND (device_digest IS NULL" + ("" if digest is None else " OR device_digest = ?") + ") "
                    "AND " + ("lo IS NULL" if lo is None else "(lo IS NULL OR lo <= ?)") + " LIMIT 1",
                    (account, hi, *subject, *(() if lo is None else (lo,)))):
            continue
        tx.execute(f"DELETE FROM erasure_fences WHERE account_id = ? AND hi <= ? AND {same_subject} AND "
                   + ("1 = 1" if lo is None else "lo IS NOT NULL AND lo >= ?"),
                   (account, hi, *subject, *(() if lo is None else (lo,))))
        tx.execute("INSERT INTO erasure_fences (account_id, device_digest, lo, hi) VALUES (?, ?, ?, ?)",
                   (account, digest, lo, hi))


def covered(fences: Sequence[Fence], subjects: Collection[bytes], ts: float) -> bool:
    """Whether a record at ``ts`` is fenced off; ``subjects``: the digests a fence of it
    would carry (its device's; attribution adds a touchpoint's person's), none when it has
    no device. A fence without a digest covers every record of its span."""
    return any(lo <= ts <= hi and (digest is None or digest in subjects) for digest, lo, hi in fences)
