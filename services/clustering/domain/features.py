"""Session feature vectors, schema version 2.

A closed session becomes one float32 vector of ``FEATURE_DIM`` numbers. The schema is
versioned (``FEATURE_SCHEMA_VERSION``); a change to the layout below must bump it, and
stored vectors carry the version they were computed with. docs/features.md documents
the same table for operators.

Layout (index: meaning):

====  =====================================================================
0-1   start hour of day on the circle: sin, cos of 2*pi*hour/24 (of the start
      the session builder passes: local when its first event carries a UTC offset,
      else UTC; sessions.py)
2-3   start day of week on the circle: sin, cos of 2*pi*dow/7 (Monday = 0)
4-9   device type one-hot: tv, mobile, tablet, desktop, console, other
10-28 genre mix weighted by watch time (sums to 1 when any genre is given),
      slots ``GENRES``; a caller's genre names reach a slot through the
      ``GenreVocabulary`` (configurable aliases); a name it does not know still
      counts, half in a slot chosen by a stable hash of the name and half in
      ``other`` (schema 2; schema 1 pooled all of it in ``other``), and is counted
      and reported
29    kids share: fraction of watch time rated ``kids``
30    teen share: fraction of watch time rated ``teen``
31    log1p(total watch minutes)
32    binge indicator: 1 when >= 3 episodes of one series were played
33    log1p(number of distinct titles)
34    VPN share: fraction of events flagged as coming through a VPN
====  =====================================================================

Why these: household members differ mostly in *when* they watch (rhythm), *where*
(device), *what* (genre mix and maturity) and *how* (length, binge). Circular
encodings keep 23:00 next to 01:00. Every feature is bounded so that no single one
dominates a Euclidean or Gaussian model without scaling.

Everything here is pure and vectorised: ``features_matrix`` builds many vectors at
once from column arrays (used by the simulator and bulk rebuilds);
``session_features`` is the per-session convenience built on it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# 2: a genre name outside the vocabulary lands in a slot chosen by a stable hash of the
# name (1: every such name in ``other``). The layout is the same; a version-1 vector
# differs from its version-2 rebuild only in sessions that carried an unknown name.
FEATURE_SCHEMA_VERSION = 2
POOLED_UNKNOWN_SCHEMA_VERSION = 1
UNKNOWN_GENRE_POLICIES = ("hash", "other")  # how a vocabulary places an unknown name
# Under "hash": the share of an unknown name's watch time in its hashed slot; the rest
# stays in ``other`` (chosen on TUNING worlds, docs/features.md "Unknown genre names").
UNKNOWN_HASHED_SHARE = 0.5

DEVICE_TYPES: tuple[str, ...] = ("tv", "mobile", "tablet", "desktop", "console", "other")
GENRES: tuple[str, ...] = (
    "action", "adventure", "animation", "comedy", "crime", "documentary", "drama",
    "family", "fantasy", "horror", "kids", "music", "news", "reality", "romance",
    "scifi", "sports", "thriller", "other",
)
MATURITIES: tuple[str, ...] = ("kids", "teen", "adult")

_DEVICE_INDEX = {d: i for i, d in enumerate(DEVICE_TYPES)}
_GENRE_INDEX = {g: i for i, g in enumerate(GENRES)}

# Offsets of each block in the vector; kept as names so code never uses magic numbers.
HOUR = slice(0, 2)
DOW = slice(2, 4)
DEVICE = slice(4, 4 + len(DEVICE_TYPES))
GENRE = slice(DEVICE.stop, DEVICE.stop + len(GENRES))
KIDS_SHARE = GENRE.stop
TEEN_SHARE = KIDS_SHARE + 1
LOG_MINUTES = TEEN_SHARE + 1
BINGE = LOG_MINUTES + 1
LOG_TITLES = BINGE + 1
VPN_SHARE = LOG_TITLES + 1
FEATURE_DIM = VPN_SHARE + 1

FEATURE_NAMES: tuple[str, ...] = (
    ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
    + tuple(f"device_{d}" for d in DEVICE_TYPES)
    + tuple(f"genre_{g}" for g in GENRES)
    + ("kids_share", "teen_share", "log_minutes", "binge", "log_titles", "vpn_share")
)
assert len(FEATURE_NAMES) == FEATURE_DIM

BINGE_EPISODES = 3  # episodes of one series in one session that make it a binge


@lru_cache(maxsize=4096)
def hashed_genre_slot(name: str) -> int:
    """The genre slot of a name outside the vocabulary: a stable hash (BLAKE2b of the
    normalised name, not Python's per-process ``hash``) over all ``len(GENRES)`` slots,
    so the same name lands in the same slot in every process and release."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % len(GENRES)


class GenreVocabulary:
    """Which feature slot a caller's genre name lands in: the slot names ``GENRES``
    themselves plus configured aliases (``"sci-fi=scifi,anime=animation"``), matched
    case-insensitively. A name outside the vocabulary is *unknown*: its watch time
    still counts, and ``unknown`` names it so the service can count and report it (an
    operator then maps it with an alias, or the service refuses it; see the clustering
    settings). With ``unknown="hash"`` (the default) ``hashed_share`` of it counts in
    the slot ``hashed_genre_slot`` gives and the rest in ``other``, so two members who
    watch *different* unknown genres stay apart (each name keeps its identity, up to
    sharing a slot with other names); ``unknown="other"`` pools every unknown name in ``other`` (schema 1's behaviour:
    a member who watches unknown genres stays apart from one who does not, but not
    from one who watches other unknown genres). The genre block stays ``len(GENRES)``
    wide whatever the vocabulary, so vectors and models keep one layout (why not extra
    hashed slots: docs/features.md)."""

    def __init__(self, aliases: dict[str, str] | None = None, unknown: str = "hash",
                 hashed_share: float = UNKNOWN_HASHED_SHARE) -> None:
        if unknown not in UNKNOWN_GENRE_POLICIES:
            raise ValueError(f"unknown genres must be placed by one of {UNKNOWN_GENRE_POLICIES}, got {unknown!r}")
        index = dict(_GENRE_INDEX)
        for alias, slot in (aliases or {}).items():
            name, target = alias.strip().lower(), slot.strip().lower()
            if not name:
                raise ValueError(f"empty genre name in alias {alias!r}={slot!r}")
            if target not in _GENRE_INDEX:
                raise ValueError(f"alias {name!r} maps to {slot!r}, which is not a feature genre "
                                 f"(one of {', '.join(GENRES)})")
            index[name] = _GENRE_INDEX[target]
        self._index = index
        self.aliases = {k: GENRES[v] for k, v in index.items() if k not in _GENRE_INDEX}
        self.hashes_unknown = unknown == "hash"
        if not 0.0 < hashed_share <= 1.0:
            raise ValueError(f"hashed_share must be in (0, 1], got {hashed_share!r}")
        self.hashed_share = hashed_share if self.hashes_unknown else 0.0
        # the schema version of the vectors this vocabulary builds
        self.feature_version = FEATURE_SCHEMA_VERSION if self.hashes_unknown else POOLED_UNKNOWN_SCHEMA_VERSION
        # Names every placement: running sums (``FeatureSums``) kept under one vocabulary
        # are not extended under another (an alias added since would place the session's
        # earlier events differently on a rebuild).
        self.signature = hashlib.blake2b(json.dumps(
            [sorted(index.items()), self.hashes_unknown, self.hashed_share]).encode(), digest_size=8).hexdigest()

    @classmethod
    def parse(cls, spec: str, unknown: str = "hash") -> "GenreVocabulary":
        """``"name=slot,name=slot"`` (the HEARTH_GENRE_ALIASES form); "" = no aliases."""
        aliases = {}
        for entry in (e for e in spec.split(",") if e.strip()):
            name, sep, slot = entry.partition("=")
            if not sep:
                raise ValueError(f"alias {entry.strip()!r} must be name=genre")
            aliases[name] = slot
        return cls(aliases, unknown)

    def placements(self, genre: str) -> tuple[tuple[int, float], ...]:
        """Where a name's watch time counts: (slot index in the genre block, share of its
        time) pairs, shares summing to 1. A known name: its slot. An unknown one under
        "hash": ``hashed_share`` in its hashed slot, the rest in ``other`` (the measured
        compromise: hashed slots are shared with known genres, so all of it there blurs
        them on worlds with few unknown names; docs/features.md); under "other": all in
        ``other``."""
        name = genre.strip().lower()
        found = self._index.get(name)
        if found is not None:
            return ((found, 1.0),)
        other = _GENRE_INDEX["other"]
        if not self.hashes_unknown:
            return ((other, 1.0),)
        hashed = hashed_genre_slot(name)
        if self.hashed_share >= 1.0 or hashed == other:
            return ((hashed, 1.0),)
        return ((hashed, self.hashed_share), (other, 1.0 - self.hashed_share))

    def unknown(self, genres: Iterable[str]) -> list[str]:
        """The names among ``genres`` that the vocabulary does not know, in the form an
        alias matches them (trimmed, lower case)."""
        names = (g.strip().lower() for g in genres)
        return [g for g in names if g not in self._index]


def device_index(device_type: str) -> int:
    """Index of a device type in the one-hot block; unknown types count as ``other``."""
    return _DEVICE_INDEX.get(device_type, _DEVICE_INDEX["other"])


def features_matrix(
    start_ts: np.ndarray,
    device_idx: np.ndarray,
    genre_seconds: np.ndarray,
    kids_seconds: np.ndarray,
    teen_seconds: np.ndarray,
    total_seconds: np.ndarray,
    binge: np.ndarray,
    n_titles: np.ndarray,
    vpn_share: np.ndarray,
) -> np.ndarray:
    """Feature vectors for N sessions at once, shape (N, FEATURE_DIM), float32.

    ``start_ts`` are epoch seconds of the clock the time features are read on (UTC, or
    local = UTC + offset when the session builder has one); ``device_idx`` indexes ``DEVICE_TYPES``;
    ``genre_seconds`` is (N, len(GENRES)) watch seconds per genre (a title with
    several genres splits its time evenly); the rest are per-session scalars.
    """
    start_ts = np.asarray(start_ts, dtype=np.float64)
    n = start_ts.shape[0]
    out = np.zeros((n, FEATURE_DIM), dtype=np.float64)
    seconds_of_day = np.mod(start_ts, 86400.0)
    hour_angle = 2.0 * np.pi * seconds_of_day / 86400.0
    # 1970-01-01 was a Thursday (dow 3 with Monday = 0).
    days = np.floor(start_ts / 86400.0)
    dow = np.mod(days + 3.0, 7.0) + seconds_of_day / 86400.0
    dow_angle = 2.0 * np.pi * dow / 7.0
    out[:, HOUR] = np.column_stack((np.sin(hour_angle), np.cos(hour_angle)))
    out[:, DOW] = np.column_stack((np.sin(dow_angle), np.cos(dow_angle)))
    out[np.arange(n), DEVICE.start + np.asarray(device_idx, dtype=np.int64)] = 1.0
    genre_seconds = np.asarray(genre_seconds, dtype=np.float64)
    genre_total = genre_seconds.sum(axis=1, keepdims=True)
    out[:, GENRE] = np.divide(genre_seconds, genre_total, out=np.zeros_like(genre_seconds),
                              where=genre_total > 0)
    total = np.asarray(total_seconds, dtype=np.float64)
    safe_total = np.where(total > 0, total, 1.0)
    out[:, KIDS_SHARE] = np.where(total > 0, np.asarray(kids_seconds) / safe_total, 0.0)
    out[:, TEEN_SHARE] = np.where(total > 0, np.asarray(teen_seconds) / safe_total, 0.0)
    out[:, LOG_MINUTES] = np.log1p(np.maximum(total, 0.0) / 60.0)
    out[:, BINGE] = np.asarray(binge, dtype=np.float64)
    out[:, LOG_TITLES] = np.log1p(np.asarray(n_titles, dtype=np.float64))
    out[:, VPN_SHARE] = np.asarray(vpn_share, dtype=np.float64)
    return out.astype(np.float32)


@dataclass(frozen=True, slots=True)
class WatchItem:
    """The part of a viewing event that features need (keeps this module independent
    of the event class)."""

    ts: float
    title_id: str
    series_id: str | None
    genres: Sequence[str]
    duration_s: float
    maturity: str | None
    vpn: bool


class FeatureSums:
    """What a session's feature vector is computed from, summed event by event in the
    order the events are added (``session_features`` adds a session's in time order,
    then event id): watch seconds per genre slot, kids/teen/total seconds, the distinct
    titles, each series' distinct episodes (up to ``BINGE_EPISODES``: the binge flag only
    asks whether one reached it), events and VPN events. A float sum depends on the order
    of its terms, so the same events added in the same order give the same bits, and
    ``to_dict``/``from_dict`` keep every float exactly (JSON writes a float's repr).

    The clustering store keeps one (sealed) per device's newest session, so a batch that
    only appends to it adds its events instead of re-reading the session's
    (services/clustering/store.py, docs/clustering.md "Incremental sessions")."""

    __slots__ = ("genre_seconds", "kids", "teen", "total", "titles", "series", "items", "vpn_items")

    def __init__(self) -> None:
        self.genre_seconds = [0.0] * len(GENRES)
        self.kids = self.teen = self.total = 0.0
        self.titles: set[str] = set()
        self.series: dict[str, set[str]] = {}
        self.items = self.vpn_items = 0

    def add(self, item: WatchItem, placements) -> None:
        """Count one event (``placements``: the vocabulary's ``placements``)."""
        self.items += 1
        self.vpn_items += bool(item.vpn)
        seconds = max(float(item.duration_s), 0.0)
        self.total += seconds
        if item.genres:
            share = seconds / len(item.genres)
            genre_seconds = self.genre_seconds
            for g in item.genres:
                for index, weight in placements(g):
                    genre_seconds[index] += share * weight
        if item.maturity == "kids":
            self.kids += seconds
        elif item.maturity == "teen":
            self.teen += seconds
        if item.title_id:
            self.titles.add(item.title_id)
            if item.series_id:
                episodes = self.series.setdefault(item.series_id, set())
                if len(episodes) < BINGE_EPISODES:
                    episodes.add(item.title_id)

    def features(self, start_ts: float, device_type: str) -> np.ndarray:
        """The session's feature vector (FEATURE_DIM float32)."""
        return sums_features([self], [start_ts], [device_type])[0]

    def binge(self) -> float:
        return float(any(len(eps) >= BINGE_EPISODES for eps in self.series.values()))

    def to_dict(self) -> dict:
        return {"genre_seconds": self.genre_seconds, "kids": self.kids, "teen": self.teen, "total": self.total,
                "titles": sorted(self.titles), "series": {k: sorted(v) for k, v in sorted(self.series.items())},
                "items": self.items, "vpn_items": self.vpn_items}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSums":
        """What ``to_dict`` wrote; ValueError for anything else (a field missing, extra or
        of another type, a number not finite, another genre layout)."""
        if not isinstance(d, dict) or d.keys() != _SUMS_FIELDS:
            raise ValueError("feature sums: not the fields to_dict writes")
        sums = cls()
        sums.genre_seconds = checked(d, "genre_seconds", [float])
        if len(sums.genre_seconds) != len(GENRES):
            raise ValueError("genre sums of another layout")
        sums.kids, sums.teen, sums.total = checked(d, "kids", float), checked(d, "teen", float), checked(d, "total", float)
        sums.titles = set(checked(d, "titles", [str]))
        sums.series = {k: set(v) for k, v in checked(d, "series", {str: [str]}).items()}
        sums.items, sums.vpn_items = checked(d, "items", int), checked(d, "vpn_items", int)
        return sums


def sums_features(sums: Sequence[FeatureSums], start_ts: Sequence[float], device_types: Sequence[str]) -> np.ndarray:
    """``FeatureSums.features`` of N sessions in one ``features_matrix`` call, shape (N,
    FEATURE_DIM) float32: each row is computed element by element, so it is the row the
    session alone gets, to the bit (tests/unit/test_sums_features.py); one call instead of
    N is what an ingest of thousands of new households saves (~80 µs a call, ingest29)."""
    return features_matrix(
        np.array(start_ts, dtype=np.float64), np.array([device_index(d) for d in device_types], dtype=np.int64),
        np.array([s.genre_seconds for s in sums], dtype=np.float64).reshape(len(sums), len(GENRES)),
        np.array([s.kids for s in sums], dtype=np.float64), np.array([s.teen for s in sums], dtype=np.float64),
        np.array([s.total for s in sums], dtype=np.float64), np.array([s.binge() for s in sums], dtype=np.float64),
        np.array([len(s.titles) for s in sums], dtype=np.float64),
        np.array([s.vpn_items / s.items if s.items else 0.0 for s in sums], dtype=np.float64),
    )


_SUMS_FIELDS = frozenset(("genre_seconds", "kids", "teen", "total", "titles", "series", "items", "vpn_items"))


def checked(d: dict, name: str, kind):
    """``d[name]`` when it is of ``kind`` (JSON as ``json.loads`` reads it): ``str``,
    ``int`` (not a bool), ``float`` (an int or a float, finite; returned as a float),
    ``dict`` (any), ``[str]``, ``[float]``, ``{str: int}`` or ``{str: [str]}``;
    ValueError naming the field otherwise. For the running states the clustering store
    keeps (``FeatureSums.from_dict``, ``SessionState.from_bytes``)."""
    value = d[name]
    if isinstance(kind, list):
        if type(value) is list:
            if kind[0] is str and all(type(v) is str for v in value):
                return value
            if kind[0] is float and all((type(v) is float or type(v) is int) and -math.inf < v < math.inf
                                        for v in value):
                return [float(v) for v in value]
    elif isinstance(kind, dict):
        if type(value) is dict:
            inner = kind[str]
            if inner is int and all(type(v) is int for v in value.values()):
                return value
            if inner == [str] and all(type(v) is list and all(type(x) is str for x in v) for v in value.values()):
                return value
    elif kind is float:
        if (type(value) is float or type(value) is int) and math.isfinite(value):
            return float(value)
    elif kind is int:
        if type(value) is int:
            return value
    elif type(value) is kind:
        return value
    raise ValueError(f"{name}: not {kind!r}")


def session_features(start_ts: float, device_type: str, items: Iterable[WatchItem],
                     vocabulary: GenreVocabulary | None = None) -> np.ndarray:
    """One session's feature vector (FEATURE_DIM float32)."""
    placements = (vocabulary or DEFAULT_VOCABULARY).placements
    sums = FeatureSums()
    for item in items:
        sums.add(item, placements)
    return sums.features(start_ts, device_type)


DEFAULT_VOCABULARY = GenreVocabulary()


def to_bytes(vectors: np.ndarray) -> bytes:
    """Bulk vectors travel as little-endian float32 bytes (row-major)."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def from_bytes(data: bytes, dim: int = FEATURE_DIM) -> np.ndarray:
    """Inverse of ``to_bytes``; raises ValueError when the length is not a multiple of dim."""
    if len(data) % (4 * dim):
        raise ValueError(f"vector bytes length {len(data)} is not a multiple of 4*{dim}")
    return np.frombuffer(data, dtype="<f4").reshape(-1, dim)
