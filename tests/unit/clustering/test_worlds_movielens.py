"""Real viewers merged into accounts (bench/worlds_movielens.py), on a tiny table of the
MovieLens 100K shape written here: MovieLens itself may not be redistributed and no test
reads outside the repository. What must hold: the tables load as the module says (taste
in proportion to the stars, MovieLens's genre names, Children's films for kids), members
watch what their viewer rated (not the blind generator's latent tastes), a child's slot
gets a viewer under 18, and the same arguments give the same households."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from bench import worlds_movielens as M
from services.clustering.domain.features import FEATURE_DIM

GENRE_BLOCK = slice(10, 29)   # features.py: the genre mix
HORROR = (1, 2, 3)            # the adults rate only these
CHILDRENS = (4, 5)            # the children rate only these


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("movielens")
    films = [{"movie_id": 1, "Horror": 1}, {"movie_id": 2, "Horror": 1}, {"movie_id": 3, "Horror": 1},
             {"movie_id": 4, "Children's": 1}, {"movie_id": 5, "Children's": 1, "Animation": 1},
             {"movie_id": 6}]   # no genre flag at all
    with open(d / "films.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["movie_id", "movie_title", *M.GENRES])
        w.writeheader()
        for film in films:
            w.writerow({"movie_title": f"film {film['movie_id']}", **{g: 0 for g in M.GENRES}, **film})
    adults, kids = range(1, 17), range(17, 27)   # each half: 8 adults, 5 children
    with open(d / "viewers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user_id", "age", "gender", "occupation", "zip_code"])
        w.writeheader()
        w.writerows({"user_id": u, "age": 30 + u if u in adults else 8 + u % 5, "gender": "F",
                     "occupation": "other", "zip_code": "00000"} for u in (*adults, *kids))
    with open(d / "ratings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user_id", "movie_id", "rating", "timestamp"])
        w.writeheader()
        for u in adults:
            w.writerows({"user_id": u, "movie_id": m, "rating": 1 + (u + m) % 5, "timestamp": 0} for m in HORROR)
        for u in kids:
            w.writerows({"user_id": u, "movie_id": m, "rating": 4, "timestamp": 0} for m in CHILDRENS)
    return M.load(d)


def test_the_tables_load_as_documented(tiny):
    assert tiny.taste.shape == (26, 6)
    assert np.allclose(tiny.taste.sum(axis=1), 1.0)
    # Viewer 1 rated films 1-3 with 3, 4 and 5 stars: watched in that proportion, nothing else.
    assert np.allclose(tiny.taste[0, :3], np.array([3, 4, 5]) / 12) and not tiny.taste[0, 3:].any()
    assert tiny.genres[0] == ("Horror",) and tiny.genres[4] == ("Animation", "Children's")
    assert tiny.genres[5] == ("unknown",)
    assert tiny.maturity[3] == tiny.maturity[4] == "kids" and tiny.maturity[0] == "adult"
    assert (tiny.age < M.ADULT_AGE).sum() == 10


def _genre_slots(h) -> np.ndarray:
    block = h.features[:, GENRE_BLOCK]
    return block[block.sum(axis=1) > 0].argmax(axis=1)


def test_members_watch_what_their_viewer_rated(tiny):
    # Adults only: every film anyone watches is a horror film, so every session's genre
    # mix sits in one slot (the blind generator's own tastes would spread over many).
    hs = M.generate(families=("solo", "sharers"), worlds_per_family=1, households_per_world=2, ml=tiny)
    assert len(hs) == 4
    for h in hs:
        assert h.features.shape == (h.n_sessions, FEATURE_DIM)
        assert np.unique(_genre_slots(h)).size == 1, h.household_id


def test_a_childs_slot_gets_a_viewer_under_18(tiny):
    horror_slot = int(_genre_slots(M.generate(families=("solo",), worlds_per_family=1, households_per_world=1,
                                              ml=tiny)[0])[0])
    hs = M.generate(families=("nest",), worlds_per_family=2, households_per_world=2, ml=tiny)
    tablets = 0
    for h in hs:
        tablet = h.device_id == f"{h.household_id}-kids-tablet"
        if tablet.any():
            tablets += 1
            block = h.features[tablet][:, GENRE_BLOCK]
            slots = set(block[block.sum(axis=1) > 0].argmax(axis=1).tolist())
            assert horror_slot not in slots, (h.household_id, slots)   # children's films only
    assert tablets >= 1


def test_the_same_arguments_give_the_same_households(tiny):
    a = M.generate(families=("couples",), worlds_per_family=1, households_per_world=2, ml=tiny)
    b = M.generate(families=("couples",), worlds_per_family=1, households_per_world=2, ml=tiny)
    assert [h.household_id for h in a] == [h.household_id for h in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.features, y.features) and np.array_equal(x.person, y.person)
        assert np.array_equal(x.device_id, y.device_id)


def test_missing_data_says_how_to_fetch_it(tmp_path):
    with pytest.raises(SystemExit, match="--fetch"):
        M.load(tmp_path)


def test_its_seed_is_not_a_seed_of_another_generator():
    from bench import worlds as W
    from bench import worlds_blind as B
    assert M.MOVIELENS_SEED not in {W.TUNING.seed, W.REPORTING.seed, B.BLIND_SEED}


def test_the_tuning_and_reporting_halves_share_no_viewer(tiny):
    halves = {split: M.viewers_of(tiny, split) for split in M.SPLITS}
    seen = [set(np.concatenate(halves[split]).tolist()) for split in M.SPLITS]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {int(tiny.viewer_id[i]) % 2 for i in seen[0]} != {int(tiny.viewer_id[i]) % 2 for i in seen[1]}
    for split, (kids, adults) in halves.items():
        assert (tiny.age[kids] < M.ADULT_AGE).all() and (tiny.age[adults] >= M.ADULT_AGE).all()
    a = M.generate(families=("couples",), worlds_per_family=1, households_per_world=1, ml=tiny)
    b = M.generate(families=("couples",), worlds_per_family=1, households_per_world=1, ml=tiny, split="tuning")
    assert a[0].household_id != b[0].household_id   # the world ids name the split
