"""Path representation and the ChannelAttribution-format parser."""

from __future__ import annotations

import numpy as np
import pytest

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import (
    Paths,
    concat_paths,
    iter_path_chunks,
    parse_path_lines,
    read_paths,
    write_paths,
)
from tests.helpers.pathdata import path_data_file

HEADER = "path;total_conversions;total_conversion_value;total_null"


def test_parse_lines_with_odd_spacing_and_empty_path() -> None:
    p = parse_path_lines([HEADER, "a > b > a;1;2.5;3", " c>a ;0;0;1", ";2;1;0", "b;0.25;0;0"])
    assert [p.path(i) for i in range(4)] == [["a", "b", "a"], ["c", "a"], [], ["b"]]
    np.testing.assert_array_equal(p.conversions, [1, 0, 2, 0.25])
    np.testing.assert_array_equal(p.values, [2.5, 0, 1, 0])
    np.testing.assert_array_equal(p.nulls, [3, 1, 0, 0])
    np.testing.assert_array_equal(p.offsets, [0, 3, 5, 5, 6])


def test_optional_columns_default_to_zero() -> None:
    p = parse_path_lines(["path;total_conversions", "a > b;2"])
    np.testing.assert_array_equal(p.values, [0.0])
    np.testing.assert_array_equal(p.nulls, [0.0])


@pytest.mark.parametrize(
    "lines,field",
    [
        (["path;conv", "a;1"], "header"),
        ([HEADER, "a;x;0;0"], "total_conversions"),
        ([HEADER, "a;1;-2;0"], "total_conversion_value"),
        ([HEADER, "a;1;0;nan"], "total_null"),
        ([HEADER, "a;1;0"], "line"),
        ([HEADER, "a >  > b;1;0;0"], "path"),
    ],
)
def test_bad_input_names_the_field(lines: list[str], field: str) -> None:
    with pytest.raises(AttributionInputError) as exc:
        parse_path_lines(lines)
    assert exc.value.field == field


def test_round_trip_and_chunked_reading_agree(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 8, 2000)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    p = Paths(rng.integers(0, 9, offsets[-1]), offsets, rng.random(2000), rng.random(2000) * 10,
              rng.integers(0, 4, 2000).astype(float), tuple(f"ch {i}" for i in range(9)))
    f = tmp_path / "paths.csv"
    write_paths(p, f)
    seen: list[tuple[int, int]] = []
    whole = read_paths(f)
    chunked = read_paths(f, chunk_bytes=2048, progress=lambda d, t: seen.append((d, t)))
    assert len(seen) > 5 and seen[-1][0] == seen[-1][1] == f.stat().st_size
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    for q in (whole, chunked):
        labels_q = [q.path(i) for i in range(q.n_paths)]
        assert labels_q == [p.path(i) for i in range(p.n_paths)]
        np.testing.assert_array_equal(q.conversions, p.conversions)  # repr round-trips exactly
        np.testing.assert_array_equal(q.values, p.values)
        np.testing.assert_array_equal(q.nulls, p.nulls)
    # Chunks share one growing vocabulary.
    chunks = list(iter_path_chunks(f, chunk_bytes=2048))
    for a, b in zip(chunks, chunks[1:]):
        assert b.channel_names[: len(a.channel_names)] == a.channel_names


def test_example_file_shape(tmp_path) -> None:
    # The shared example file when HEARTH_SHARED_DATA is set, else a generated one; the
    # expected shape is the documented one, or the generator's own count.
    data = path_data_file(tmp_path)
    p = read_paths(data.path)
    assert p.n_paths == data.n_paths == 10_000 and p.n_channels == data.n_channels == 12
    assert p.conversions.sum() == data.conversions and p.nulls.sum() == data.nulls


def test_transformations() -> None:
    p = Paths.from_lists([["a", "a", "b", "b", "a"], [], ["c"]], [1, 2, 3], [1, 1, 1], [0, 1, 0])
    c = p.collapse_repeats()
    assert [c.path(i) for i in range(3)] == [["a", "b", "a"], [], ["c"]]
    s = p.select(np.array([2, 0]))
    assert [s.path(0), s.path(1)] == [["c"], ["a", "a", "b", "b", "a"]]
    np.testing.assert_array_equal(s.conversions, [3, 1])
    assert p.without_empty().n_paths == 2
    q = Paths.from_lists([["d"]], [1])
    both = concat_paths([p, q])
    assert both.channel_names == ("a", "b", "c", "d") and both.path(3) == ["d"]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"offsets": np.array([0, 5])}, "offsets"),
        ({"conversions": np.array([-1.0])}, "conversions"),
        ({"values": np.array([np.inf])}, "values"),
        ({"channels": np.array([0, 7])}, "channels"),
        ({"channel_names": ("a", "a")}, "channel_names"),
    ],
)
def test_paths_validation(kwargs: dict, field: str) -> None:
    base = dict(channels=np.array([0, 1]), offsets=np.array([0, 2]), conversions=np.array([1.0]),
                values=np.array([0.0]), nulls=np.array([0.0]), channel_names=("a", "b"))
    base.update(kwargs)
    with pytest.raises(AttributionInputError) as exc:
        Paths(**base)
    assert exc.value.field == field
