"""Gateway settings (HEARTH_* environment variables, validated at start)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEARTH_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    gateway_port: int = 8080
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    trace_export: str = "none"

    clustering_addr: str = "127.0.0.1:50051"
    attribution_addr: str = "127.0.0.1:50052"
    privacy_addr: str = "127.0.0.1:50053"
    feedback_addr: str = "127.0.0.1:50054"
    # Deadline of every gateway -> service call; health checks use their own, shorter one.
    rpc_timeout_s: float = 10.0
    health_timeout_s: float = 1.0

    # API keys: a JSON file of [{"sha256": hex, "principal": id, "role": role}] — only
    # hashes are ever stored. make run writes var/gateway-keys.json with a demo key.
    api_keys_file: Path | None = None
    max_body_bytes: int = 8 * 1024 * 1024

    @field_validator("gateway_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("must be a port number in 0..65535")
        return value

    @field_validator("rpc_timeout_s", "health_timeout_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0")
        return value
