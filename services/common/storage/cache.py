"""Caches and short-lived state: in-process by default, Redis when configured.

Never the only copy of anything that must survive: callers always rebuild from the SQL
store on a miss. Keys are namespaced ``hearth:<service>:``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Protocol

from prometheus_client import Counter

from services.common.errors import Unavailable

log = logging.getLogger("hearth.cache")
# How long an erasure waits for Redis to rewrite its persistence files (purge_persistence).
PERSISTENCE_WAIT_S = 10.0


class Cache(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...
    def delete(self, *keys: str, strict: bool = False) -> int: ...
    def delete_prefix(self, prefix: str, strict: bool = False) -> int: ...
    def keys(self, prefix: str = "") -> list[str]: ...
    def health(self) -> str: ...   # "" when usable, else why not


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

    def health(self) -> str:
        return ""

    def delete(self, *keys: str, strict: bool = False) -> int:
        with self._lock:
            return sum(self._data.pop(self._ns + k, None) is not None for k in keys)

    def delete_prefix(self, prefix: str, strict: bool = False) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(self._ns + prefix)]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [k[len(self._ns):] for k in self._data if k.startswith(self._ns + prefix)]


class RedisCache:
    """Redis behind the ``Cache`` interface, riding out Redis outages (docs/operations.md).

    A cache outage costs speed, never correctness: while Redis is unreachable ``get``
    answers None (the caller reads the SQL store) and ``set`` is skipped; after a failure
    Redis is not tried again for ``retry_after_s`` (no 2 s socket timeout per request),
    then the next call probes it. A ``set`` or ``delete`` that could not reach Redis
    leaves it possibly stale (an old model version, or a copy an erasure meant to
    remove), so the first call after Redis answers again clears this service's whole
    namespace before anything is read from it. An erasure must not report success
    while a copy may survive: ``delete(..., strict=True)`` raises ``Unavailable``
    instead (the deletion job retries until Redis is back).

    A Redis that comes back by itself — a restart that reloads a snapshot or an
    append-only file, or a failover to a replica — may hold what it held *before* the
    last writes and erasures (a pre-unlearning model, a key an erasure had deleted), and
    redis-py reconnects without an error the service would see. So every new connection
    asks the server for its ``run_id`` (new on every start, its own on every replica)
    and, when it is not the server this cache last spoke to, clears the service's
    namespace on that connection before any command runs on it (other new connections
    wait for it)."""

    def __init__(self, url: str, namespace: str, *, retry_after_s: float = 1.0,
                 socket_timeout_s: float = 0.5) -> None:
        import redis

        self._ns = f"hearth:{namespace}:"
        self._server_id: bytes | None = None     # run_id of the server last spoken to
        self._server_lock = threading.Lock()
        self._redis = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s,
                                           redis_connect_func=self._on_connect)
        self._response_error = redis.ResponseError
        self._errors = (redis.RedisError, OSError)
        self._retry_after = retry_after_s
        self._down_until = 0.0
        self._stale = False
        self._reason = ""
        self._lock = threading.Lock()

    @property
    def client(self):
        return self._redis

    # ---- outage handling -------------------------------------------------------------

    def ping(self) -> str:
        """Probe Redis (the health report's check): "" when it answers, else why not.
        A successful probe also ends an outage (clearing a stale namespace)."""
        self._call(self._redis.ping, writes=False)
        return self.health()

    def health(self) -> str:
        """"" when Redis answered last, else why not."""
        with self._lock:
            return self._reason

    def _call(self, op, *, writes: bool):
        with self._lock:
            if time.monotonic() < self._down_until:
                self._stale = self._stale or writes
                return _Down
        try:
            with self._lock:
                stale = self._stale
            if stale:
                self._clear_namespace()
            result = op()
        except self._errors as exc:
            with self._lock:
                first = not self._reason
                self._down_until = time.monotonic() + self._retry_after
                self._stale = self._stale or writes
                self._reason = f"redis unreachable: {type(exc).__name__}"
            CACHE_ERRORS.labels(self._ns.split(":")[1]).inc()
            if first:
                log.warning("redis unreachable, serving from the SQL store: %s", exc)
            return _Down
        with self._lock:
            if self._reason:
                log.warning("redis reachable again")
            self._reason = ""
        return result

    def _on_connect(self, conn) -> None:
        """redis-py's hook for a new connection (replacing its own handshake, which runs
        first): a server other than the one last spoken to gets the namespace cleared."""
        conn.on_connect()
        conn.send_command("INFO", "server")
        try:
            info = conn.read_response()
        except self._response_error as exc:   # INFO renamed or refused: no identity to compare
            if self._server_id != b"":
                log.warning("redis INFO refused (%s): a restart from a snapshot cannot be detected", exc)
                self._server_id = b""
            return
        found = re.search(rb"run_id:(\w+)", info if isinstance(info, bytes) else str(info).encode())
        run_id = found.group(1) if found else b""
        with self._server_lock:
            if self._server_id and run_id != self._server_id:
                removed = self._clear_on(conn)
                log.warning("redis server changed (restart or failover): namespace %s cleared (%d keys); "
                            "a snapshot it reloaded may predate the last writes and erasures",
                            self._ns, removed)
            self._server_id = run_id

    def _clear_on(self, conn) -> int:
        """Delete every key of the namespace through ``conn`` (in the connect hook, where
        the client's own commands would need the connection being set up)."""
        cursor, doomed = b"0", []
        while True:
            conn.send_command("SCAN", cursor, "MATCH", self._ns + "*", "COUNT", 500)
            cursor, keys = conn.read_response()
            doomed += keys
            if int(cursor) == 0:
                break
        for i in range(0, len(doomed), 500):
            conn.send_command("DEL", *doomed[i:i + 500])
            conn.read_response()
        return len(doomed)

    def _clear_namespace(self) -> None:
        doomed = list(self._redis.scan_iter(match=self._ns + "*", count=500))
        if doomed:
            self._redis.delete(*doomed)
        with self._lock:
            self._stale = False
        log.warning("redis namespace %s cleared after an outage (%d keys)", self._ns, len(doomed))

    # ---- Cache -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        value = self._call(lambda: self._redis.get(self._ns + key), writes=False)
        return None if value is _Down else value

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._call(lambda: self._redis.set(self._ns + key, value, px=int(ttl_s * 1000) if ttl_s else None),
                   writes=True)

    def delete(self, *keys: str, strict: bool = False) -> int:
        if not keys:
            return 0
        n = self._call(lambda: int(self._redis.delete(*(self._ns + k for k in keys))), writes=True)
        return self._outcome(n, strict)

    def delete_prefix(self, prefix: str, strict: bool = False) -> int:
        def op() -> int:
            doomed = list(self._redis.scan_iter(match=self._ns + _escape(prefix) + "*", count=500))
            return int(self._redis.delete(*doomed)) if doomed else 0
        return self._outcome(self._call(op, writes=True), strict)

    def _outcome(self, n, strict: bool) -> int:
        if n is _Down:
            if strict:
                raise Unavailable(f"cache unavailable ({self.health() or 'redis unreachable'}): "
                                  "cannot confirm the copies are gone")
            return 0
        return n

    def purge_persistence(self, wait_s: float = PERSISTENCE_WAIT_S) -> list[dict]:
        """After an erasure deleted keys: make Redis's own files forget them too. A Redis
        that persists keeps the deleted keys in its last RDB snapshot (until the next
        save point) and in its append-only file (until the AOF is rewritten, which may be
        never), and reloads them after a restart. So when it persists, start a fresh
        snapshot and an AOF rewrite (``BGSAVE SCHEDULE``, ``BGREWRITEAOF``: each started
        after the deletion, so neither holds the deleted keys; Redis removes the old AOF
        files) and wait for both, at most ``wait_s``. Returns the purge step for the
        deletion receipt, or nothing when Redis does not persist. ``complete`` is False
        when the files could not be rewritten in time or Redis refused ``CONFIG GET``
        (whether it persists is then unknown). Raises ``Unavailable`` while Redis is
        unreachable (the deletion job retries)."""
        started = time.time()
        step = {"store": "redis", "where": "persistence", "action": "", "at": started, "complete": False}
        try:
            config = {}
            for name in ("save", "appendonly", "dbfilename", "appenddirname"):
                config.update(self._redis.config_get(name))
            rdb, aof = bool(str(config.get("save", "")).strip()), config.get("appendonly") == "yes"
            if not rdb and not aof:
                return []
            # File names only: the receipt is shown to API clients, the server's paths are not theirs.
            step["where"] = " + ".join(([str(config.get("dbfilename"))] if rdb else [])
                                       + ([str(config.get("appenddirname", "appendonlydir"))] if aof else []))
            step["action"] = " + ".join((["BGSAVE"] if rdb else []) + (["BGREWRITEAOF"] if aof else []))
            step["complete"], why = self._rewrite_files(rdb, aof, wait_s)
        except self._response_error as exc:   # CONFIG, INFO or BGSAVE renamed or refused
            step["complete"], why = False, f"refused: {exc}; whether Redis still persists the erased keys is unknown"
        except self._errors as exc:
            raise Unavailable(f"redis unreachable ({type(exc).__name__}): cannot rewrite its persistence "
                              "files after the erasure") from None
        if why:
            step["action"] = f"{step['action'] or 'CONFIG GET'} ({why})"
            log.warning("erasure: redis persistence files not rewritten: %s", why)
        return [step]

    def _rewrite_files(self, rdb: bool, aof: bool, wait_s: float) -> tuple[bool, str]:
        """Start a snapshot and/or an AOF rewrite once none is running, and wait until
        one started after this call has finished: (done, why not)."""
        jobs = {name: None for name, on in (("rdb", rdb), ("aof", aof)) if on}
        counter = {"rdb": "rdb_saves", "aof": "aof_rewrites"}
        running = {"rdb": ("rdb_bgsave_in_progress",), "aof": ("aof_rewrite_in_progress", "aof_rewrite_scheduled")}
        status = {"rdb": "rdb_last_bgsave_status", "aof": "aof_last_bgrewrite_status"}
        deadline = time.monotonic() + wait_s
        if any(counter[name] not in self._redis.info("persistence") for name in jobs):
            self._redis.bgsave(schedule=True) if rdb else None
            self._redis.bgrewriteaof() if aof else None
            return False, "started; Redis before 7.0 does not count its rewrites, so their end is not confirmed"
        while True:
            info = self._redis.info("persistence")
            busy = {name: any(int(info.get(k, 0)) for k in running[name]) for name in jobs}
            for name, target in jobs.items():
                if target is None and not busy[name]:
                    try:
                        self._redis.bgsave(schedule=True) if name == "rdb" else self._redis.bgrewriteaof()
                    except self._response_error:   # one started meanwhile: wait for it, then ours
                        continue
                    jobs[name] = int(info.get(counter[name], 0)) + 1
            if all(target is not None and not busy[name] for name, target in jobs.items()):
                info = self._redis.info("persistence")
                if all(int(info.get(counter[n], 0)) >= t and not any(int(info.get(k, 0)) for k in running[n])
                       for n, t in jobs.items()):
                    failed = [n for n in jobs if info.get(status[n]) != "ok"]
                    return (not failed, f"{' and '.join(failed)} rewrite failed" if failed else "")
            if time.monotonic() > deadline:
                return False, f"still running after {wait_s:g} s"
            time.sleep(0.02)

    def keys(self, prefix: str = "") -> list[str]:
        found = self._call(lambda: [k.decode()[len(self._ns):] for k in
                                    self._redis.scan_iter(match=self._ns + _escape(prefix) + "*", count=500)],
                           writes=False)
        return [] if found is _Down else found


_Down = object()  # sentinel: Redis was not reachable for this call
CACHE_ERRORS = Counter("hearth_cache_errors_total", "Cache (Redis) calls that failed; the SQL store answered",
                       ["service"])


def _escape(pattern: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern)


def open_cache(settings, service: str) -> Cache:
    """Redis when configured (registered with the health report), else in-process."""
    if not settings.redis_url:
        return MemoryCache(service)
    from services.common import health_report

    cache = RedisCache(settings.redis_url, service)
    health_report.register("redis", cache.ping)
    return cache


def purge_persistence(cache: Cache) -> list[dict]:
    """The purge steps that make a Redis that persists forget what an erasure deleted
    (``RedisCache.purge_persistence``); nothing for an in-process cache."""
    return cache.purge_persistence() if isinstance(cache, RedisCache) else []


def erase_prefix(cache: Cache, prefix: str) -> dict:
    """Delete every key under ``prefix`` for an erasure (strict: raises ``Unavailable``
    while Redis is unreachable, so the deletion job retries) and describe it as a purge
    step of the deletion receipt: ``{"store", "where", "action", "at", "complete"}``."""
    started = time.time()
    removed = cache.delete_prefix(prefix, strict=True)
    namespace = getattr(cache, "_ns", "")
    return {"store": "redis" if isinstance(cache, RedisCache) else "memory",
            "where": f"{namespace}{prefix}*", "action": f"DEL ({removed} keys)", "at": started,
            "complete": True}

