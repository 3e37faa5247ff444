"""Encryption of sensitive fields at rest: ``FieldCipher``, used by the stores.

Each household (account) has its own AES-256 data key (DEK), versioned, held by the
privacy service wrapped under a master key (KEK). A store asks for the DEK through
privacy's ``GetDataKey`` (service principals only), keeps it in memory for at most
``ttl_s`` (default 60 s, never on disk) and encrypts each sensitive field with
AES-256-GCM. Formats — identical to ``services.privacy.keys.domain.KeyRing``
(docs/privacy.md §3), so the privacy service's key ring can read any store's blobs:

    blob = 0x01 || dek_version (4 bytes, big-endian) || nonce (12) || AES-256-GCM(pt)
    AAD  = b"hearth-field-v1" 0x00 json([account_id, field, dek_version])

The AAD binds a ciphertext to its household and column: a blob copied to another
household or field does not decrypt. TEXT columns hold ``"enc1:" + base64(blob)``
(``encrypt_text``), so the schemas stay unchanged on SQLite and PostgreSQL.

Crypto-shredding: a household deletion destroys the DEK in the privacy service; a store
calls ``forget(account_id)`` in its Erase so this process drops its copy at once, and
any other replica's copy expires within ``ttl_s``. After that, every ciphertext of the
household — including copies in backups — is unreadable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from json.encoder import encode_basestring_ascii as _json_string

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter

from services.common.errors import (ERROR_CODE_KEY, FailedPrecondition, HearthError, InvalidArgument, NotFound,
                                    Unavailable, about_account)
from services.common.telemetry import pseudonym

BLOB_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + 4 + NONCE_BYTES
TEXT_PREFIX = "enc1:"
_DIGEST_LABEL = b"hearth-erased-id-v1"
# The data key version a digest key is derived from when the privacy service gives none
# (a release before session 27; the same derivation as privacy's, keys.domain).
DIGEST_DEK_VERSION = 1
DEFAULT_TTL_S = 60.0
_MAX_REKEY_EPOCHS = 200_000
# ``warm``'s concurrent GetDataKey calls: a quarter of privacy's default HEARTH_MAX_WORKERS (16),
# so one batch's warming leaves the other callers of privacy most of its threads.
WARM_CONCURRENCY = 4

# ``warm``'s households per GetDataKeys call (session 28): privacy creates the missing keys of
# one call in one transaction under its key lock, so the chunk bounds how long another
# caller's GetDataKey waits behind it; the chunks go one after the other.
WARM_BATCH = 250

# Data keys fetched from the privacy service: ``warm`` fetches those of a write's households
# before its transaction opens; ``on_use`` is a fetch where a key is used — inside a write
# transaction, holding SQLite's write lock for the round trip (attack27: one a household).
DATA_KEY_FETCHES = Counter("hearth_data_key_fetches_total", "Household data keys fetched from the privacy service",
                           ["when"])

# fetch(account_id, dek_version) -> (dek_version, 32-byte key); dek_version 0 = newest
# (the authority creates the household's first key on demand).
KeyFetcher = Callable[[str, int], tuple[int, bytes]]
# fetch_digest_key(account_id) -> the household's 32-byte erased-id digest key, or None
# from an authority that has none to give (a privacy service before session 27).
DigestKeyFetcher = Callable[[str], "bytes | None"]
# fetch_keys(account_ids) -> for each household its newest (dek_version, key), or None when
# the authority gives none now (erased, or unavailable: the on-use fetch says why); the
# whole answer None from an authority without the batch call (a privacy service before
# session 28 answers GetDataKeys UNIMPLEMENTED), and the caller fetches one household at a time.
BatchKeyFetcher = Callable[[list[str]], "dict[str, tuple[int, bytes] | None] | None"]


class FieldDecryptionError(Exception):
    """A stored ciphertext does not authenticate (altered bytes, wrong household or
    column, or a key that is not the one it was written with). Not a caller error: the
    server maps it to INTERNAL without details (it means data loss or tampering)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


_AAD_PREFIX = b"hearth-field-v1\x00"


def field_aad(account_id: str, field: str, dek_version: int) -> bytes:
    """``_AAD_PREFIX + json.dumps([account_id, field, dek_version], separators=(",", ":"))``
    as UTF-8. For the types it is called with (str, str, int) the JSON is written here, by
    the function json.dumps writes a string with (``ensure_ascii``) and an int's repr:
    json.dumps with its own separators builds an encoder a call, which was ~a tenth of
    clustering's CPU on event ingest, where every stored event's five sealed fields are
    opened when its session is rebuilt (tests/unit/common/test_field_crypto_aad.py holds
    the two equal)."""
    if type(account_id) is str and type(field) is str and type(dek_version) is int:
        return _AAD_PREFIX + f"[{_json_string(account_id)},{_json_string(field)},{dek_version}]".encode("ascii")
    return _AAD_PREFIX + json.dumps([account_id, field, dek_version], separators=(",", ":")).encode("utf-8")


def encrypted_length(plaintext_length: int) -> int:
    return HEADER_BYTES + plaintext_length + TAG_BYTES


class FieldCipher:
    """Encrypt/decrypt one field of one household (see module docstring).

    Thread-safe; keys are cached per (account, version) for at most ``ttl_s``."""

    def __init__(self, fetch_key: KeyFetcher, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic, close: Callable[[], None] | None = None,
                 fetch_digest_key: DigestKeyFetcher | None = None,
                 fetch_keys: BatchKeyFetcher | None = None) -> None:
        if not 0 < ttl_s <= DEFAULT_TTL_S:
            raise ValueError(f"ttl_s: must be in (0, {DEFAULT_TTL_S}] seconds")
        self._fetch = fetch_key
        self._fetch_keys = fetch_keys
        self._fetch_digest_key = fetch_digest_key
        # account -> (fetched_at, digest key); cleared with the household's data keys
        self._digest_keys: dict[str, tuple[float, bytes]] = {}
        self._ttl = float(ttl_s)
        self._clock = clock
        self._close = close
        # (account, version) -> (fetched_at, version, cipher, digest key); version 0 caches "newest".
        self._keys: dict[tuple[str, int], tuple[float, int, AESGCM, bytes]] = {}
        self._lock = threading.Lock()
        self._erasure_epoch: int | None = None   # the store's household_erasures.epoch last seen
        # account -> the store's household_key_epochs.epoch last seen (absent: 0, never re-keyed)
        self._rekey_epochs: dict[str, int] = {}
        # Moves whenever cached keys are dropped (``warm`` keeps what it fetched only if it
        # did not move meanwhile: a key fetched before an erasure or re-key was noted here).
        self._invalidations = 0

    @classmethod
    def remote(cls, privacy_addr: str, calling_service: str, *, timeout_s: float = 5.0,
               ttl_s: float = DEFAULT_TTL_S) -> "FieldCipher":
        """Keys from the privacy service's ``GetDataKey``, as ``svc:<calling_service>``."""
        from hearth.privacy.v1 import privacy_pb2, privacy_pb2_grpc
        from services.common.client import BatchCall, Peer

        peer = Peer(privacy_addr, calling_service, privacy_pb2_grpc.KeysStub, timeout_s)

        def fetch(account_id: str, version: int) -> tuple[int, bytes]:
            request = privacy_pb2.GetDataKeyRequest(account_id=account_id, dek_version=version)
            try:
                r = peer.call("GetDataKey", request, idempotent=True)
            except grpc.RpcError as exc:
                raise _error_from_rpc(exc) from None
            return int(r.dek_version), bytes(r.dek)

        def fetch_digest_key(account_id: str) -> bytes | None:
            # Version 0 (the newest) as ``digests`` always asked first: it creates the
            # household's keys on first use and refuses an erased household.
            request = privacy_pb2.GetDataKeyRequest(account_id=account_id, dek_version=0, with_digest_key=True)
            try:
                r = peer.call("GetDataKey", request, idempotent=True)
            except grpc.RpcError as exc:
                raise _error_from_rpc(exc) from None
            return bytes(r.digest_key) or None   # empty: a privacy service before session 27

        batch = BatchCall()   # a privacy before session 28: one GetDataKey a household meanwhile

        def fetch_keys(account_ids: list[str]) -> dict[str, tuple[int, bytes] | None] | None:
            request = privacy_pb2.GetDataKeysRequest(account_ids=account_ids)
            try:
                r = batch.call(lambda: peer.call("GetDataKeys", request, idempotent=True))
            except grpc.RpcError as exc:
                raise _error_from_rpc(exc) from None
            if r is None:
                return None
            got = {k.account_id: (int(k.dek_version), bytes(k.dek)) for k in r.keys
                   if k.outcome == privacy_pb2.DATA_KEY_OUTCOME_KEY}
            return {a: got.get(a) for a in account_ids}

        return cls(fetch, ttl_s=ttl_s, close=peer.close, fetch_digest_key=fetch_digest_key, fetch_keys=fetch_keys)

    # ---- keys ------------------------------------------------------------------------

    def _entry(self, account_id: str, version: int) -> tuple[float, int, AESGCM, bytes]:
        now = self._clock()
        with self._lock:
            hit = self._keys.get((account_id, version))
        if hit is not None and now - hit[0] < self._ttl:
            return hit
        DATA_KEY_FETCHES.labels("on_use").inc()
        try:
            got_version, key = self._fetch(account_id, version)
        except HearthError as exc:   # a batch's caller names the item (errors.naming_the_item)
            about_account(exc, account_id)
            raise
        if len(key) != 32 or got_version < 1 or (version and got_version != version):
            raise HearthError(f"data key service returned an unusable key for {account_id!r}", "account_id")
        entry = (now, got_version, AESGCM(key), hmac.new(key, _DIGEST_LABEL, hashlib.sha256).digest())
        with self._lock:
            self._keys[(account_id, version)] = entry
            self._keys[(account_id, got_version)] = entry
        return entry

    def uncached(self, account_ids: Iterable[str], now: float | None = None) -> list[str]:
        """The households (each once, in order) whose newest data key is not cached."""
        now = self._clock() if now is None else now
        with self._lock:
            return [a for a in dict.fromkeys(account_ids)
                    if (hit := self._keys.get((a, 0))) is None or now - hit[0] >= self._ttl]

    def warm(self, account_ids: Iterable[str]) -> None:
        """Fetch the newest data key of each household not cached — ``WARM_BATCH``
        households a call (``fetch_keys``: privacy's GetDataKeys, which creates the missing
        keys of a call in one transaction), else, from a privacy service without that call,
        one household a call ``WARM_CONCURRENCY`` at a time: called by a store before the
        write transaction that uses them opens, so the transaction makes no privacy round
        trip for them (attack27: one a household inside it, holding SQLite's write lock —
        5,000 new households answered 504; keyfetch27 moved them before the transaction,
        still one call and one key creation each, and they still did).

        Only a cache fill; every guarantee stays with the transaction: its
        ``drop_keys_of_erased_households`` still drops these keys when an erasure or a
        re-key of the household committed since, and what was fetched is not kept at all
        when cached keys were dropped while it was fetched (a key fetched before another
        transaction noted an erasure must not outlive that). A household privacy refuses
        (erased) or a failed call is left to the transaction, which fetches it again and
        raises as before."""
        now = self._clock()
        with self._lock:
            invalidations = self._invalidations
        missing = self.uncached(account_ids, now)
        if not missing:
            return

        fetched = self._fetch_in_batches(missing)
        if fetched is None:
            fetched = self._fetch_one_by_one(missing)
        entries = {}
        for account_id, got in zip(missing, fetched):
            if got is not None and len(got[1]) == 32 and got[0] >= 1:
                key = got[1]
                entries[account_id] = (now, got[0], AESGCM(key), hmac.new(key, _DIGEST_LABEL, hashlib.sha256).digest())
        with self._lock:
            if self._invalidations != invalidations:
                return
            for account_id, entry in entries.items():
                self._keys[(account_id, 0)] = entry
                self._keys[(account_id, entry[1])] = entry

    def _fetch_in_batches(self, missing: list[str]) -> list[tuple[int, bytes] | None] | None:
        """``warm``'s fetch through ``fetch_keys``, ``WARM_BATCH`` at a time, in the order of
        ``missing``; None when there is no batch call (then nothing was fetched). A chunk
        whose call fails is left to the transaction, as a failed single fetch is."""
        if self._fetch_keys is None or len(missing) == 1:
            return None
        fetched: list[tuple[int, bytes] | None] = []
        for start in range(0, len(missing), WARM_BATCH):
            chunk = missing[start:start + WARM_BATCH]
            try:
                got = self._fetch_keys(chunk)
            except HearthError:
                got = {}
            if got is None:
                if start:   # cannot happen with one authority; the rest one at a time all the same
                    return fetched + self._fetch_one_by_one(missing[start:])
                return None
            DATA_KEY_FETCHES.labels("warm").inc(len(chunk))
            fetched += [got.get(a) for a in chunk]
        return fetched

    def _fetch_one_by_one(self, missing: list[str]) -> list[tuple[int, bytes] | None]:
        def fetch(account_id: str) -> tuple[int, bytes] | None:
            DATA_KEY_FETCHES.labels("warm").inc()
            try:
                return self._fetch(account_id, 0)
            except HearthError:
                return None

        if len(missing) == 1:
            return [fetch(missing[0])]
        with ThreadPoolExecutor(min(WARM_CONCURRENCY, len(missing)), thread_name_prefix="key-warm") as pool:
            return list(pool.map(fetch, missing))

    def _key(self, account_id: str, version: int) -> tuple[int, AESGCM]:
        entry = self._entry(account_id, version)
        return entry[1], entry[2]

    def digests(self, account_id: str, values: Iterable[str]) -> dict[str, bytes]:
        """Keyed digests (HMAC-SHA256 under the household's digest key) of ``values``: what
        a store keeps of an erased event's id so that a replay of the event is refused,
        without keeping the id (a household erasure shreds the digest key with the data
        keys, and the digests then match nothing).

        The digest key is the privacy service's (GetDataKey ``with_digest_key``, session
        27): ``HMAC-SHA256(data key version 1, "hearth-erased-id-v1")``, derived once and
        kept apart from the data keys, so a data key rotation can destroy version 1 and
        the digests still match (until session 27 the stores derived it from version 1
        themselves, which a rotation therefore kept while the household lived; until
        dek24 from the newest version, whose digests stopped matching after a new one).
        From a privacy service that gives none (an older release) it is derived here from
        version 1 as that release did — the same key. No value, no key asked: an erasure
        that deleted nothing (a household erased before, its key shredded; an account
        never seen) must neither fail nor create a data key (review23)."""
        values = list(values)
        if not values:
            return {}
        mac = self._digest_key(account_id)
        return {v: hmac.new(mac, v.encode("utf-8"), hashlib.sha256).digest() for v in values}

    def _digest_key(self, account_id: str) -> bytes:
        now = self._clock()
        with self._lock:
            hit = self._digest_keys.get(account_id)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        key = self._fetch_digest_key(account_id) if self._fetch_digest_key is not None else None
        if key is None:
            # The newest is asked first: it creates the household's key on first use and
            # refuses a shredded household as before.
            newest = self._entry(account_id, 0)
            key = (newest if newest[1] == DIGEST_DEK_VERSION else self._entry(account_id, DIGEST_DEK_VERSION))[3]
        elif len(key) != 32:
            raise HearthError(f"data key service returned an unusable digest key for {account_id!r}", "account_id")
        with self._lock:
            self._digest_keys[account_id] = (now, key)
        return key

    def require_live(self, account_id: str) -> None:
        """Raise FailedPrecondition (field ``account_id``) when the household was erased
        (its key destroyed); for a store about to keep data of the household that it does
        not encrypt (a conversion carries no sensitive column, yet stored under an erased
        account id it would bring the household back)."""
        self._key(account_id, 0)

    def sync_erasures(self, epoch: int, rekeyed: Mapping[str, int] | None = None) -> None:
        """Drop every cached key when the store's count of household erasures moved: one
        replica's Erase cannot reach the keys the other replicas of the store have
        cached, and with a household's key cached a replica could go on writing for it
        after its deletion (see ``drop_keys_of_erased_households``). ``rekeyed``: the
        store's re-key count of each household about to be written; a household's cached
        keys are dropped when its count moved (another replica's ``Rekey`` of a data key
        rotation), the other households' stay (until session 27 a Rekey moved the global
        count and every replica refetched every household's key)."""
        with self._lock:
            if epoch != self._erasure_epoch:
                self._invalidations += 1
                self._keys.clear()
                self._digest_keys.clear()
                self._erasure_epoch = epoch
            for account_id, count in (rekeyed or {}).items():
                if self._rekey_epochs.get(account_id, 0) != count:
                    self._forget_locked(account_id)
                    self._rekey_epochs[account_id] = count
            if len(self._rekey_epochs) > _MAX_REKEY_EPOCHS:
                # Bounded: forgetting what was seen means forgetting the keys cached with it
                # (a household's counts then read as unseen and its keys are fetched again).
                self._rekey_epochs.clear()
                self._invalidations += 1
                self._keys.clear()
                self._digest_keys.clear()

    def forget(self, account_id: str) -> None:
        """Drop every cached key of the household (called by a store's Erase)."""
        with self._lock:
            self._forget_locked(account_id)

    def _forget_locked(self, account_id: str) -> None:
        self._invalidations += 1
        for k in [k for k in self._keys if k[0] == account_id]:
            del self._keys[k]
        self._digest_keys.pop(account_id, None)

    def forget_all(self) -> None:
        with self._lock:
            self._invalidations += 1
            self._keys.clear()
            self._digest_keys.clear()

    def close(self) -> None:
        self.forget_all()
        if self._close is not None:
            self._close()

    # ---- bytes -----------------------------------------------------------------------

    def encrypt(self, account_id: str, field: str, plaintext: bytes) -> bytes:
        version, cipher = self._key(account_id, 0)
        return _seal(cipher, version, account_id, field, plaintext)

    def sealer(self, account_id: str) -> "HouseholdSealer":
        """The household's newest data key (fetched if not cached), taken once: a store
        seals a new household's rows with it *before* its write transaction opens, so that
        the transaction only writes (ingest29), and keeps them only if
        ``cached_newest_version`` still names ``sealer.version`` inside the transaction
        (after ``drop_keys_of_erased_households``: a re-key or erasure noted meanwhile
        dropped the key, and the rows are sealed again there)."""
        version, cipher = self._key(account_id, 0)
        return HouseholdSealer(account_id, version, cipher)

    def cached_newest_version(self, account_id: str) -> int | None:
        """The version of the household's newest data key as cached now (within its TTL),
        None when it is not: no fetch."""
        now = self._clock()
        with self._lock:
            hit = self._keys.get((account_id, 0))
        return hit[1] if hit is not None and now - hit[0] < self._ttl else None

    def decrypt(self, account_id: str, field: str, blob: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) < HEADER_BYTES + TAG_BYTES or blob[0] != BLOB_VERSION:
            raise FieldDecryptionError(f"stored {field} of {pseudonym(account_id)} is not an encrypted field", field)
        version = int.from_bytes(blob[1:5], "big")
        _, cipher = self._key(account_id, version)
        try:
            return cipher.decrypt(blob[5:HEADER_BYTES], blob[HEADER_BYTES:],
                                  field_aad(account_id, field, version))
        except InvalidTag:
            # The household by its pseudonym: the error interceptor logs this message with its
            # traceback, and logs are not rewritten when the household is erased (attack25).
            raise FieldDecryptionError(f"stored {field} of {pseudonym(account_id)} does not authenticate",
                                       field) from None

    # ---- re-keying (a rotation of the household's data key) ---------------------------

    @staticmethod
    def blob_version(blob: bytes) -> int:
        """The data key version a sealed blob names (0: not a sealed blob)."""
        blob = bytes(blob)
        if len(blob) < HEADER_BYTES + TAG_BYTES or blob[0] != BLOB_VERSION:
            return 0
        return int.from_bytes(blob[1:5], "big")

    def reseal(self, account_id: str, field: str, blob: bytes, dek_version: int) -> bytes | None:
        """``blob`` decrypted and encrypted again under the household's data key version
        ``dek_version`` (asked for by number, not "the newest": a store may still hold the
        older newest in its cache); None when it is already under that version or a newer
        one, or is not a sealed blob (plain bytes written before encryption was enabled)."""
        version = self.blob_version(blob)
        if not 0 < version < dek_version:
            return None
        plaintext = self.decrypt(account_id, field, blob)
        got, cipher = self._key(account_id, dek_version)
        nonce = os.urandom(NONCE_BYTES)
        return (bytes([BLOB_VERSION]) + got.to_bytes(4, "big") + nonce
                + cipher.encrypt(nonce, plaintext, field_aad(account_id, field, got)))

    def reseal_text(self, account_id: str, field: str, stored: str | None, dek_version: int) -> str | None:
        """``reseal`` of a TEXT column's ``"enc1:" + base64(blob)``; None when unchanged."""
        if stored is None or not stored.startswith(TEXT_PREFIX):
            return None
        blob = self.reseal(account_id, field, base64.b64decode(stored[len(TEXT_PREFIX):]), dek_version)
        return None if blob is None else TEXT_PREFIX + base64.b64encode(blob).decode("ascii")

    # ---- TEXT columns ----------------------------------------------------------------

    def encrypt_text(self, account_id: str, field: str, value: str | None) -> str | None:
        """``"enc1:" + base64(blob)`` of the UTF-8 text; None stays None (NULL column)."""
        if value is None:
            return None
        return _text(self.encrypt(account_id, field, value.encode("utf-8")))

    def decrypt_text(self, account_id: str, field: str, stored: str | None) -> str | None:
        """Inverse of ``encrypt_text``. A value without the prefix was written before
        encryption was enabled and is returned as is."""
        if stored is None or not stored.startswith(TEXT_PREFIX):
            return stored
        return self.decrypt(account_id, field, base64.b64decode(stored[len(TEXT_PREFIX):])).decode("utf-8")

    def decrypt_vector(self, account_id: str, field: str, stored: bytes) -> bytes:
        """Decrypt a float32 vector column. Plain float32 bytes (length a multiple of 4)
        were written before encryption was enabled; a blob's length is 4k + 33, never a
        multiple of 4, so the two cannot be confused."""
        stored = bytes(stored)
        if len(stored) % 4 == 0:
            return stored
        return self.decrypt(account_id, field, stored)


def _seal(cipher: AESGCM, version: int, account_id: str, field: str, plaintext: bytes) -> bytes:
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"expected bytes, got {type(plaintext).__name__}", field)
    nonce = os.urandom(NONCE_BYTES)
    body = cipher.encrypt(nonce, bytes(plaintext), field_aad(account_id, field, version))
    return bytes([BLOB_VERSION]) + version.to_bytes(4, "big") + nonce + body


def _text(blob: bytes) -> str:
    return TEXT_PREFIX + base64.b64encode(blob).decode("ascii")


class HouseholdSealer:
    """``FieldCipher.encrypt`` / ``encrypt_text`` of one household under one data key
    version (``FieldCipher.sealer``): the same blobs, without a key cache lookup a field."""

    __slots__ = ("account_id", "version", "_cipher")

    def __init__(self, account_id: str, version: int, cipher: AESGCM) -> None:
        self.account_id, self.version, self._cipher = account_id, version, cipher

    def encrypt(self, field: str, plaintext: bytes) -> bytes:
        return _seal(self._cipher, self.version, self.account_id, field, plaintext)

    def encrypt_text(self, field: str, value: str | None) -> str | None:
        return None if value is None else _text(self.encrypt(field, value.encode("utf-8")))


def _error_from_rpc(exc: grpc.RpcError) -> HearthError:
    code = exc.code() if isinstance(exc.code(), grpc.StatusCode) else None
    # The keys service's message already reads "account_id: ..." (HearthError.__str__);
    # the error made here names the field again, so the prefix is dropped once.
    details = (exc.details() or "data key service error").removeprefix("account_id: ")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details, "account_id")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, "account_id")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # privacy's own reason (its database full or stopping) when privacy answered — its
        # error interceptor marks the answer — so the client and the operator read the
        # cause (ops33: "data key service unavailable" on a full disk sent them to the
        # network); a channel's failure names addresses, and stays out of the answer.
        said_by_privacy = any(key == ERROR_CODE_KEY for key, _ in (exc.trailing_metadata() or ()))
        return Unavailable(f"data key service unavailable: {details}" if said_by_privacy and exc.details()
                           else "data key service unavailable", "account_id")
    return HearthError(f"data key service: {details}", "account_id")


# ---- household erasures across replicas ----------------------------------------------
# A store that writes household data keeps, in its own database (shared by its
# replicas), how many households it has erased. A household Erase bumps it in its
# transaction; every write transaction reads it under the household lock and drops the
# replica's cached keys when it moved, so the write has to fetch the household's key,
# which a household deletion has destroyed before any store erases (privacy's
# HOUSEHOLD_STAGES): a replica that did not run the Erase cannot keep writing for the
# household on a cached key. The table holds one number and no account id.
HOUSEHOLD_ERASURES_SQL = """
CREATE TABLE household_erasures (id INTEGER PRIMARY KEY, epoch {bigint} NOT NULL);
INSERT INTO household_erasures (id, epoch) VALUES (1, 0)
"""


def note_household_erased(tx) -> None:
    """In a household Erase's transaction (with ``forget_household_rekeys``)."""
    tx.execute("UPDATE household_erasures SET epoch = epoch + 1 WHERE id = 1")


def household_erasures(tx) -> int:
    """How many households the store has erased (read in the caller's transaction)."""
    return int(tx.query("SELECT epoch FROM household_erasures WHERE id = 1")[0][0])


# ---- a household's data key rotation across replicas -----------------------------------
# A store's ``Rekey`` (a rotation of one household's data key) re-encrypts the household's
# values under the new version; the store's other replicas must then drop the keys they
# cached of that household (the old version is destroyed next), and only of that one.
# Per household, unlike the erasures above: the household lives on, so its row (which
# names the account) may too; a household Erase deletes it (``forget_household_rekeys``;
# the table is among the store's personal tables, purged physically).
HOUSEHOLD_KEY_EPOCHS_SQL = """
CREATE TABLE IF NOT EXISTS household_key_epochs (account_id TEXT PRIMARY KEY, epoch {bigint} NOT NULL)
"""


def note_household_rekeyed(tx, account_id: str) -> None:
    """In a Rekey's transaction, under the household's lock."""
    tx.execute("INSERT INTO household_key_epochs (account_id, epoch) VALUES (?, 1) ON CONFLICT (account_id) "
               "DO UPDATE SET epoch = household_key_epochs.epoch + 1", (account_id,))


def forget_household_rekeys(tx, account_id: str) -> None:
    """In a household Erase's transaction."""
    tx.execute("DELETE FROM household_key_epochs WHERE account_id = ?", (account_id,))


def household_rekeys(tx, account_ids: Iterable[str]) -> dict[str, int]:
    """Each household's re-key count (0: never re-keyed), read in the caller's transaction."""
    accounts = sorted(set(account_ids))
    counts = dict.fromkeys(accounts, 0)
    for start in range(0, len(accounts), 500):
        chunk = accounts[start:start + 500]
        counts.update((r[0], int(r[1])) for r in tx.query(
            f"SELECT account_id, epoch FROM household_key_epochs WHERE account_id IN ({', '.join('?' * len(chunk))})",
            tuple(chunk)))
    return counts


def household_key_state(tx, account_id: str) -> tuple[int, int]:
    """(household erasures, the household's re-key count): what a copy of a sealed value
    read in ``tx`` (a cached model) was sealed under is stale when either moved."""
    return household_erasures(tx), household_rekeys(tx, (account_id,))[account_id]


def drop_keys_of_erased_households(tx, cipher: "FieldCipher | None", account_ids: Iterable[str] = ()) -> None:
    """In a write transaction, after ``tx.lock_household`` of the households it writes
    (``account_ids``: their cached keys are also dropped when another replica re-keyed them)."""
    if cipher is not None:
        cipher.sync_erasures(household_erasures(tx), household_rekeys(tx, account_ids))


def warm_household_keys(db, cipher: "FieldCipher | None", account_ids: Iterable[str]) -> None:
    """Before a write transaction over ``account_ids`` (which still runs
    ``drop_keys_of_erased_households`` itself): the store's erasure and re-key counts, read
    first, so that keys a process has not yet checked against them (its first write) are
    dropped now rather than after warming, then ``FieldCipher.warm``."""
    # Nothing to fetch, nothing read: most batches (households seen within the TTL).
    accounts = sorted(set(account_ids)) if cipher is not None else []
    if not accounts or not cipher.uncached(accounts):
        return
    with db.transaction(readonly=True) as tx:
        drop_keys_of_erased_households(tx, cipher, accounts)
    cipher.warm(accounts)
