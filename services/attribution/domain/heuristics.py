"""Heuristic attribution: first touch, last touch, linear, time decay, position-based.

Every heuristic splits each path's conversions (and value) over the path's *touches*
with fractions that sum to 1 per non-empty path; :func:`touch_fractions` returns them
and :func:`credit_from_fractions` turns them into credit with one ``bincount``. The
bootstrap (``bootstrap.py``) reuses the same fractions, so intervals and point
estimates share one definition.

Conventions (the first three are identical to ChannelAttribution's ``heuristic_models``):

* ``first_touch``: everything to the path's first touch; ``last_touch``: to its last.
* ``linear``: ``1/len(path)`` per touch, so a channel that occurs twice gets twice the
  share (repeats are not collapsed).
* ``time_decay``: touch weight ``2 ** (-age / half_life)`` normalised per path, where
  ``age`` is the time from the touch to the journey's end (its conversion, or its last
  touch for a null journey), in days; half-life 7 days by default. Path files carry no
  touch times, so it needs ``touch_ages`` (journeys built from touchpoints have them).
* ``position_based`` (U-shaped): weights ``(first, middle, last)`` default
  ``(0.4, 0.2, 0.4)``: the first and last touches get ``first`` and ``last``, the
  middle touches share ``middle`` equally. A path of two touches splits
  ``first : last`` (50/50 by default, as Google's "position-based" model does); a path
  of one touch gets everything.

Value: every method credits ``values`` of paths with ``conversions > 0`` only (a value
without a conversion has no conversion to follow), the same total as the Markov chain.
Empty paths credit nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths

HEURISTICS = ("first_touch", "last_touch", "linear", "time_decay", "position_based")
DEFAULT_HALF_LIFE_DAYS = 7.0
DEFAULT_POSITION_WEIGHTS = (0.4, 0.2, 0.4)


@dataclass(frozen=True)
class HeuristicParams:
    """Parameters of the time-decay and position-based heuristics (validated)."""

    half_life_days: float = DEFAULT_HALF_LIFE_DAYS
    position_weights: tuple[float, float, float] = DEFAULT_POSITION_WEIGHTS

    def __post_init__(self) -> None:
        h = float(self.half_life_days)
        if not np.isfinite(h) or h <= 0:
            raise AttributionInputError("half_life_days", f"must be finite and > 0, got {self.half_life_days!r}")
        if len(self.position_weights) != 3:   # counted before any is read or echoed back (attack31)
            raise AttributionInputError(
                "position_weights", f"must be three non-negative weights summing to 1, got {len(self.position_weights)} weights"
            )
        w = tuple(float(x) for x in self.position_weights)
        if not all(np.isfinite(x) and x >= 0 for x in w) or abs(sum(w) - 1.0) > 1e-9:
            raise AttributionInputError(
                "position_weights", f"must be three non-negative weights summing to 1, got {self.position_weights!r}"
            )
        object.__setattr__(self, "half_life_days", h)
        object.__setattr__(self, "position_weights", w)


@dataclass(frozen=True, eq=False)
class HeuristicResult:
    """Conversions and revenue credited per channel code by one heuristic."""

    method: str
    channel_names: tuple[str, ...]
    conversions: np.ndarray
    revenue: np.ndarray

    @property
    def shares(self) -> np.ndarray:
        total = self.conversions.sum()
        return self.conversions / total if total > 0 else np.zeros_like(self.conversions)


def credited_values(paths: Paths) -> np.ndarray:
    """Per-path value that any method credits: the value of paths that converted."""
    return np.where(paths.conversions > 0, paths.values, 0.0)


def check_touch_ages(paths: Paths, touch_ages: np.ndarray | Sequence[float] | None) -> np.ndarray | None:
    """Validate ages (days, one per touch, finite, >= 0); None stays None."""
    if touch_ages is None:
        return None
    ages = np.asarray(touch_ages, dtype=np.float64)
    if ages.shape != (paths.n_touches,):
        raise AttributionInputError("touch_ages", f"must have one age per touch ({paths.n_touches}), got {ages.shape}")
    if not np.all(np.isfinite(ages)) or np.any(ages < 0):
        raise AttributionInputError("touch_ages", "must be finite and >= 0 (days before the journey's end)")
    return ages


def touch_fractions(
    paths: Paths,
    method: str,
    params: HeuristicParams | None = None,
    touch_ages: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of its path's credit that every touch receives (sums to 1 per non-empty path)."""
    params = params or HeuristicParams()
    lengths = paths.lengths
    row = paths.row_of_touch()
    n_t = paths.n_touches
    pos = np.arange(n_t, dtype=np.int64) - paths.offsets[:-1][row]
    length = lengths[row]
    if method == "first_touch":
        return (pos == 0).astype(np.float64)
    if method == "last_touch":
        return (pos == length - 1).astype(np.float64)
    if method == "linear":
        return 1.0 / length if n_t else np.zeros(0)
    if method == "position_based":
        first, middle, last = params.position_weights
        out = np.zeros(n_t)
        is_first, is_last = pos == 0, pos == length - 1
        one = length == 1
        two = length == 2
        many = length >= 3
        out[one] = 1.0
        ends = first + last
        # Two touches: the ends' weights renormalised (both 0 -> equal split).
        out[two & is_first] = first / ends if ends > 0 else 0.5
        out[two & is_last] = last / ends if ends > 0 else 0.5
        out[many & is_first] = first
        out[many & is_last] = last
        inner = many & ~is_first & ~is_last
        out[inner] = middle / (length[inner] - 2)
        return out
    if method == "time_decay":
        ages = check_touch_ages(paths, touch_ages)
        if ages is None:
            raise AttributionInputError(
                "touch_ages", "time_decay needs the age of every touch (path files carry no touch times)"
            )
        # Relative to the youngest touch of the path, so weights never underflow.
        youngest = np.full(paths.n_paths, np.inf)
        np.minimum.at(youngest, row, ages)
        w = np.exp2(-(ages - youngest[row]) / params.half_life_days)
        total = np.bincount(row, weights=w, minlength=paths.n_paths)
        return w / total[row] if n_t else np.zeros(0)
    raise AttributionInputError("method", f"unknown heuristic {method!r}; one of {HEURISTICS}")


def credit_from_fractions(paths: Paths, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(conversions, revenue) per channel code from per-touch fractions."""
    row = paths.row_of_touch()
    n = paths.n_channels
    conv = np.bincount(paths.channels, weights=fractions * paths.conversions[row], minlength=n)
    rev = np.bincount(paths.channels, weights=fractions * credited_values(paths)[row], minlength=n)
    return conv, rev


def heuristic(
    paths: Paths, method: str, params: HeuristicParams | None = None, touch_ages: np.ndarray | None = None
) -> HeuristicResult:
    """One heuristic's credit."""
    conv, rev = credit_from_fractions(paths, touch_fractions(paths, method, params, touch_ages))
    return HeuristicResult(method, paths.channel_names, conv, rev)


def first_touch(paths: Paths) -> HeuristicResult:
    """All credit of a path to its first channel."""
    return heuristic(paths, "first_touch")


def last_touch(paths: Paths) -> HeuristicResult:
    """All credit of a path to its last channel."""
    return heuristic(paths, "last_touch")


def linear(paths: Paths) -> HeuristicResult:
    """Credit of a path split equally over its touches."""
    return heuristic(paths, "linear")


def available_heuristics(touch_ages: np.ndarray | None) -> tuple[str, ...]:
    """Heuristics computable on this input (time decay needs touch ages)."""
    return HEURISTICS if touch_ages is not None else tuple(h for h in HEURISTICS if h != "time_decay")


def heuristic_attribution(
    paths: Paths, params: HeuristicParams | None = None, touch_ages: np.ndarray | None = None
) -> dict[str, HeuristicResult]:
    """Every available heuristic, keyed by method name (time decay only with ages)."""
    return {m: heuristic(paths, m, params, touch_ages) for m in available_heuristics(touch_ages)}
