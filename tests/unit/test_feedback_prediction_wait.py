"""POST /v1/feedback's wait for a prediction not yet forwarded (gateway/routes/feedback.py,
PredictionWait): it retries only an unknown prediction, gives up after its wait, and lets
only a few requests wait at once (each holds an admission slot of the feedback service)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.routes.feedback import PredictionWait
from services.common.errors import ERROR_FIELD_KEY


def _rpc_error(code: grpc.StatusCode, field: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata((ERROR_FIELD_KEY, field)), "refused")


class FeedbackThatLearnsLate:
    """The feedback service's answers: NOT_FOUND (prediction_id) for the first ``unknown_for``
    calls of each request, then a response."""

    def __init__(self, unknown_for: int, error: grpc.aio.AioRpcError | None = None,
                 clustering_serving: bool = True) -> None:
        self.unknown_for, self.error, self.calls = unknown_for, error, 0
        self.clustering_serving = clustering_serving

    async def serving(self, name):
        assert name == "clustering"
        return self.clustering_serving

    async def call(self, service, method, request, who):
        assert (service, method) == ("feedback", "RecordFeedback")
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.unknown_for:
            raise _rpc_error(grpc.StatusCode.NOT_FOUND, "prediction_id")
        return "recorded"


def test_a_prediction_that_arrives_during_the_wait_is_recorded():
    clients = FeedbackThatLearnsLate(unknown_for=3)
    assert asyncio.run(PredictionWait(2.0).record(clients, None, None)) == "recorded"
    assert clients.calls == 4


def test_an_id_still_unknown_after_the_wait_is_refused_naming_the_field():
    clients = FeedbackThatLearnsLate(unknown_for=10**6)

    async def scenario():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await PredictionWait(0.3).record(clients, None, None)
        return refused.value, loop.time() - started

    error, waited = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert 0.1 <= waited <= 0.3 + 0.2 and clients.calls >= 3


def test_an_id_still_unknown_while_clustering_is_down_is_unavailable_not_not_found():
    """Clustering's outbox is durable and is forwarded when it runs again: the prediction
    may still come, so 503 (retry), not a final 404."""
    from services.common.errors import Unavailable

    clients = FeedbackThatLearnsLate(unknown_for=10**6, clustering_serving=False)
    with pytest.raises(Unavailable) as refused:
        asyncio.run(PredictionWait(0.3).record(clients, None, None))
    assert refused.value.field == "prediction_id" and clients.calls >= 3


@pytest.mark.parametrize("code, field", [(grpc.StatusCode.NOT_FOUND, "true_person_id"),
                                         (grpc.StatusCode.ALREADY_EXISTS, "feedback_id"),
                                         (grpc.StatusCode.UNAVAILABLE, "")])
def test_other_refusals_are_not_retried(code, field):
    clients = FeedbackThatLearnsLate(unknown_for=0, error=_rpc_error(code, field))
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(PredictionWait(2.0).record(clients, None, None))
    assert clients.calls == 1


def test_only_a_few_requests_wait_at_once_and_none_is_left_counted():
    async def scenario():
        wait = PredictionWait(0.4, max_waiting=2)
        loop = asyncio.get_running_loop()

        async def one():
            started = loop.time()
            try:
                await wait.record(FeedbackThatLearnsLate(unknown_for=10**6), None, None)
            except grpc.aio.AioRpcError:
                return loop.time() - started

        took = sorted(await asyncio.gather(*(one() for _ in range(10))))
        return took, wait.waiting

    took, still_waiting = asyncio.run(scenario())
    assert all(t < 0.1 for t in took[:8]), took      # refused at once: no slot to wait in
    assert all(t >= 0.2 for t in took[8:]), took     # the two that waited
    assert still_waiting == 0
