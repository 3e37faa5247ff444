"""Settings from environment variables, validated at start-up.

Every variable is ``HEARTH_<NAME>``. A bad value stops the process with a message that
names the variable (``ConfigError``), instead of failing later at first use.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from services.common.identity import DEFAULT_TOKEN_TTL_S, MIN_KEY_CHARS
from services.common.telemetry import check_trace_export

ENV_PREFIX = "HEARTH_"

# Default ports: one gRPC port and one Prometheus port per service.
DEFAULT_PORTS = {
    "clustering": (50051, 9101),
    "attribution": (50052, 9102),
    "privacy": (50053, 9103),
    "feedback": (50054, 9104),
}


def bounded(*, gt: float | None = None, ge: float | None = None, le: float | None = None,
            message: str | None = None) -> AfterValidator:
    """The bounds of a numeric setting, declared on its field
    (``x: Annotated[float, bounded(gt=0)] = 1.0``): a value outside them — NaN too —
    stops the process with ``message`` (by default "must be > gt" / "must be >= ge"), in
    the line naming the variable (``_build``: ``HEARTH_X: <message>``). None
    passes (an optional setting left unset). The one check of every component's bounded
    settings (dek24): until session 24 each was a pydantic validator written by hand,
    and a subclass's validator named like its base class's replaced it — clustering's
    and privacy's ``_positive`` dropped ServiceSettings', so those two services took
    HEARTH_GRACE_SECONDS=0 and HEARTH_PEER_TIMEOUT_S=-1 — and ``value <= 0`` let NaN
    through."""
    if message is None:
        message = f"must be > {gt}" if gt is not None else f"must be >= {ge}"

    def check(value):
        if value is not None and not ((gt is None or value > gt) and (ge is None or value >= ge)
                                      and (le is None or value <= le)):
            raise ValueError(message)
        return value

    return AfterValidator(check)


# Kubernetes quantity suffixes (a Pod's emptyDir sizeLimit: "1Gi", "500M", "2.5Gi").
_QUANTITY_FACTORS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# Kubernetes' grammar: digits with an optional fraction ("1.5", "1.", ".5"), then a binary
# or decimal suffix or a decimal exponent ("1e9", "5E+8"); a sign or milli ("m") makes no
# sense for a volume and is refused. "E" alone is the exa suffix, "E" with digits an
# exponent (until attack27 "1E" and "2Ei" were taken for exponents and refused). ASCII
# digits only (\d also matches other scripts' digits, which Kubernetes refuses).
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([KMGTPE]i|[kMGTPE])|[eE]\+?([0-9]+))?")
# The largest size read (8 EiB, a signed 64-bit count of bytes); past it a typo, refused.
_MAX_QUANTITY = 2**63
_QUANTITY_MESSAGE = "must be a byte quantity such as 1Gi, 500Mi or 1073741824"


def byte_quantity(value: object) -> int:
    """Bytes from a Kubernetes quantity ("1Gi", "500Mi", "2G", "1073741824"; "" or 0:
    unknown, 0). The chart hands the data volume's ``sizeLimit`` over as it is written in
    the values, so the process needs no second spelling of it to keep in step. Exact
    (decimal, not float) and rounded up to a whole byte, as Kubernetes rounds a quantity
    (a fraction of a byte is not 0, "no limit known")."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ValueError(_QUANTITY_MESSAGE)
    if not text:
        return 0
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(_QUANTITY_MESSAGE)
    number, suffix, exponent = match.groups()
    if exponent is not None and len(exponent) > 3:   # 1e400: an OverflowError traceback until attack27
        raise ValueError(f"{_QUANTITY_MESSAGE}, at most 8Ei")
    factor = Decimal(10) ** int(exponent) if exponent is not None else _QUANTITY_FACTORS[suffix or ""]
    size = math.ceil(Decimal(number) * factor)
    if size > _MAX_QUANTITY:
        raise ValueError(f"{_QUANTITY_MESSAGE}, at most 8Ei")
    return size


ByteQuantity = Annotated[int, BeforeValidator(byte_quantity)]
Port = Annotated[int, bounded(ge=0, le=65535, message="must be a port number in 0..65535")]
Positive = Annotated[float, bounded(gt=0)]
NonNegative = Annotated[float, bounded(ge=0)]
AtLeastOne = Annotated[int, bounded(ge=1)]


# The mesh services each component calls (the peer addresses its code dials:
# ``settings.<peer>_addr`` in its entry point, and privacy's AppendAudit for every other
# service's audit records). The bootstrap probes the health of these peers only, and the
# chart's NetworkPolicies (``networkPolicy.peers``) admit exactly these calls; tests hold
# both to the entry points (tests/unit/common/test_peer_calls.py, tests/deploy/test_chart_egress.py).
PEER_CALLS: dict[str, frozenset[str]] = {
    "clustering": frozenset({"privacy", "feedback"}),
    "attribution": frozenset({"privacy", "clustering"}),
    "privacy": frozenset({"clustering", "attribution", "feedback"}),
    "feedback": frozenset({"privacy", "clustering"}),
    "gateway": frozenset({"clustering", "attribution", "privacy", "feedback"}),
}


class ConfigError(SystemExit):
    """Raised (and exits the process) when configuration is invalid."""


class HearthSettings(BaseSettings):
    """The base of every component's settings (ServiceSettings and its per-service
    subclasses, GatewaySettings): ``HEARTH_*`` variables, frozen once loaded, and
    ``extra="forbid"`` so a misspelt keyword override fails. pydantic-settings does not
    look at environment variables that match no field, so ``load`` also refuses every
    ``HEARTH_*`` variable that no component reads (``check_environment``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)


# The modules defining settings classes: every process checks the environment against
# the variables of ALL components, because one environment (a compose file, the test
# mesh, a shell) often serves several, and a variable meant for the gateway is not a
# typo in the clustering service. Imported by name: config imports no component.
SETTINGS_MODULES = ("services.common.config", "services.clustering.settings", "services.attribution.settings",
                    "services.feedback.settings", "services.privacy.settings", "gateway.config")

# HEARTH_* variables no Hearth process reads: tooling around the processes (tests, CI,
# benchmarks, the rollout CLI). Every variable a process reads is a settings field.
OTHER_VARIABLES: dict[str, str] = {
    "HEARTH_SHARED_DATA": "tests and .ci/run: where external test data lives",
    "HEARTH_PROVISION_DRY_RUN": "scripts/provision.sh",
    "HEARTH_BENCH_POSTGRES_DSN": "bench/: the PostgreSQL a benchmark uses",
    "HEARTH_ROLLOUT_API_KEY": "services/rollout.py: the rollout CLI's gateway key",
    "HEARTH_ROLLOUT_WEBHOOK_TOKEN": "services/rollout.py: the rollback webhook's bearer token",
    "HEARTH_ROLLOUT_CA_FILE": "services/rollout.py: CA of the gateway's HTTPS certificate",
    "HEARTH_DRILL_CA": "scripts/fresh_machine_drill.sh: a proxy's CA bundle copied into the drill's root",
    "HEARTH_DRILL_MIRROR": "scripts/fresh_machine_drill.sh: the Debian mirror debootstrap uses",
    "HEARTH_LEDGER_SIGNING_KEY": "hearth ledger export, restore: the Ed25519 key (PEM or base64 seed) signing the off-site deletion ledger; unset on SQLite: generated in $HEARTH_DATA_DIR (development)",
    "HEARTH_POSTGRES_ADMIN_DSN": "hearth db provision-roles: a superuser's DSN or a managed server's admin login (CREATEROLE, owner of the database), for provisioning only",
    **{f"HEARTH_POSTGRES_DSN_{service.upper()}": f"hearth db provision-roles, backup, restore: {service}'s own DSN (its role and password)"
       for service in ("attribution", "clustering", "feedback", "privacy")},
}


def _settings_classes() -> list[type[HearthSettings]]:
    import importlib

    for module in SETTINGS_MODULES:
        importlib.import_module(module)
    found, todo = [], [HearthSettings]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def known_variables() -> set[str]:
    """Every HEARTH_* variable some Hearth component reads."""
    names = {ENV_PREFIX + field.upper() for cls in _settings_classes() for field in cls.model_fields}
    return names | set(OTHER_VARIABLES)


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Stop (ConfigError naming them) on HEARTH_* variables no component reads: a
    misspelt variable would otherwise be silently ignored and its default used."""
    env = os.environ if environ is None else environ
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX))
    if not unknown:
        return
    known = known_variables()
    unknown = [name for name in unknown if name not in known]
    if unknown:
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"  {name}: not a Hearth setting{hint}")
        raise ConfigError("invalid configuration: unknown variable(s)\n" + "\n".join(lines))


class MeshSettings(HearthSettings):
    """What every process of the mesh reads, services and gateway alike: how it proves
    who it is to its peers (service tokens, mutual TLS), how its clients balance, and
    the key of the pseudonyms in its logs. The bootstrap hands them to identity, tls
    and telemetry once (``configure_process``); those modules read no environment."""

    # A key per component (service_keys.py): this process's Ed25519 private key (PEM) and
    # the public keys of every component (JSON keyset). Both or neither; neither and no
    # service_token_key: a random key of the process's own (in-process calls only).
    service_signing_key_file: str = ""
    service_public_keys_file: str = ""
    # Transitional: the one shared HMAC mesh secret of sessions <= 18 (identity.py), used
    # only when the two files above are unset; every holder can mint any principal.
    service_token_key: SecretStr = SecretStr("")
    service_token_ttl_s: Annotated[float, bounded(gt=0, le=86400, message="must be seconds in (0, 86400]")] = \
        DEFAULT_TOKEN_TTL_S
    # Mutual TLS between processes (tls.py): all three files, or none.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = ""
    # Key of log/trace pseudonyms (telemetry.pseudonym); empty: derived from the token key.
    log_pseudonym_key: SecretStr = SecretStr("")
    # tls.channel_options(): round_robin spreads calls over every address a name resolves to.
    grpc_lb_policy: Literal["pick_first", "round_robin"] = "pick_first"
    # tls.channel_options(): the longest wait between reconnect attempts to a peer that is down.
    grpc_reconnect_max_s: Annotated[float, bounded(ge=0.05, le=120, message="must be seconds in [0.05, 120]")] = 5.0
    # The largest request message a server reads (and a client sends): tls.max_message_bytes,
    # server.build_server. Responses (exports) stay at 64 MiB.
    grpc_max_message_bytes: Annotated[int, bounded(ge=1024 * 1024, le=1024 * 1024 * 1024,
                                                   message="must be bytes in [1 MiB, 1 GiB]")] = 16 * 1024 * 1024
    # The largest response message a server sends and a client reads (tls.response_max_bytes).
    # Until session 26 a household's export was one response and had to fit; it is streamed
    # now (export_stream.py), so this bounds single answers only. Tests lower it to show an
    # export larger than the limit going through whole (tests/e2e/test_export_stream_e2e.py).
    grpc_max_response_bytes: Annotated[int, bounded(ge=64 * 1024, le=1024 * 1024 * 1024,
                                                    message="must be bytes in [64 KiB, 1 GiB]")] = 64 * 1024 * 1024
    # The data bytes of one message of a streamed export (export_stream.chunks): each data
    # holder's part and privacy's document are sent in chunks of at most this.
    export_chunk_bytes: Annotated[int, bounded(ge=1024, le=16 * 1024 * 1024,
                                               message="must be bytes in [1 KiB, 16 MiB]")] = 1024 * 1024
    # The size limit of the data directory's volume (the chart's storage.dataDir.sizeLimit:
    # the kubelet evicts a pod whose emptyDir grows past it, and an evicted pod's emptyDir
    # — its audit outbox with it — is gone). Only reported, as
    # hearth_data_dir_limit_bytes beside hearth_data_dir_used_bytes, for the alert
    # HearthDataDirNearLimit; 0 / empty: no limit known.
    data_dir_size_limit: ByteQuantity = 0
    # The audit sink's reserve file in the data directory (audit.AuditReserve): allocated at
    # start, it keeps the records held in memory while neither the audit log nor the disk
    # outbox takes them (a full disk) across a kill. ~400 bytes a record; 0: none.
    audit_reserve_mb: Annotated[float, bounded(ge=0, le=1024, message="must be MiB in [0, 1024] (0 = none)")] = 4.0

    @field_validator("service_token_key")
    @classmethod
    def _token_key(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_KEY_CHARS} characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')")
        return value


def mesh_settings() -> MeshSettings:
    """The mesh settings from the environment, for a process (or test) that did not go
    through a bootstrap; ConfigError naming the variable when one is bad."""
    return _build(MeshSettings, {})


def service_settings_class(service: str) -> type["ServiceSettings"]:
    """The settings class of a service: the ServiceSettings subclass its
    ``services/<service>/settings.py`` defines for it (plain ServiceSettings if none)."""
    import importlib

    try:
        module = importlib.import_module(f"services.{service}.settings")
    except ModuleNotFoundError:
        return ServiceSettings
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, ServiceSettings) and value is not ServiceSettings
                and value.__module__ == module.__name__
                and value.model_fields["service_name"].default == service):
            return value
    return ServiceSettings


def settings_from(environ: Mapping[str, str], settings_cls: type[BaseSettings] = MeshSettings):
    """Settings from an explicit ``{"HEARTH_X": value}`` mapping (values there win over
    the environment); ConfigError naming the variable. For tools and tests."""
    unknown = [name for name in environ if not name.startswith(ENV_PREFIX)]
    if unknown:
        raise ConfigError(f"invalid configuration:\n  {unknown[0]}: not a Hearth setting")
    return _build(settings_cls, {name[len(ENV_PREFIX):].lower(): value for name, value in environ.items()})


# Group and others lose every permission on what a Hearth process creates: the SQLite
# files and their WALs (viewing histories), the audit outboxes, the development keys,
# the data dir itself (attack25: they were 0644 / 0755 under the usual umask 022, so any
# local user of a machine running `make run` read them; the backups were already 0600).
PRIVATE_UMASK = 0o077


def keep_files_private() -> None:
    """From now on this process creates files and directories for its owner only (the
    current umask plus 077). Called first by each process's bootstrap, before anything
    is written."""
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


def warn_if_shared(data_dir: Path) -> None:
    """Log a warning when the process's own data dir (made before attack25, or by hand)
    lets group or others in: the umask covers new files only, and the operator may mean it
    (a backup agent in the group), so it is said, not changed. A directory another user
    owns is only noted at INFO: that is how Kubernetes mounts a pod's volumes (an emptyDir
    is 0777, an fsGroup volume group-writable, both root's), the process cannot chmod it,
    and nothing outside the pod reaches it; a warning at every pod start would teach
    operators to ignore it (review25). The files in it are the process's, 0600."""
    import logging
    import os

    try:
        info = data_dir.stat()
    except OSError:
        return
    mode = info.st_mode & 0o777
    if not mode & 0o077:
        return
    log = logging.getLogger("hearth.config")
    if info.st_uid == os.geteuid():
        log.warning("HEARTH_DATA_DIR %s is open to group or others (mode %s) and holds personal data and keys: "
                    "chmod 700 it (files made before session 25 may be 0644: chmod -R go= it)", data_dir, oct(mode))
    else:
        log.info("HEARTH_DATA_DIR %s (mode %s) belongs to uid %d, not this process: its files are made 0600",
                 data_dir, oct(mode), info.st_uid)


def configure_process(settings: MeshSettings, component: str | None = None) -> None:
    """Hand the mesh settings to the modules that use them (once, from the bootstrap):
    the service-token signer, the TLS material and channel options, the pseudonym key.
    A partial or unreadable TLS or signing-key configuration stops the process naming
    the variable. ``component``: the process's name ("gateway", "privacy", ...; default
    ``settings.service_name``), which its signing key must belong to."""
    from services.common import export_stream, identity, telemetry, tls

    identity.configure_service_tokens(identity.signer_from_settings(
        settings, component or getattr(settings, "service_name", None)))
    tls.configure(tls.material_from_settings(settings), settings.grpc_lb_policy, settings.grpc_reconnect_max_s,
                  settings.grpc_max_message_bytes, settings.grpc_max_response_bytes)
    if settings.export_chunk_bytes > settings.grpc_max_response_bytes // 2:
        raise ConfigError("invalid configuration:\n  HEARTH_EXPORT_CHUNK_BYTES: must be at most half of "
                          f"HEARTH_GRPC_MAX_RESPONSE_BYTES ({settings.grpc_max_response_bytes})")
    export_stream.configure(settings.export_chunk_bytes, getattr(settings, "max_workers", None))
    telemetry.configure_pseudonym_key(settings.log_pseudonym_key.get_secret_value()
                                      or settings.service_token_key.get_secret_value())


def specialise(settings: "ServiceSettings", settings_cls: type["ServiceSettings"]):
    """``settings`` as ``settings_cls`` (a service's own class): itself when it is one,
    else its values plus the class's own variables from the environment (harnesses and
    tests build plain ServiceSettings)."""
    if isinstance(settings, settings_cls):
        return settings
    return load(settings_cls, **settings.model_dump())


class ServiceSettings(MeshSettings):

    service_name: str = "clustering"
    host: str = "127.0.0.1"
    grpc_port: Port | None = None       # None: the service's default from DEFAULT_PORTS
    metrics_port: Port | None = None    # 0 disables the metrics HTTP server
    # A plaintext port serving grpc.health only (0: none), for the kubelet's gRPC probes,
    # which cannot present a client certificate to a service listening with mutual TLS.
    health_port: Port = 0
    max_workers: int = 16
    # On SIGTERM, how long calls in flight may run before the server cancels them. Any
    # call under way at the signal has less than the gateway's deadline left
    # (HEARTH_RPC_TIMEOUT_S, 10 s), so a grace at least that long never cuts a call its
    # caller still waits for: it finishes (durably) or its caller has given up. 5 s cut
    # IngestEvents streams slowed by a loaded machine. Calls starting during the grace are
    # refused UNAVAILABLE (server.Drain); the server stops once the last call has finished.
    grace_seconds: Positive = 10.0
    # How often database, Redis and peers are checked for the health report.
    health_check_interval_s: float = 2.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    storage: Literal["sqlite", "postgres"] = "sqlite"
    data_dir: Path = Path("var")
    postgres_dsn: str = ""
    postgres_pool_max: int = 8
    redis_url: str = ""                 # empty: in-process cache only

    # Tracing: "none", "otlp" (OTEL_EXPORTER_OTLP_* say where and how), "console", or
    # "jsonl:<path>" (one JSON span per line, synchronous; tests use it). telemetry.py.
    trace_export: str = "none"

    # Peers (host:port), used by services that call others.
    clustering_addr: str = "127.0.0.1:50051"
    attribution_addr: str = "127.0.0.1:50052"
    privacy_addr: str = "127.0.0.1:50053"
    feedback_addr: str = "127.0.0.1:50054"
    peer_timeout_s: Positive = 5.0
    # How long a consent answer from privacy is reused (consent.py): a withdrawal is in
    # force in every replica at most this long after SetConsent returned (docs/privacy.md §8).
    # At most the 300 s a cached answer serves while privacy is unreachable
    # (consent.DEFAULT_STALE_TTL_S; not imported here: config imports no gRPC).
    consent_cache_s: Annotated[float, bounded(ge=0, le=300, message="must be seconds in [0, 300]")] = 5.0
    # A gRPC reflection stream (grpcurl list / describe: well under a second) is cancelled
    # after this: it holds one of the service's workers while open (server.py).
    reflection_stream_s: Annotated[float, bounded(gt=0, le=600, message="must be seconds in (0, 600]")] = 10.0

    @field_validator("trace_export")
    @classmethod
    def _trace_export(cls, value: str) -> str:
        return check_trace_export(value)

    @model_validator(mode="after")
    def _postgres_needs_dsn(self) -> "ServiceSettings":
        if self.storage == "postgres" and not self.postgres_dsn:
            raise ValueError("HEARTH_POSTGRES_DSN is required when HEARTH_STORAGE=postgres")
        if self.storage == "postgres":
            # Read here, so a DSN that does not parse stops the start naming the variable:
            # psycopg's own error, raised at the first connection, quoted the token it could
            # not read — a password, whole or in part (attack29; storage/dsn.py).
            from services.common.storage.dsn import parse_dsn

            parse_dsn(self.postgres_dsn, "HEARTH_POSTGRES_DSN")
        return self

    @property
    def resolved_grpc_port(self) -> int:
        return self.grpc_port if self.grpc_port is not None else DEFAULT_PORTS[self.service_name][0]

    @property
    def resolved_metrics_port(self) -> int:
        return self.metrics_port if self.metrics_port is not None else DEFAULT_PORTS[self.service_name][1]


class RetentionSettings(ServiceSettings):
    """The retention window (docs/privacy.md §7), read by privacy, whose purge erases
    what is older, and by clustering, whose ingest refuses it (``rejected_expired``):
    one definition, so both read the same variables alike."""

    retention_days: Positive = 90.0
    retention_check_s: Annotated[float, bounded(ge=0, message="must be >= 0 (0 = off)")] = 3600.0   # 0 = the purge off

    @property
    def retention_s(self) -> float | None:
        """The age past which ingest refuses an event; None while the purge is off."""
        return self.retention_days * 86400.0 if self.retention_check_s > 0 else None


def load(settings_cls: type[BaseSettings] = ServiceSettings, **overrides):
    """Build settings from the environment (and overrides); exit with a clear message
    naming the variable on any invalid value or any HEARTH_* variable no component reads."""
    check_environment()
    return _build(settings_cls, overrides)


_UNPARSED_FIELD = re.compile(r'error parsing value for field "([a-z0-9_]+)"')


def _build(settings_cls: type[BaseSettings], overrides: Mapping[str, object]):
    try:
        return settings_cls(**overrides)
    except SettingsError as exc:
        # A JSON-valued variable that is no JSON (HEARTH_ADMISSION_LIMITS,
        # HEARTH_AUDIT_BULK_READERS): pydantic-settings names the field, not the variable
        # (until session 35 the process stopped on its traceback).
        found = _UNPARSED_FIELD.search(str(exc))
        name = ENV_PREFIX + found.group(1).upper() if found else "configuration"
        raise ConfigError(f"invalid configuration:\n  {name}: not valid JSON") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "configuration"
            # pydantic's "Value error, " before a validator's own words is noise (until session 32)
            lines.append(f"  {name}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
