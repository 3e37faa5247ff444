"""Settings of the clustering service: the shared ``ServiceSettings`` plus its own
variables, validated at start (a bad value names the variable).

| variable | default | meaning |
|---|---|---|
| `HEARTH_SESSION_GAP_S` | 1800 | a device's events further apart than this start a new session |
| `HEARTH_LATENESS_TOLERANCE_S` | 21600 | events this far behind their device's newest are still placed; older ones are `rejected_late` |
| `HEARTH_RETENTION_DAYS` | 90 | read with privacy (one value for both: the chart's shared ConfigMap): while the retention purge is on, events older than now minus this are refused at ingest and counted `rejected_expired`, and the prediction outbox drops (unsent, `hearth_predictions_expired_total`) predictions about sessions that started more than this minus 10 minutes ago (docs/privacy.md §7) |
| `HEARTH_RETENTION_CHECK_S` | 3600 | read with privacy: 0 (the purge off) = no event is refused for its age |
| `HEARTH_COLD_START` | `account` | households with < 10 sessions: `account` (one person until the first fit), `population_prior` (the prior's personas; falls back to `account` until enough households exist to learn the prior) or `heuristic` (docs/clustering.md, "Cold start": why `account` is the default) |
| `HEARTH_POPULATION_PRIOR_REFRESH_S` | 3600 | how often the population prior is relearnt from stored households |
| `HEARTH_CALIBRATOR_CACHE_S` | 60 | how long a calibrator fetched from feedback is applied before asking again (the assign path never waits for feedback; a recalibration shows within this) |
| `HEARTH_PREDICTION_FORWARD_INTERVAL_S` | 0.2 | how often logged predictions are forwarded to feedback; the gateway's `POST /v1/feedback` waits up to `HEARTH_FEEDBACK_PREDICTION_WAIT_S` (2 s) for one not forwarded yet, so keep this well below it |
| `HEARTH_GENRE_ALIASES` | empty | `name=genre,...`: callers' genre names mapped onto the feature genres (docs/features.md) |
| `HEARTH_UNKNOWN_GENRES` | `hash` | a genre outside the vocabulary: counted in a genre slot chosen by a stable hash of its name and reported (`hash`), counted in `other` and reported (`other`, feature schema 1), or refused (`reject`) |
| `HEARTH_MAX_DEVICES_PER_HOUSEHOLD` | 1000 | distinct devices a household may have; a batch of events bringing a device past it is refused whole (HTTP 422 naming `events[i].device_id`) |
| `HEARTH_ERASURE_FENCE_S` | 3 | every Erase waits this long after its deletion and refit are committed, and each replica re-reads the erasure fence every quarter of it: once an erasure completes no replica answers with the model it replaced or removed (docs/security.md "Other replicas after an erasure") |
| `HEARTH_FAULT_GMM_NUMERICAL` | empty | fault injection for `make verify`, never set in production: households whose id starts with this prefix get a GMM fit that fails numerically (k-means fallback) |
"""

from __future__ import annotations

from typing import Annotated, Literal

from services.common.config import Positive, RetentionSettings, ServiceSettings, bounded


class ClusteringSettings(RetentionSettings):
    # RetentionSettings: HEARTH_RETENTION_DAYS / _CHECK_S, read with privacy (ingest
    # refuses what the retention purge would erase, docs/privacy.md §7).
    service_name: str = "clustering"
    session_gap_s: Positive = 1800.0
    lateness_tolerance_s: Positive = 6 * 3600.0
    # "account" since session 16: on TUNING streams (bench/_worlds_eval, 48 households,
    # every world's own population prior) the prior's personas gave a household's first
    # sessions person ids the first fit never keeps, at arrival: accuracy 0.666 against
    # 0.692, size exact 0.17 / 0.63, single-person households kept 0.00 / 1.00, ECE equal
    # (docs/clustering.md, "Cold start").
    cold_start: Literal["account", "population_prior", "heuristic"] = "account"
    population_prior_refresh_s: Positive = 3600.0
    calibrator_cache_s: Positive = 60.0
    genre_aliases: str = ""
    unknown_genres: Literal["hash", "other", "reject"] = "hash"
    fault_gmm_numerical: str = ""
    # How often the prediction log forwards logged predictions to feedback (a caller's
    # feedback on a prediction not yet forwarded waits for it at the gateway,
    # HEARTH_FEEDBACK_PREDICTION_WAIT_S; keep this well below that wait).
    prediction_forward_interval_s: Positive = 0.2
    # Distinct devices a household may have: a batch bringing one more is refused whole
    # (INVALID_ARGUMENT naming events[i].device_id). Unbounded, 5,000 devices in one
    # request made every household read 470 KB (attack25, docs/security.md).
    max_devices_per_household: Annotated[int, bounded(ge=1)] = 1000
    # How long an Erase waits after its commit for the other replicas to see the erasure
    # fence (each reads it every quarter of this): ClusteringStore.watch_erasure_fence.
    erasure_fence_s: Annotated[float, bounded(ge=0.1, le=60.0)] = 3.0


def clustering_settings(settings: ServiceSettings) -> ClusteringSettings:
    """The clustering settings for ``settings`` plus the variables above from the environment."""
    from services.common import config

    return config.specialise(settings, ClusteringSettings)
