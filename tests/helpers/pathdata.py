"""The ChannelAttribution-format path file the attribution checks run against.

`make test` never reads outside the repository. When ``HEARTH_SHARED_DATA`` names a
directory (``.ci/run`` sets it to the shared data folder beside the checkout, when there is
one), the checks use the example file that
ships with ChannelAttribution 2.2.5 from there (it must not be copied into the project:
GPL-3.0). When it is unset, the same checks run on a file generated here, deterministically,
in the same format and of the same shape (10,000 paths over 12 channels, skewed channel
popularity, repeated touches, integer conversions, values and nulls), so a fresh clone runs
every check instead of skipping it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE_NAME = "channelattribution-pathdata.csv"
CHANNELS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta",
            "eta", "theta", "iota", "kappa", "lambda", "mu")


@dataclass(frozen=True)
class PathDataFile:
    path: Path
    n_paths: int
    n_channels: int
    conversions: float
    nulls: float
    source: str  # "shared" or "generated"


# The shape of the shared file (the ChannelAttribution example data HEARTH_SHARED_DATA points at).
SHARED_SHAPE = dict(n_paths=10_000, n_channels=12, conversions=19_785, nulls=68_602)


def generate(path: Path, n_paths: int = 10_000, seed: int = 2025) -> PathDataFile:
    """Write a ChannelAttribution-format file and return its shape, counted from the
    generator's own arrays (independently of the parser under test)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(len(CHANNELS), 0.8))
    lengths = np.minimum(rng.geometric(0.3, n_paths), 25)
    conversions = rng.poisson(1.8, n_paths)
    values = np.round(rng.gamma(2.0, 1.5, n_paths) * (conversions > 0), 3)
    nulls = rng.poisson(6.5, n_paths)
    used: set[str] = set()
    lines = ["path;total_conversions;total_conversion_value;total_null"]
    for i in range(n_paths):
        # Sticky walks: a touch repeats the previous channel with probability 0.4, as real
        # journeys do, so the order > 1 chains and repeat handling get exercised.
        walk = [CHANNELS[rng.choice(len(CHANNELS), p=popularity)]]
        for _ in range(lengths[i] - 1):
            walk.append(walk[-1] if rng.random() < 0.4 else CHANNELS[rng.choice(len(CHANNELS), p=popularity)])
        used.update(walk)
        lines.append(f"{' > '.join(walk)};{conversions[i]};{float(values[i])!r};{nulls[i]}")
    path.write_text("\n".join(lines) + "\n")
    return PathDataFile(path, n_paths, len(used), float(conversions.sum()), float(nulls.sum()), "generated")


def path_data_file(workdir: Path) -> PathDataFile:
    """The shared example file when ``HEARTH_SHARED_DATA`` is set, else a generated one in
    ``workdir``. A set variable that names no such file is an error, not a fallback."""
    root = os.environ.get("HEARTH_SHARED_DATA")
    if root:
        shared = Path(root) / FILE_NAME
        if not shared.is_file():
            raise FileNotFoundError(f"HEARTH_SHARED_DATA={root} has no {FILE_NAME}")
        return PathDataFile(shared, source="shared", **SHARED_SHAPE)
    return generate(workdir / FILE_NAME)
