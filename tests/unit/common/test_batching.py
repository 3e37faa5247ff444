"""Group commit: batches many submissions, acknowledges only after flush, propagates failure."""

from __future__ import annotations

import threading

import pytest

from services.common.batching import GroupCommitter


def test_concurrent_submissions_are_batched_and_all_flushed():
    flushed: list[list[int]] = []
    gate = threading.Event()

    def flush(items):
        gate.wait(5)  # hold the first batch so that the others queue up behind it
        flushed.append(list(items))
        return len(items)

    committer = GroupCommitter(flush, max_batch=1000, max_delay_s=0.01)
    futures = [committer.submit([i]) for i in range(200)]
    gate.set()
    for f in futures:
        f.result(5)
    committer.close()
    assert sorted(x for batch in flushed for x in batch) == list(range(200))
    assert len(flushed) < 200  # batched, not one flush per submission


def test_failure_reaches_every_waiter_of_the_batch():
    def flush(items):
        raise OSError("disk full")

    committer = GroupCommitter(flush, max_delay_s=0.01)
    futures = [committer.submit([1]), committer.submit([2])]
    for f in futures:
        with pytest.raises(OSError):
            f.result(5)
    committer.close()


def test_close_flushes_pending_and_refuses_new():
    seen = []
    committer = GroupCommitter(lambda items: seen.extend(items), max_delay_s=0.05)
    future = committer.submit(["a", "b"])
    committer.close()
    assert future.done() and seen == ["a", "b"]
    with pytest.raises(RuntimeError):
        committer.submit(["c"])


def test_a_batch_holds_at_most_max_batch_items_and_a_slow_commit_times_out_its_waiter():
    flushed: list[list[int]] = []
    gate = threading.Event()

    def flush(items):
        gate.wait(5)
        flushed.append(list(items))

    committer = GroupCommitter(flush, max_batch=10, max_delay_s=0.01)
    commits = [committer.submit([i]) for i in range(35)]
    with pytest.raises(TimeoutError):   # held by the gate: not durable, not acknowledged
        commits[-1].result(0.05)
    assert not commits[-1].done()
    gate.set()
    for c in commits:
        c.result(5)
    committer.close()
    assert sorted(x for batch in flushed for x in batch) == list(range(35))
    assert max(len(batch) for batch in flushed) <= 10


def test_a_submission_heavier_than_max_batch_is_one_batch_of_its_own():
    flushed: list[list[str]] = []
    committer = GroupCommitter(lambda items: flushed.append(list(items)), max_batch=4, max_delay_s=0.01)
    committer.submit(["a"]).result(5)
    committer.submit(["chunk"], weight=9).result(5)
    committer.close()
    assert flushed == [["a"], ["chunk"]]
