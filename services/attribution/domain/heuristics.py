"""Heuristic attribution baselines: first touch, last touch, linear.

Conventions (identical to ChannelAttribution's ``heuristic_models``):

* first touch: all of a path's conversions and value go to its first channel;
* last touch: to its last channel;
* linear: each *touch* gets ``1/len(path)`` of the path, so a channel that occurs
  twice gets twice the share (repeats are not collapsed).

Empty paths credit nothing. All three are single ``bincount`` passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.attribution.domain.paths import Paths

HEURISTICS = ("first_touch", "last_touch", "linear")


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


def _positional(paths: Paths, use_last: bool, method: str) -> HeuristicResult:
    nonempty = paths.lengths > 0
    idx = (paths.offsets[1:] - 1 if use_last else paths.offsets[:-1])[nonempty]
    codes = paths.channels[idx]
    n = paths.n_channels
    return HeuristicResult(
        method=method,
        channel_names=paths.channel_names,
        conversions=np.bincount(codes, weights=paths.conversions[nonempty], minlength=n),
        revenue=np.bincount(codes, weights=paths.values[nonempty], minlength=n),
    )


def first_touch(paths: Paths) -> HeuristicResult:
    """All credit of a path to its first channel."""
    return _positional(paths, use_last=False, method="first_touch")


def last_touch(paths: Paths) -> HeuristicResult:
    """All credit of a path to its last channel."""
    return _positional(paths, use_last=True, method="last_touch")


def linear(paths: Paths) -> HeuristicResult:
    """Credit of a path split equally over its touches."""
    lengths = paths.lengths
    row = paths.row_of_touch()
    inv = np.divide(1.0, lengths, out=np.zeros(paths.n_paths), where=lengths > 0)
    n = paths.n_channels
    return HeuristicResult(
        method="linear",
        channel_names=paths.channel_names,
        conversions=np.bincount(paths.channels, weights=(paths.conversions * inv)[row], minlength=n),
        revenue=np.bincount(paths.channels, weights=(paths.values * inv)[row], minlength=n),
    )


def heuristic_attribution(paths: Paths) -> dict[str, HeuristicResult]:
    """All three baselines, keyed by method name."""
    return {"first_touch": first_touch(paths), "last_touch": last_touch(paths), "linear": linear(paths)}
