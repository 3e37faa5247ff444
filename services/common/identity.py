"""The principal (who is calling, in which of five roles) as it travels in gRPC metadata,
and the proof that a mesh member put it there.

Metadata of every internal call::

    x-hearth-principal  the acting principal's id      (e.g. "alice", "svc:privacy")
    x-hearth-role       one of the five roles
    x-hearth-token      a signed service token

A token binds the principal, the role, the *audience* — the component the call is sent
to ("clustering", "attribution", "privacy", "feedback"), which the receiver checks
against its own name (``wrong_audience``), so a token captured on its way to one service
does not replay at another — and an expiry (``HEARTH_SERVICE_TOKEN_TTL_S``, default
300 s). An attacker who can reach a service port can neither invent a principal nor
raise the role of one they have seen.

Who signs (``signer_from_settings``):

* **a key per component** (``services.common.service_keys``, token ``v3``): each
  component signs with its own Ed25519 private key (``HEARTH_SERVICE_SIGNING_KEY_FILE``)
  and verifies with the public keys of all (``HEARTH_SERVICE_PUBLIC_KEYS_FILE``); a
  ``svc:<name>`` principal is accepted only when ``<name>`` signed it (role ``service``), a person's only
  from the gateway (or privacy towards the data holders) — ``service_keys.may_vouch``.
  So a compromised gateway cannot mint ``svc:privacy``.
* *transitional*: one shared HMAC secret ``HEARTH_SERVICE_TOKEN_KEY`` (``ServiceTokenSigner``,
  token ``"v2.<aud>.<exp>.<mac>"`` with ``mac = HMAC-SHA256(key,
  "hearth-service-token|v2|<principal>|<role>|<aud>|<exp>")``): every holder can sign
  any principal. Used only when the two files are unset.
* neither: a random key of the process's own — calls inside one process (in-process
  tests) still work, and every remote caller is refused, the safe failure.
  ``services.testing.mesh.Mesh`` generates a key per component for its processes.

When mutual TLS is configured (see ``services.common.tls``) the transport proves that the
peer holds a certificate of the mesh CA naming one component; the token is still verified
(when keys are configured) and its signer must be that component
(``principal_from_metadata``).

Failed authentications and permission denials are reported through
``report_security_event``: it counts them in Prometheus and calls every listener
registered with ``add_security_listener`` (the audit log hooks in there).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import math
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from services.common.errors import Unauthenticated
from services.common.ids import Role, valid_principal_id  # noqa: F401  (re-exported: identity.Role)

log = logging.getLogger("hearth.identity")




PRINCIPAL_KEY = "x-hearth-principal"
ROLE_KEY = "x-hearth-role"
TOKEN_KEY = "x-hearth-token"
TOKEN_KEY_ENV = "HEARTH_SERVICE_TOKEN_KEY"
TOKEN_TTL_ENV = "HEARTH_SERVICE_TOKEN_TTL_S"
MIN_KEY_CHARS = 32
DEFAULT_TOKEN_TTL_S = 300.0
# Clocks of two hosts disagree a little; a token is accepted this long past its expiry.
CLOCK_SKEW_S = 30.0
_TOKEN_VERSION = "v2"
_MAX_TOKEN_CHARS = 256
# An audience is a component name: "clustering", "privacy", "gateway", ...
_AUDIENCE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ANY_COMPONENT = "*"   # service_keys.ANY_COMPONENT: the signer of a process's random key


# ---------------------------------------------------------------------------------------
# security events: the one hook for failed authentication and denied access
# ---------------------------------------------------------------------------------------

AUTH_FAILURES = Counter("hearth_auth_failures_total",
                        "Failed authentications (gateway: HTTP credentials; services: peer/principal)",
                        ["component", "reason"])
ACCESS_DENIED = Counter("hearth_access_denied_total",
                        "Authenticated callers refused by the permission matrix",
                        ["component", "role", "target"])
RATE_LIMITED = Counter("hearth_rate_limited_total", "Requests refused by a rate limit",
                       ["component", "target"])


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One refused request.

    ``kind``: "authentication_failed", "permission_denied" or "rate_limited".
    ``reason``: a short machine word (e.g. "expired_token"); it goes to logs, metrics
    and listeners, never to the caller. ``target``: the route ("METHOD /path") or RPC."""

    kind: str
    component: str
    reason: str
    principal_id: str = ""
    role: str = ""
    target: str = ""


SecurityListener = Callable[[SecurityEvent], None]
_listeners: list[SecurityListener] = []
_listeners_lock = threading.Lock()


def add_security_listener(listener: SecurityListener) -> Callable[[], None]:
    """Call ``listener(event)`` on every refused request; returns a function that removes it.

    Listeners run on the request path: keep them fast (queue the work)."""
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


# The "security event" log line is coalesced (session 34): the first event of a kind for a
# (component, reason, principal, role, target) is logged whole at once; its repeats within
# SECURITY_LOG_WINDOW_S are counted and logged as ONE "security event repeated" line with
# the count when the window ends (a flood of forged tokens is one line a minute, not one a
# request: until session 34 each 401 wrote ~300 bytes, ~190 MB/h with the access lines at
# 80 requests/s). A window that ends with no repeat forgets the key, so the next occurrence
# is logged whole again. The metrics and the listeners (the audit log) still see every
# event. At most SECURITY_LOG_KEYS keys are held; past that (an attacker varying the claimed
# principal) new keys share one key per (kind, component, reason) with principal "*".
# The audit log's coalescing of the same events is a token bucket of its own, on purpose
# (audit._FailureBudget says why the two sinks differ).
SECURITY_LOG_WINDOW_S = 60.0
SECURITY_LOG_KEYS = 1024
OVERFLOW_PRINCIPAL = "*"


def _event_fields(key: tuple[str, ...]) -> dict[str, str]:
    kind, component, reason, principal, role, target = key
    return {"event": kind, "component": component, "reason": reason, "principal": principal,
            "role": role, "target": target}


class SecurityEventLog:
    """Writes the "security event" log lines, coalesced as described above (thread-safe).

    ``event(e)`` logs ``e`` at once when it is the first of its key (or of a new window after
    a quiet one) and counts it otherwise; ``flush()`` writes one line for every window that
    has ended with repeats. A daemon thread, started at the first counted repeat, calls
    ``flush`` when the earliest window ends, so the count is written even if the flood
    stops (``background=False``: only ``event`` and the caller's ``flush`` write)."""

    def __init__(self, logger: logging.Logger, window_s: float = SECURITY_LOG_WINDOW_S,
                 max_keys: int = SECURITY_LOG_KEYS, clock: Callable[[], float] = time.monotonic,
                 background: bool = True) -> None:
        if not window_s > 0:
            raise ValueError("window_s: must be > 0")
        self._log, self._window, self._max_keys, self._clock = logger, float(window_s), max_keys, clock
        self._background = background
        self._windows: dict[tuple[str, ...], list[float]] = {}   # key -> [window start, repeats]
        self._next_sweep = -math.inf   # no held window ends before this (a full table's sweep)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def event(self, event: SecurityEvent) -> None:
        key = (event.kind, event.component, event.reason, event.principal_id, event.role, event.target)
        now = self._clock()
        due: list[tuple[tuple[str, ...], int, float]] = []
        with self._lock:
            if key not in self._windows and len(self._windows) >= self._max_keys:
                # A full table first closes the windows that have ended (review34: without a
                # repeat nothing started the thread that forgets them, so one-off refusals
                # filled the table for good and a new principal's first refusal was logged
                # as "*" with no role or target, no flood under way).
                if now >= self._next_sweep:
                    due += self._sweep(now)
                if len(self._windows) >= self._max_keys:
                    key = (event.kind, event.component, event.reason, OVERFLOW_PRINCIPAL, "", "")
            window = self._windows.get(key)
            if window is not None and now - window[0] >= self._window:
                due += self._close(key, window, now)
                window = self._windows.get(key)
            first = window is None
            if first:
                self._windows[key] = [now, 0]
            else:
                window[1] += 1
                if self._background and self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="security-event-log", daemon=True)
                    self._thread.start()
        self._write(due)
        if first:
            self._log.warning("security event", extra={"fields": {
                **_event_fields(key), "repeats_coalesced_s": self._window}})

    def flush(self) -> None:
        """Write the count of every window that has ended with repeats; forget the keys
        whose window ended without one."""
        now = self._clock()
        with self._lock:
            due = self._sweep(now)
        self._write(due)

    def _sweep(self, now: float) -> list[tuple[tuple[str, ...], int, float]]:
        """Under the lock: close every window that has ended (``flush``'s work)."""
        due = [line for key, window in list(self._windows.items()) if now - window[0] >= self._window
               for line in self._close(key, window, now)]
        self._next_sweep = min((w[0] for w in self._windows.values()), default=now) + self._window
        return due

    def _close(self, key: tuple[str, ...], window: list[float], now: float
               ) -> list[tuple[tuple[str, ...], int, float]]:
        """Under the lock: end ``key``'s window. With repeats: their line, and a new window
        from the old one's end (a steady flood: one line a window); without: the key is
        forgotten."""
        repeats = int(window[1])
        if not repeats:
            del self._windows[key]
            return []
        ended = window[0] + self._window
        # A window that ended long ago (nothing called flush) restarts now.
        window[0], window[1] = (ended if now - ended < self._window else now), 0
        return [(key, repeats, self._window)]

    def _write(self, due: list[tuple[tuple[str, ...], int, float]]) -> None:
        for key, repeats, window_s in due:
            self._log.warning("security event repeated", extra={"fields": {
                **_event_fields(key), "repeats": repeats, "window_s": window_s}})

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._windows:
                    wait = min(w[0] for w in self._windows.values()) + self._window - self._clock()
                else:
                    wait = self._window
            if wait > 0:
                with self._wake:
                    self._wake.wait(min(wait, self._window) + 0.01)
                continue
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the log's own thread must not die of a bad handler
                pass


_security_log = SecurityEventLog(log)


def report_security_event(event: SecurityEvent) -> None:
    """Count the event, log it (coalesced: ``SecurityEventLog``) and hand it to every
    listener. A failing listener is logged and never turns a 401/403 into a 500."""
    if event.kind == "authentication_failed":
        AUTH_FAILURES.labels(event.component, event.reason).inc()
    elif event.kind == "permission_denied":
        ACCESS_DENIED.labels(event.component, event.role, event.target).inc()
    elif event.kind == "rate_limited":
        RATE_LIMITED.labels(event.component, event.target).inc()
    _security_log.event(event)
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a broken listener must not break the request
            log.exception("security listener failed")


# ---------------------------------------------------------------------------------------
# principal and signed service tokens
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: Role

    def metadata(self, audience: str) -> list[tuple[str, str]]:
        """gRPC metadata that carries this principal to the component ``audience`` (the
        service the call is sent to: "clustering", "privacy", ...), signed with this
        process's key."""
        return [(PRINCIPAL_KEY, self.id), (ROLE_KEY, self.role.value),
                (TOKEN_KEY, service_token_signer().sign(self, audience=audience))]


class ServiceTokenSigner:
    """Signs and verifies the transitional HMAC service tokens (format in the module
    docstring); ``service_keys.ComponentTokenSigner`` is the per-component signer.

    Tokens are cached per (principal, role, audience) and reused while more than half
    their lifetime remains, so the hot path costs one dict look-up rather than one HMAC
    per call."""

    def __init__(self, key: bytes, ttl_s: float = DEFAULT_TOKEN_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_CHARS:
            raise ValueError(f"key: a service token key needs at least {MIN_KEY_CHARS} bytes")
        if not ttl_s > 0:
            raise ValueError("ttl_s: must be > 0")
        self._key = key
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._cache: dict[tuple[str, str, str], tuple[int, str]] = {}
        # Tokens whose signature verified, with the principal, role, audience and expiry
        # they were verified for: a service presents the same token on every call for half
        # its lifetime, so the HMAC is computed once per token rather than once per call.
        # The audience and lifetime checks still run on every call.
        self._verified: dict[str, tuple[str, str, str, int]] = {}

    def _mac(self, principal_id: str, role: str, audience: str, exp: int) -> str:
        message = f"hearth-service-token|{_TOKEN_VERSION}|{principal_id}|{role}|{audience}|{exp}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _token(self, principal: Principal, audience: str, exp: int) -> str:
        return f"{_TOKEN_VERSION}.{audience}.{exp}.{self._mac(principal.id, principal.role.value, audience, exp)}"

    def sign(self, principal: Principal, exp: int | None = None, *, audience: str) -> str:
        """A token for ``principal`` to present to the component ``audience``; ``exp``
        (Unix seconds) defaults to now + ttl."""
        if not _AUDIENCE.match(audience or ""):
            raise ValueError(f"audience: a component name (lower-case letters), not {audience!r}")
        now = self._clock()
        if exp is not None:
            return self._token(principal, audience, exp)
        cache_key = (principal.id, principal.role.value, audience)
        cached = self._cache.get(cache_key)
        if cached is not None and reusable_token(cached[0], now, self.ttl_s):
            return cached[1]
        exp = int(now + self.ttl_s)
        token = self._token(principal, audience, exp)
        if len(self._cache) > 10_000:  # bounded: principals are many only under attack
            self._cache.clear()
        self._cache[cache_key] = (exp, token)
        return token

    def verify(self, principal_id: str, role: str, token: str, *, audience: str) -> None:
        """Return None (any holder of the shared secret may have signed), or raise Unauthenticated (field ``x-hearth-token``) unless ``token`` was signed
        with this key for exactly this principal and role, names ``audience`` (the
        verifying component) and is within its lifetime. The exception's ``reason``
        attribute says why (for logs and metrics only)."""
        known = self._verified.get(token) if isinstance(token, str) else None
        if known is not None and known[0] == principal_id and known[1] == role:
            token_audience, exp = known[2], known[3]
        else:
            parts = token.split(".") if isinstance(token, str) and len(token) <= _MAX_TOKEN_CHARS else []
            if (len(parts) != 4 or parts[0] != _TOKEN_VERSION or not _AUDIENCE.match(parts[1])
                    or not parts[2].isdigit() or len(parts[2]) > 12):
                raise _unauthenticated("malformed_token")
            token_audience, exp = parts[1], int(parts[2])
            expected = self._mac(principal_id, role, token_audience, exp)
            if not hmac.compare_digest(expected.encode(), parts[3].encode()):
                raise _unauthenticated("bad_token_signature")
            if len(self._verified) > 10_000:  # bounded: a few tokens per peer are live at once
                self._verified.clear()
            self._verified[token] = (principal_id, role, token_audience, exp)
        check_audience_and_lifetime(token_audience, audience, exp, self._clock(), self.ttl_s)
        return None   # the shared secret names no signer (ComponentTokenSigner.verify names it)


def reusable_token(exp: int, now: float, ttl_s: float) -> bool:
    """Whether a cached token expiring at ``exp`` may be presented again at ``now``: more
    than half its lifetime left, and no more than a whole one — a token ending later than
    one minted now would was minted while the clock was ahead (a step forward since put
    right), and every peer refuses it (``token_lifetime_too_long``). Until session 24 the
    signer kept presenting it until the clock caught up: after an hour's step forward and
    back, the gateway's every call was refused for that hour (docs/operations.md, "Clock
    steps")."""
    return ttl_s / 2 < exp - now <= ttl_s


def check_audience_and_lifetime(token_audience: str, audience: str, exp: int, now: float, ttl_s: float) -> None:
    """The checks every kind of service token makes after its signature (Unauthenticated
    with the reason)."""
    if token_audience != audience:
        # Minted for another component: a token captured on its way to one service
        # (or handed to a client by the edge authorizer) does not open another.
        raise _unauthenticated("wrong_audience")
    if now > exp + CLOCK_SKEW_S:
        raise _unauthenticated("expired_token")
    if exp > now + ttl_s + CLOCK_SKEW_S:
        # Only a key holder can mint it, but a token valid for a year is a mistake or
        # an attack; either way it is refused.
        raise _unauthenticated("token_lifetime_too_long")


def _unauthenticated(reason: str) -> Unauthenticated:
    error = Unauthenticated("invalid service token", field=TOKEN_KEY)
    error.reason = reason  # type: ignore[attr-defined]
    return error


_signer = None   # ServiceTokenSigner or service_keys.ComponentTokenSigner
_signer_lock = threading.Lock()


def signer_from_settings(settings, component: str | None = None):
    """The process's signer from ``config.MeshSettings``:

    * ``service_signing_key_file`` + ``service_public_keys_file``: this component's own
      Ed25519 key and the keyset of all (``service_keys.ComponentTokenSigner``); with
      ``component`` given, the key must be that component's in the keyset;
    * else ``service_token_key`` (transitional): the shared HMAC mesh secret
      (``ServiceTokenSigner``), logged as a warning naming the new settings;
    * else a random Ed25519 key of the process's own: in-process calls only.

    ConfigError naming the variable when they cannot be used."""
    from services.common import service_keys
    from services.common.config import ConfigError

    signing, public = settings.service_signing_key_file, settings.service_public_keys_file
    hmac_key = settings.service_token_key.get_secret_value()
    ttl_s = settings.service_token_ttl_s
    if signing or public:
        if not (signing and public):
            missing = service_keys.PUBLIC_KEYS_ENV if signing else service_keys.SIGNING_KEY_ENV
            raise ConfigError(f"invalid configuration:\n  {missing}: must be set with "
                              f"{service_keys.SIGNING_KEY_ENV if signing else service_keys.PUBLIC_KEYS_ENV}")
        if hmac_key:
            raise ConfigError(f"invalid configuration:\n  {TOKEN_KEY_ENV}: set with {service_keys.SIGNING_KEY_ENV}; "
                              "a component signs with its own key only, remove the shared mesh secret")
        try:
            signer = service_keys.ComponentTokenSigner(
                service_keys.load_private_key(signing), service_keys.load_keyset(public), ttl_s)
        except service_keys.KeyError_ as exc:
            name = service_keys.PUBLIC_KEYS_ENV if str(exc).startswith(str(public)) else service_keys.SIGNING_KEY_ENV
            raise ConfigError(f"invalid configuration:\n  {name}: {exc}") from None
        if component is not None and signer.component != component:
            raise ConfigError(f"invalid configuration:\n  {service_keys.SIGNING_KEY_ENV}: the keyset lists this key "
                              f"(kid {signer.kid}) as {signer.component}'s, not {component}'s")
        return signer
    if hmac_key:
        log.warning("%s: the shared mesh secret is transitional: every process holding it (the gateway "
                    "too) can sign any principal, svc:privacy included. Give each component its own key: "
                    "%s and %s (docs/deploy.md)", TOKEN_KEY_ENV, service_keys.SIGNING_KEY_ENV,
                    service_keys.PUBLIC_KEYS_ENV)
        return ServiceTokenSigner(hmac_key.encode(), ttl_s)
    log.warning("%s and %s are not set: signing with a random per-process key, so only callers in "
                "this process can authenticate (set them; mutual TLS alone lets a peer act only as its own svc:<component>)",
                service_keys.SIGNING_KEY_ENV, service_keys.PUBLIC_KEYS_ENV)
    return service_keys.ComponentTokenSigner.ephemeral(ttl_s)


def service_token_signer() -> ServiceTokenSigner:
    """The process-wide signer: the bootstrap's (``config.configure_process``), else
    built once from the mesh settings in the environment."""
    global _signer
    if _signer is None:
        with _signer_lock:
            if _signer is None:
                from services.common.config import mesh_settings

                _signer = signer_from_settings(mesh_settings())
    return _signer


def configure_service_tokens(signer: ServiceTokenSigner | None) -> None:
    """Replace the process-wide signer (``None``: rebuild from the mesh settings on next use)."""
    global _signer
    with _signer_lock:
        _signer = signer


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def principal_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None, *,
                            component: str, peer_component: str | None = None) -> Principal:
    """The principal of an incoming call, or Unauthenticated.

    ``component``: the receiving component (its name, e.g. "privacy"), the audience a
    token must name. ``peer_component``: ``None`` when the call came without TLS, else
    the component the peer's verified mesh certificate names (``tls.peer_component``;
    "" when it names none). Every refusal is reported as a security event.

    Over mutual TLS (session 20; until then a verified peer forwarded any principal
    without a token, and the chart mounted one certificate in every pod, so any pod could
    claim ``svc:privacy`` or any person):

    * the certificate must name a component (``unidentified_peer_certificate``);
    * with component keys (or the transitional shared secret) configured, the token is
      verified exactly as without TLS — the certificate never replaces it, because a
      certificate proves only which pod is calling, while the token is what proves who
      may vouch for the principal (``service_keys.may_vouch``) — and, besides, the
      component the certificate names must be the one that signed the token
      (``certificate_not_signer``: a token captured from privacy's traffic and replayed
      from clustering's pod is refused) or, with the shared secret, one that may vouch
      for the principal (``certificate_may_not_vouch``);
    * with no keys configured (a process's random key, which no other process knows),
      a peer may act as its own ``svc:<name>`` (role ``service``) on a certificate
      naming ``<name>``; every other principal needs a token this process can verify,
      i.e. none from another process.
    """
    values = dict((k, v) for k, v in (metadata or ()) if isinstance(v, str))
    pid, role = values.get(PRINCIPAL_KEY), values.get(ROLE_KEY)
    try:
        if not pid or not role:
            raise _refusal("no principal in request metadata", PRINCIPAL_KEY, "missing_principal")
        if not valid_principal_id(pid):
            raise _refusal("malformed principal id", PRINCIPAL_KEY, "malformed_principal")
        try:
            principal = Principal(pid, Role(role))
        except ValueError:
            raise _refusal("unknown role", ROLE_KEY, "unknown_role") from None
        if peer_component is not None and not peer_component:
            raise _refusal("the peer's certificate names no mesh component", PRINCIPAL_KEY,
                           "unidentified_peer_certificate")
        signer = service_token_signer()
        keyless = getattr(signer, "component", None) == _ANY_COMPONENT
        if peer_component and keyless and pid == f"svc:{peer_component}" and role == Role.SERVICE.value:
            return principal   # no keys anywhere: the certificate alone proves its own component
        token = values.get(TOKEN_KEY)
        if not token:
            raise _refusal("no service token in request metadata", TOKEN_KEY, "missing_token")
        vouched_by = signer.verify(pid, role, token, audience=component)
        if peer_component and not keyless:
            if vouched_by is None:   # the shared secret: the token does not say who signed
                from services.common.service_keys import may_vouch

                if not may_vouch(peer_component, pid, component, role):
                    raise _refusal("the peer's certificate may not vouch for this principal", TOKEN_KEY,
                                   "certificate_may_not_vouch")
            elif vouched_by != peer_component:
                raise _refusal("the token was not signed by the component of the peer's certificate",
                               TOKEN_KEY, "certificate_not_signer")
        return principal
    except Unauthenticated as exc:
        report_security_event(SecurityEvent(
            "authentication_failed", component, getattr(exc, "reason", "invalid"),
            pid if valid_principal_id(pid) else "",
            role if role in Role._value2member_map_ else ""))
        raise


def _refusal(message: str, field: str, reason: str) -> Unauthenticated:
    error = Unauthenticated(message, field=field)
    error.reason = reason  # type: ignore[attr-defined]
    return error


def set_current(principal: Principal | None) -> contextvars.Token:
    return _current.set(principal)


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)


def current_principal() -> Principal:
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no principal in request metadata", field=PRINCIPAL_KEY)
    return principal


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Make outbound peer calls inside the block act as ``principal``.

    Peer calls normally act on behalf of the caller (so the audit trail keeps the
    human). Use this where the matrix gives the step to services only, e.g. the privacy
    service fanning a deletion out to every ``Erase`` as ``service_principal("privacy")``
    after it has audited the human's request."""
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)


# Principal ids of the mesh's own services (``service_principal``). Nobody else may hold
# one: an API key or JWT subject "svc:privacy" would be indistinguishable in the audit
# log from the privacy service acting on its own.
RESERVED_PRINCIPAL_PREFIX = "svc:"


def reserved_principal_id(principal_id: str) -> bool:
    """True for the names the mesh's services act as (``svc:<service>``): never issued
    to a user, an API key or a JWT subject."""
    return principal_id.lower().startswith(RESERVED_PRINCIPAL_PREFIX)


# Services calling one another act as this principal (role "service").
def service_principal(service: str) -> Principal:
    return Principal(f"svc:{service}", Role.SERVICE)
