"""The clustering service's calls to the feedback service: predictions out, the
household's model variant and the current calibrator in. Every call has a deadline;
answers that steer the assign path are cached so a slow or absent feedback service
never slows assignment (it falls back to the control variant and no recalibration)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.clustering.prediction_log import PredictionRecord, to_request
from services.common.client import Peer
from services.common.calibration import IDENTITY, Calibrator

log = logging.getLogger("hearth.clustering.peers")
DEFAULT_VARIANT = "gmm"
CACHE_TTL_S = 60.0
MAX_VARIANTS_PER_CALL = 10_000   # feedback's GetVariants bound


class FeedbackPeer:
    def __init__(self, address: str, timeout_s: float = 2.0, calibrator_cache_s: float = CACHE_TTL_S) -> None:
        self._calibrator_ttl_s = calibrator_cache_s
        self.peer = Peer(address, "clustering", fpb_grpc.FeedbackServiceStub, timeout_s)
        self._lock = threading.Lock()
        self._variants: dict[str, tuple[float, str]] = {}
        self._calibrators: dict[str, tuple[float, Calibrator]] = {}

    def record_predictions(self, request: fpb.RecordPredictionRequest) -> None:
        """One RecordPrediction call (the prediction outbox's forwarder, prediction_log)."""
        self.peer.call("RecordPrediction", request, idempotent=True)   # idempotent by prediction_id

    def send_predictions(self, records: Sequence[PredictionRecord]) -> None:
        self.record_predictions(to_request(records))

    def variant_of(self, account_id: str) -> str:
        now = time.monotonic()
        with self._lock:
            hit = self._variants.get(account_id)
        if hit and now - hit[0] < CACHE_TTL_S:
            return hit[1]
        try:
            variant = self.peer.call("GetExperiment", fpb.GetExperimentRequest(account_id=account_id)).variant
        except Exception as exc:  # noqa: BLE001 - feedback down: serve the control variant
            log.debug("variant lookup failed: %s", exc)
            variant = DEFAULT_VARIANT
        variant = variant if variant in ("gmm", "kmeans") else DEFAULT_VARIANT
        with self._lock:
            if len(self._variants) > 100_000:
                self._variants.clear()
            self._variants[account_id] = (now, variant)
        return variant

    def warm_variants(self, account_ids: Sequence[str]) -> None:
        """The variants of those of ``account_ids`` not cached, in one GetVariants call a
        10,000 (``variant_of`` then answers them from the cache): what the model refresh
        asks before refreshing a queue of households (session 32; one GetExperiment a
        household before, each reading feedback's whole label set for its per-variant
        results). A feedback replica older than GetVariants (UNIMPLEMENTED), or feedback
        not answering: nothing cached, and ``variant_of`` asks (or falls back) one
        household at a time, as before."""
        now = time.monotonic()
        with self._lock:
            missing = [a for a in dict.fromkeys(account_ids)
                       if not ((hit := self._variants.get(a)) and now - hit[0] < CACHE_TTL_S)]
        for start in range(0, len(missing), MAX_VARIANTS_PER_CALL):
            chunk = missing[start:start + MAX_VARIANTS_PER_CALL]
            try:
                variants = self.peer.call("GetVariants", fpb.GetVariantsRequest(account_ids=chunk),
                                          idempotent=True).variants
            except Exception as exc:  # noqa: BLE001 - variant_of asks one at a time
                log.debug("variants lookup failed: %s", exc)
                return
            if len(variants) != len(chunk):
                return   # not an answer to this question: variant_of asks one at a time
            with self._lock:
                if len(self._variants) + len(chunk) > 100_000:
                    self._variants.clear()
                for account, variant in zip(chunk, variants):
                    self._variants[account] = (now, variant if variant in ("gmm", "kmeans") else DEFAULT_VARIANT)

    def calibrator(self, variant: str) -> Calibrator:
        now = time.monotonic()
        with self._lock:
            hit = self._calibrators.get(variant)
        if hit and now - hit[0] < self._calibrator_ttl_s:
            return hit[1]
        try:
            response = self.peer.call("GetCalibrator", fpb.GetCalibratorRequest(variant=variant))
            calibrator = Calibrator.from_json(response.calibrator_json) if response.version else IDENTITY
        except Exception as exc:  # noqa: BLE001 - keep the last known calibrator (or none)
            log.debug("calibrator fetch failed: %s", exc)
            calibrator = hit[1] if hit else IDENTITY
        with self._lock:
            self._calibrators[variant] = (now, calibrator)
        return calibrator

    def close(self) -> None:
        self.peer.close()
