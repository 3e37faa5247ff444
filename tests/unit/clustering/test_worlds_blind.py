"""The blind worlds (bench/worlds_blind.py): deterministic, independent of the model's
internals, through the real session builder, and they hold what the module claims
(household sizes 1-6, a phone replaced mid-period, a tablet two children share,
composition changes, genre names Hearth does not know)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench import worlds_blind as B
from services.clustering.domain.features import FEATURE_DIM

ROOT = Path(__file__).resolve().parents[3]

# What the generator may import: the public event schema and session builder, the
# household container of bench/worlds.py, and generic libraries. Nothing of the model.
ALLOWED_MODULES = {"__future__", "collections", "dataclasses", "numpy", "bench.worlds",
                   "services.clustering.domain.events", "services.clustering.domain.sessions"}
ALLOWED_FROM_WORLDS = {"WorldHousehold", "CompositionChange"}


def test_the_generator_imports_nothing_of_the_model():
    tree = ast.parse((ROOT / "bench" / "worlds_blind.py").read_text())
    imported, from_worlds = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            if node.module == "bench.worlds":
                from_worlds |= {a.name for a in node.names}
    assert imported <= ALLOWED_MODULES, imported - ALLOWED_MODULES
    assert from_worlds <= ALLOWED_FROM_WORLDS   # the container only, no parameter values
    assert not {m for m in imported if m.startswith("services.clustering.domain.")} - {
        "services.clustering.domain.events", "services.clustering.domain.sessions"}


def test_its_seed_is_not_a_seed_of_the_first_generator():
    from bench import worlds as W
    assert B.BLIND_SEED not in {W.TUNING.seed, W.REPORTING.seed}


def test_deterministic_and_fewer_households_give_a_prefix():
    a = B.generate(families=("couples",), worlds_per_family=1, households_per_world=2)
    b = B.generate(families=("couples",), worlds_per_family=1, households_per_world=2)
    c = B.generate(families=("couples",), worlds_per_family=1, households_per_world=1)
    assert len(a) == 2 and len(c) == 1
    for x, y in zip(a, b):
        assert np.array_equal(x.features, y.features) and np.array_equal(x.person, y.person)
        assert np.array_equal(x.device_id, y.device_id) and np.array_equal(x.start_ts, y.start_ts)
    assert np.array_equal(a[0].features, c[0].features)
    other = B.generate(families=("couples",), worlds_per_family=1, households_per_world=1, seed=B.BLIND_SEED + 1)
    assert not (other[0].features.shape == a[0].features.shape and np.array_equal(other[0].features, a[0].features))


def _household(seed: int, **family_changes):
    family = dataclasses.replace(B.FAMILIES[family_changes.pop("base", "sharers")], **family_changes)
    rng = np.random.default_rng(seed)
    world = B.make_world(family, rng, f"test-w{seed}")
    for attempt in range(10):
        h = B.make_household(world, rng, f"test-h{seed}-{attempt}")
        if h is not None:
            return h, world
    raise AssertionError("no household with enough sessions")


def _assert_from_the_session_builder(h):
    assert h.features.shape == (h.n_sessions, FEATURE_DIM) and h.features.dtype == np.float32
    assert h.n_sessions >= B.MIN_SESSIONS and h.n_sessions <= B.MAX_SESSIONS
    assert np.all(np.diff(h.start_ts) >= 0)
    assert set(h.person.tolist()) == set(range(h.n_persons))
    # Device one-hot of the session builder agrees with the device type kept beside it.
    device_block = h.features[:, 4:10]
    assert np.allclose(device_block.sum(axis=1), 1.0)
    # Hour of day on the circle.
    assert np.allclose(h.features[:, 0] ** 2 + h.features[:, 1] ** 2, 1.0, atol=1e-5)


@pytest.mark.parametrize("size", [1, 6])
def test_households_have_the_size_drawn(size):
    h, _ = _household(11 + size, base="nest" if size > 1 else "solo", sizes=((size, 1.0),), change=(0.0, 0.0),
                      guests_per_month=(0.0, 0.0))
    _assert_from_the_session_builder(h)
    assert h.n_persons == size


def test_a_replaced_phone_is_a_new_device_of_the_same_person_from_then_on():
    h, _ = _household(5, sizes=((2, 1.0),), phone=(1.0, 1.0), churn=(1.0, 1.0), personal_share=(0.9, 0.9),
                      travel=(0.0, 0.0), change=(0.0, 0.0))
    _assert_from_the_session_builder(h)
    ids = set(h.device_id.tolist())
    replaced = sorted(d for d in ids if d.endswith("-phone2"))
    assert replaced, ids
    for new in replaced:
        old = new[:-1]
        assert old in ids
        assert h.start_ts[h.device_id == old].max() < h.start_ts[h.device_id == new].min()
        persons = set(h.person[(h.device_id == old) | (h.device_id == new)].tolist())
        assert len(persons) == 1  # one owner (no one else uses a member's phone)


def test_two_children_share_one_tablet():
    h, _ = _household(7, base="nest", sizes=((4, 1.0),), kid_chance=(1.0, 1.0), change=(0.0, 0.0))
    tablet = h.device_id == f"{h.household_id}-kids-tablet"
    assert tablet.any()
    assert np.unique(h.person[tablet]).size >= 2
    assert set(h.device_type[tablet].tolist()) == {"tablet"}


def test_a_composition_change_is_where_the_sessions_show_it():
    seen = 0
    for seed in range(20, 30):
        h, _ = _household(seed, base="couples", sizes=((3, 1.0),), change=(1.0, 1.0))
        for c in h.changes:
            seen += 1
            mine = h.person == c.person
            if c.kind == "join":
                assert not mine[:c.session_index].any() and mine[c.session_index:].any()
            else:
                assert mine[:c.session_index].any() and not mine[c.session_index:].any()
    assert seen >= 3


def test_outside_genre_names_reach_the_sessions_as_unknown():
    shares = [h.unknown_genre_share for h in B.generate(families=("sharers",), worlds_per_family=2,
                                                          households_per_world=1)]
    assert max(shares) > 0.05 and all(0.0 <= x <= 1.0 for x in shares)


def test_the_shared_evaluation_scores_them_beside_every_baseline():
    from bench import _worlds_eval as E
    hs = B.generate(families=("solo",), worlds_per_family=1, households_per_world=2)
    report = E.run(hs, streaming=False)
    block = report["all"]
    assert set(block["baselines"]) == set(E.BASELINES)
    assert block["households"] == 2 and block["sessions"] == sum(h.n_sessions for h in hs)
    assert 0.0 <= block["session_accuracy"] <= 1.0
    oracle = block["baselines"]["supervised_oracle"]["session_accuracy"]
    assert oracle >= block["baselines"]["majority"]["session_accuracy"]
    assert set(report["by_household_size"]) == {str(h.n_persons) for h in hs}
