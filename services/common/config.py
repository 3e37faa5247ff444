"""Settings from environment variables, validated at start-up.

Every variable is ``HEARTH_<NAME>``. A bad value stops the process with a message that
names the variable (``ConfigError``), instead of failing later at first use.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.telemetry import check_trace_export

ENV_PREFIX = "HEARTH_"

# Default ports: one gRPC port and one Prometheus port per service.
DEFAULT_PORTS = {
    "clustering": (50051, 9101),
    "attribution": (50052, 9102),
    "privacy": (50053, 9103),
    "feedback": (50054, 9104),
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
SETTINGS_MODULES = ("services.common.config", "services.feedback.settings", "services.privacy.settings",
                    "gateway.config")

# HEARTH_* variables read outside the settings classes, each by the one function that
# takes it as an explicit input (and validates it, naming it), or by tooling around
# the processes rather than by the processes themselves.
OTHER_VARIABLES: dict[str, str] = {
    "HEARTH_SERVICE_TOKEN_KEY": "services/common/identity.py signer_from_env",
    "HEARTH_SERVICE_TOKEN_TTL_S": "services/common/identity.py signer_from_env",
    "HEARTH_TLS_CERT": "services/common/tls.py material_from_env",
    "HEARTH_TLS_KEY": "services/common/tls.py material_from_env",
    "HEARTH_TLS_CA": "services/common/tls.py material_from_env",
    "HEARTH_TLS_SERVER_NAME": "services/common/tls.py material_from_env",
    "HEARTH_AUDIT_SIGNING_KEY": "services/privacy/audit/app.py load_signing_key",
    "HEARTH_AUDIT_SIGNING_KEY_FILE": "services/privacy/audit/app.py load_signing_key",
    "HEARTH_SHARED_DATA": "tests and .ci/run: where external test data lives",
    "HEARTH_PROVISION_DRY_RUN": "scripts/provision.sh",
    "HEARTH_BENCH_POSTGRES_DSN": "bench/: the PostgreSQL a benchmark uses",
    "HEARTH_ROLLOUT_API_KEY": "services/rollout.py: the rollout CLI's gateway key",
    "HEARTH_ROLLOUT_WEBHOOK_TOKEN": "services/rollout.py: the rollback webhook's bearer token",
    "HEARTH_ROLLOUT_CA_FILE": "services/rollout.py: CA of the gateway's HTTPS certificate",
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


class ServiceSettings(HearthSettings):

    service_name: str = "clustering"
    host: str = "127.0.0.1"
    grpc_port: int | None = None        # None: the service's default from DEFAULT_PORTS
    metrics_port: int | None = None     # 0 disables the metrics HTTP server
    max_workers: int = 16
    grace_seconds: float = 5.0
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
    peer_timeout_s: float = 5.0
    # Read by services/common/tls.CHANNEL_OPTIONS; declared here so a typo fails at start.
    grpc_lb_policy: Literal["pick_first", "round_robin"] = "pick_first"

    # Clustering / session builder.
    session_gap_s: float = 1800.0
    lateness_tolerance_s: float = 6 * 3600.0
    # Cold start (< 10 sessions): "account", "population_prior" (falls back to account
    # until enough households exist to learn the prior) or "heuristic".
    cold_start: Literal["account", "population_prior", "heuristic"] = "population_prior"
    population_prior_refresh_s: float = 3600.0
    # How long clustering applies a calibrator fetched from feedback before asking again
    # (the assign path never waits for feedback; a recalibration shows within this).
    calibrator_cache_s: float = 60.0
    # Genre vocabulary: aliases "name=genre,..." onto the feature genres (docs/features.md);
    # a name outside it is counted in "other" and reported ("other"), or refused ("reject").
    genre_aliases: str = ""
    unknown_genres: Literal["other", "reject"] = "other"
    # Fault injection for `make verify` (never set in production): households whose id
    # starts with this prefix get a GMM fit that fails numerically (k-means fallback).
    fault_gmm_numerical: str = ""

    @field_validator("grpc_port", "metrics_port")
    @classmethod
    def _port_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 65535:
            raise ValueError("must be a port number in 0..65535")
        return value

    @field_validator("session_gap_s", "lateness_tolerance_s", "grace_seconds", "peer_timeout_s",
                     "calibrator_cache_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("trace_export")
    @classmethod
    def _trace_export(cls, value: str) -> str:
        return check_trace_export(value)

    @model_validator(mode="after")
    def _postgres_needs_dsn(self) -> "ServiceSettings":
        if self.storage == "postgres" and not self.postgres_dsn:
            raise ValueError("HEARTH_POSTGRES_DSN is required when HEARTH_STORAGE=postgres")
        return self

    @property
    def resolved_grpc_port(self) -> int:
        return self.grpc_port if self.grpc_port is not None else DEFAULT_PORTS[self.service_name][0]

    @property
    def resolved_metrics_port(self) -> int:
        return self.metrics_port if self.metrics_port is not None else DEFAULT_PORTS[self.service_name][1]


def load(settings_cls: type[BaseSettings] = ServiceSettings, **overrides):
    """Build settings from the environment (and overrides); exit with a clear message
    naming the variable on any invalid value."""
    check_environment()
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "configuration"
            lines.append(f"  {name}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
