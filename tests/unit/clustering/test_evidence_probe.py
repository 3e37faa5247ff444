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
