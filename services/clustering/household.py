"""The stored form of a household model and the service's policy around it.

The domain's ``HouseholdModel`` knows persons; the service also needs to know *which*
stored sessions the model has seen, where its last full refit was (the reference the
drift detector compares against) and how far drift has been checked. Those travel with
the model in one versioned blob (an "envelope") so that one compare-and-swap updates
both together.

Sessions are identified by their position in the household's closed sessions ordered
by (start, session id). Anything that could shift those positions (an erasure, late
events rebuilding a session, a session that closes after later-starting ones were folded
in: overlapping sessions on two devices) makes the service refit from scratch instead,
which is also what makes erasure exact: the model after a deletion *is* the model fitted
on the remaining sessions. The envelope keeps the first session's id and the id at its
last included position to see such a shift.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from services.clustering.domain.model import HouseholdModel, PopulationPrior

ENVELOPE_VERSION = 1
MICRO_BATCH = 10          # new closed sessions folded into the model at a time
MIN_DRIFT_REFERENCE = 30  # sessions needed before drift is monitored


@dataclass
class Envelope:
    model: HouseholdModel
    included: int = 0        # closed sessions [0, included) are in the model
    reference_end: int = 0   # sessions [0, reference_end) were the last full refit
    drift_checked: int = 0   # sessions [0, drift_checked) went through the drift detector
    first_session_id: str = ""  # detects a shifted session list (erasure, late events)
    last_refit: float = 0.0     # UTC seconds of the last fit on every session (0 = unknown)
    # the session at position included - 1 when saved: detects a session inserted before it
    # ("" = an envelope saved before this was kept: not checked)
    last_included_id: str = ""
    # The drift detector's state after the last drift check (ModelKeeper._check_drift,
    # DriftDetector.checkpoint): the next fold resumes it instead of rebuilding the
    # detector over the whole reference. None: rebuilt at the next check. Kept in the
    # header (an older replica ignores the key, and its save drops the state: rebuilt).
    drift_state: dict | None = None

    def to_bytes(self) -> bytes:
        fields = {"v": ENVELOPE_VERSION, "included": self.included,
                  "reference_end": self.reference_end, "drift_checked": self.drift_checked,
                  "first_session_id": self.first_session_id,
                  "last_refit": self.last_refit, "last_included_id": self.last_included_id}
        if self.drift_state is not None:
            fields["drift_state"] = self.drift_state
        header = json.dumps(fields).encode()
        return struct.pack("<I", len(header)) + header + self.model.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, prior: PopulationPrior | None) -> "Envelope":
        (n,) = struct.unpack_from("<I", data)
        header = json.loads(data[4:4 + n])
        if header.get("v") != ENVELOPE_VERSION:
            raise ValueError(f"unsupported household envelope version {header.get('v')}")
        return cls(HouseholdModel.from_bytes(data[4 + n:], prior), header["included"],
                   header["reference_end"], header["drift_checked"], header.get("first_session_id", ""),
                   float(header.get("last_refit", 0.0)), header.get("last_included_id", ""),
                   header.get("drift_state"))
