"""bench/pair_merge.py: pair evidence as a merge and a split test on fitted persons
(docs/clustering.md 4n)."""

import numpy as np
import pytest

from bench import pair_merge as PG


def _blocks(sizes: list[int], within: list[float], across: float) -> tuple[np.ndarray, np.ndarray]:
    truth = np.repeat(np.arange(len(sizes)), sizes)
    L = np.full((truth.size, truth.size), across, dtype=np.float64)
    for k, w in enumerate(within):
        sel = truth == k
        L[np.ix_(sel, sel)] = w
    np.fill_diagonal(L, 0.0)
    return L, truth


def test_means_are_over_distinct_pairs_within_and_all_pairs_between():
    L, truth = _blocks([3, 2], within=[2.0, 1.0], across=-1.0)
    M, within, size = PG._means(L, truth)
    assert within.tolist() == pytest.approx([2.0, 1.0])      # the zero diagonal is not a pair
    assert M[0, 1] == pytest.approx(-1.0) and size.tolist() == [3, 2]


def test_merge_joins_one_member_split_in_two_and_keeps_two_members_apart():
    L, truth = _blocks([10, 10], within=[2.0, 2.0], across=-2.0)
    fitted = np.repeat([0, 1, 2], [5, 5, 10])                 # member 0 over-counted as persons 0 and 1
    none = np.full(20, -1)
    out = PG.merge_persons(L, fitted, none, threshold=0.0)
    assert np.unique(out).size == 2 and (out[:10] == out[0]).all() and out[10] != out[0]
    # a bar above the evidence merges nothing; one below the members' score merges everything
    assert np.unique(PG.merge_persons(L, fitted, none, threshold=2.5)).size == 3
    assert np.unique(PG.merge_persons(L, fitted, none, threshold=-2.5)).size == 1


def test_keep_devices_never_merges_two_persons_who_each_hold_a_personal_device():
    L, truth = _blocks([10, 10], within=[2.0, 2.0], across=-2.0)
    fitted = np.repeat([0, 1, 2], [5, 5, 10])
    devices = np.full(20, -1)
    devices[:5], devices[5:10] = 0, 1                         # one owner's phone and tablet kept apart
    assert np.unique(PG.merge_persons(L, fitted, devices, 0.0, keep_devices=True)).size == 3
    assert np.unique(PG.merge_persons(L, fitted, devices, 0.0, keep_devices=False)).size == 2
    devices[5:10] = -1                                        # only one of them holds a device
    assert np.unique(PG.merge_persons(L, fitted, devices, 0.0, keep_devices=True)).size == 2


def test_the_relative_score_reads_the_cross_pairs_against_each_persons_own():
    # a household whose pairs all score high: the absolute bar merges the two members, the
    # relative one sees that their cross pairs agree far less than their own
    L, truth = _blocks([10, 10, 10], within=[6.0, 6.0, 6.0], across=2.0)
    L[:10, 10:20] = L[10:20, :10] = 6.0                       # members 0 and 1 fitted apart are one
    fitted = truth
    none = np.full(30, -1)
    assert np.unique(PG.merge_persons(L, fitted, none, 1.0, score="absolute")).size == 1
    out = PG.merge_persons(L, fitted, none, -1.0, score="relative")
    assert np.unique(out).size == 2 and out[0] == out[10] != out[20]
    with pytest.raises(ValueError):
        PG.pair_scores(L, fitted, "other")


def test_split_divides_a_person_the_pair_model_sees_as_two_and_keeps_one_whole():
    L, truth = _blocks([15, 15, 20], within=[3.0, 3.0, 3.0], across=-4.0)
    fitted = np.repeat([0, 1], [30, 20])                      # members 0 and 1 fitted as one person
    none = np.full(50, -1)
    out = PG.split_persons(L, fitted, none, threshold=-3.0, min_size=8)
    assert np.unique(out).size == 3
    assert (out[:15] == out[0]).all() and (out[15:30] == out[15]).all() and out[0] != out[15]
    # the parts score -4 between them: a bar below that, or parts smaller than min_size, keep it one
    assert np.unique(PG.split_persons(L, fitted, none, threshold=-5.0, min_size=8)).size == 2
    assert np.unique(PG.split_persons(L, fitted, none, threshold=-3.0, min_size=16)).size == 2


def test_split_keeps_a_personal_device_whole():
    L, truth = _blocks([15, 15], within=[3.0, 3.0], across=-4.0)
    devices = np.full(30, -1)
    devices[[0, 1, 2, 20, 21, 22]] = 0                        # a device whose sessions the pairs call apart
    out = PG.split_persons(L, np.zeros(30, dtype=np.int64), devices, threshold=-1.0, min_size=8)
    assert len({out[k] for k in (0, 1, 2, 20, 21, 22)}) == 1


def _scored(hearth: list[np.ndarray], truth: list[np.ndarray], Ls: list[np.ndarray], world: list[str]):
    return [PG.Scored(f"h{k}", w, t, L, np.full(t.size, -1), {"hearth_batch": p})
            for k, (p, t, L, w) in enumerate(zip(hearth, truth, Ls, world))]


def test_choose_takes_a_test_that_beats_hearth_and_refuses_one_that_splits_single_viewers():
    over_L, over_t = _blocks([10, 10], within=[2.0, 2.0], across=-2.0)
    single_L, single_t = _blocks([20], within=[1.0], across=0.0)
    single_L[:10, 10:] = single_L[10:, :10] = -3.0           # one viewer with two kinds the pairs see apart
    scored = _scored([np.repeat([0, 1, 2], [5, 5, 10]), np.zeros(20, dtype=np.int64)],
                     [over_t, single_t], [over_L, single_L], ["w0", "w1"])
    before = PG.figures(scored, [s.answers["hearth_batch"] for s in scored])
    assert before["household_size_exact"] == 0.5
    merges = [PG.MergeTest("absolute", t) for t in (2.5, 0.0)]
    best, table = PG.choose(scored, merges, before)
    assert best == PG.MergeTest("absolute", 0.0) and len(table) == 2
    # a split that would fix nothing and split the single viewer is never chosen
    splits = [PG.SplitTest("absolute", -2.0, 8)]
    assert PG.figures(scored, PG.apply_tests(scored, (splits[0],)))["single_person_kept"] == 0.0
    assert PG.choose(scored, splits, before)[0] is None
    moved = PG.changed(scored, PG.apply_tests(scored, (best,)))
    assert moved == {"households_changed": 1, "closer": 1, "further": 0}


def test_diagnose_counts_one_member_pairs_and_the_auc_reads_their_scores():
    L, truth = _blocks([10, 10], within=[2.0, 2.0], across=-2.0)
    scored = _scored([np.repeat([0, 1, 2], [5, 5, 10])], [truth], [L], ["w0"])
    d = PG.diagnose(scored, min_size=4)["merge_absolute"]
    # persons 0 and 1 are one member (score 2), each of them against person 2 two (score -2)
    assert (d["pairs_one_member"], d["pairs_two_members"]) == (1, 2)
    assert d["auc"] == 1.0 and d["households_fixable"] == 1 and d["households_no_merge_right"] == 0
    assert PG._auc(np.array([0.0, 1.0]), np.array([0.0])) == 0.75
    assert PG._auc(np.array([]), np.array([1.0])) is None
