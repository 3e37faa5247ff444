"""Feedback changes the confidence later assignments return, through the whole mesh as
real processes: assignments over HTTP (gateway -> clustering, predictions forwarded to
feedback), feedback over HTTP (gateway -> feedback), feedback's periodic check fits a
calibrator, and clustering fetches it (GetCalibrator, as svc:clustering through the
permission interceptor) and applies it to the next answers.

The probes are bare feature vectors: their predictions have no stored session, so the
feedback on them does not become a label and does not refit the model — the model
version stays the same, and the change in confidence is the calibrator's alone. The
feedback says the model is over-confident (half of its answers were someone else), so
calibrated answers must move toward the accuracy the feedback showed."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from services.testing.mesh import running_mesh
from tests.e2e.test_mesh import _iso
from tests.helpers.households import household_events, week_start_days_ago

ACCOUNTS = ("e2e-cal-1", "e2e-cal-2")
PROBES = 160


@pytest.fixture(scope="module")
def calibration_mesh(tmp_path_factory):
    """A mesh of its own: feedback checks every second and refits its calibrator after
    100 new feedback rows, clustering re-fetches calibrators every second, and the
    refit triggers stay quiet (their refits would change the model under the probes)."""
    with running_mesh(tmp_path_factory.mktemp("calibration-mesh"), extra_env={
            "HEARTH_FEEDBACK_CHECK_INTERVAL_S": "1", "HEARTH_FEEDBACK_RECALIBRATE_MIN_NEW": "100",
            "HEARTH_FEEDBACK_MIN_COHORT_SAMPLES": "1000000", "HEARTH_FEEDBACK_DISAGREEMENT_COUNT": "1000",
            "HEARTH_FEEDBACK_DISAGREEMENT_WINDOW": "1000", "HEARTH_CALIBRATOR_CACHE_S": "1"}) as m:
        yield m


def _send(c: httpx.Client, method: str, path: str, deadline_s: float = 60.0, ok=(200,), **kwargs) -> httpx.Response:
    """One request, retried while the gateway sheds load (429/503) or, for feedback,
    while the prediction has not reached the feedback service yet (404)."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = c.request(method, path, **kwargs)
        if r.status_code in ok or time.monotonic() > deadline:
            return r
        if r.status_code not in (404, 429, 503):
            return r
        time.sleep(min(float(r.headers.get("retry-after", 0.2) or 0.2), 1.0))


def _assign(c: httpx.Client, probes) -> list[dict]:
    answers = []
    for account, vector in probes:
        r = _send(c, "POST", "/v1/assign", json={"account_id": account, "feature_vector": vector})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def test_feedback_recalibrates_the_confidence_assignments_return(calibration_mesh):
    mesh = calibration_mesh
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        vectors = {}
        for n, account in enumerate(ACCOUNTS):
            events, _ = household_events(account, ("kid", "parent", "teen"), days=25,
                                         start_ts=week_start_days_ago(40), seed=n + 1)
            body = [{"event_id": e.event_id, "account_id": e.account_id, "device_id": e.device_id,
                     "device_type": e.device_type, "ts": _iso(e.ts), "kind": e.kind, "title_id": e.title_id,
                     "series_id": e.series_id, "genres": list(e.genres), "duration_s": e.duration_s,
                     "maturity": e.maturity} for e in events]
            assert _send(c, "POST", "/v1/events", json={"events": body}).status_code == 200
        deadline = time.monotonic() + 120
        for account in ACCOUNTS:
            while True:
                h = c.get(f"/v1/household/{account}").json()
                if h.get("model_version", 0) > 0 and h["status"]["persons"] == 3:
                    vectors[account] = np.array([s["feature_vector"] for s in h["sessions"] if s["feature_vector"]])
                    break
                assert time.monotonic() < deadline, h
                time.sleep(0.3)
        # Probes halfway between two of a household's sessions: answers of every confidence.
        rng = np.random.default_rng(0)
        probes = []
        for i in range(PROBES):
            account = ACCOUNTS[i % len(ACCOUNTS)]
            X = vectors[account]
            a, b = rng.integers(0, len(X), 2)
            probes.append((account, [float(v) for v in 0.5 * (X[a] + X[b])]))

        before = _assign(c, probes)
        assert not any(a["cold_start"] for a in before), before[0]     # the full model answered
        # Feedback: every other answer was someone else -> accuracy 0.5 whatever the confidence.
        for i, answer in enumerate(before):
            others = [p["person_id"] for p in answer["probabilities"] if p["person_id"] != answer["person_id"]]
            body = {"feedback_id": f"e2e-cal-fb-{i}", "prediction_id": answer["prediction_id"],
                    "kind": "explicit_confirm" if i % 2 else "explicit_correct",
                    **({} if i % 2 else {"true_person_id": others[0]})}
            r = _send(c, "POST", "/v1/feedback", json=body)
            assert r.status_code == 200, r.text

        # Feedback's periodic check recalibrates; clustering picks it up within a second.
        deadline = time.monotonic() + 120
        while True:
            after = _assign(c, probes[:10])
            if any(abs(a["confidence"] - b["confidence"]) > 0.01 for a, b in zip(after, before)):
                break
            assert time.monotonic() < deadline, "the recalibration never reached the answers"
            time.sleep(1.0)
        after = _assign(c, probes)
        calibration = c.get("/v1/calibration", params={"group_by": "variant"})
        by_age = c.get("/v1/calibration", params={"group_by": "model_age"})

    assert [a["model_version"] for a in after] == [b["model_version"] for b in before]   # same model...
    assert [a["person_id"] for a in after] == [b["person_id"] for b in before]           # ...same persons
    conf_before = np.array([b["confidence"] for b in before])
    conf_after = np.array([a["confidence"] for a in after])
    assert np.abs(conf_after - conf_before).max() > 0.05                                  # recalibrated
    # Toward what the feedback showed (half right): the over-confidence shrinks.
    assert abs(conf_after.mean() - 0.5) < abs(conf_before.mean() - 0.5) - 0.05, (conf_before.mean(), conf_after.mean())
    assert calibration.status_code == 200, calibration.text
    groups = {g["group"]: g for g in calibration.json()["groups"]}
    assert "calibrated:gmm" in groups and groups["gmm"]["n"] >= PROBES
    # Every prediction reached feedback with its model's age (clustering -> feedback), the
    # key of the calibrator's segments: none is "unknown".
    assert by_age.status_code == 200, by_age.text
    ages = {g["group"]: g["n"] for g in by_age.json()["groups"] if not g["group"].startswith("calibrated:")}
    assert "unknown" not in ages and sum(ages.values()) >= PROBES and all(a.startswith("sessions:") for a in ages), ages
