"""Caches and short-lived state: in-process by default, Redis when configured.

Never the only copy of anything that must survive: callers always rebuild from the SQL
store on a miss. Keys are namespaced ``hearth:<service>:``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Cache(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...
    def delete(self, *keys: str) -> int: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def keys(self, prefix: str = "") -> list[str]: ...


class MemoryCache:
    def __init__(self, namespace: str) -> None:
        self._ns = f"hearth:{namespace}:"
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(self._ns + key)
            if item is None:
                return None
            value, expires = item
            if expires is not None and expires < time.monotonic():
                del self._data[self._ns + key]
                return None
            return value

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._lock:
            self._data[self._ns + key] = (value, time.monotonic() + ttl_s if ttl_s else None)

    def delete(self, *keys: str) -> int:
        with self._lock:
            return sum(self._data.pop(self._ns + k, None) is not None for k in keys)

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(self._ns + prefix)]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [k[len(self._ns):] for k in self._data if k.startswith(self._ns + prefix)]


class RedisCache:
    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self._ns = f"hearth:{namespace}:"
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    @property
    def client(self):
        return self._redis

    def get(self, key: str) -> bytes | None:
        return self._redis.get(self._ns + key)

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._redis.set(self._ns + key, value, px=int(ttl_s * 1000) if ttl_s else None)

    def delete(self, *keys: str) -> int:
        return int(self._redis.delete(*(self._ns + k for k in keys))) if keys else 0

    def delete_prefix(self, prefix: str) -> int:
        doomed = list(self._redis.scan_iter(match=self._ns + _escape(prefix) + "*", count=500))
        return int(self._redis.delete(*doomed)) if doomed else 0

    def keys(self, prefix: str = "") -> list[str]:
        return [k.decode()[len(self._ns):]
                for k in self._redis.scan_iter(match=self._ns + _escape(prefix) + "*", count=500)]


def _escape(pattern: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern)


def open_cache(settings, service: str) -> Cache:
    return RedisCache(settings.redis_url, service) if settings.redis_url else MemoryCache(service)
