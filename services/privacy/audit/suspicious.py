"""Suspicious-activity detection over the audit stream (pure, sliding time windows).

Three rules, each per principal, each over its own sliding window ``(t - window, t]``
where ``t`` is the newest timestamp seen:

* ``mass_household_reads`` — distinct households read (``read_household`` and
  ``export`` entries; the household id is the entry's ``resource``) reaches
  ``distinct_households`` — or, for a principal the operator named a bulk reader
  (``bulk_readers``, ``HEARTH_AUDIT_BULK_READERS``: an internal reporting service's key),
  that principal's own, higher threshold;
* ``repeated_auth_failures`` — ``authentication_failure`` entries reach
  ``auth_failures``;
* ``bulk_export`` — ``export`` entries reach ``exports``, or the sum of their
  ``details["record_count"]`` reaches ``export_records``.

A rule fires once when its count reaches the threshold and re-arms only after the
count has dropped below the threshold again, so one burst gives one alert rather
than one per further entry. Entries should arrive in timestamp order; a late entry
(older than the newest seen) still counts while it lies inside the window.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.common.ids import Role
from services.privacy.audit.domain import AuditEntry, EventType


_SWEEP_EVERY = 4096  # observations between sweeps that drop idle windows


class SecurityEventKind(enum.StrEnum):
    MASS_HOUSEHOLD_READS = "mass_household_reads"
    REPEATED_AUTH_FAILURES = "repeated_auth_failures"
    BULK_EXPORT = "bulk_export"


class AlertThreshold(enum.StrEnum):
    """Whose threshold an alert crossed: the rule's own (``default``), or an expected bulk
    reader's (``bulk_reader``: only ``mass_household_reads`` of a principal named in
    ``bulk_readers``, reading with the service role). A bounded label of
    ``hearth_security_alerts_total`` (session 36: until then a bulk reader's alert was one
    more ``mass_household_reads``, told apart only in the audit entry), never the principal."""
    DEFAULT = "default"
    BULK_READER = "bulk_reader"


@dataclass(frozen=True, slots=True)
class DetectorThresholds:
    """Counts at which each rule fires, and the window they are counted over."""

    window: timedelta = timedelta(minutes=10)
    distinct_households: int = 50
    auth_failures: int = 5
    exports: int = 10
    export_records: int = 100_000
    # Principals the operator expects to read many households (an internal reporting
    # service's API key asking events/status or GET household for every account): each
    # principal -> its own distinct-households threshold over the same window. A number,
    # never "unlimited": a stolen bulk reader's key reading past its usual volume still
    # alerts. Default none (session 35; docs/operations.md, "Expected bulk readers").
    bulk_readers: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            raise ValueError(f"window: must be a positive timedelta, got {self.window!r}")
        for name in ("distinct_households", "auth_failures", "exports", "export_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        check_bulk_readers(self.bulk_readers)

    def household_reads_threshold(self, principal: str, role: Role) -> tuple[int, AlertThreshold]:
        """How many distinct households ``principal`` (acting as ``role``) may read within
        the window before ``mass_household_reads`` fires, and whose threshold that is. A bulk reader's threshold holds
        for the service role only (review35 R5): API keys and JWT subjects share one
        namespace of principal ids, so a user whose token's ``sub`` is a bulk reader's name
        would otherwise read under the reporting service's threshold."""
        if role is Role.SERVICE and principal in self.bulk_readers:
            return self.bulk_readers[principal], AlertThreshold.BULK_READER
        return self.distinct_households, AlertThreshold.DEFAULT


def check_bulk_readers(value: object) -> Mapping[str, int]:
    """``value`` if it maps principals (non-empty strings) to thresholds (ints >= 1);
    ValueError naming the principal otherwise."""
    if not isinstance(value, Mapping):
        raise ValueError(f"bulk_readers: expected a mapping of principal -> threshold, got {type(value).__name__}")
    for principal, threshold in value.items():
        if not isinstance(principal, str) or not principal.strip():
            raise ValueError(f"bulk_readers: a principal must be a non-empty string, got {principal!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"bulk_readers[{principal!r}]: must be an int >= 1 (a number of households, "
                             f"never unlimited), got {threshold!r}")
    return value


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One alert: ``count`` events of ``kind`` by ``principal`` within ``window``
    ending at ``at`` (the timestamp of the entry that crossed the threshold), against
    ``threshold``'s threshold."""

    kind: SecurityEventKind
    principal: str
    count: int
    window: timedelta
    at: datetime
    seq: int
    threshold: AlertThreshold = AlertThreshold.DEFAULT

    def details(self) -> dict[str, object]:
        """JSON-ready details for the ``security_alert`` audit entry."""
        return {
            "kind": self.kind.value,
            "principal": self.principal,
            "count": self.count,
            "window_s": self.window.total_seconds(),
            "trigger_seq": self.seq,
            "threshold": self.threshold.value,
        }


@dataclass(slots=True)
class _Window:
    """Timestamped items of one (rule, principal) with an incremental count."""

    items: deque[tuple[datetime, str, int]] = field(default_factory=deque)
    distinct: Counter[str] = field(default_factory=Counter)
    weight: int = 0
    armed: bool = True

    def add(self, ts: datetime, key: str, weight: int) -> None:
        self.items.append((ts, key, weight))
        self.distinct[key] += 1
        self.weight += weight

    def evict(self, cutoff: datetime) -> None:
        items = self.items
        while items and items[0][0] <= cutoff:
            _, key, weight = items.popleft()
            self.weight -= weight
            self.distinct[key] -= 1
            if not self.distinct[key]:
                del self.distinct[key]


class SuspiciousActivityDetector:
    """Feed audit entries with ``observe``; get ``SecurityEvent`` alerts back."""

    def __init__(self, thresholds: DetectorThresholds | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        """``clock``: the wall clock. An entry dated ahead of it counts as of now, so no
        entry moves the windows past the entries still to come (attack34: one appended
        record dated a day ahead made every later entry "too late to matter")."""
        self.thresholds = thresholds or DetectorThresholds()
        self._clock = clock
        if not isinstance(self.thresholds, DetectorThresholds):
            raise ValueError("thresholds: expected DetectorThresholds")
        self._windows: dict[tuple[str, str], _Window] = {}
        self._latest: datetime | None = None
        self._observed = 0

    def _window(self, rule: str, principal: str, cutoff: datetime) -> _Window:
        """The window of (rule, principal) with entries at or before ``cutoff`` dropped;
        windows are only pruned when touched (and by the periodic sweep), because a
        count only matters at the moment an entry is added to it."""
        key = (rule, principal)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window()
        else:
            w.evict(cutoff)
        return w

    def _check(
        self, w: _Window, value: int, threshold: int, kind: SecurityEventKind, entry: AuditEntry,
        whose: AlertThreshold = AlertThreshold.DEFAULT,
    ) -> SecurityEvent | None:
        if value < threshold:
            w.armed = True
            return None
        if not w.armed:
            return None
        w.armed = False
        return SecurityEvent(kind, entry.principal, value, self.thresholds.window, entry.ts, entry.seq, whose)

    def _evict_all(self, cutoff: datetime) -> None:
        empty = []
        for key, w in self._windows.items():
            w.evict(cutoff)
            if not w.items:
                empty.append(key)
        for key in empty:
            del self._windows[key]

    def observe(self, entry: AuditEntry) -> list[SecurityEvent]:
        """Account for one entry; return the alerts it triggers (usually none)."""
        if not isinstance(entry, AuditEntry):
            raise ValueError(f"entry: expected AuditEntry, got {type(entry).__name__}")
        t = self.thresholds
        ts = entry.ts
        if self._latest is None or ts > self._latest:
            ts = min(ts, self._clock())
            if self._latest is None or ts > self._latest:
                self._latest = ts
        cutoff = self._latest - t.window
        if ts <= cutoff:
            return []  # too late to matter for any current window
        self._observed += 1
        if self._observed % _SWEEP_EVERY == 0:
            self._evict_all(cutoff)  # bound memory held by principals gone quiet
        alerts: list[SecurityEvent] = []
        kind = entry.event_type
        if kind in (EventType.READ_HOUSEHOLD, EventType.EXPORT) and entry.resource:
            w = self._window("reads", entry.principal, cutoff)
            w.add(ts, entry.resource, 1)
            threshold, whose = t.household_reads_threshold(entry.principal, entry.role)
            alert = self._check(w, len(w.distinct), threshold, SecurityEventKind.MASS_HOUSEHOLD_READS, entry, whose)
            if alert:
                alerts.append(alert)
        if kind is EventType.AUTHENTICATION_FAILURE:
            w = self._window("auth", entry.principal, cutoff)
            w.add(ts, "", 1)
            alert = self._check(w, len(w.items), t.auth_failures,
                                SecurityEventKind.REPEATED_AUTH_FAILURES, entry)
            if alert:
                alerts.append(alert)
        if kind is EventType.EXPORT:
            records = entry.details.get("record_count", 0)
            if isinstance(records, bool) or not isinstance(records, int) or records < 0:
                records = 0  # a malformed count must not hide the export itself
            w = self._window("exports", entry.principal, cutoff)
            w.add(ts, "", records)
            over_count = len(w.items) >= t.exports
            over_records = w.weight >= t.export_records
            value = len(w.items) if over_count or not over_records else w.weight
            threshold = t.exports if over_count or not over_records else t.export_records
            alert = self._check(w, value, threshold, SecurityEventKind.BULK_EXPORT, entry)
            if alert:
                alerts.append(alert)
        return alerts

    def observe_many(self, entries: Iterable[AuditEntry]) -> list[SecurityEvent]:
        """``observe`` each entry in order; all alerts, in order."""
        alerts: list[SecurityEvent] = []
        for e in entries:
            alerts.extend(self.observe(e))
        return alerts
