"""The gateway's admission gate (gateway/admission.py): slots, FIFO queue, bounded wait,
no slot ever leaked, and the 503 the middleware answers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.admission import OVERLOAD_RETRY_AFTER_S, AdmissionControl, Gate, route_table
from gateway.config import GatewaySettings


def run(coro):
    return asyncio.run(coro)


def test_admits_up_to_the_limit_then_queues_then_refuses_a_full_queue():
    async def scenario():
        gate = Gate("clustering", max_in_flight=2, max_queue=1, queue_timeout_s=5)
        assert await gate.acquire() == "" and await gate.acquire() == ""
        queued = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert not queued.done()
        assert await gate.acquire() == "queue_full"     # one waiter is the whole queue
        gate.release()                                  # the slot goes to the waiter
        assert await queued == ""
        assert gate.in_flight == 2
        gate.release(), gate.release()
        assert gate.in_flight == 0

    run(scenario())


def test_a_wait_longer_than_the_timeout_is_refused_and_leaks_nothing():
    async def scenario():
        gate = Gate("attribution", max_in_flight=1, max_queue=10, queue_timeout_s=0.05)
        assert await gate.acquire() == ""
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await gate.acquire() == "queue_timeout"
        assert 0.04 <= loop.time() - started < 1.0
        assert not gate._waiters
        gate.release()
        assert gate.in_flight == 0
        assert await gate.acquire() == ""               # the slot is free again

    run(scenario())


def test_waiters_are_served_first_in_first_out_and_newcomers_do_not_overtake():
    async def scenario():
        gate = Gate("privacy", max_in_flight=1, max_queue=5, queue_timeout_s=5)
        assert await gate.acquire() == ""
        order = []

        async def waiter(k):
            assert await gate.acquire() == ""
            order.append(k)

        tasks = [asyncio.create_task(waiter(k)) for k in range(3)]
        await asyncio.sleep(0.01)
        for _ in range(3):
            gate.release()
            await asyncio.sleep(0.01)
            assert gate.in_flight == 1
        assert order == [0, 1, 2]
        await asyncio.gather(*tasks)

    run(scenario())


def test_a_cancelled_waiter_gives_up_its_place_without_losing_a_slot():
    async def scenario():
        gate = Gate("feedback", max_in_flight=1, max_queue=5, queue_timeout_s=5)
        assert await gate.acquire() == ""
        task = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release()
        assert gate.in_flight == 0 and not gate._waiters

    run(scenario())


def test_the_middleware_answers_503_overloaded_with_retry_after_and_skips_unbacked_paths():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    release = asyncio.Event()

    async def slow(_request):
        await release.wait()
        return JSONResponse({"ok": True})

    async def health(_request):
        return JSONResponse({"status": "SERVING"})

    backed = [Route("/v1/household/{account_id}", slow)]
    inner = Starlette(routes=[*backed, Route("/health", health)])

    async def scenario():
        gate = Gate("clustering", max_in_flight=1, max_queue=0, queue_timeout_s=0)
        app = AdmissionControl(inner, {"clustering": gate}, route_table({"clustering": backed}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            first = asyncio.create_task(c.get("/v1/household/a-1"))
            while gate.in_flight == 0:      # the first request holds the one slot (not a fixed
                await asyncio.sleep(0.001)  # sleep: a stalled loop made the second one take it)
            refused = await c.get("/v1/household/a-2")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == str(OVERLOAD_RETRY_AFTER_S)
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["content-type"] == "application/json"
            assert (await c.get("/health")).status_code == 200   # never limited
            release.set()
            assert (await first).status_code == 200
            assert gate.in_flight == 0

    run(scenario())


def test_settings_validate_admission_limits_by_service_name(monkeypatch):
    monkeypatch.setenv("HEARTH_ADMISSION_LIMITS",
                       '{"attribution": {"max_in_flight": 4, "max_queue": 8, "queue_timeout_s": 2}}')
    s = GatewaySettings()
    assert s.admission_for("attribution").max_in_flight == 4
    assert s.admission_for("clustering") == s.admission_default
    monkeypatch.setenv("HEARTH_ADMISSION_LIMITS", '{"clusterin": {"max_in_flight": 4, "max_queue": 8, '
                                                  '"queue_timeout_s": 2}}')
    with pytest.raises(ValueError, match="clusterin"):
        GatewaySettings()
    monkeypatch.setenv("HEARTH_ADMISSION_LIMITS", '{"clustering": {"max_in_flight": 0, "max_queue": 8, '
                                                  '"queue_timeout_s": 2}}')
    with pytest.raises(ValueError, match="max_in_flight"):
        GatewaySettings()
