"""python -m gateway: validate settings, then serve the FastAPI app with uvicorn."""

from __future__ import annotations

import uvicorn
from pydantic import ValidationError

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common import telemetry


def main() -> None:
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        lines = [f"  HEARTH_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("invalid configuration:\n" + "\n".join(lines)) from None
    telemetry.setup_telemetry("gateway", settings.trace_export, settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.gateway_port,
                log_level=settings.log_level.lower(), access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
