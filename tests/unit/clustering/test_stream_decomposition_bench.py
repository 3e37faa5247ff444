"""bench/stream_tuning's at-arrival decomposition (issue #10, viewers32): the figures that
say where the answers at arrival lose to the batch fit on the real viewers' TUNING halves."""

import numpy as np

from bench import stream_tuning as S


def test_majority_reads_each_id_as_its_most_frequent_person():
    truth = np.array([0, 0, 1, 1, 1, 1, 1])
    # person 1 answered under two ids (a rename); id 5 is mostly person 0
    labels = np.array([5, 5, 5, 3, 3, 4, 4])
    got = S.majority_correct(truth, labels)
    assert got.tolist() == [True, True, False, True, True, True, True]


def test_periodic_refit_answers_every_session_and_keeps_ids_across_fits():
    from types import SimpleNamespace

    from bench import worlds
    h = next(h for h in worlds.generate(worlds.TUNING, worlds_per_family=1, households_per_world=1)
             if h.n_sessions >= 40)
    n = 40   # the first 40 sessions: fits at 10 and 30
    small = SimpleNamespace(n_sessions=n, features=h.features[:n], device_id=h.device_id[:n], person=h.person[:n])
    got = S.periodic_refit_correct(small, 20)
    assert got.shape == (n,) and got.dtype == bool
    # before the first fit every session is one id, and that id matches one person at most
    first = S.model_module.MIN_SESSIONS
    assert got[:first].sum() <= np.bincount(h.person[:first]).max()


def test_decomposition_by_position_pools_households():
    outs = [{"arrival_correct": [1, 0] * 10, "majority_correct": [1] * 20, "settled_correct": [1] * 20,
             "batch_correct": [1, 1] * 10},
            {"arrival_correct": [0] * 5, "majority_correct": [0] * 5, "settled_correct": [1] * 5,
             "batch_correct": [1] * 5}]
    d = S.arrival_decomposition(outs)
    assert d["accuracy"] == {"arrival": 0.4, "majority": 0.8, "settled": 1.0, "batch": 1.0}
    # sessions 0-9: ten of the first household and five of the second
    assert d["by_position"]["0-10"] == {"share": 0.6, "arrival": round(5 / 15, 3), "majority": round(10 / 15, 3),
                                        "settled": 1.0, "batch": 1.0}
    assert d["by_position"]["10-20"]["arrival"] == 0.5
    assert S.arrival_decomposition([{"accuracy": 1.0}]) is None
