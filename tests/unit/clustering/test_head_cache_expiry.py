"""The outbox encoder's cache of households' shared prediction fields (prediction_log._head)
drops every entry HEAD_CACHE_TTL_S after it was written, on a timer: a replica that did not
serve a household's Erase (forget_cached_heads runs on the one that did) keeps its bytes no
longer than that (docs/privacy.md §11, "clustering's prediction outbox")."""

from __future__ import annotations

import threading
import time

from services.clustering import prediction_log
from services.common.predictions import PredictionRecord


def _record(account: str, device: str, start: float) -> PredictionRecord:
    return PredictionRecord(prediction_id="", session_id="", person_id="", probabilities={}, account_id=account,
                            model_variant="gmm", model_version=3, ts=1_780_000_300.0, cold_start=False,
                            household_size=2, device_id=device, session_start=start, session_end=start + 30,
                            model_sessions=40, calibration_group="")


def _cached() -> bytes:
    return repr(prediction_log._HEADS).encode() + b"".join(
        b for parts in list(prediction_log._HEADS.values()) for b in parts)


def test_an_entry_leaves_the_cache_once_its_time_is_up_with_no_further_traffic(monkeypatch):
    """Written once, never read again, no erasure in this process: the household's bytes
    are gone HEAD_CACHE_TTL_S later (until session 22 they stayed until 4,096 other
    entries had filled the cache), and not before."""
    monkeypatch.setattr(prediction_log, "HEAD_CACHE_TTL_S", 0.3)
    record = _record("acc-ttl-other-replica", "tv-ttl", 1_780_000_150.0)
    written = time.monotonic()
    head = prediction_log._head(prediction_log._SHARED(record))
    assert head == prediction_log.to_request([record]).predictions[0].SerializeToString()
    assert b"acc-ttl-other-replica" in _cached() and b"tv-ttl" in _cached()
    deadline = time.monotonic() + 60   # a timer written by an earlier test may be due first
    while b"acc-ttl-other-replica" in _cached() and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = time.monotonic()
    assert b"acc-ttl-other-replica" not in _cached() and b"tv-ttl" not in _cached()
    # Not before its time, less the slack an expiry takes with it (review22: entries due
    # within HEAD_CACHE_TTL_S / _EXPIRY_BATCHES go together, one timer for all of them).
    assert gone - written >= 0.3 * (1 - 1 / prediction_log._EXPIRY_BATCHES)
    # ts's bytes too, once the expiry that dropped the head has ended: it drops the head's
    # entry, then ts's, under the cache's lock, and this test's reads take none (ops32's
    # whole-suite run at load 18 read ts's entry between the two).
    with prediction_log._cache_lock:
        assert not any(key[1] == 1_780_000_300.0 for key in prediction_log._BORN)


def test_an_expiry_drops_only_the_entries_whose_time_is_up(monkeypatch):
    monkeypatch.setattr(prediction_log, "HEAD_CACHE_TTL_S", 3600.0)
    old, new = _record("acc-ttl-old", "tv-old", 1_780_000_000.0), _record("acc-ttl-new", "tv-new", 1_780_000_500.0)
    prediction_log._head(prediction_log._SHARED(old))
    for key in [k for k in prediction_log._BORN if b"acc-ttl-old" in repr(k).encode()]:
        prediction_log._BORN[key] -= 3601.0     # written an hour and a second ago
    prediction_log._head(prediction_log._SHARED(new))
    prediction_log._expire_heads()
    assert b"acc-ttl-old" not in _cached() and b"acc-ttl-new" in _cached()
    # Written again, an entry is young again (moved to the end of the age order).
    again = prediction_log._head(prediction_log._SHARED(old))
    assert again == prediction_log.to_request([old]).predictions[0].SerializeToString()
    prediction_log._expire_heads()
    assert b"acc-ttl-old" in _cached()
    prediction_log.forget_cached_heads()
    assert not prediction_log._HEADS and not prediction_log._BORN


def test_entries_written_one_by_one_expire_in_batches_not_a_timer_thread_each(monkeypatch):
    """Entries are written at their own instants (a prediction that misses the cache);
    until review22 each expiry dropped only the entries already due and scheduled the next
    at the following one's instant: a timer thread per entry (2,239 for 2,441 entries
    written over 3 s, ~0.2 ms of CPU each). An expiry now takes what is due within the
    slack (HEAD_CACHE_TTL_S / _EXPIRY_BATCHES): at most one timer per slack, and still no
    entry outlives HEAD_CACHE_TTL_S."""
    monkeypatch.setattr(prediction_log, "HEAD_CACHE_TTL_S", 0.5)
    timers = []
    schedule = prediction_log._timer
    monkeypatch.setattr(prediction_log, "_timer", lambda delay_s: (timers.append(delay_s), schedule(delay_s)))
    started = time.monotonic()
    written = 0
    # At least 300 entries over at least 1 s: counted, not timed — on a loaded 2-core machine
    # 1 s of 1 ms sleeps wrote only 162 (refresh23's run, load 16).
    while written < 300 or time.monotonic() - started < 1.0:
        prediction_log._cache(prediction_log._STAMPS, 1, -1.0 - written, b"stamp")
        written += 1
        time.sleep(0.001)
    writing_s = time.monotonic() - started
    deadline = time.monotonic() + 60
    while prediction_log._BORN and time.monotonic() < deadline:
        # Nothing older than the TTL is ever left (a little scheduling delay allowed).
        oldest = next(iter(prediction_log._BORN.values()), None)
        assert oldest is None or time.monotonic() - oldest < 0.5 + 0.25
        time.sleep(0.005)
    assert not prediction_log._BORN and not prediction_log._STAMPS
    assert written >= 300
    # Expiries over the writing time and one TTL after it, one per 25 ms slack at most: ~60
    # for 1 s of writing (was one per entry).
    assert len(timers) <= (writing_s + 0.5) / (0.5 / prediction_log._EXPIRY_BATCHES) + 5, (len(timers), written)


def test_an_expiry_run_by_hand_leaves_one_timer_pending(monkeypatch):
    """_expire_heads while a timer is pending replaces it (no second chain of timers)."""
    monkeypatch.setattr(prediction_log, "HEAD_CACHE_TTL_S", 3600.0)
    prediction_log.forget_cached_heads()
    prediction_log._cache(prediction_log._STAMPS, 1, -0.5, b"stamp")
    prediction_log._expire_heads()
    prediction_log._expire_heads()
    pending = [t for t in threading.enumerate() if t.name == "prediction-head-expiry" and not t.finished.is_set()]
    assert len(pending) == 1
    prediction_log.forget_cached_heads()
    prediction_log._expire_heads()
    assert not [t for t in threading.enumerate() if t.name == "prediction-head-expiry" and not t.finished.is_set()]
