"""The model refresh after a big batch asks feedback for its households' variants in one
call (session 32, ingest32): ``GetVariants`` on feedback, ``FeedbackPeer.warm_variants`` in
clustering, and the refresh loop taking its queue up to ``REFRESH_BATCH`` households at a
time. Before, each household's refresh asked ``GetExperiment`` on its own (which also reads
feedback's label set for the per-variant results). Each household is still refreshed on its
own: one that fails does not keep the others from their models."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.clustering.app import ClusteringApp
from services.clustering.modeling import ModelKeeper
from services.clustering.peers import FeedbackPeer
from services.clustering.store import ClusteringStore
from services.common.errors import ERROR_FIELD_KEY
from services.common.storage.sql import SqliteDatabase
from tests.conftest import ADMIN
from tests.integration.test_ingest_new_households import GAP_S, _batch

ACCOUNTS = [f"acc-{i}" for i in range(40)]


def _call(stub, method: str, request):
    return getattr(stub, method)(request, metadata=ADMIN.metadata("feedback"), timeout=10)


def test_get_variants_answers_get_experiment_s_variant_of_each_household_in_one_call(start_service):
    running, channel = start_service("feedback", clustering_addr="127.0.0.1:1", privacy_addr="127.0.0.1:1")
    stub = fpb_grpc.FeedbackServiceStub(channel)
    _call(stub, "SetFlag", fpb.SetFlagRequest(traffic={"gmm": 50.0, "kmeans": 50.0}, reason="a split"))
    expected = [_call(stub, "GetExperiment", fpb.GetExperimentRequest(account_id=a)).variant for a in ACCOUNTS]
    assert set(expected) == {"gmm", "kmeans"}
    assert list(_call(stub, "GetVariants", fpb.GetVariantsRequest(account_ids=ACCOUNTS)).variants) == expected
    assert list(_call(stub, "GetVariants", fpb.GetVariantsRequest()).variants) == []
    for request, field in ((fpb.GetVariantsRequest(account_ids=["acc-1", "not valid"]), "account_ids[1]"),
                           (fpb.GetVariantsRequest(account_ids=[f"a-{i}" for i in range(10_001)]), "account_ids")):
        with pytest.raises(grpc.RpcError) as info:
            _call(stub, "GetVariants", request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(info.value.trailing_metadata()).get(ERROR_FIELD_KEY) == field

    # Clustering's peer: one GetVariants for the households, then variant_of answers from it.
    peer = FeedbackPeer(f"127.0.0.1:{running.port}")
    asked: list[str] = []
    call = peer.peer.call
    peer.peer.call = lambda method, *a, **kw: (asked.append(method), call(method, *a, **kw))[1]
    try:
        peer.warm_variants(ACCOUNTS + ACCOUNTS[:3])
        assert [peer.variant_of(a) for a in ACCOUNTS] == expected
        assert asked == ["GetVariants"]
        peer.warm_variants(ACCOUNTS)   # all cached: not asked again
        assert asked == ["GetVariants"]
    finally:
        peer.close()


def test_a_feedback_that_does_not_answer_leaves_each_refresh_to_ask_for_its_own():
    """Nothing listens: nothing cached, no exception (a replica older than GetVariants
    answers UNIMPLEMENTED, taken the same way); variant_of falls back as before."""
    peer = FeedbackPeer("127.0.0.1:1", timeout_s=0.5)
    try:
        peer.warm_variants(ACCOUNTS[:5])
        assert peer._variants == {}
        assert peer.variant_of(ACCOUNTS[0]) == "gmm"
    finally:
        peer.close()


class _FailingFor(ModelKeeper):
    """A keeper whose refresh of one household fails (its fit, its key, the database)."""

    failing = ""

    def refresh(self, account_id, **kwargs):
        if account_id == self.failing:
            raise RuntimeError(f"refresh of {account_id} failed")
        return super().refresh(account_id, **kwargs)


def test_the_refresh_loop_asks_one_call_for_its_queue_and_refreshes_each_household_on_its_own(tmp_path):
    """Seen failing before the change: no ``warm_variants``; each of the 40 refreshes asked
    for its household's variant on its own."""
    store = ClusteringStore(SqliteDatabase(tmp_path / "c.db"), gap_s=GAP_S)
    store.migrate()
    store.ingest(_batch(random.Random(5), ACCOUNTS))
    variant_calls: list[str] = []
    warmed: list[list[str]] = []
    cached: dict[str, str] = {}
    lock = threading.Lock()

    def variant_of(account: str) -> str:
        with lock:
            if account not in cached:
                variant_calls.append(account)
            return cached.get(account, "gmm")

    def warm(accounts: list[str]) -> None:
        warmed.append(list(accounts))
        cached.update((a, "kmeans" if i % 2 else "gmm") for i, a in enumerate(accounts))

    keeper = _FailingFor(store, variant_of)
    keeper.failing = ACCOUNTS[7]
    app = ClusteringApp(store, keeper=keeper, background=False, warm_variants=warm)
    try:
        for account in ACCOUNTS:
            app.schedule_refresh(account)
        app._worker.start()
        app.drain(120)
        assert warmed == [ACCOUNTS]
        assert variant_calls == []
        models = {a: store.get_model(a) for a in ACCOUNTS}
        assert [a for a, m in models.items() if m is None] == [ACCOUNTS[7]]
        # Each model of the variant the one call answered for its household.
        assert {a: keeper.load(a)[1].model.variant for a, m in models.items() if m is not None} == {
            a: cached[a] for a in ACCOUNTS if a != ACCOUNTS[7]}
    finally:
        app.close()
