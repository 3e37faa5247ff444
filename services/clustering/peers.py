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
