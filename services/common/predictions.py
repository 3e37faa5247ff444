"""The prediction record: one assignment as clustering logs it and feedback stores it.

One type for both sides of ``RecordPrediction`` (clustering's durable outbox row and the
feedback service's prediction log hold the same fields), so the two cannot drift apart.

Clustering's outbox stores the RecordPrediction request's bytes since session 19
(services/clustering/prediction_log.py: ``to_request`` maps the fields, ``_encode`` writes
four of them itself); rows queued by session 18 hold a record positionally
(``[traceparent, *fields]`` in declaration order): a new field goes at the end, with a
default, so those still read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PredictionRecord:
    prediction_id: str
    account_id: str
    session_id: str
    person_id: str
    probabilities: dict[str, float]
    model_variant: str
    model_version: int
    ts: float
    cold_start: bool
    household_size: int
    device_id: str = ""   # "" = unknown (older clients): a device erasure then takes the household's
    # The session the prediction is about (None = a bare feature vector or unknown: a window
    # erasure then goes by ts).
    session_start: float | None = None
    session_end: float | None = None
    # Sessions the model had seen when it answered (0 = unknown): feedback calibrates
    # young and mature models' answers apart (services/common/calibration.py).
    model_sessions: int = 0
    # The calibration group clustering put the answer in ("" = the default group;
    # services/clustering/domain/model.feedback_calibrator_rows): feedback fits one
    # calibrator per group (services/feedback/domain/recalibration.fit_grouped_calibrator).
    calibration_group: str = ""



def retention_instant(ts: float, session_start: float | None, session_end: float | None) -> tuple[float, str]:
    """The instant the retention purge judges a prediction by, and the field holding it: the
    start of the session it is about when the session is known (feedback's window erasure
    takes the predictions about the sessions the window overlaps: its purge, from the
    beginning to its end, those about a session that started before the end), else the
    prediction's own time. One rule for feedback's RecordPrediction, which refuses what is
    already outside the window, and clustering's forwarder, which does not send it."""
    if session_start is not None and session_end is not None:
        return session_start, "session_start"
    return ts, "ts"
