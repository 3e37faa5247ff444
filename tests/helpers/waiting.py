"""Waiting on conditions the way a robust client does, for tests that run through real
processes on a machine that may be heavily loaded (CI shares 2 cores with other work).

Deadlines here are generous on purpose: a test waits for a *condition* and returns as
soon as it holds, so a long deadline costs nothing when the machine is idle and only
turns a slow pass under load into a pass instead of a spurious failure. What the tests
assert is unchanged: the condition must still hold in the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")

# How long a test waits for a condition that normally holds within a second or two.
# Start-up of a Python service (imports, migrations) takes 10-40 s at load ~20 on 2 cores.
SLOW_MACHINE_S = 120.0


# A CPU-bound test on a loaded machine gets its share of the cores, not a core: at load 25 on
# 2 cores ~1/12 of one, so 27 CPU-s took over 300 s (session 26's CI at load 18-28 failed
# test_model.py's labels-that-add-a-person on pytest's 300 s timeout). At most this many
# times longer than idle is allowed for (a test that hangs is still stopped).
MAX_SLOWDOWN = 8.0


def cpu_slowdown(load1: float | None = None, cores: int | None = None) -> float:
    """How many times longer CPU-bound work takes now than on an idle machine, measured
    now: the 1-minute load average over the cores (runnable tasks per core), at least 1
    and at most MAX_SLOWDOWN."""
    if load1 is None:
        load1 = os.getloadavg()[0]
    cores = cores or os.cpu_count() or 1
    return min(max(load1 / cores, 1.0), MAX_SLOWDOWN)


def wait_for(predicate: Callable[[], T], timeout_s: float = SLOW_MACHINE_S, what: str = "",
             interval_s: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"timed out after {timeout_s:g} s waiting for {what or predicate}"
            return value
        time.sleep(interval_s)


def wait_serving(proc, url: str, log, what: str, timeout_s: float = SLOW_MACHINE_S) -> None:
    """Until ``GET url`` answers 200 (a server a test started: prometheus, the rollout
    webhook); fails with ``log``'s text if ``proc`` exits first, naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout_s:g} s"
        time.sleep(0.1)


def retry_after_503(send: Callable[[], httpx.Response], timeout_s: float = SLOW_MACHINE_S) -> httpx.Response:
    """Send a request again while the gateway answers 503 with ``Retry-After`` (the
    documented contract: a dependency is briefly unavailable, retry after that many
    seconds), until ``timeout_s``; returns the last response. Any other answer, or a 503
    without ``Retry-After``, is returned at once for the test to judge."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = send()
        retry_after = response.headers.get("retry-after", "")
        if response.status_code != 503 or not retry_after.isdigit() or time.monotonic() > deadline:
            return response
        time.sleep(min(float(retry_after), max(0.0, deadline - time.monotonic())))


def deletion_job(client: httpx.Client, job_id: str, timeout_s: float = SLOW_MACHINE_S) -> dict:
    """Poll ``GET /v1/delete/{job_id}`` until the job has finished (completed or failed) and
    return its body; after ``timeout_s`` the last body is returned for the test to judge."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(f"/v1/delete/{job_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["state"] in ("completed", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def deletion_step_attempted(client: httpx.Client, job_id: str, service: str,
                            timeout_s: float = SLOW_MACHINE_S) -> tuple[dict, dict]:
    """Poll ``GET /v1/delete/{job_id}`` until ``service``'s step has been attempted at least
    once (a stopped service refused it); (the job's body, that step) — the last ones after
    ``timeout_s``, for the test to judge."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/delete/{job_id}").json()
        step = next(s for s in body["services"] if s["service"] == service)
        if step["attempts"] >= 1 or time.monotonic() > deadline:
            return body, step
        time.sleep(0.05)


def household_erasure_held_at(mesh, client: httpx.Client, account_id: str, service: str = "clustering") -> str:
    """With ``service`` stopped, ask for ``account_id``'s household erasure and wait until
    that step has been refused once (the job running, the step unconfirmed); ``service`` is
    started again whatever happens (not waited for). The job's id."""
    mesh.stop_process(service)
    try:
        r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": account_id}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        body, step = deletion_step_attempted(client, job_id, service)
        assert body["state"] == "running" and not step["confirmed"], body
    finally:
        mesh.start_service(service)
    return job_id
