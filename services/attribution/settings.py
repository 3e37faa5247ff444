"""Settings of the attribution service: the shared ``ServiceSettings`` (storage, peers,
ports, timeouts; docs/operations.md). Attribution has no variables of its own yet: its
methods and their parameters come with each request (docs/attribution.md). New
``HEARTH_*`` variables of this service are declared here, so a misspelt one stops the
process naming it."""

from __future__ import annotations

from services.common.config import ServiceSettings


class AttributionSettings(ServiceSettings):
    service_name: str = "attribution"


def attribution_settings(settings: ServiceSettings) -> AttributionSettings:
    from services.common import config

    return config.specialise(settings, AttributionSettings)
