"""Compact path representation and the ChannelAttribution path-file parser.

A *path* (customer journey) is an ordered sequence of channel touches with three
outcome weights. Millions of paths are held CSR-style, never as Python lists:

=============  ==========  =========================================================
field          dtype       meaning
=============  ==========  =========================================================
channels       int32       channel code of every touch, paths concatenated in order
offsets        int64       path ``i`` is ``channels[offsets[i]:offsets[i+1]]``
conversions    float64     conversions of the path (fractional weights allowed)
values         float64     conversion value (revenue) of the path
nulls          float64     number of times the path ended without conversion
channel_names  tuple[str]  ``channel_names[code]`` is the label of a code
=============  ==========  =========================================================

Memory is 4 bytes per touch plus 32 bytes per path, so 10 M paths of mean length 4
take about 480 MB; use :func:`iter_path_chunks` to stream a file through the Markov
builder when that is too much.

File format (ChannelAttribution's ``Data.csv``): a header line naming the columns,
``;`` as the field separator, channels joined by ``>`` (spaces around the separator
are ignored, as ChannelAttribution does)::

    path;total_conversions;total_conversion_value;total_null
    eta > iota > alpha;1;0.244;3

``path`` and ``total_conversions`` are required; ``total_conversion_value`` and
``total_null`` default to 0 when the columns are absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.attribution.domain.errors import AttributionInputError

PATH_COLUMN = "path"
CONVERSIONS_COLUMN = "total_conversions"
VALUE_COLUMN = "total_conversion_value"
NULL_COLUMN = "total_null"

ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(bytes_done, bytes_total)`` while a file is parsed."""


@dataclass(frozen=True, eq=False)
class Paths:
    """Many journeys in CSR form (see the module docstring for the layout).

    Construction validates shapes, ranges and finiteness once, so every algorithm
    downstream can trust the arrays.
    """

    channels: np.ndarray
    offsets: np.ndarray
    conversions: np.ndarray
    values: np.ndarray
    nulls: np.ndarray
    channel_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        channels = np.ascontiguousarray(self.channels, dtype=np.int32)
        offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if channels.ndim != 1:
            raise AttributionInputError("channels", "must be a 1-D array of channel codes")
        if offsets.ndim != 1 or offsets.size < 1:
            raise AttributionInputError("offsets", "must be a 1-D array of length n_paths + 1")
        if offsets[0] != 0 or offsets[-1] != channels.size:
            raise AttributionInputError(
                "offsets", "must start at 0 and end at len(channels)"
            )
        if offsets.size > 1 and np.any(np.diff(offsets) < 0):
            raise AttributionInputError("offsets", "must be non-decreasing")
        n_paths = offsets.size - 1
        arrays = {}
        for name in ("conversions", "values", "nulls"):
            arr = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n_paths,):
                raise AttributionInputError(name, f"must have shape ({n_paths},), got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise AttributionInputError(name, "must be finite (no NaN or inf)")
            if np.any(arr < 0):
                raise AttributionInputError(name, "must be non-negative")
            arrays[name] = arr
        names = tuple(str(n) for n in self.channel_names)
        if channels.size:
            lo, hi = int(channels.min()), int(channels.max())
            if lo < 0:
                raise AttributionInputError("channels", "codes must be non-negative")
            if not names:
                names = tuple(str(i) for i in range(hi + 1))
            if hi >= len(names):
                raise AttributionInputError(
                    "channels", f"code {hi} has no name (only {len(names)} channel_names)"
                )
        if len(set(names)) != len(names):
            raise AttributionInputError("channel_names", "must be unique")
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "offsets", offsets)
        for name, arr in arrays.items():
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "channel_names", names)

    # ---- shape helpers -------------------------------------------------------------
    @property
    def n_paths(self) -> int:
        return self.offsets.size - 1

    @property
    def n_touches(self) -> int:
        return int(self.channels.size)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def lengths(self) -> np.ndarray:
        """Number of touches of each path (int64)."""
        return np.diff(self.offsets)

    def row_of_touch(self) -> np.ndarray:
        """Path index of every touch (int64, same length as ``channels``)."""
        return np.repeat(np.arange(self.n_paths, dtype=np.int64), self.lengths)

    def path(self, i: int) -> list[str]:
        """Channel labels of path ``i`` (debugging and tests; not for hot loops)."""
        codes = self.channels[self.offsets[i] : self.offsets[i + 1]]
        return [self.channel_names[c] for c in codes]

    def __len__(self) -> int:
        return self.n_paths

    def __repr__(self) -> str:
        return (
            f"Paths(n_paths={self.n_paths}, n_touches={self.n_touches}, "
            f"n_channels={self.n_channels}, conversions={self.conversions.sum():g})"
        )

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        paths: Sequence[Sequence[str]],
        conversions: Sequence[float],
        values: Sequence[float] | None = None,
        nulls: Sequence[float] | None = None,
        channel_names: Sequence[str] | None = None,
    ) -> Paths:
        """Build from Python lists of channel labels (small inputs, tests, the API).

        Channel codes follow ``channel_names`` when given, else sorted label order.
        """
        if len(conversions) != len(paths):
            raise AttributionInputError("conversions", "must have one entry per path")
        labels = sorted({str(c) for p in paths for c in p}) if channel_names is None else [
            str(c) for c in channel_names
        ]
        index = {name: i for i, name in enumerate(labels)}
        flat: list[int] = []
        offsets = [0]
        for p in paths:
            for c in p:
                try:
                    flat.append(index[str(c)])
                except KeyError:
                    raise AttributionInputError(
                        "paths", f"channel {c!r} is not in channel_names"
                    ) from None
            offsets.append(len(flat))
        n = len(paths)
        return cls(
            channels=np.asarray(flat, dtype=np.int32),
            offsets=np.asarray(offsets, dtype=np.int64),
            conversions=np.asarray(conversions, dtype=np.float64),
            values=np.zeros(n) if values is None else np.asarray(values, dtype=np.float64),
            nulls=np.zeros(n) if nulls is None else np.asarray(nulls, dtype=np.float64),
            channel_names=tuple(labels),
        )

    # ---- transformations --------------------------------------------------------------
    def select(self, mask_or_index: np.ndarray) -> Paths:
        """Paths picked by a boolean mask or an index array, order kept."""
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            if idx.shape != (self.n_paths,):
                raise AttributionInputError("mask_or_index", "boolean mask must have one entry per path")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        lengths = self.lengths[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Gather touches of the chosen rows without a Python loop: start of each row
        # repeated over its length plus the position inside the row.
        starts = np.repeat(self.offsets[:-1][idx], lengths)
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return Paths(
            channels=self.channels[starts + within],
            offsets=offsets,
            conversions=self.conversions[idx],
            values=self.values[idx],
            nulls=self.nulls[idx],
            channel_names=self.channel_names,
        )

    def without_empty(self) -> Paths:
        """The same paths minus those with no touch (they carry no channel to credit)."""
        lengths = self.lengths
        if np.all(lengths > 0):
            return self
        return self.select(lengths > 0)

    def collapse_repeats(self) -> Paths:
        """Merge runs of the same channel inside each path (``a > a > b`` -> ``a > b``)."""
        if self.n_touches == 0:
            return self
        keep = np.ones(self.n_touches, dtype=bool)
        same_as_previous = self.channels[1:] == self.channels[:-1]
        # A touch equal to its predecessor is dropped unless it starts a new path.
        row_start = np.zeros(self.n_touches, dtype=bool)
        row_start[self.offsets[:-1][self.lengths > 0]] = True
        keep[1:] = ~same_as_previous | row_start[1:]
        kept_before = np.concatenate(([0], np.cumsum(keep)))
        return Paths(
            channels=self.channels[keep],
            offsets=kept_before[self.offsets],
            conversions=self.conversions,
            values=self.values,
            nulls=self.nulls,
            channel_names=self.channel_names,
        )

    def with_channel_names(self, channel_names: Sequence[str]) -> Paths:
        """Re-code onto a superset vocabulary (used to merge chunks and align chains)."""
        names = tuple(str(n) for n in channel_names)
        index = {n: i for i, n in enumerate(names)}
        try:
            mapping = np.asarray([index[n] for n in self.channel_names], dtype=np.int32)
        except KeyError as exc:
            raise AttributionInputError("channel_names", f"missing channel {exc.args[0]!r}") from None
        return Paths(
            channels=mapping[self.channels] if self.n_touches else self.channels,
            offsets=self.offsets,
            conversions=self.conversions,
            values=self.values,
            nulls=self.nulls,
            channel_names=names,
        )


def concat_paths(parts: Sequence[Paths]) -> Paths:
    """Concatenate path sets; vocabularies are merged (first-seen order kept)."""
    if not parts:
        raise AttributionInputError("parts", "need at least one Paths")
    names: list[str] = []
    seen: set[str] = set()
    for p in parts:
        for n in p.channel_names:
            if n not in seen:
                seen.add(n)
                names.append(n)
    aligned = [p.with_channel_names(names) for p in parts]
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in aligned:
        offsets.append(p.offsets[1:] + base)
        base += p.n_touches
    return Paths(
        channels=np.concatenate([p.channels for p in aligned]),
        offsets=np.concatenate(offsets),
        conversions=np.concatenate([p.conversions for p in aligned]),
        values=np.concatenate([p.values for p in aligned]),
        nulls=np.concatenate([p.nulls for p in aligned]),
        channel_names=tuple(names),
    )


# ---- parsing ----------------------------------------------------------------------------

_BOUNDARY = "\x01"  # cannot occur in a decoded text line; marks path ends in the token list


class _Vocabulary:
    """Channel label -> code, shared across the chunks of one file."""

    _BOUNDARY_CODE = -1
    _EMPTY_CODE = -2

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def codes(self, tokens: list[str]) -> np.ndarray:
        """Codes of tokens; the path-boundary marker maps to -1 and "" to -2."""
        lookup = self.index
        for tok in sorted(set(tokens).difference(lookup)):
            if tok not in (_BOUNDARY, ""):
                lookup[tok] = len(lookup)
        lookup[_BOUNDARY] = self._BOUNDARY_CODE
        lookup[""] = self._EMPTY_CODE
        try:
            return np.fromiter(map(lookup.__getitem__, tokens), dtype=np.int32, count=len(tokens))
        finally:
            del lookup[_BOUNDARY], lookup[""]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.index)


def _parse_numbers(column: list[str], name: str, first_line: int) -> np.ndarray:
    try:
        out = np.array(column, dtype=np.float64) if column else np.zeros(0)
    except ValueError:
        for i, s in enumerate(column):
            try:
                float(s)
            except ValueError:
                raise AttributionInputError(
                    name, f"line {first_line + i}: {s!r} is not a number"
                ) from None
        raise
    bad = ~np.isfinite(out) | (out < 0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise AttributionInputError(
            name, f"line {first_line + i}: {column[i]!r} must be finite and >= 0"
        )
    return out


def _parse_header(line: str) -> list[str]:
    cols = [c.strip().strip('"') for c in line.rstrip("\r\n").split(";")]
    if PATH_COLUMN not in cols or CONVERSIONS_COLUMN not in cols:
        raise AttributionInputError(
            "header",
            f"needs columns {PATH_COLUMN!r} and {CONVERSIONS_COLUMN!r} separated by ';', got {cols}",
        )
    return cols


def _tokenize(raw_paths: list[str], sep: str) -> list[str]:
    """All channel tokens of all paths, with a boundary token after each path but the last.

    Fast path: split on the canonical `` > `` and accept when no token still holds
    spaces or the separator; otherwise split on ``sep`` and strip every token.
    """
    spaced = f" {sep.strip()} "
    tokens = f"{spaced}{_BOUNDARY}{spaced}".join(raw_paths).split(spaced)
    unique = set(tokens)
    if all(u == u.strip() and sep not in u for u in unique):
        return tokens
    joined = f"{sep}{_BOUNDARY}{sep}".join(raw_paths)
    return list(map(str.strip, joined.split(sep)))


def _parse_block(
    text: str, columns: list[str], vocabulary: _Vocabulary, sep: str, first_line: int
) -> Paths:
    """Parse complete lines (no header) of one chunk into Paths."""
    text = text.replace("\r", "").strip("\n")
    n_cols = len(columns)
    if not text:
        flat: list[str] = []
    else:
        flat = text.replace("\n", ";").split(";")
    if len(flat) % n_cols:
        for i, line in enumerate(text.split("\n")):
            if line.count(";") != n_cols - 1:
                raise AttributionInputError(
                    "line", f"line {first_line + i}: expected {n_cols} ';'-separated fields: {line[:80]!r}"
                )
    n = len(flat) // n_cols
    raw_paths = flat[columns.index(PATH_COLUMN) :: n_cols]
    numbers = {}
    for name in (CONVERSIONS_COLUMN, VALUE_COLUMN, NULL_COLUMN):
        if name in columns:
            numbers[name] = _parse_numbers(flat[columns.index(name) :: n_cols], name, first_line)
        else:
            numbers[name] = np.zeros(n)
    # One C-level join+split tokenises every path; a boundary token marks each path end
    # so lengths come from its positions instead of a per-path Python count.
    if n:
        raw_codes = vocabulary.codes(_tokenize(raw_paths, sep))
    else:
        raw_codes = np.zeros(0, dtype=np.int32)
    is_boundary = raw_codes == _Vocabulary._BOUNDARY_CODE
    is_empty = raw_codes == _Vocabulary._EMPTY_CODE
    # Raw span of path i ends at its boundary (the last path ends at the list end).
    raw_ends = np.concatenate((np.flatnonzero(is_boundary), [raw_codes.size])) if n else np.zeros(0, np.int64)
    raw_starts = np.concatenate(([0], raw_ends[:-1] + 1)) if n else np.zeros(0, np.int64)
    if np.any(is_empty):
        # "" is legal only as the single token of an empty path field.
        empty_rows = np.searchsorted(raw_ends, np.flatnonzero(is_empty))
        bad = (raw_ends[empty_rows] - raw_starts[empty_rows]) != 1
        if np.any(bad):
            row = int(empty_rows[np.flatnonzero(bad)[0]])
            raise AttributionInputError(
                PATH_COLUMN, f"line {first_line + row}: empty channel name between separators"
            )
    real = ~(is_boundary | is_empty)
    real_before = np.concatenate(([0], np.cumsum(real)))
    offsets = np.zeros(n + 1, dtype=np.int64)
    if n:
        offsets[1:] = real_before[raw_ends]
    codes = raw_codes[real]
    return Paths(
        channels=codes,
        offsets=offsets,
        conversions=numbers[CONVERSIONS_COLUMN],
        values=numbers[VALUE_COLUMN],
        nulls=numbers[NULL_COLUMN],
        channel_names=vocabulary.names,
    )


def iter_path_chunks(
    source: str | os.PathLike[str],
    *,
    chunk_bytes: int = 4 << 20,
    sep: str = ">",
    progress: ProgressCallback | None = None,
) -> Iterator[Paths]:
    """Stream a path file as :class:`Paths` chunks of about ``chunk_bytes`` of text.

    Channel codes are consistent across chunks (a chunk's ``channel_names`` extends the
    previous chunk's). ``progress(bytes_done, bytes_total)`` is called after each chunk.
    """
    if chunk_bytes < 1024:
        raise AttributionInputError("chunk_bytes", "must be at least 1024")
    if not sep or "\n" in sep or ";" in sep:
        raise AttributionInputError("sep", "must be a non-empty separator other than ';' or newline")
    total = os.path.getsize(source)
    vocabulary = _Vocabulary()
    with open(source, "rb") as fh:
        header = fh.readline().decode("utf-8-sig")
        if not header.strip():
            raise AttributionInputError("header", "file is empty")
        columns = _parse_header(header)
        done = len(header.encode())
        carry = b""
        line_no = 2
        while True:
            block = fh.read(chunk_bytes)
            if not block and not carry:
                break
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            text = data.decode("utf-8")
            chunk = _parse_block(text, columns, vocabulary, sep, line_no)
            line_no += text.count("\n")
            done += len(data)
            if progress is not None:
                progress(min(done, total), total)
            if chunk.n_paths:
                yield chunk
            if not block:
                break


def read_paths(
    source: str | os.PathLike[str],
    *,
    sep: str = ">",
    progress: ProgressCallback | None = None,
    chunk_bytes: int = 4 << 20,
) -> Paths:
    """Read a whole ChannelAttribution path file into one :class:`Paths`."""
    chunks = list(iter_path_chunks(source, sep=sep, progress=progress, chunk_bytes=chunk_bytes))
    if not chunks:
        return Paths(
            channels=np.zeros(0, np.int32),
            offsets=np.zeros(1, np.int64),
            conversions=np.zeros(0),
            values=np.zeros(0),
            nulls=np.zeros(0),
            channel_names=(),
        )
    if len(chunks) == 1:
        return chunks[0]
    return concat_paths(chunks)


def parse_path_lines(lines: Iterable[str], *, sep: str = ">") -> Paths:
    """Parse in-memory lines (the first one is the header); handy for APIs and tests."""
    it = iter(lines)
    try:
        header = next(it)
    except StopIteration:
        raise AttributionInputError("header", "no lines") from None
    columns = _parse_header(header)
    body = "\n".join(line.rstrip("\r\n") for line in it)
    return _parse_block(body, columns, _Vocabulary(), sep, 2)


def write_paths(paths: Paths, target: str | os.PathLike[str], *, sep: str = " > ") -> None:
    """Write paths in ChannelAttribution's format (inverse of :func:`read_paths`)."""
    names = paths.channel_names
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(f"{PATH_COLUMN};{CONVERSIONS_COLUMN};{VALUE_COLUMN};{NULL_COLUMN}\n")
        off = paths.offsets.tolist()
        codes = paths.channels.tolist()
        # repr of a Python float round-trips exactly, so read_paths(write_paths(p)) == p.
        for i, (c, v, n) in enumerate(
            zip(paths.conversions.tolist(), paths.values.tolist(), paths.nulls.tolist())
        ):
            labels = sep.join(names[k] for k in codes[off[i] : off[i + 1]])
            fh.write(f"{labels};{c!r};{v!r};{n!r}\n")
