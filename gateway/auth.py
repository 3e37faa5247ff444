"""Who is calling: the one module that turns an HTTP request into a Principal.

This issue's scheme is API keys from configuration, stored only as SHA-256 hashes and
compared in constant time. JWT bearer tokens, revocation and the permission matrix come
with the access-control work and belong here too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import Unauthenticated
from services.common.identity import Principal, Role

API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True)
class ApiKeyRecord:
    sha256: str
    principal: Principal


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(path: Path | None) -> list[ApiKeyRecord]:
    if path is None:
        return []
    try:
        raw = json.loads(Path(path).read_text())
        return [ApiKeyRecord(item["sha256"].lower(), Principal(item["principal"], Role(item["role"])))
                for item in raw]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"HEARTH_API_KEYS_FILE: cannot read API keys from {path}: {exc}") from None


class Authenticator:
    def __init__(self, keys: list[ApiKeyRecord]) -> None:
        self._keys = keys

    def authenticate(self, headers) -> Principal:
        key = headers.get(API_KEY_HEADER)
        if not key:
            raise Unauthenticated("missing credentials", API_KEY_HEADER)
        digest = hash_key(key)
        match = None
        for record in self._keys:  # constant time per record; no early exit on match
            if hmac.compare_digest(record.sha256, digest):
                match = record
        if match is None:
            raise Unauthenticated("invalid credentials", API_KEY_HEADER)
        return match.principal
