"""Settings: one base class, unknown HEARTH_* variables stop the process naming them,
and the environment is read only by the settings code: identity, TLS, the audit signing
key and log pseudonyms get their values from the settings the bootstrap loaded
(config.OTHER_VARIABLES lists only tooling around the processes)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from services.attribution.settings import AttributionSettings
from services.clustering.settings import ClusteringSettings
from services.common import config
from services.feedback.settings import FeedbackSettings
from services.privacy.settings import PrivacySettings

ROOT = Path(__file__).resolve().parents[3]


def test_every_component_settings_class_shares_the_strict_base():
    for cls in (config.ServiceSettings, ClusteringSettings, AttributionSettings, FeedbackSettings,
                PrivacySettings, GatewaySettings):
        assert issubclass(cls, config.MeshSettings) and issubclass(cls, config.HearthSettings)
        assert cls.model_config["extra"] == "forbid" and cls.model_config["frozen"]
    with pytest.raises(config.ConfigError, match="HEARTH_SESSION_GAPP_S"):
        config.load(ClusteringSettings, service_name="clustering", session_gapp_s=10)   # a misspelt override
    with pytest.raises(config.ConfigError, match="HEARTH_SESSION_GAP_S: must be > 0"):
        config.load(ClusteringSettings, service_name="clustering", session_gap_s=0)


def test_identity_tls_audit_signing_and_pseudonym_variables_are_settings_fields():
    # Read by the processes, so declared on a settings class (validated at start), not
    # listed among the variables that only tooling reads.
    process_variables = {"HEARTH_SERVICE_TOKEN_KEY", "HEARTH_SERVICE_TOKEN_TTL_S", "HEARTH_SERVICE_SIGNING_KEY_FILE",
                         "HEARTH_SERVICE_PUBLIC_KEYS_FILE", "HEARTH_TLS_CERT",
                         "HEARTH_TLS_KEY", "HEARTH_TLS_CA", "HEARTH_TLS_SERVER_NAME", "HEARTH_LOG_PSEUDONYM_KEY",
                         "HEARTH_GRPC_LB_POLICY", "HEARTH_AUDIT_SIGNING_KEY", "HEARTH_AUDIT_SIGNING_KEY_FILE"}
    fields = {config.ENV_PREFIX + f.upper() for cls in (GatewaySettings, PrivacySettings) for f in cls.model_fields}
    assert process_variables <= fields
    assert not process_variables & set(config.OTHER_VARIABLES)
    assert {"HEARTH_SESSION_GAP_S", "HEARTH_COLD_START"} <= config.known_variables()
    assert "session_gap_s" not in config.ServiceSettings.model_fields   # clustering's own


def test_the_bootstrap_hands_the_pseudonym_key_to_telemetry():
    import hashlib
    import hmac

    from services.common import telemetry

    previous = telemetry._PSEUDONYM_KEY
    try:
        config.configure_process(config.settings_from({"HEARTH_LOG_PSEUDONYM_KEY": "p" * 40,
                                                       "HEARTH_SERVICE_TOKEN_KEY": "k" * 40}))
        key = hmac.new(b"p" * 40, b"hearth-log-pseudonym-v1", hashlib.sha256).digest()
        assert telemetry.pseudonym("acct-1") == "ps_" + hmac.new(key, b"acct-1", hashlib.sha256).hexdigest()[:16]
        config.configure_process(config.settings_from({"HEARTH_LOG_PSEUDONYM_KEY": "",
                                                       "HEARTH_SERVICE_TOKEN_KEY": "k" * 40}))
        key = hmac.new(b"k" * 40, b"hearth-log-pseudonym-v1", hashlib.sha256).digest()
        assert telemetry.pseudonym("acct-1") == "ps_" + hmac.new(key, b"acct-1", hashlib.sha256).hexdigest()[:16]
    finally:
        from services.common import identity, tls

        telemetry._PSEUDONYM_KEY = previous
        identity.configure_service_tokens(None)
        tls._configured = None


def test_unknown_variable_is_refused_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("HEARTH_FEEDBACK_MAX_ECEE", "0.1")
    with pytest.raises(config.ConfigError) as info:
        config.load(FeedbackSettings, service_name="feedback")
    message = str(info.value)
    assert "HEARTH_FEEDBACK_MAX_ECEE: not a Hearth setting (did you mean HEARTH_FEEDBACK_MAX_ECE?)" in message


def test_every_component_knows_every_components_variables(monkeypatch):
    # One environment often serves several components: a gateway variable is no typo
    # in a service, nor a privacy variable in the gateway.
    monkeypatch.setenv("HEARTH_API_KEYS_FILE", "/nonexistent/keys.json")
    monkeypatch.setenv("HEARTH_RETENTION_DAYS", "30")
    monkeypatch.setenv("HEARTH_SERVICE_TOKEN_KEY", "k" * 32)
    assert config.load(service_name="clustering").service_name == "clustering"
    assert config.load(PrivacySettings, service_name="privacy").retention_days == 30


@pytest.mark.parametrize("module", ["services.feedback", "gateway"])
def test_a_misspelt_variable_stops_the_process_naming_it(tmp_path, module):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HEARTH_DATA_DIR=str(tmp_path), HEARTH_GRPC_PORT="0", HEARTH_METRICS_PORT="0",
               HEARTH_GATEWAY_PORT="0", HEARTH_LOG_LEVL="DEBUG")
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "HEARTH_LOG_LEVL: not a Hearth setting (did you mean HEARTH_LOG_LEVEL?)" in result.stderr


def _environment_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


# The modules allowed to read the environment: the settings code, and telemetry.py for
# OpenTelemetry's standard OTEL_* variables (read as the SDK reads them).
ENVIRONMENT_READERS = {
    "services/common/config.py", "services/common/telemetry.py",
    "services/rollout.py",   # an operator CLI, not a service process (OTHER_VARIABLES)
    "services/common/storage/roles.py",   # `hearth db provision-roles`, an operator CLI (OTHER_VARIABLES)
    # `hearth backup` / `restore` hand their own environment on to pg_dump / pg_restore with
    # PGPASSWORD added (the DSN's password kept off their command line, review28): no setting read.
    "services/common/backup.py",
    # `hearth ledger export` / `restore`: HEARTH_LEDGER_SIGNING_KEY (OTHER_VARIABLES), which no
    # service reads (the privacy pods never hold the ledger key: ledger33).
    "services/privacy/backup.py",
}


def test_only_the_settings_code_reads_the_environment():
    readers = {p.relative_to(ROOT).as_posix() for base in ("services", "gateway")
               for p in (ROOT / base).rglob("*.py") if _environment_reads(p)}
    readers -= {"services/testing/mesh.py", "services/testing/inprocess.py", "services/common/child_process.py"}  # harnesses
    assert readers <= ENVIRONMENT_READERS, sorted(readers - ENVIRONMENT_READERS)
    for name, where in config.OTHER_VARIABLES.items():
        assert name.startswith("HEARTH_") and where


def test_the_default_cold_start_is_one_person_and_the_benchmark_follows_it(monkeypatch):
    """HEARTH_COLD_START defaults to "account" (session 16: the population prior's personas
    named persons the first fit never keeps; docs/clustering.md, "Cold start"), the variable
    still chooses, and the benchmarks' streams answer cold starts as the default does."""
    from bench import accuracy
    monkeypatch.delenv("HEARTH_COLD_START", raising=False)
    assert ClusteringSettings().cold_start == "account"
    monkeypatch.setenv("HEARTH_COLD_START", "population_prior")
    assert ClusteringSettings().cold_start == "population_prior"
    assert accuracy.SERVICE_COLD_START_PRIOR is False
    from bench import _worlds_eval
    assert accuracy.SERVICE_COLD_START_PRIOR is _worlds_eval.SERVICE_COLD_START_PRIOR   # bench.label_feedback's too
    assert accuracy.run_worlds.__defaults__[-1] is False and accuracy.run_report_only.__defaults__[-1] is False


def test_clustering_reads_the_retention_privacy_purges_with(monkeypatch):
    """docs/privacy.md §7: clustering refuses at ingest what privacy's purge would erase,
    so it reads the same two variables; the purge off (check 0) refuses nothing."""
    for name in ("retention_days", "retention_check_s"):
        assert name in ClusteringSettings.model_fields and name in PrivacySettings.model_fields
    monkeypatch.setenv("HEARTH_RETENTION_DAYS", "30")
    monkeypatch.setenv("HEARTH_RETENTION_CHECK_S", "60")
    assert ClusteringSettings().retention_s == 30 * 86400.0
    assert PrivacySettings().retention_days == 30
    monkeypatch.setenv("HEARTH_RETENTION_CHECK_S", "0")
    assert ClusteringSettings().retention_s is None
    with pytest.raises(config.ConfigError, match="HEARTH_RETENTION_DAYS"):
        config.load(ClusteringSettings, service_name="clustering", retention_days=0)


def test_the_grpc_message_limit_is_a_mesh_setting_the_gateways_body_limit_must_fit():
    """HEARTH_GRPC_MAX_MESSAGE_BYTES (16 MiB): the largest request message a server reads and
    a client sends. A gateway body's protobuf is never larger than its JSON, so a gateway
    whose HEARTH_MAX_BODY_BYTES exceeds it could forward a body no service reads: refused at
    start, naming both."""
    assert config.MeshSettings.model_fields["grpc_max_message_bytes"].default == 16 * 1024 * 1024
    assert config.load(GatewaySettings, max_body_bytes=16 * 1024 * 1024).max_body_bytes == 16 * 1024 * 1024
    with pytest.raises(config.ConfigError, match="HEARTH_MAX_BODY_BYTES must not exceed HEARTH_GRPC_MAX_MESSAGE_BYTES"):
        config.load(GatewaySettings, max_body_bytes=32 * 1024 * 1024)
    assert config.load(GatewaySettings, max_body_bytes=32 * 1024 * 1024,
                       grpc_max_message_bytes=32 * 1024 * 1024).grpc_max_message_bytes == 32 * 1024 * 1024
    with pytest.raises(config.ConfigError, match="HEARTH_GRPC_MAX_MESSAGE_BYTES"):
        config.load(ClusteringSettings, service_name="clustering", grpc_max_message_bytes=1000)


def test_the_consent_cache_is_a_setting_of_every_service_within_the_stale_bound(monkeypatch):
    """HEARTH_CONSENT_CACHE_S (session 23): how long clustering, attribution and feedback
    reuse a consent answer, 5 s by default (the bound docs/privacy.md §8 states); at most
    the 300 s an answer serves while privacy is unreachable. The services' checkers are
    built with it (tests/e2e/test_attribution_http.py holds a withdrawal to it)."""
    from services.common import consent

    monkeypatch.delenv("HEARTH_CONSENT_CACHE_S", raising=False)
    for cls in (ClusteringSettings, AttributionSettings, FeedbackSettings):
        assert cls().consent_cache_s == consent.DEFAULT_TTL_S == 5.0
    monkeypatch.setenv("HEARTH_CONSENT_CACHE_S", "0.5")
    assert FeedbackSettings().consent_cache_s == 0.5
    assert config.load(AttributionSettings, service_name="attribution", consent_cache_s=300).consent_cache_s == 300
    for bad in (-1, consent.DEFAULT_STALE_TTL_S + 1):
        with pytest.raises(config.ConfigError, match="HEARTH_CONSENT_CACHE_S"):
            config.load(ClusteringSettings, service_name="clustering", consent_cache_s=bad)
    for service in ("clustering", "attribution", "feedback"):
        source = (ROOT / "services" / service / "__main__.py").read_text()
        assert "ttl_s=settings.consent_cache_s" in source, service


_NAN = float("nan")
_POSITIVE = ([0, -1, _NAN], [0.001, 3600], "must be > 0")
# Every bounded setting: values refused, values accepted (the bounds themselves where
# they are included) and the message, which the error names with its variable.
_BOUNDS = {
    "grpc_max_message_bytes": ([1024 * 1024 - 1, 1024**3 + 1], [1024 * 1024 * 16, 1024**3], "must be bytes in [1 MiB, 1 GiB]"),
    "grpc_max_response_bytes": ([64 * 1024 - 1, 1024**3 + 1], [64 * 1024, 1024**3], "must be bytes in [64 KiB, 1 GiB]"),
    "export_chunk_bytes": ([1023, 16 * 1024 * 1024 + 1], [1024, 16 * 1024 * 1024], "must be bytes in [1 KiB, 16 MiB]"),
    "grpc_reconnect_max_s": ([0.049, 120.5, _NAN], [0.05, 120], "must be seconds in [0.05, 120]"),
    "audit_reserve_mb": ([-0.5, 1024.5, _NAN], [0, 1024], "must be MiB in [0, 1024] (0 = none)"),
    "service_token_ttl_s": ([0, -1, 86401, _NAN], [0.5, 86400], "must be seconds in (0, 86400]"),
    **{port: ([-1, 65536], [0, 65535], "must be a port number in 0..65535")
       for port in ("grpc_port", "metrics_port", "health_port", "gateway_port", "edge_authorizer_port")},
    **{name: _POSITIVE for name in (
        "grace_seconds", "peer_timeout_s", "retention_days", "session_gap_s", "lateness_tolerance_s",
        "population_prior_refresh_s", "calibrator_cache_s", "prediction_forward_interval_s", "deletion_poll_s",
        "deletion_retry_base_s", "deletion_retry_max_s", "deletion_erase_timeout_s", "deletion_lease_s",
        "feedback_refit_timeout_s", "feedback_audit_timeout_s", "rpc_timeout_s", "health_timeout_s")},
    "reflection_stream_s": ([0, 600.5, _NAN], [0.1, 600], "must be seconds in (0, 600]"),
    "consent_cache_s": ([-0.1, 300.5, _NAN], [0, 300], "must be seconds in [0, 300]"),
    "retention_check_s": ([-1, _NAN], [0, 3600], "must be >= 0 (0 = off)"),
    **{name: ([0, -5], [1, 1000], "must be >= 1") for name in ("deletion_max_attempts", "feedback_recalibrate_min_new")},
    **{name: ([-1, _NAN], [0, 60], "must be >= 0") for name in ("feedback_trigger_cooldown_s", "feedback_check_interval_s")},
    "max_body_bytes": ([1023, 1024**3 + 1], [1024, 16 * 1024 * 1024], "must be between 1 KiB and 1 GiB"),
    "jwt_leeway_s": ([-1, 300.5, _NAN], [0, 300], "must be between 0 and 300 seconds"),
}
_COMPONENTS = (config.MeshSettings, config.ServiceSettings, config.RetentionSettings, ClusteringSettings,
               AttributionSettings, FeedbackSettings, PrivacySettings, GatewaySettings)


def _errors(cls, **values) -> list[str]:
    try:
        config._build(cls, values)
    except config.ConfigError as exc:
        return str(exc).splitlines()[1:]
    return []


@pytest.mark.parametrize("cls", _COMPONENTS, ids=lambda c: c.__name__)
def test_every_bounded_setting_of_every_component_is_checked_naming_it(cls, monkeypatch):
    """dek24: every bounded setting a component reads refuses a value out of its bounds —
    NaN too — with the one line naming the variable, in every component that reads it, and
    takes its bounds. Until session 24 each was a hand-written pydantic validator, and a
    subclass's validator of the same name replaced its base class's: clustering's and
    privacy's ``_positive`` (their own settings) dropped ServiceSettings' ``_positive``, so
    HEARTH_GRACE_SECONDS=0 and HEARTH_PEER_TIMEOUT_S=-1 were accepted by those two
    services only; and a check written ``value <= 0`` let NaN through."""
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    fields = [f for f in _BOUNDS if f in cls.model_fields]
    assert fields
    for field in fields:
        bad, good, message = _BOUNDS[field]
        variable = config.ENV_PREFIX + field.upper()
        for value in bad:
            assert _errors(cls, **{field: value}) == [f"  {variable}: {message}"], (field, value)
        for value in good:
            extra = {"max_body_bytes": 1024} if field == "grpc_max_message_bytes" and cls is GatewaySettings else {}
            assert _errors(cls, **{field: value}, **extra) == [], (field, value)


@pytest.mark.parametrize("value, message", [
    ('{"reporting-svc": 0}', "HEARTH_AUDIT_BULK_READERS: bulk_readers['reporting-svc']: must be an int >= 1"),
    ('{"reporting-svc": "many"}', "HEARTH_AUDIT_BULK_READERS"),
    ('{"": 500}', "HEARTH_AUDIT_BULK_READERS: bulk_readers: a principal must be a non-empty string"),
    ("reporting-svc=500", "HEARTH_AUDIT_BULK_READERS: not valid JSON"),
])
def test_the_expected_bulk_readers_are_checked_naming_the_variable(monkeypatch, value, message):
    # session 35: each configured bulk reader's threshold is a number of households (never
    # unlimited); a bad value stops privacy naming the variable, a JSON-valued variable that
    # is no JSON included (until session 35 that was pydantic-settings' own traceback).
    monkeypatch.setenv("HEARTH_AUDIT_BULK_READERS", value)
    with pytest.raises(config.ConfigError) as info:
        config.load(PrivacySettings, service_name="privacy")
    assert message in str(info.value)
    monkeypatch.setenv("HEARTH_AUDIT_BULK_READERS", '{"reporting-svc": 500}')
    assert config.load(PrivacySettings, service_name="privacy").audit_bulk_readers == {"reporting-svc": 500}
