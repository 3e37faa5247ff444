"""A household's re-encryption (``DataHolder.Rekey``, a data key rotation) in pages, each
its own short write transaction (session 28, pgrot28).

Until then a store re-sealed the whole household in one transaction, which on SQLite holds
the database's one write lock for all of it: a 100,000-event household held clustering's
~22 s and every other household's writes waited (attack27: small ingests answered 504).
Paged, the lock is held for one page at a time, and on SQLite the rekey pauses between
pages so that writers waiting in SQLite's busy handler (which polls with growing sleeps,
not in order) get the lock (``PAUSE_S``).

Why a crash between pages is safe: each page commits values re-sealed under the new
version, the others stay under the old one, and both versions stay live until the rotation
retires the old one — which it does only after a Rekey pass that found nothing left under
it (privacy keys/rotation.py). A value is re-sealed only when it is under an older version
(``FieldCipher.reseal`` answers None otherwise), so the next call carries on where this one
stopped. A write of the household between pages seals under the newest version (after the
settle); an erasure between pages deletes rows the next page no longer finds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.common.storage.sql import Database, Tx, record_erasure

# A page's transaction re-seals up to ~5 values a row (an event's text fields): 500 rows
# hold SQLite's lock ~0.1-0.2 s on an idle machine, ~0.75 s at load 28.
PAGE_ROWS = 500
# SQLite: the pause after each page. A writer waiting for the lock sleeps in SQLite's busy
# handler between tries, up to 100 ms a sleep once it has waited a while: a shorter pause
# is mostly missed, and the rekey takes the lock again (measured: with 50 ms, writes beside
# a 10,000-event rekey still waited 7.8-18.6 s). It adds PAUSE_S per page to the rekey.
PAUSE_S = 0.11


def reseal_in_pages(db: Database, account_id: str, select: str, order: Sequence[str],
                    reseal: Callable[[Tx, tuple], int], *, first: Callable[[Tx], None] | None = None,
                    page_rows: int | None = None) -> int:
    """Call ``reseal(tx, row)`` (values it re-sealed and wrote) for every row of ``select``
    (``SELECT <order columns>, ... FROM t WHERE account_id = ?``, no ORDER BY), read by keyset
    over ``order`` (one or two columns, unique together, first in each row; an index must
    lead with ``account_id`` and them) a page at a time, each page in its own write
    transaction holding the household's lock. ``first(tx)`` runs in the first page's
    transaction. A page that changed something notes the purge owed (``record_erasure``).
    Returns the values re-sealed."""
    page_rows = page_rows or PAGE_ROWS
    columns = ", ".join(order)
    after: tuple | None = None
    changed = 0
    while True:
        with db.transaction() as tx:
            tx.lock_household(account_id)
            if first is not None:
                first(tx)
                first = None
            if after is None:
                rows = tx.query(f"{select} ORDER BY {columns} LIMIT ?", (account_id, page_rows))
            elif len(order) == 1:
                rows = tx.query(f"{select} AND {order[0]} > ? ORDER BY {columns} LIMIT ?",
                                (account_id, after[0], page_rows))
            else:   # as storage.sql.keyset_rows: the range on the first column said, for the index
                a, b = order
                rows = tx.query(f"{select} AND {a} >= ? AND ({a} > ? OR ({a} = ? AND {b} > ?)) "
                                f"ORDER BY {columns} LIMIT ?", (account_id, after[0], after[0], after[0], after[1],
                                                                 page_rows))
            page = sum(reseal(tx, row) for row in rows)
            if page:
                record_erasure(tx)
        changed += page
        if len(rows) < page_rows:
            return changed
        after = tuple(rows[-1][:len(order)])
        if db.dialect == "sqlite":
            time.sleep(PAUSE_S)
