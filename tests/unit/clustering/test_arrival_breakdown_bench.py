"""bench/arrival_breakdown (issue #10, arrival36): the device heuristic answered at arrival
reads only the sessions before, and the young-device replay renames only the answers its
rule names."""

import numpy as np

from bench import arrival_breakdown as B
from bench.worlds import WorldHousehold
from services.clustering.domain import features as F


def _household(device_type: list[str], device_id: list[str], person: list[int], hours: list[float]) -> WorldHousehold:
    n = len(device_type)
    X = np.zeros((n, F.FEATURE_DIM), dtype=np.float32)
    X[:, 0] = hours   # one feature outside the device block that tells the sessions apart
    for i, t in enumerate(device_type):
        X[i, F.DEVICE][F.DEVICE_TYPES.index(t)] = 1.0
    return WorldHousehold("h", "test", "w", X, np.array(person), np.array(device_id), np.array(device_type),
                          np.arange(n, dtype=np.float64), np.full(n, 600.0), 0.0)


def test_the_heuristic_at_arrival_reads_only_the_sessions_before():
    h = _household(["tv", "mobile", "tv", "desktop", "tv", "tv"], ["tv", "a", "tv", "b", "tv", "tv"],
                   [0, 0, 0, 1, 1, 0], [0.0, 0.0, 0.1, 5.0, 4.9, 0.2])
    got = B.causal_heuristic(h).tolist()
    # before any personal device one person; a personal device is its own id; the shared
    # session at 2 knows only device a; at 4 and 5 the nearer of a and b
    assert got == ["_one", "a", "a", "b", "b", "a"]
    # a later session's features do not move an earlier answer (the batch heuristic's
    # centroids read every session)
    later = _household(["tv", "mobile", "tv", "desktop", "tv", "tv"], ["tv", "a", "tv", "b", "tv", "tv"],
                       [0, 0, 0, 1, 1, 0], [0.0, 0.0, 0.1, -3.0, 4.9, 0.2])
    assert B.causal_heuristic(later).tolist()[:3] == got[:3]


def _trace(rows: list[dict], device_id: list[str], device_type: list[str]) -> dict:
    return {"rows": rows, "device_id": np.array(device_id), "device_type": np.array(device_type)}


def test_the_young_device_replay_names_only_young_personal_devices_of_a_fitted_model():
    device_id = ["b"] * 5 + ["a", "a", "tv", "b", "a"]
    device_type = ["desktop"] * 5 + ["mobile", "mobile", "tv", "desktop", "mobile"]
    fitted = {"cold": False, "known": True, "next_person": 3, "persons": 1, "id": "p1"}
    rows = ([{**fitted, "cold": True, "persons": 0, "folded": 0}] * 5 + [
        {**fitted, "folded": 5, "known": False},   # phone a, not known to the model: the next person
        {**fitted, "folded": 6},                   # phone a, 1 session folded in: the next person
        {**fitted, "folded": 7},                   # the TV: as answered
        {**fitted, "folded": 8, "id": "p2"},       # laptop b, 5 sessions folded in: as answered
        {**fitted, "folded": 9}])                  # phone a, 2 sessions folded in: the next person
    t = {"rows": rows, "device_id": np.array(device_id), "device_type": np.array(device_type)}
    assert B.replay_young_device(t, 1) == ["p1"] * 5 + ["p3", "p3", "p1", "p2", "p3"]
    # a model with fewer persons than min_persons answers as before
    assert B.replay_young_device(t, 2) == [r["id"] for r in rows]
