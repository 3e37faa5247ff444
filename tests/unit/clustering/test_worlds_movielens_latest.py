"""The second population of real viewers merged into accounts (bench/worlds_movielens_latest.py),
on tiny tables of the latest-small shape written here: MovieLens may not be redistributed
and no test reads outside the repository. What must hold: the tables load as the module
says (taste in proportion to the stars, the release's own genre names, "Children" films
for kids, no ages), the two halves hold disjoint people, every member of a household is a
distinct viewer of the household's half who watches what that viewer rated, the fetch's
conversion round-trips, and its unpickler runs nothing but a frame's own rebuilding."""

from __future__ import annotations

import csv
import pickle
import re
from collections import Counter

import numpy as np
import pytest

from bench import worlds_movielens as M
from bench import worlds_movielens_latest as L

VIEWERS = range(1, 15)   # viewer u rates film u only, so a title names its viewer
UNRATED = 99


def _genres_of(film: int) -> str:
    return ("Children|Animation", "Horror|IMAX", "(no genres listed)")[film % 3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("movielens_latest")
    with open(d / "films.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        w.writerows([(u, f"film {u}, a title with a comma", _genres_of(u)) for u in VIEWERS] + [(UNRATED, "none", "")])
    with open(d / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows((u, u, 0.5 * (1 + u % 10), 1_000_000_000 + u) for u in VIEWERS)
        w.writerow((1, 2, 4.5, 0))   # viewer 1 also rated film 2: 1 star vs 4.5
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return L.load(tiny_dir)


def test_the_tables_load_as_documented(tiny):
    assert tiny.taste.shape == (14, 15)
    assert np.allclose(tiny.taste.sum(axis=1), 1.0)
    assert np.allclose(tiny.taste[0, :2], np.array([1.0, 4.5]) / 5.5) and not tiny.taste[0, 2:].any()
    assert tiny.genres[0] == ("Horror", "IMAX") and tiny.genres[1] == ("(no genres listed)",)
    assert tiny.genres[2] == ("Children", "Animation") and tiny.genres[-1] == ()
    assert tiny.maturity[2] == "kids" and tiny.maturity[0] == tiny.maturity[1] == "adult"
    assert (tiny.age == M.UNKNOWN_AGE).all() and tiny.viewer_id.tolist() == list(VIEWERS)


def test_the_halves_share_no_viewer_and_any_viewer_may_fill_a_childs_slot(tiny):
    halves = {split: M.viewers_of(tiny, split, L.SPLITS) for split in L.SPLITS}
    for split, (kids, adults) in halves.items():
        assert kids.tolist() == adults.tolist()   # no ages: a child's slot may take anyone of the half
        assert {int(u) % 2 for u in tiny.viewer_id[adults]} == {L.SPLITS[split][1]}
    assert not set(halves["reporting"][1].tolist()) & set(halves["tuning"][1].tolist())


def _viewers_watched(h, tiny) -> dict[int, Counter]:
    """Per true person: how many play events of each viewer's film (film u is viewer u's)."""
    starts, ends = h.start_ts, h.end_ts   # an event's session: its device's, spanning its time
    out: dict[int, Counter] = {}
    for e in h.events:
        if e.kind == "browse":
            continue
        j = int(re.fullmatch(r".*-t(\d+)", e.title_id).group(1))
        i = np.flatnonzero((h.device_id == e.device_id) & (starts <= e.ts) & (e.ts <= ends))
        if i.size:
            out.setdefault(int(h.person[i[0]]), Counter())[int(tiny.viewer_id[j]) if j < 14 else -1] += 1
    return out


@pytest.mark.parametrize("split", ["reporting", "tuning"])
def test_members_are_distinct_viewers_of_their_half_watching_what_they_rated(tiny, split):
    hs = L.generate(families=("couples",), worlds_per_family=1, households_per_world=2, ml=tiny, split=split,
                    keep_events=True)
    assert len(hs) == 2 and all(h.world_id.startswith(f"mllatest-{split}-") for h in hs)
    parity = L.SPLITS[split][1]
    for h in hs:
        watched = _viewers_watched(h, tiny)
        assert watched, h.household_id
        # Every film watched is one a viewer of this half rated (guests included).
        assert {u % 2 for c in watched.values() for u in c} == {parity}, (h.household_id, watched)
        # Each person mostly watches one viewer's films, and no two persons are the same viewer.
        main = [c.most_common(1)[0][0] for c in watched.values()]
        assert len(set(main)) == len(main), (h.household_id, watched)


def test_the_genre_names_reach_the_session_builder_as_the_release_spells_them(tiny):
    h = L.generate(families=("solo",), worlds_per_family=1, households_per_world=1, ml=tiny, keep_events=True)[0]
    names = {g for e in h.events for g in e.genres}
    assert names <= {"Children", "Animation", "Horror", "IMAX", "(no genres listed)"} and names
    # Names the vocabulary does not know are counted, not dropped or renamed on the way.
    unknown = {"Children", "IMAX", "(no genres listed)"}
    share = sum(g in unknown for e in h.events for g in e.genres) / sum(len(e.genres) for e in h.events)
    assert h.unknown_genre_share == pytest.approx(share) and share > 0


def test_a_frame_written_then_loaded_round_trips(tmp_path):
    # What fetch writes from the dslabs frame: any object with columns that have .tolist().
    frame = {"movieId": np.array([7, 3, 7]), "title": np.array(["Seven, the film", "Three", "Seven, the film"]),
             "genres": np.array(["Drama|Sci-Fi", "IMAX", "Drama|Sci-Fi"]), "userId": np.array([2, 2, 5]),
             "rating": np.array([4.0, 1.0, 2.5]), "timestamp": np.array([10, 11, 12])}
    L.write_tables(frame, tmp_path)
    ml = L.load(tmp_path)
    assert ml.genres == (("IMAX",), ("Drama", "Sci-Fi")) and ml.viewer_id.tolist() == [2, 5]
    assert np.allclose(ml.taste, [[0.2, 0.8], [0.0, 1.0]])


class _RunsSomething:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return os.mkdir, (str(self.path),)


def test_the_unpickler_rebuilds_arrays_and_runs_nothing_else(tmp_path):
    assert L.safe_unpickle(pickle.dumps(np.arange(4))).tolist() == [0, 1, 2, 3]
    target = tmp_path / "made"
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        L.safe_unpickle(pickle.dumps(_RunsSomething(target)))
    assert not target.exists()


def test_missing_data_says_how_to_fetch_it(tmp_path):
    with pytest.raises(SystemExit, match="--fetch"):
        L.load(tmp_path)


def test_its_seeds_are_no_other_generators(tiny):
    from bench import worlds as W
    from bench import worlds_blind as B
    others = {W.TUNING.seed, W.REPORTING.seed, B.BLIND_SEED, M.MOVIELENS_SEED, M.MOVIELENS_TUNING_SEED}
    assert not {L.LATEST_SEED, L.LATEST_TUNING_SEED} & others


def test_the_tuning_half_is_there_for_the_feedback_tools(monkeypatch):
    from bench import feedback_shipped, label_feedback
    calls = []
    monkeypatch.setattr(L, "generate", lambda **kw: calls.append(kw) or [])
    assert label_feedback.households("movielens-latest-tuning", 0, 2, 3) == []
    assert calls == [{"worlds_per_family": 2, "households_per_world": 3, "split": "tuning"}]
    assert "movielens-latest-tuning" in feedback_shipped.SPLITS and "reporting" not in feedback_shipped.SPLITS
