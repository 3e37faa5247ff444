"""Session builder: gaps, late events, duplicates, features, and order independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.clustering.domain import features as F
from services.clustering.domain.events import ViewingEvent, validate_batch
from services.clustering.domain.sessions import build_sessions, split_by_gap
from services.common.errors import InvalidArgument

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a Thursday


def ev(i, ts, **kw):
    base = dict(event_id=f"e{i}", account_id="a", device_id="d", device_type="tv", ts=ts,
                kind="heartbeat", title_id=f"t{i}", genres=("drama",), duration_s=60.0)
    base.update(kw)
    return ViewingEvent(**base)


def test_gap_splits_sessions_exactly_at_the_window():
    events = [ev(0, T0), ev(1, T0 + 1800), ev(2, T0 + 1800 + 1801)]
    sessions = build_sessions(events, gap_s=1800)
    assert [s.event_ids for s in sessions] == [("e0", "e1"), ("e2",)]
    assert sessions[0].start_ts == T0 and sessions[0].end_ts == T0 + 1800


def test_duplicates_by_event_id_are_ignored():
    events = [ev(0, T0), ev(1, T0 + 60), ev(1, T0 + 60)]
    (session,) = build_sessions(events)
    assert session.event_ids == ("e0", "e1")
    assert session.watch_seconds == 120.0


def test_late_event_joins_its_session_and_changes_its_id_only_when_it_moves_the_start():
    on_time = [ev(0, T0), ev(1, T0 + 600)]
    (before,) = build_sessions(on_time)
    (joined,) = build_sessions(on_time + [ev(2, T0 + 300)])
    assert joined.session_id == before.session_id and len(joined.event_ids) == 3
    (extended,) = build_sessions(on_time + [ev(3, T0 - 300)])
    assert extended.session_id != before.session_id and extended.start_ts == T0 - 300


def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one"):
        build_sessions([ev(0, T0), ev(1, T0, device_id="other")])


def test_features_encode_time_device_genres_and_binge():
    events = [ev(i, T0 + 20 * 3600 + i * 60, series_id="show", title_id=f"ep{i}",
                 genres=("kids", "animation"), maturity="kids", duration_s=100.0) for i in range(3)]
    events.append(ev(9, T0 + 20 * 3600 + 400, genres=("drama",), maturity="adult", duration_s=300.0))
    (s,) = build_sessions(events)
    v = s.features
    assert v.dtype == np.float32 and v.shape == (F.FEATURE_DIM,)
    angle = 2 * math.pi * 20 / 24
    assert v[F.HOUR].tolist() == pytest.approx([math.sin(angle), math.cos(angle)], abs=1e-6)
    assert v[F.DEVICE.start + F.DEVICE_TYPES.index("tv")] == 1.0 and v[F.DEVICE].sum() == 1.0
    genres = v[F.GENRE]
    assert genres.sum() == pytest.approx(1.0)
    assert genres[F.GENRES.index("kids")] == pytest.approx(150 / 600)
    assert genres[F.GENRES.index("drama")] == pytest.approx(300 / 600)
    assert v[F.KIDS_SHARE] == pytest.approx(0.5)
    assert v[F.BINGE] == 1.0
    assert v[F.LOG_MINUTES] == pytest.approx(math.log1p(10.0))
    assert v[F.LOG_TITLES] == pytest.approx(math.log1p(4))


def test_genre_vocabulary_aliases_and_unknown_genres_are_named_not_lost():
    """Aliases reach their feature genre (any case); a name outside the vocabulary keeps
    its watch time (its hashed slot and ``other``) and the session names it with its
    event count."""
    vocabulary = F.GenreVocabulary.parse("sci-fi=scifi, Anime=animation")
    events = [ev(0, T0, genres=("Sci-Fi",), duration_s=100.0),
              ev(1, T0 + 60, genres=("anime", "k_drama"), duration_s=100.0),
              ev(2, T0 + 120, genres=("k_drama", "K_Drama ", "Drama"), duration_s=300.0)]
    (s,) = build_sessions(events, vocabulary=vocabulary)
    genres = s.features[F.GENRE]
    assert genres.sum() == pytest.approx(1.0)                       # nothing dropped
    assert genres[F.GENRES.index("scifi")] == pytest.approx(100 / 500)
    assert genres[F.GENRES.index("animation")] == pytest.approx(50 / 500)
    assert genres[F.GENRES.index("drama")] == pytest.approx(100 / 500)
    k_drama = F.hashed_genre_slot("k_drama")
    assert k_drama not in {F.GENRES.index(g) for g in ("scifi", "animation", "drama", "other")}
    assert genres[k_drama] == pytest.approx(F.UNKNOWN_HASHED_SHARE * 250 / 500)
    assert genres[F.GENRES.index("other")] == pytest.approx((1 - F.UNKNOWN_HASHED_SHARE) * 250 / 500)
    assert s.unknown_genres == (("k_drama", 2),)                    # events per (normalised) name
    assert s.feature_version == F.FEATURE_SCHEMA_VERSION == 2
    (plain,) = build_sessions(events)                               # the default vocabulary
    assert dict(plain.unknown_genres) == {"sci-fi": 1, "anime": 1, "k_drama": 2}
    for spec, word in (("western", "name=genre"), ("western=cowboys", "not a feature genre"), ("=drama", "empty")):
        with pytest.raises(ValueError, match=word):
            F.GenreVocabulary.parse(spec)


def test_day_of_week_starts_on_monday():
    monday_noon = T0 + 4 * 86400 + 12 * 3600   # 2026-01-05 is a Monday
    (s,) = build_sessions([ev(0, monday_noon)])
    angle = 2 * math.pi * (0 + 0.5) / 7
    assert s.features[F.DOW].tolist() == pytest.approx([math.sin(angle), math.cos(angle)], abs=1e-6)


def test_missing_optional_fields_still_give_finite_features():
    (s,) = build_sessions([ev(0, T0, title_id="", genres=(), duration_s=0.0, device_type="other")])
    assert np.isfinite(s.features).all()
    assert s.features[F.GENRE].sum() == 0.0


def test_label_is_the_most_frequent_profile_hint():
    events = [ev(0, T0, profile_hint="Ana"), ev(1, T0 + 1, profile_hint="Ben"), ev(2, T0 + 2, profile_hint="Ben")]
    assert build_sessions(events)[0].label == "Ben"


def test_vector_bytes_round_trip_and_bad_length():
    m = np.arange(2 * F.FEATURE_DIM, dtype=np.float32).reshape(2, -1)
    assert np.array_equal(F.from_bytes(F.to_bytes(m)), m)
    with pytest.raises(ValueError):
        F.from_bytes(b"\x00" * 7)


@pytest.mark.parametrize("field,change", [
    ("events[0].event_id", {"event_id": ""}),
    ("events[0].event_id", {"event_id": "x" * 200}),
    ("events[0].account_id", {"account_id": "bad id"}),
    ("events[0].device_type", {"device_type": "fridge"}),
    ("events[0].ts", {"ts": float("nan")}),
    ("events[0].ts", {"ts": 0.0}),
    ("events[0].kind", {"kind": "pause"}),
    ("events[0].duration_s", {"duration_s": -1.0}),
    ("events[0].duration_s", {"duration_s": float("inf")}),
    ("events[0].genres", {"genres": tuple(f"g{i}" for i in range(17))}),
    ("events[0].genres[0]", {"genres": ("",)}),
    ("events[0].maturity", {"maturity": "R18"}),
    ("events[0].country", {"country": "gbr"}),
    ("events[0].profile_hint", {"profile_hint": "x" * 65}),
    ("events[0].utc_offset_minutes", {"utc_offset_minutes": 841}),
    ("events[0].utc_offset_minutes", {"utc_offset_minutes": -841}),
])
def test_validation_names_the_field(field, change):
    with pytest.raises(InvalidArgument) as info:
        validate_batch([ev(0, change.pop("ts", T0), **change)], now=T0 + 10)
    assert info.value.field == field


event_times = st.lists(st.floats(min_value=0, max_value=5 * 3600, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(times=event_times, seed=st.randoms(use_true_random=False))
def test_sessions_do_not_depend_on_arrival_order_or_repeats(times, seed):
    events = [ev(i, T0 + t) for i, t in enumerate(times)]
    shuffled = list(events) + seed.sample(events, k=len(events) // 2)  # repeats = duplicates
    seed.shuffle(shuffled)
    a, b = build_sessions(events), build_sessions(shuffled)
    assert [s.session_id for s in a] == [s.session_id for s in b]
    assert all(np.array_equal(x.features, y.features) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None)
@given(times=event_times, gap=st.floats(min_value=60, max_value=7200))
def test_every_event_in_exactly_one_session_and_gaps_respected(times, gap):
    events = [ev(i, T0 + t) for i, t in enumerate(times)]
    sessions = build_sessions(events, gap_s=gap)
    ids = [i for s in sessions for i in s.event_ids]
    assert sorted(ids) == sorted(e.event_id for e in events)
    by_id = {e.event_id: e.ts for e in events}
    for s in sessions:
        ts = sorted(by_id[i] for i in s.event_ids)
        assert all(b - a <= gap for a, b in zip(ts, ts[1:]))
    for left, right in zip(sessions, sessions[1:]):
        assert right.start_ts - left.end_ts > gap


def test_split_by_gap_vectorised_matches_definition():
    ts = np.array([0, 10, 100, 105, 400.0])
    assert split_by_gap(ts, 50).tolist() == [0, 2, 4]
    assert split_by_gap(np.array([]), 50).tolist() == []


def test_different_unknown_genres_keep_their_identity_and_the_pooling_policy_does_not():
    """Two members watching different unknown genres get different genre mixes under the
    default vocabulary (hashed slots), the same under ``unknown="other"`` (schema 1)."""
    a, b = "telenovela", "bollywood"
    assert F.hashed_genre_slot(a) != F.hashed_genre_slot(b)
    for vocabulary, differ, version in ((F.DEFAULT_VOCABULARY, True, 2), (F.GenreVocabulary(unknown="other"), False, 1)):
        (sa,) = build_sessions([ev(0, T0, genres=(a,), duration_s=600.0)], vocabulary=vocabulary)
        (sb,) = build_sessions([ev(1, T0, genres=(b,), duration_s=600.0)], vocabulary=vocabulary)
        assert sa.features[F.GENRE].sum() == pytest.approx(1.0) and sb.features[F.GENRE].sum() == pytest.approx(1.0)
        assert (not np.allclose(sa.features[F.GENRE], sb.features[F.GENRE])) is differ
        assert sa.feature_version == sb.feature_version == version
    # a name is its normalised form: case and spaces do not move it
    assert F.DEFAULT_VOCABULARY.placements(" TeleNovela ") == F.DEFAULT_VOCABULARY.placements(a)
    with pytest.raises(ValueError, match="one of"):
        F.GenreVocabulary(unknown="drop")
    with pytest.raises(ValueError, match="hashed_share"):
        F.GenreVocabulary(hashed_share=0.0)


PINNED_SLOTS = ["adventure", "family", "horror", "reality"]


def test_the_hashed_slot_of_a_name_is_the_same_in_every_process():
    """Stored vectors and models depend on where a name lands: the hash must not be
    Python's per-process salted ``hash`` (a fresh interpreter with another hash seed
    agrees), and the slots of these names are pinned (a change is a schema change)."""
    import os
    import subprocess
    import sys

    names = ("k_drama", "anime", "telenovela", "true_crime")
    code = ("from services.clustering.domain.features import hashed_genre_slot as h; "
            f"print([h(n) for n in {names!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == str([F.hashed_genre_slot(n) for n in names])
    assert [F.GENRES[F.hashed_genre_slot(n)] for n in names] == PINNED_SLOTS
