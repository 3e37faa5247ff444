"""Key material of the privacy service: the receipt signing key, the KEKs and the
per-household data keys (DEKs) behind ``GetDataKey`` / ``RotateKeys`` and the
crypto-shredding step of a household deletion.

Configuration (services/privacy/settings.py): ``HEARTH_RECEIPT_SIGNING_KEY``,
``HEARTH_KEKS`` + ``HEARTH_ACTIVE_KEK``. Without them (development) keys are generated
once and persisted under ``HEARTH_DATA_DIR`` with mode 0600, with a warning in the log.

Replicas: every replica holds a ``KeyRing`` over the shared ``data_keys`` table. A
household's records are re-read from the table when this replica's view of them is
older than ``REFRESH_S`` (5 s), so a key shredded by another replica stops being served
here within 5 s; DEK creation is an insert-if-absent, and the loser of a creation race
adopts the winner's key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from services.common.config import ConfigError
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.privacy.keys.domain import (
    DIGEST_KEY_VERSION, FIRST_DEK_VERSION, DecryptionError, KeyDestroyedError, KeyEncryptionKey, KeyNotFoundError, KeyRing,
    WrappedDek, generate_kek, parse_kek_config)
from services.privacy.keys.signing import (
    Ed25519PrivateKey, generate_private_key, load_private_key, private_key_to_pem, publish_public_key)
from services.privacy.keys.store import DataKeyStore

log = logging.getLogger("hearth.privacy.keys")

REFRESH_S = 5.0
START_CHECK_SAMPLE = 64   # the start's KEK check: the oldest and newest live keys of each KEK it tries
# At most this many households' records in memory (KeyService._checked); beyond REFRESH_S
# a household's records are read from the store again before any use anyway, so they are
# dropped then (``_held``), and this bounds a burst of households within it.
HELD_MAX = 200_000
# GetDataKeys: the most households one call may ask for, and its per-household answers
# besides a key.
MAX_DATA_KEYS = 1000
ERASED = "erased"
UNAVAILABLE = "unavailable"
ROTATE_ATTEMPTS = 5
SIGNING_KEY_FILE = "privacy-receipt-signing.key"
SIGNING_PUBLIC_FILE = "privacy-receipt-signing.pub"
KEK_FILE = "privacy-keks"


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_signing_key(configured: str, data_dir: Path) -> Ed25519PrivateKey:
    """The receipt signing key from configuration, else the development key under
    ``data_dir`` (generated on first start). Its public key is written next to it
    (``privacy-receipt-signing.pub``) for ``hearth verify-receipt --public-key``."""
    if configured:
        key = load_private_key(configured, argument="HEARTH_RECEIPT_SIGNING_KEY")
    else:
        path = Path(data_dir) / SIGNING_KEY_FILE
        if not path.exists():
            log.warning("HEARTH_RECEIPT_SIGNING_KEY is not set: generated a development receipt "
                        "signing key in %s (configure a managed key in production)", path)
            try:
                _write_secret(path, private_key_to_pem(generate_private_key()))
            except FileExistsError:
                pass  # another process of this data dir generated it first
        else:
            log.warning("HEARTH_RECEIPT_SIGNING_KEY is not set: using the development key in %s", path)
        key = load_private_key(path.read_text(), argument=str(path))
    publish_public_key(Path(data_dir) / SIGNING_PUBLIC_FILE, key.public_key())
    return key


def load_keks(configured: str, active: str, data_dir: Path,
              stored_kek_ids: Iterable[str] = ()) -> tuple[list[KeyEncryptionKey], str]:
    """KEKs and the active id from configuration, else the development KEK file.
    ``stored_kek_ids``: the KEKs wrapping the live data keys already stored. When they
    exist, a missing development file is not generated anew (a new KEK would open none
    of them): the start is refused, so the operator restores the file."""
    if not configured:
        path = Path(data_dir) / KEK_FILE
        stored = sorted(set(stored_kek_ids))
        if not path.exists() and stored:
            raise ConfigError(
                f"invalid configuration:\n  HEARTH_KEKS: not set, and the development KEK file {path} is "
                f"missing, but the database holds data keys wrapped under KEK {', '.join(map(repr, stored))}: "
                "restore the file (or set HEARTH_KEKS to that KEK); a new KEK would open none of them, "
                "so every household that has a key could no longer be read, written or exported")
        if not path.exists():
            log.warning("HEARTH_KEKS is not set: generated a development master key in %s "
                        "(configure KEKs from a secret store in production)", path)
            kek = generate_kek("dev-1")
            import base64
            try:
                _write_secret(path, f"{kek.kek_id}={base64.b64encode(kek.key).decode()}")
            except FileExistsError:
                pass
        else:
            log.warning("HEARTH_KEKS is not set: using the development master key in %s", path)
        configured = path.read_text().strip()
    try:
        keks = parse_kek_config(configured)
    except ValueError as exc:
        raise InvalidArgument(str(exc), "HEARTH_KEKS") from None
    ids = [k.kek_id for k in keks]
    if not active:
        if len(ids) != 1:
            raise InvalidArgument("several KEKs configured: set HEARTH_ACTIVE_KEK to one of "
                                  f"{', '.join(ids)}", "HEARTH_ACTIVE_KEK")
        active = ids[0]
    if active not in ids:
        raise InvalidArgument(f"{active!r} is not among the configured KEKs", "HEARTH_ACTIVE_KEK")
    return keks, active


class KeyService:
    """GetDataKey / RotateKeys / crypto-shredding over a ``KeyRing`` and the store."""

    def __init__(self, store: DataKeyStore, keks: list[KeyEncryptionKey], active_kek_id: str, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic,
                 records: Iterable[WrappedDek] | None = None) -> None:
        self.store = store
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # Only what the KEK check below tries (``records``: the tests' own view, kept), then
        # each household's records read on use and held for REFRESH_S (``_held``).
        self.ring = KeyRing(keks, active_kek_id, store.start_check_sample(START_CHECK_SAMPLE)
                            if records is None else records)
        # A KEK whose bytes changed under its id opens none of the keys it wraps: refuse to
        # start on it (attack25; until then every existing household answered 500 and new
        # households' keys were wrapped under the wrong KEK). Judged on the oldest keys: a
        # KEK that opens most of them but not some other one (wrapped by a run on a wrong KEK, or
        # damaged) is the right one, and refusing it too left no KEK that could start
        # privacy (review25); those keys are reported. The messages name KEK ids and
        # counts only, never an account.
        unopened = self.ring.unopened_data_keys(START_CHECK_SAMPLE)
        replaced = self.ring.replaced_keks(START_CHECK_SAMPLE)
        if replaced:
            raise ConfigError("invalid configuration:\n  HEARTH_KEKS: " + "; ".join(
                f"KEK {kek_id!r} does not open the data keys stored under that id ({unopened[kek_id][0]} of "
                f"{unopened[kek_id][1]} tried, most of the oldest)" for kek_id in replaced)
                + ": its bytes are not the ones that wrapped them (a development KEK file regenerated, or "
                "another secret under the same id). Restore the KEK that wrapped them; on this one every "
                "household that has a key could not be read, written or exported, and new households' "
                "keys would be wrapped under the wrong KEK")
        for kek_id, (bad, tried) in unopened.items():
            log.error("KEK %r opens the oldest data keys stored under its id but not %d of the %d tried: those "
                      "households' keys were wrapped by other bytes under the same id (a run on a regenerated "
                      "development file or another secret) or are damaged, and cannot be read", kek_id, bad, tried)
        # account -> when its records were last read from the store (time.monotonic()),
        # oldest first: the households whose records the ring holds.
        self._checked: OrderedDict[str, float] = OrderedDict()
        self._holding_all = False
        if records is None:
            self.ring.keep_only(())

    @contextlib.contextmanager
    def _forgotten_unless_stored(self, *records: WrappedDek | None) -> Iterator[None]:
        """Around the store's write of records the ring just made (``create_dek``,
        ``derive_digest_key`` put them in the ring first): when the write fails, the ring
        forgets them. Until review28 a failed write (the database unavailable, a write
        refused) left the key in the ring, unstored, and the next fetch of the household —
        the store's retry — served it: the store sealed data under a key no database held
        (a restarted privacy made another), and a retried rotation "resumed" an unstored
        version and destroyed the stored one."""
        try:
            yield
        except BaseException:
            for record in records:
                if record is not None:
                    self.ring.discard(record.account_id, record.dek_version)
            raise

    def _refresh(self, account_id: str, force: bool = False) -> None:
        now = self._monotonic()
        if force or now - self._checked.get(account_id, -1e18) > REFRESH_S:
            self.ring.load(self.store.load(account_id))
            self._held([account_id], now)

    def _held(self, account_ids: list[str], now: float) -> None:
        """Note ``account_ids``' records read at ``now``, and drop from the ring every
        household read longer than REFRESH_S ago (read again before its next use anyway)
        or beyond HELD_MAX. Until session 29 every household's records stayed for the
        process's life, every household's loaded at start: +134 MiB per 100,000 households."""
        for account_id in account_ids:
            self._checked[account_id] = now
            self._checked.move_to_end(account_id)
        while self._checked and not self._holding_all:
            account_id, at = next(iter(self._checked.items()))
            if now - at <= REFRESH_S and len(self._checked) <= HELD_MAX:
                break
            del self._checked[account_id]
            self.ring.forget(account_id)

    def data_key(self, account_id: str, version: int = 0) -> tuple[int, bytes]:
        """(version, raw DEK) for a store; creates the household's first DEK on demand.
        FailedPrecondition once the household was shredded (the account was erased)."""
        if version < 0:
            raise InvalidArgument("must be >= 0", "dek_version")
        with self._lock:
            self._refresh(account_id)
            if version == 0 and not self.ring.has_dek(account_id) and not self.ring.is_destroyed(account_id):
                # The household's first data key, and its digest key with it (one transaction).
                record, digest, _ = self.ring.create_household_keys(account_id, self._clock())
                with self._forgotten_unless_stored(record, digest):
                    inserted = self.store.insert_new(record, digest)
                if not inserted:
                    self.ring.discard(account_id, DIGEST_KEY_VERSION)
                    self._refresh(account_id, force=True)  # another replica's key won the race
            try:
                try:
                    return self.ring.data_key(account_id, version or None)
                except KeyNotFoundError:
                    if not version:
                        raise
                    # A version named by number that this replica's view (up to REFRESH_S
                    # old) lacks: a data key rotation on another replica has just created it.
                    self._refresh(account_id, force=True)
                    return self.ring.data_key(account_id, version)
            except KeyDestroyedError:
                raise FailedPrecondition("the data key of this household was destroyed "
                                         "(the household was erased)", "account_id") from None
            except KeyNotFoundError as exc:
                raise NotFound(str(exc), "dek_version" if version else "account_id") from None

    def data_keys(self, account_ids: list[str]) -> dict[str, tuple[int, bytes] | str]:
        """The newest data key of each household (GetDataKeys): ``(version, raw DEK)``,
        ``ERASED`` (shredded: no key is made for it) or ``UNAVAILABLE`` (a key that cannot
        be opened here: ``data_key`` of that household says why). The households without
        a key get their first data key and digest key as ``data_key`` makes them, all in
        one store transaction and one hold of the lock (until session 28 one call, one
        lock hold and one commit each: ~3 ms a household, so 5,000 new households in one
        ingest request ran past the gateway's deadline). A creation that loses to a
        stored row (another replica's key, or the tombstone of an erasure this view had
        not seen) is discarded and the stored rows are read: the erasure wins."""
        with self._lock:
            read_at = self._refresh_many(account_ids)
            now = self._clock()
            created = {}
            for account_id in account_ids:
                if not self.ring.has_dek(account_id) and not self.ring.is_destroyed(account_id):
                    created[account_id] = self.ring.create_household_keys(account_id, now)
            if created:
                with self._forgotten_unless_stored(*(r for record, digest, _ in created.values() for r in (record, digest))):
                    inserted = self.store.insert_new_many((record, digest) for record, digest, _ in created.values())
                lost = [account_id for account_id in created if account_id not in inserted]
                for account_id in lost:
                    self.ring.discard(account_id, FIRST_DEK_VERSION)
                    self.ring.discard(account_id, DIGEST_KEY_VERSION)
                    del created[account_id]
                # As of the first read: a later instant would drop households this call read
                # fresh then and answers below (review29: UNAVAILABLE for a stored key).
                self._refresh_many(lost, force=True, now=read_at)
            answers: dict[str, tuple[int, bytes] | str] = {}
            for account_id in account_ids:
                if account_id in created:   # stored now: the raw key at hand, no unwrap
                    answers[account_id] = (FIRST_DEK_VERSION, created[account_id][2])
                    continue
                try:
                    answers[account_id] = self.ring.data_key(account_id)
                except KeyDestroyedError:
                    answers[account_id] = ERASED
                except (KeyNotFoundError, DecryptionError):
                    answers[account_id] = UNAVAILABLE
            return answers

    def _refresh_many(self, account_ids: list[str], force: bool = False, now: float | None = None) -> float:
        """``_refresh`` of several households with one read of the store, as of ``now``
        (default: this instant; returned): a household read within REFRESH_S before it is
        kept, one read longer ago dropped (``_held``)."""
        now = self._monotonic() if now is None else now
        stale = [a for a in account_ids if force or now - self._checked.get(a, -1e18) > REFRESH_S]
        if stale:
            self.ring.load(self.store.load_many(stale))
            self._held(stale, now)
        return now

    def digest_key(self, account_id: str) -> bytes:
        """The household's erased-id digest key (GetDataKey ``with_digest_key``), after
        ``data_key(account_id)`` (which creates the household's keys on first use). A
        household from before session 27 has none yet: it is derived now from its live
        version 1 — the key its stores' digests were keyed from until then — and stored
        (only while the household has a live key, in its lock: an erasure wins). Same
        errors as ``data_key``."""
        with self._lock:
            self._refresh(account_id)
            try:
                try:
                    return self.ring.digest_key(account_id)
                except KeyNotFoundError:
                    self._ensure_digest_key(account_id)
                    return self.ring.digest_key(account_id)
            except KeyDestroyedError:
                raise FailedPrecondition("the data key of this household was destroyed "
                                         "(the household was erased)", "account_id") from None
            except KeyNotFoundError as exc:
                raise NotFound(str(exc), "account_id") from None

    def _ensure_digest_key(self, account_id: str) -> None:
        """Under ``self._lock``: the household's digest key stored (derived from version 1
        when it has none). KeyDestroyedError once shredded; KeyNotFoundError when neither
        the digest key nor version 1 exists."""
        self._refresh(account_id, force=True)
        record = self.ring.derive_digest_key(account_id, self._clock())
        if record is None:
            return
        with self._forgotten_unless_stored(record):
            outcome = self.store.insert_version(record)
        if outcome != "inserted":
            # "exists": another replica derived it (the same key: reload); "destroyed": shredded
            # meanwhile (the reload reads the tombstones, and the ring refuses).
            self.ring.discard(account_id, DIGEST_KEY_VERSION)
            self._refresh(account_id, force=True)
            self.ring.digest_key(account_id)

    def shred(self, account_id: str, purges: list[dict] | None = None) -> list[str]:
        """Destroy every DEK version of the household; returns the ids of the destroyed
        keys (``data_key:<account>:v<n>``) for the deletion receipt, and appends the
        physical purge of the old wrapped keys to ``purges``. Idempotent."""
        with self._lock:
            self._refresh(account_id, force=True)
            if not self.ring.records(account_id):
                # Never keyed: nothing to destroy, but no key may be made for it after the
                # erasure either (a tombstone of version 1), as for a household that had one.
                if self.store.tombstone_unkeyed(account_id, self.ring.active_kek_id, self._clock().isoformat()):
                    self._refresh(account_id, force=True)
                    return []
                self._refresh(account_id, force=True)   # keyed meanwhile by another replica: shred it
            already = {r.dek_version for r in self.ring.records(account_id) if r.destroyed}
            tombstones = self.ring.destroy_dek(account_id, self._clock())
            self.store.overwrite([t for t in tombstones if t.dek_version not in already], purges)
            # The store also tombstoned any version this view had not seen yet (a data key
            # rotation's, created on another replica): read back, so it is reported too.
            self._refresh(account_id, force=True)
            destroyed = [r.dek_version for r in self.ring.records(account_id) if r.destroyed]
        return [f"data_key:{account_id}:v{v}" if v != DIGEST_KEY_VERSION else f"digest_key:{account_id}"
                for v in sorted(destroyed, key=lambda v: v == DIGEST_KEY_VERSION) if v not in already]

    def is_shredded(self, account_id: str) -> bool:
        """Whether the household's data keys are destroyed (crypto-shredded by its erasure),
        read from the store (another replica may have shredded it)."""
        with self._lock:
            self._refresh(account_id, force=True)
            return self.ring.is_destroyed(account_id)

    # ---- data key rotation (keys/rotation.py drives it) -----------------------------------

    def begin_rotation(self, account_id: str, create: bool = True,
                       unless_created_after: datetime | None = None) -> tuple[int, bool, datetime] | None:
        """The version a rotation of the household's data key re-encrypts to, whether it
        was begun before (resumed: a live older version is not retired yet), and when that
        version was created. Otherwise creates version newest + 1 (``create``; else None) (``insert_version``:
        never after the household was shredded). ``unless_created_after``: None instead of a
        new version when the newest was created after that time — rotated since (a batch
        requested before another batch or call rotated it asks so: attack28). FailedPrecondition once the household
        was erased; NotFound when it has no data key (nothing of it is encrypted)."""
        with self._lock:
            for _ in range(ROTATE_ATTEMPTS):
                self._refresh(account_id, force=True)
                if self.ring.is_destroyed(account_id):
                    raise FailedPrecondition("the data key of this household was destroyed "
                                             "(the household was erased)", "account_id")
                live = {r.dek_version: r for r in self.ring.records(account_id)
                        if not r.destroyed and not r.is_digest_key}
                if not live:
                    raise NotFound("the household has no data key: nothing of it is encrypted", "account_id")
                newest = max(live)
                retired = self.store.retired_versions(account_id)
                if any(v < newest and v not in retired for v in live):
                    return newest, True, live[newest].created_at
                if not create or (unless_created_after is not None
                                  and live[newest].created_at > unless_created_after):
                    return None
                record = self.ring.create_dek(account_id, self._clock())
                with self._forgotten_unless_stored(record):
                    outcome = self.store.insert_version(record)
                if outcome == "inserted":
                    return record.dek_version, False, record.created_at
                # Not stored: this view must not keep serving the key it just made. Shredded
                # meanwhile ("destroyed": the next turn reads the tombstones and refuses), or
                # another replica began a rotation first ("exists": the next turn resumes it).
                self.ring.discard(record.account_id, record.dek_version)
            raise Unavailable("the household's data keys kept changing: run the rotation again")

    def finish_rotation(self, account_id: str, dek_version: int, purges: list[dict] | None = None,
                        keep_first: bool = False, purge: bool = True) -> tuple[list[int], list[int]]:
        """After every store re-encrypted the household's data under ``dek_version``: the
        older live versions are destroyed, version 1 included — the household's digest key
        is derived from it first if it has none (a household from before session 27), so
        the erased-id digests still match. ``keep_first``: a data holder of an older
        release keys its digests with version 1 itself (``RekeyResponse.digests_keyed_apart``
        false): version 1 is retired and kept, as that release did. ``purge`` False: the
        key tables' physical purge is left to the caller (``DataKeyStore.retire``). Returns
        (versions destroyed by this call, live versions kept besides ``dek_version``). Idempotent."""
        with self._lock:
            try:
                self._ensure_digest_key(account_id)
            except KeyDestroyedError:
                raise FailedPrecondition("the data key of this household was destroyed "
                                         "(the household was erased)", "account_id") from None
            except KeyNotFoundError:
                pass   # version 1 destroyed before (no digest key needed it: none is asked of it)
            if self.ring.is_destroyed(account_id):
                raise FailedPrecondition("the data key of this household was destroyed "
                                         "(the household was erased)", "account_id")
            older = [r.dek_version for r in self.ring.records(account_id)
                     if not r.destroyed and not r.is_digest_key and r.dek_version < dek_version]
            kept = [v for v in older if keep_first and v == FIRST_DEK_VERSION]
            destroyed = self.store.retire(account_id, kept, [v for v in older if v not in kept],
                                          self._clock().isoformat(), purges, purge=purge)
            self._refresh(account_id, force=True)
            return destroyed, sorted(r.dek_version for r in self.ring.records(account_id)
                                     if not r.destroyed and not r.is_digest_key and r.dek_version != dek_version)

    def rotate(self, new_active_kek_id: str) -> tuple[int, str, list[str]]:
        """Make another configured KEK active and re-wrap every live DEK under it."""
        with self._lock:
            self._holding_all = True   # every household loaded: none dropped until the re-wrap is done
            try:
                return self._rotate_kek(new_active_kek_id)
            finally:
                self._holding_all = False
                self.ring.keep_only(self._checked)   # back to the households held

    def _rotate_kek(self, new_active_kek_id: str) -> tuple[int, str, list[str]]:
        self.ring.load(self.store.load())
        previous = {(r.account_id, r.dek_version): r.wrapped for r in self.ring.records()}
        try:
            records = self.ring.rotate_kek(new_active_kek_id)
        except ValueError as exc:
            # the domain's message starts with the field, which InvalidArgument adds itself
            raise InvalidArgument(str(exc).removeprefix("new_active_kek_id: "), "new_active_kek_id") from None
        stored = 0
        for _ in range(ROTATE_ATTEMPTS):
            conflicts = self.store.rewrap(records, previous)
            stored += len(records) - len(conflicts)
            if not conflicts:
                break
            # Another replica shredded (a tombstone) or re-wrapped these keys since they
            # were read: take the stored rows (a tombstone wins in the ring) and re-wrap
            # what is still live under an older KEK.
            for account_id in sorted({r.account_id for r in conflicts}):
                self._refresh(account_id, force=True)
            previous = {(r.account_id, r.dek_version): r.wrapped for r in self.ring.records()}
            records = self.ring.rewrap_all()
        else:
            raise Unavailable("the data keys kept changing during the rotation: run it again")
        return stored, self.ring.active_kek_id, sorted(self.ring.kek_ids_in_use())

    def metadata(self, account_id: str) -> list[dict]:
        """Key records of a household without key material (for the export)."""
        with self._lock:
            self._refresh(account_id, force=True)
            return [{"dek_version": r.dek_version, "kek_id": r.kek_id,
                     "created_at": r.created_at.isoformat(),
                     "destroyed_at": r.destroyed_at.isoformat() if r.destroyed_at else None}
                    for r in self.ring.records(account_id) if not r.is_digest_key]
