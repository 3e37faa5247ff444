"""The attribution service's repository: touchpoints and conversions (SQLite/PostgreSQL)."""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from services.attribution.domain.records import Conversion, Touchpoint
from services.attribution.migrations import MIGRATIONS
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.erasure_fences import covered, read_fences, write_fences
from services.common.field_crypto import (FieldCipher, drop_keys_of_erased_households, forget_household_rekeys,
                                         note_household_erased, note_household_rekeyed, warm_household_keys)
from services.common.rekey_pages import reseal_in_pages
from services.common.storage.cache import Cache, MemoryCache
from services.common.ids import MAX_FUTURE_SKEW_S
from services.common.export_stream import materialised
from services.common.storage.sql import Database, Tx, keyset_rows, migrate, record_erasure

# Every table an erasure deletes from (purged physically after it: Database.purge_erased;
# kept out of PostgreSQL's planner statistics: migrate(personal_tables=...)).
_ERASED_TABLES = ("touchpoints", "conversions", "erased_records", "household_key_epochs",
                  "erasure_fences")  # session 31: account ids and device digests


# A person erasure's fence on a device the person's erased touchpoints were on covers that
# device's touchpoints that name no person (a person is latent: clustering resolves them),
# not one naming another person, nor its conversions (the account's: a person erasure
# keeps them). Its subject is this kind's digest of the device id.
_UNNAMED_TOUCHPOINTS = "unnamed-touchpoints"


def _fence_subjects(x: Touchpoint | Conversion) -> list[tuple[str, str]]:
    """The (kind, id)s a fence covering record ``x`` would carry the digest of: its device;
    a touchpoint's person, or when it names none its device's unnamed touchpoints."""
    subjects = [("device", x.device_id)] if x.device_id else []
    if isinstance(x, Touchpoint):
        subjects.append(("person", x.person_id) if x.person_id else (_UNNAMED_TOUCHPOINTS, x.device_id))
    return subjects


class AttributionStore:
    def __init__(self, db: Database, cache: Cache | None = None, *, cipher: FieldCipher | None = None) -> None:
        self.db = db
        self.cache = cache or MemoryCache("attribution")
        # Encryption at rest of the sensitive column (campaign); None = plaintext (unit tests).
        self.cipher = cipher

    def _campaign_in(self, t: Touchpoint) -> str:
        return self.cipher.encrypt_text(t.account_id, "campaign", t.campaign) if self.cipher else t.campaign

    def _campaign_out(self, account_id: str, stored: str) -> str:
        return self.cipher.decrypt_text(account_id, "campaign", stored) if self.cipher else stored

    def migrate(self) -> list[int]:
        return migrate(self.db, MIGRATIONS, personal_tables=_ERASED_TABLES)

    def _digests(self, account: str, kind: str, ids: Iterable[str]) -> dict[str, bytes]:
        """Record id -> the digest ``erased_records`` keeps of it (keyed with the
        household's data key; a plain SHA-256 without a cipher, the unit tests')."""
        keyed = {f"{kind}:{i}": i for i in ids}
        if self.cipher is not None:
            return {keyed[k]: d for k, d in self.cipher.digests(account, keyed).items()}
        return {i: hashlib.sha256(f"{account}\x00{k}".encode("utf-8")).digest() for k, i in keyed.items()}

    def _not_erased(self, tx: Tx, kind: str, items: Sequence, id_of: Callable) -> list:
        """``items`` without those whose id an erasure of their household deleted (sent
        again, they would bring erased data back)."""
        kept = list(items)
        for account in sorted({x.account_id for x in items}):
            if not tx.query("SELECT 1 FROM erased_records WHERE account_id = ? LIMIT 1", (account,)):
                continue
            digests = self._digests(account, kind, {id_of(x) for x in items if x.account_id == account})
            wanted = sorted(set(digests.values()))
            erased: set[bytes] = set()
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                erased.update(bytes(r[0]) for r in tx.query(
                    f"SELECT digest FROM erased_records WHERE account_id = ? AND digest IN ({', '.join('?' * len(chunk))})",
                    (account, *chunk)))
            kept = [x for x in kept if x.account_id != account or digests[id_of(x)] not in erased]
        return kept

    def _unfenced(self, tx: Tx, items: Sequence) -> list:
        """``items`` (touchpoints or conversions) without those an erasure's fence covers:
        recorded by an erased device, in an erased window, or (touchpoints) of an erased
        person, before the erasure."""
        fences = read_fences(tx, sorted({x.account_id for x in items}))
        if not fences:
            return list(items)
        digests: dict[str, dict[tuple[str, str], bytes]] = {}
        for account in fences:
            wanted: dict[str, set[str]] = defaultdict(set)
            for x in items:
                if x.account_id == account:
                    for kind, subject in _fence_subjects(x):
                        wanted[kind].add(subject)
            digests[account] = {(kind, subject): d for kind, subjects in wanted.items()
                                for subject, d in self._digests(account, kind, subjects).items()}
        return [x for x in items if x.account_id not in fences or not covered(
            fences[x.account_id], {digests[x.account_id][s] for s in _fence_subjects(x)}, x.ts)]

    def record_touchpoints(self, items: Sequence[Touchpoint]) -> tuple[int, int]:
        """Store new touchpoints; returns (accepted, duplicates). Idempotent by id, also
        for a touchpoint an erasure deleted since."""
        # The households' keys before the write lock is taken (FieldCipher.warm).
        warm_household_keys(self.db, self.cipher, {t.account_id for t in items})
        with self.db.transaction() as tx:
            accounts = sorted({t.account_id for t in items})
            for account in accounts:
                tx.lock_household(account)
            drop_keys_of_erased_households(tx, self.cipher, accounts)
            fresh = self._unfenced(tx, self._not_erased(tx, "touchpoint", items, lambda t: t.touchpoint_id))
            accepted = tx.executemany(
                "INSERT INTO touchpoints (touchpoint_id, account_id, device_id, ts, channel, campaign, "
                "person_id) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, touchpoint_id) DO NOTHING",
                [(t.touchpoint_id, t.account_id, t.device_id, t.ts, t.channel, self._campaign_in(t), t.person_id)
                 for t in fresh])
        return accepted, len(items) - accepted

    def record_conversions(self, items: Sequence[Conversion]) -> tuple[int, int]:
        """Store new conversions; returns (accepted, duplicates). Refused (nothing stored)
        when a household was erased: its key is destroyed."""
        warm_household_keys(self.db, self.cipher, {c.account_id for c in items})
        with self.db.transaction() as tx:
            accounts = sorted({c.account_id for c in items})
            for account in accounts:
                tx.lock_household(account)
            drop_keys_of_erased_households(tx, self.cipher, accounts)
            for account in accounts if self.cipher is not None else ():
                self.cipher.require_live(account)
            fresh = self._unfenced(tx, self._not_erased(tx, "conversion", items, lambda c: c.conversion_id))
            accepted = tx.executemany(
                "INSERT INTO conversions (conversion_id, account_id, ts, kind, value, device_id) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, conversion_id) DO NOTHING",
                [(c.conversion_id, c.account_id, c.ts, c.kind, c.value, c.device_id) for c in fresh])
        return accepted, len(items) - accepted

    def load(self, account_ids: Sequence[str], start: float | None, end: float | None,
             lookback_s: float) -> tuple[list[Touchpoint], list[Conversion]]:
        """Conversions in [start, end) of the accounts (all when empty) and every
        touchpoint that can fall in their lookback windows."""
        where, params = ["1 = 1"], []
        if account_ids:
            where.append(f"account_id IN ({', '.join('?' * len(account_ids))})")
            params.extend(account_ids)
        conv_where, conv_params = list(where), list(params)
        if start is not None:
            conv_where.append("ts >= ?")
            conv_params.append(start)
        if end is not None:
            conv_where.append("ts < ?")
            conv_params.append(end)
        tp_where, tp_params = list(where), list(params)
        if start is not None:
            tp_where.append("ts >= ?")
            tp_params.append(start - lookback_s)
        if end is not None:
            tp_where.append("ts < ?")
            tp_params.append(end)
        with self.db.transaction() as tx:
            conv = tx.query("SELECT conversion_id, account_id, ts, kind, value, device_id FROM conversions "
                            f"WHERE {' AND '.join(conv_where)} ORDER BY account_id, ts, conversion_id",
                            conv_params)
            tps = tx.query("SELECT touchpoint_id, account_id, device_id, ts, channel, campaign, person_id "
                           f"FROM touchpoints WHERE {' AND '.join(tp_where)} "
                           "ORDER BY account_id, ts, touchpoint_id", tp_params)
        return ([Touchpoint(r[0], r[1], r[2], float(r[3]), r[4], self._campaign_out(r[1], r[5]), r[6]) for r in tps],
                [Conversion(r[0], r[1], float(r[2]), r[3], float(r[4]), r[5]) for r in conv])

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """Re-encrypt the household's touchpoint campaigns under data key version
        ``dek_version`` (DataHolder.Rekey; ``ClusteringStore.rekey`` says why the purge and
        the household's re-key count). Conversions carry no sealed column, and the erased-id
        digests are keyed with the household's digest key, which a rotation carries over
        (field_crypto.FieldCipher.digests). Idempotent."""
        if self.cipher is None:
            return 0, []
        cipher = self.cipher
        cipher.forget(account_id)

        def touchpoint(tx, row: tuple) -> int:
            sealed = cipher.reseal_text(account_id, "campaign", row[1], dek_version)
            if sealed is None:
                return 0
            tx.execute("UPDATE touchpoints SET campaign = ? WHERE account_id = ? AND touchpoint_id = ?",
                       (sealed, account_id, row[0]))
            return 1

        # A page at a time, each its own transaction (services/common/rekey_pages.py).
        changed = reseal_in_pages(self.db, account_id,
                                  "SELECT touchpoint_id, campaign FROM touchpoints WHERE account_id = ?",
                                  ("touchpoint_id",), touchpoint, first=lambda tx: note_household_rekeyed(tx, account_id))
        # Purged on every call (ClusteringStore.rekey says why: review26), unless a batch
        # defers it to its one purge of the store (the note record_erasure left stays).
        if defer_purge:
            return changed, []
        return changed, [self.db.purge_erased(("touchpoints",))]

    def erase(self, scope: ErasureScope, person_touchpoints: Sequence[str] = (),
              own_devices: Sequence[str] = ()) -> ErasureOutcome:
        """Delete the scope's touchpoints and conversions in one transaction.

        Person scope: ``person_touchpoints`` are the ids the caller resolved to that
        person (through the clustering service) plus those stored with that person_id;
        a conversion is the account's, not a person's, so it stays (its credit is
        recomputed without the person's touchpoints at the next Attribute call).
        ``own_devices``: the person's own devices as clustering reads them (GetPersonDevices),
        whose touchpoints naming nobody are fenced with those of every device one of the
        person's erased touchpoints was on, shared or not."""
        outcome = ErasureOutcome()
        account = scope.account_id
        cached = "attribution:" if scope.all_accounts else f"attribution:{account}"
        self.cache.delete_prefix(cached, strict=True)  # Redis down: fail (retried) before deleting
        with self.db.transaction() as tx:
            if not scope.all_accounts:
                tx.lock_household(account)
            if self.cipher is not None and scope.kind == "household":
                # Drop the cached data key under the write lock: a write that comes
                # after this transaction must fetch the key, which a household deletion
                # has shredded first (privacy's HOUSEHOLD_STAGES), so it is refused;
                # one before it is deleted here.
                self.cipher.forget(account)
            if scope.kind == "household":
                note_household_erased(tx)
                forget_household_rekeys(tx, account)
                tp_where, tp_params = "account_id = ?", [account]
                cv_where, cv_params = "account_id = ?", [account]
            elif scope.kind == "device":
                tp_where, tp_params = "account_id = ? AND device_id = ?", [account, scope.device_id]
                cv_where, cv_params = "account_id = ? AND device_id = ?", [account, scope.device_id]
            elif scope.kind == "window":
                lo = scope.start if scope.start is not None else float("-inf")
                hi = scope.end if scope.end is not None else float("inf")
                if scope.all_accounts:  # retention purge (privacy service only): every account
                    tp_where, tp_params = "ts >= ? AND ts < ?", [lo, hi]
                else:
                    tp_where, tp_params = "account_id = ? AND ts >= ? AND ts < ?", [account, lo, hi]
                cv_where, cv_params = tp_where, list(tp_params)
            else:  # person
                ids = sorted(set(person_touchpoints))
                tp_where = "account_id = ? AND (person_id = ?" + (
                    f" OR touchpoint_id IN ({', '.join('?' * len(ids))}))" if ids else ")")
                tp_params = [account, scope.person_id, *ids]
                cv_where, cv_params = None, []
            if scope.kind in ("device", "window", "person") and not scope.all_accounts and any(
                    tx.query(f"SELECT 1 FROM {table} WHERE account_id = ? LIMIT 1", (account,))
                    for table in ("touchpoints", "conversions", "erased_records", "erasure_fences")):
                # What the device (window, person) recorded up to now and this store does not
                # hold yet stays out (services/common/erasure_fences.py). Not for a household
                # the store holds nothing of: a device's digest would make it a data key.
                now = time.time()
                if scope.kind == "person":
                    # Every touchpoint naming the person recorded up to now, and those naming
                    # no person on each device one of the person's erased touchpoints was on,
                    # shared or not (session 32: one in flight there may be the person's, and
                    # erasure completeness wins over another member's in the fence window),
                    # and, since session 33, on the person's own devices, which may have sent
                    # nothing yet. Not on a shared device the person left no erased touchpoint
                    # on: nothing ties one there to the person (docs/privacy.md §6).
                    devices = sorted({r[0] for r in tx.query(
                        f"SELECT DISTINCT device_id FROM touchpoints WHERE {tp_where}", tp_params)} | set(own_devices))
                    write_fences(tx, account, [*self._digests(account, _UNNAMED_TOUCHPOINTS, devices).values(),
                                               self._digests(account, "person", [scope.person_id])[scope.person_id]],
                                 None, now)
                elif scope.kind == "device":
                    write_fences(tx, account, [self._digests(account, "device", [scope.device_id])[scope.device_id]],
                                 None, now)
                elif lo < min(hi, now):
                    write_fences(tx, account, [None], None if lo == float("-inf") else lo, min(hi, now))
            tps = [r[0] for r in tx.query(f"SELECT touchpoint_id FROM touchpoints WHERE {tp_where}", tp_params)]
            tx.execute(f"DELETE FROM touchpoints WHERE {tp_where}", tp_params)
            outcome.add("touchpoints", tps)
            if cv_where is not None:
                cvs = [r[0] for r in tx.query(f"SELECT conversion_id FROM conversions WHERE {cv_where}", cv_params)]
                tx.execute(f"DELETE FROM conversions WHERE {cv_where}", cv_params)
                outcome.add("conversions", cvs)
            if scope.kind == "household":
                # Its key is shredded: every later write of the household is refused.
                tx.execute("DELETE FROM erased_records WHERE account_id = ?", (account,))
                tx.execute("DELETE FROM erasure_fences WHERE account_id = ?", (account,))
            elif scope.all_accounts:
                # The retention purge: a record erased before its window is older than it.
                if scope.end is not None:
                    tx.execute("DELETE FROM erased_records WHERE erased_at < ?", (scope.end - MAX_FUTURE_SKEW_S,))
                    tx.execute("DELETE FROM erasure_fences WHERE hi < ?", (scope.end - MAX_FUTURE_SKEW_S,))
            else:
                erased_at = time.time()
                rows = [(account, d, erased_at) for kind, ids in (("touchpoint", outcome.deleted_ids_of("touchpoints")),
                                                                  ("conversion", outcome.deleted_ids_of("conversions")))
                        for d in self._digests(account, kind, sorted(ids)).values()]
                tx.executemany("INSERT INTO erased_records (account_id, digest, erased_at) VALUES (?, ?, ?) "
                               "ON CONFLICT (account_id, digest) DO NOTHING", rows)
            if not outcome.empty:
                record_erasure(tx)
        outcome.purges.append(self.db.purge_erased(_ERASED_TABLES))
        self.cache.delete_prefix(cached)
        if self.cipher is not None and scope.kind == "household":
            self.cipher.forget(account)  # and any a read fetched meanwhile (the key is shredded)
        return outcome

    def export_account(self, account_id: str) -> dict:
        """``export_sections`` read whole (the tests' and tools' form)."""
        return materialised(self.export_sections(account_id))

    def export_sections(self, account_id: str) -> dict:
        """Everything held for the account (privacy's household export), decrypted; lazy,
        a page at a time as the stream is written (services/common/export_stream.py)."""
        tps = keyset_rows(self.db, "SELECT touchpoint_id, device_id, ts, channel, campaign, person_id "
                          "FROM touchpoints WHERE account_id = ?", (account_id,), ("ts", "touchpoint_id"), (2, 0))
        cvs = keyset_rows(self.db, "SELECT conversion_id, ts, kind, value, device_id FROM conversions "
                          "WHERE account_id = ?", (account_id,), ("ts", "conversion_id"), (1, 0))
        return {
            "touchpoints": ({"touchpoint_id": r[0], "device_id": r[1], "ts": float(r[2]), "channel": r[3],
                             "campaign": self._campaign_out(account_id, r[4]), "person_id": r[5]} for r in tps),
            "conversions": ({"conversion_id": r[0], "ts": float(r[1]), "kind": r[2], "value": float(r[3]),
                             "device_id": r[4]} for r in cvs),
        }

