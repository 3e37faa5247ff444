"""Settings of the attribution service: the shared ``ServiceSettings`` (storage, peers,
ports, timeouts; docs/operations.md) and the retention window it reads with privacy and
clustering (``HEARTH_RETENTION_DAYS``, ``HEARTH_RETENTION_CHECK_S``: while the purge is
on, touchpoints and conversions older than the window are refused at ingest and counted
``rejected_expired``, docs/privacy.md §7). Its methods and their parameters come with
each request (docs/attribution.md). New ``HEARTH_*`` variables of this service are
declared here, so a misspelt one stops the process naming it."""

from __future__ import annotations

from services.common.config import RetentionSettings, ServiceSettings


class AttributionSettings(RetentionSettings):
    service_name: str = "attribution"


def attribution_settings(settings: ServiceSettings) -> AttributionSettings:
    from services.common import config

    return config.specialise(settings, AttributionSettings)
