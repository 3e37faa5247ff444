"""bench.evidence_probe: the links it counts and the ratios it reports."""

from __future__ import annotations

import numpy as np

from bench import evidence_probe as P
from bench.worlds import WorldHousehold


def household(start, end, device, person, series):
    n = len(start)
    return WorldHousehold("h", "f", "w", np.zeros((n, 35), np.float32), np.array(person), np.array(device),
                          np.array(["tv"] * n), np.array(start, float), np.ones(n), 0.0, [],
                          np.array(end, float), tuple(tuple(s) for s in series))


def test_overlap_links_are_pairs_on_different_devices_that_overlap():
    h = household([0, 10, 20, 100], [50, 30, 25, 120], ["tv", "phone", "tv", "phone"], [0, 1, 0, 1],
                  [(), (), (), ()])
    # 0-1 and 0-2 overlap, but 0-2 share the TV (one device cannot be two streams); 1-2 overlap
    assert sorted(map(tuple, P.overlap_links(h).tolist())) == [(0, 1), (1, 2)]


def test_series_links_join_each_session_to_the_previous_one_of_its_series():
    h = household([0, 10, 20, 30], [5, 15, 25, 35], ["tv"] * 4, [0, 1, 0, 1],
                  [("s1",), ("s2",), ("s1", "s2"), ("s1",)])
    assert sorted(map(tuple, P.series_links(h).tolist())) == [(0, 2), (1, 2), (2, 3)]


def test_probe_reports_the_same_person_share_against_the_base_rate():
    # two persons alternate; series links always join one person's sessions, overlaps never
    n = 40
    person = np.arange(n) % 2
    start = np.arange(n) * 100.0
    end = start + np.where(person == 0, 150.0, 50.0)     # person 0 overlaps the next session
    device = np.where(person == 0, "tv", "phone")
    series = [(f"s{p}",) for p in person]
    report = P.probe([household(start, end, device, person, series)])
    assert report["series_continuation"]["same_person"] == 1.0
    assert report["overlap"]["same_person"] == 0.0
    assert 0.3 < report["base_same_person"] < 0.7
    assert report["series_continuation"]["likelihood_ratio_same"] > 100
    assert report["overlap"]["likelihood_ratio_same"] < 0.01


def test_given_fit_splits_the_link_shares_by_the_fits_answer():
    # two persons alternate; a fit that answers by blocks of four sessions (half
    # right); the series links join one person's sessions, so among the pairs the fit
    # split the links are still all "same person": the link says more than the fit
    n = 40
    person = np.arange(n) % 2
    start = np.arange(n) * 100.0
    series = [(f"s{p}",) for p in person]
    h = household(start, start + 50, ["tv"] * n, person, series)
    answers = (np.arange(n) // 4) % 2
    out = P.given_fit([h], [answers])
    assert out["links"] == n - 2
    assert out["fit_split"]["same_person"] == 1.0 and out["fit_same"]["same_person"] == 1.0
    assert out["fit_split"]["links"] > 0 and out["fit_split"]["likelihood_ratio_same"] > 100
    # a fit that answers the truth: every link it joins is the same person, none split
    truth = P.given_fit([h], [person])
    assert truth["fit_same"]["links"] == n - 2 and truth["fit_split"] == {"links": 0}
