"""bench.composition_free: join/leave change points on the session stream itself (no
fitted persons). Hand-made streams whose change is known: a newcomer on a phone of
their own, a newcomer at other hours, a household watching more often; and a stable
household, which must raise nothing at the bars."""

import numpy as np

from bench import composition_free as C
from bench.worlds import CompositionChange, WorldHousehold
from services.clustering.domain import features as F

DAY = 86_400.0


def stream(rng, n=220, change_at=None, newcomer=None):
    """n sessions of one member on the TV, one every ~2 days at 20-22 h, drama; from session
    ``change_at`` every other session is the newcomer's: ``newcomer`` says how
    ("phone": on a phone of their own, same hours; "morning": on the TV at 7-9 h, kids
    titles, the household's sessions four times as frequent)."""
    gaps = rng.exponential(2.0, n)
    if newcomer == "morning":
        gaps[change_at:] *= 0.25    # a heavy viewer: their sessions come on top of the old member's
    day = np.floor(np.cumsum(gaps))
    hour = rng.uniform(20, 22, n)
    device = np.array(["tv"] * n, dtype=object)
    dtype = np.array(["tv"] * n, dtype=object)
    genre = np.zeros((n, len(F.GENRES)))
    genre[:, F.GENRES.index("drama")] = 1.0
    kids = np.zeros(n)
    person = np.zeros(n, int)
    changes = []
    if change_at is not None:
        theirs = np.arange(change_at, n, 2)
        person[theirs] = 1
        changes = [CompositionChange("join", 1, change_at)]
        if newcomer == "phone":
            device[theirs], dtype[theirs] = "phone-new", "mobile"
        else:
            hour[theirs] = rng.uniform(7, 9, theirs.size)
            genre[theirs] = 0.0
            genre[theirs, F.GENRES.index("kids")] = 1.0
            kids[theirs] = 1.0
    ts = day * DAY + hour * 3600.0
    order = np.argsort(ts, kind="stable")
    X = F.features_matrix(ts, [F.device_index(t) for t in dtype], genre * 3600.0, kids * 3600.0, np.zeros(n),
                          np.full(n, 3600.0), np.zeros(n), np.ones(n), np.zeros(n))
    return WorldHousehold("h", "f", "w", X[order], person[order], device[order].astype(str),
                          dtype[order].astype(str), ts[order], np.full(n, 3600.0), 0.0, changes)


def first_event_after(evs, at):
    return next(((n, k) for n, k in evs if n >= at), None)


def test_a_newcomer_on_a_phone_of_their_own_is_a_join_within_30_sessions():
    h = stream(np.random.default_rng(1), change_at=100, newcomer="phone")
    hit = first_event_after(C.events(h, "new_device", 3.0), 100)
    assert hit is not None and hit[0] <= 130 and hit[1] == "join"
    # the device mix test sees the same phone
    assert any(100 <= n <= 130 for n, _ in C.events(h, "device", 8.0))


def test_a_newcomer_at_other_hours_moves_the_hour_and_genre_profiles():
    h = stream(np.random.default_rng(2), change_at=100, newcomer="morning")
    for group in ("hour", "genre", "kids"):
        evs = C.events(h, group, 10.0)
        assert any(100 <= n <= 130 for n, _ in evs), group
        assert not any(n < 100 for n, _ in evs), group
    # a second member doubles the session rate: the rate test names it a join
    rate = [k for n, k in C.events(h, "rate", 8.0) if 100 <= n <= 130]
    assert rate and rate[0] == "join"


def test_a_stable_household_raises_nothing_at_the_bars():
    for seed in range(3):
        h = stream(np.random.default_rng(10 + seed))
        # every group's statistics at every check, computed once for the five groups (as
        # the bench does): events() recomputes only after a firing restarts the detector
        tab = C.session_table(h)
        cached = [(n, C.statistics(tab, 0, n)) for n in C.check_points(h.n_sessions)]
        for group in ("hour", "genre", "kids", "device", "new_device"):
            bar = 3.0 if group == "new_device" else 10.0
            assert C.events(h, group, bar, tab, cached) == [], (seed, group)


def test_one_change_is_one_event_the_detector_restarts_after_it():
    """After a firing the next tests only look at sessions from its change point on, so a
    lasting change is not reported again at every later check (at a bar it passes by far)."""
    h = stream(np.random.default_rng(3), change_at=100, newcomer="morning")
    evs = C.events(h, "hour", 10.0)
    assert len([n for n, _ in evs if n >= 100]) == 1
    # without the restart the same statistic stays over the bar at the next checks
    later = [max(s["hour"] for s in C.statistics(C.session_table(h), 0, n)) for n in (140, 150)]
    assert min(later) >= 10.0


def test_the_statistics_are_zero_without_a_change_and_say_the_rate_direction():
    same = np.array([5.0, 3.0, 2.0])
    assert C._multinomial_llr(same * 4, same) < 1e-6
    # a category empty in both segments adds nothing
    assert C._multinomial_llr(np.r_[same * 4, np.zeros(20)], np.r_[same, np.zeros(20)]) < 1e-6
    assert C._multinomial_llr(np.array([20.0, 0.0, 0.0]), np.array([0.0, 0.0, 10.0])) > 5
    rng = np.random.default_rng(4)
    llr, direction = C._rate_llr(rng.exponential(24.0, 60), rng.exponential(8.0, 20))
    assert llr > 5 and direction == 1
    _, direction = C._rate_llr(rng.exponential(8.0, 60), rng.exponential(24.0, 20))
    assert direction == -1


def test_the_union_of_two_detectors_keeps_each_event_once():
    assert C.union([(20, "join"), (40, "leave")], [(40, "leave"), (50, "join")]) == [
        (20, "join"), (40, "leave"), (50, "join")]
