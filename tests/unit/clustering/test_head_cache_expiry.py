"""The outbox encoder's cache of households' shared prediction fields (prediction_log._head)
drops every entry HEAD_CACHE_TTL_S after it was written, on a timer: a replica that did not
serve a household's Erase (forget_cached_heads runs on the one that did) keeps its bytes no
longer than that (docs/privacy.md §11, "clustering's prediction outbox")."""

from __future__ import annotations

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
    assert gone - written >= 0.3
    assert not any(key[1] == 1_780_000_300.0 for key in prediction_log._BORN)   # ts's bytes too


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
