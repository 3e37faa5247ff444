"""A/B experiments: which model variant a household gets, and whether a variant is better.

Assignment
----------
bucket(account) = int(SHA-256(salt + "\\x1f" + account_id)[:8], big-endian) mod 10,000.
The salt is the experiment's name, so two experiments split households independently;
the unit separator keeps ("ab", "c") and ("a", "bc") apart. 2^64 mod 10^4 bias is
below 1e-15 and ignored.

Traffic is given in percent per *treatment* variant, with 0.01 % resolution (one
bucket). Treatments take contiguous bucket ranges in the order listed in the flags,
starting at bucket 0; control gets every remaining bucket. So raising the share of
the first (or only) treatment only moves households from control into it, never
between treatments. ``kill_switch`` sends everybody to control at once, without
losing the configured shares (turning it off restores the same split).

Comparison
----------
Per variant: accuracy, top-label Brier, ECE on the predictions that received
feedback. Against control:
- accuracy: two-proportion z-test, pooled, two-sided, on the weighted accuracies
  with Kish effective sample sizes n_eff = (sum w)^2 / sum w^2 (equal to n without
  weights);
- Brier: percentile bootstrap CI of Brier(variant) - Brier(control), resampling each
  arm independently (``n_bootstrap`` draws, seeded, so results are reproducible).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.feedback.domain.errors import InvalidArgument
from services.common import strict_json
from services.feedback.domain.metrics import DEFAULT_BINS, as_vector, as_weights, expected_calibration_error

BUCKETS = 10_000
_SEPARATOR = "\x1f"
FLAGS_SCHEMA = 1


def bucket(salt: str, account_id: str) -> int:
    """Stable bucket 0..9999 of an account within an experiment (see module doc)."""
    if not isinstance(account_id, str) or not account_id:
        raise InvalidArgument("account_id", "must be a non-empty string")
    digest = hashlib.sha256(f"{salt}{_SEPARATOR}{account_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class ExperimentFlags:
    """Flags of one experiment; validated on construction, serialisable to JSON.

    ``salt``: experiment name used in the hash. ``control``: the variant everybody gets
    by default (e.g. "kmeans"). ``traffic``: percent of households per treatment (e.g.
    ``{"gmm": 30.0}``), multiples of 0.01, total <= 100. ``kill_switch``: all to control.
    ``version``: bumped by whoever changes the flags (for audit and caching).
    """

    salt: str
    control: str = "kmeans"
    traffic: Mapping[str, float] = field(default_factory=dict)
    kill_switch: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str) or not self.salt or _SEPARATOR in self.salt:
            raise InvalidArgument("salt", "must be a non-empty string without the unit separator")
        if not isinstance(self.control, str) or not self.control:
            raise InvalidArgument("control", "must be a non-empty variant name")
        if not isinstance(self.traffic, Mapping):
            raise InvalidArgument("traffic", "must map variant name to percent")
        if not isinstance(self.kill_switch, bool):
            raise InvalidArgument("kill_switch", "must be true or false")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidArgument("version", "must be an integer >= 0")
        total = 0
        for name, percent in self.traffic.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgument("traffic", "variant names must be non-empty strings")
            if name == self.control:
                raise InvalidArgument(f"traffic.{name}", "the control gets the remainder; do not list it")
            if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent):
                raise InvalidArgument(f"traffic.{name}", f"must be a number, got {percent!r}")
            if not 0.0 <= percent <= 100.0:
                raise InvalidArgument(f"traffic.{name}", f"must lie in [0, 100], got {percent}")
            buckets = round(percent * BUCKETS / 100)
            if abs(buckets - percent * BUCKETS / 100) > 1e-6:
                raise InvalidArgument(f"traffic.{name}", f"resolution is 0.01 %, got {percent}")
            total += buckets
        if total > BUCKETS:
            raise InvalidArgument("traffic", f"shares add up to {total / 100:.2f} %, more than 100 %")
        # Freeze a private copy so later changes to the caller's dict cannot move traffic.
        object.__setattr__(self, "traffic", dict(self.traffic))

    @property
    def variants(self) -> tuple[str, ...]:
        """Control first, then treatments in flag order."""
        return (self.control, *self.traffic.keys())

    def bucket_ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open bucket range [start, stop) per treatment (before the kill switch)."""
        ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for name, percent in self.traffic.items():
            stop = start + round(percent * BUCKETS / 100)
            ranges[name] = (start, stop)
            start = stop
        return ranges

    def shares(self) -> dict[str, float]:
        """Effective percent per variant, control included (all 100 % to control under the kill switch)."""
        if self.kill_switch:
            return {self.control: 100.0, **{name: 0.0 for name in self.traffic}}
        treated = sum(round(p * BUCKETS / 100) for p in self.traffic.values())
        return {self.control: (BUCKETS - treated) * 100 / BUCKETS, **{n: float(p) for n, p in self.traffic.items()}}

    @classmethod
    def from_split(
        cls, salt: str, split: Mapping[str, float], control: str, kill_switch: bool = False, version: int = 1
    ) -> "ExperimentFlags":
        """Flags from a full split that includes control and sums to 100 (the SetFlag API form).

        A map has no dependable order, so treatments take their bucket ranges in name order.
        """
        if not isinstance(split, Mapping) or control not in split:
            raise InvalidArgument("traffic", f"must include the control variant {control!r}")
        total = sum(float(v) for v in split.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if abs(total - 100.0) > 1e-6:
            raise InvalidArgument("traffic", f"percentages must sum to 100, got {total:g}")
        treatments = {name: split[name] for name in sorted(split) if name != control}
        return cls(salt=salt, control=control, traffic=treatments, kill_switch=kill_switch, version=version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": FLAGS_SCHEMA,
            "salt": self.salt,
            "control": self.control,
            "traffic": dict(self.traffic),
            "kill_switch": self.kill_switch,
            "version": self.version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentFlags":
        if not isinstance(data, Mapping):
            raise InvalidArgument("flags", "must be a JSON object")
        if data.get("schema", FLAGS_SCHEMA) != FLAGS_SCHEMA:
            raise InvalidArgument("schema", f"unsupported flags schema {data.get('schema')!r}")
        unknown = set(data) - {"schema", "salt", "control", "traffic", "kill_switch", "version"}
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], "unknown flag field")
        if "salt" not in data:
            raise InvalidArgument("salt", "is missing")
        return cls(
            salt=data["salt"],
            control=data.get("control", "kmeans"),
            traffic=data.get("traffic", {}),
            kill_switch=data.get("kill_switch", False),
            version=data.get("version", 1),
        )

    @classmethod
    def from_json(cls, text: str) -> "ExperimentFlags":
        try:
            data = strict_json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("flags", f"is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data)


def variant_for_bucket(flags: ExperimentFlags, bucket_id: int) -> str:
    """The variant owning a bucket under these flags (control when the kill switch is on)."""
    if not 0 <= bucket_id < BUCKETS:
        raise InvalidArgument("bucket_id", f"must lie in [0, {BUCKETS})")
    if flags.kill_switch:
        return flags.control
    for name, (start, stop) in flags.bucket_ranges().items():
        if start <= bucket_id < stop:
            return name
    return flags.control


def assign_variant(flags: ExperimentFlags, account_id: str) -> str:
    """Variant of one household; deterministic in (flags.salt, account_id)."""
    return variant_for_bucket(flags, bucket(flags.salt, account_id))


def assign_variants(flags: ExperimentFlags, account_ids: Iterable[str]) -> NDArray[np.str_]:
    """Variants of many households (hashing is per id; the bucket lookup is vectorised)."""
    buckets = np.fromiter((bucket(flags.salt, a) for a in account_ids), dtype=np.int64)
    names = np.asarray(flags.variants)
    if flags.kill_switch or not flags.traffic:
        return np.full(buckets.shape[0], flags.control, dtype=names.dtype)
    # Owner of each bucket: treatments' stops are sorted; beyond the last stop it is control.
    stops = np.array([stop for _, stop in flags.bucket_ranges().values()])
    owner = np.searchsorted(stops, buckets, side="right")  # 0..len(traffic); len(traffic) = control
    lookup = np.append(names[1:], names[0])
    return lookup[owner]


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class VariantMetrics:
    """Feedback-based metrics of one variant: n, effective n, weighted accuracy, Brier, ECE."""

    variant: str
    n: int
    n_effective: float
    accuracy: float
    brier: float
    ece: float


@dataclass(frozen=True)
class VariantComparison:
    """Treatment minus control: accuracy z-test and bootstrap CI of the Brier difference."""

    variant: str
    control: str
    accuracy_diff: float
    z: float
    p_value: float
    brier_diff: float
    brier_ci_low: float
    brier_ci_high: float
    confidence_level: float

    @property
    def accuracy_significant(self) -> bool:
        return self.p_value < 1.0 - self.confidence_level

    @property
    def brier_significant(self) -> bool:
        """True when the CI excludes 0."""
        return self.brier_ci_low > 0.0 or self.brier_ci_high < 0.0


def two_proportion_z_test(p1: float, n1: float, p2: float, n2: float) -> tuple[float, float]:
    """Pooled two-sided z-test of p1 - p2; returns (z, p-value).

    When the pooled proportion is 0 or 1 the difference is exactly 0 and untestable:
    (0.0, 1.0) is returned rather than a division by zero.
    """
    if n1 <= 0 or n2 <= 0:
        raise InvalidArgument("n", "both sample sizes must be positive")
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0, 1.0
    z = (p1 - p2) / math.sqrt(variance)
    # Two-sided normal tail, 2 * (1 - Phi(|z|)) = erfc(|z| / sqrt 2): scipy.stats.norm.sf to
    # 1e-10 relative, without importing scipy.stats (a third of the service's start-up).
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def _bootstrap_weighted_means(values: NDArray[np.float64], weights: NDArray[np.float64], n_draws: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """``n_draws`` bootstrap replicates of the weighted mean, in memory-bounded chunks."""
    n = values.shape[0]
    chunk = max(1, 4_000_000 // max(n, 1))  # ~32 MB of int64 indices per chunk
    out = np.empty(n_draws)
    wx = weights * values
    for start in range(0, n_draws, chunk):
        stop = min(n_draws, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        w_sum = weights[idx].sum(axis=1)
        out[start:stop] = wx[idx].sum(axis=1) / np.where(w_sum > 0, w_sum, 1.0)
    return out


def compare_variants(
    variants: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
    weights: ArrayLike | None = None,
    control: str = "kmeans",
    n_bootstrap: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> tuple[dict[str, VariantMetrics], list[VariantComparison]]:
    """Per-variant metrics and each treatment's comparison with ``control``.

    Rows are predictions with feedback: their variant, top-label confidence and
    correctness (0/1). Returns ({variant: metrics}, [comparison per treatment]); no
    comparison is made when control has no rows.
    """
    names = np.asarray(variants).astype(str)
    n = names.shape[0]
    if names.ndim != 1:
        raise InvalidArgument("variants", "must be a 1-D array")
    if n == 0:
        raise InvalidArgument("variants", "needs at least one prediction with feedback")
    conf = as_vector(confidence, n, "confidence", 0.0, 1.0)
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    w = as_weights(weights, n)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 100:
        raise InvalidArgument("n_bootstrap", "must be an integer >= 100")
    if not 0.5 <= confidence_level < 1.0:
        raise InvalidArgument("confidence_level", "must lie in [0.5, 1)")

    squared_error = (conf - outcome) ** 2
    metrics: dict[str, VariantMetrics] = {}
    arms: dict[str, np.ndarray] = {}
    for name in sorted(set(names.tolist())):
        rows = np.flatnonzero(names == name)
        wr = w[rows]
        if wr.sum() <= 0:
            continue
        arms[name] = rows
        metrics[name] = VariantMetrics(
            variant=name,
            n=int(rows.size),
            n_effective=float(wr.sum() ** 2 / np.sum(wr**2)),
            accuracy=float(np.dot(wr, outcome[rows]) / wr.sum()),
            brier=float(np.dot(wr, squared_error[rows]) / wr.sum()),
            ece=expected_calibration_error(conf[rows], outcome[rows], wr, n_bins),
        )
    comparisons: list[VariantComparison] = []
    if control not in metrics:
        return metrics, comparisons
    rng = np.random.default_rng(seed)
    base = metrics[control]
    control_draws = _bootstrap_weighted_means(squared_error[arms[control]], w[arms[control]], n_bootstrap, rng)
    tail = (1.0 - confidence_level) / 2.0
    for name, m in metrics.items():
        if name == control:
            continue
        z, p_value = two_proportion_z_test(m.accuracy, m.n_effective, base.accuracy, base.n_effective)
        draws = _bootstrap_weighted_means(squared_error[arms[name]], w[arms[name]], n_bootstrap, rng) - control_draws
        low, high = np.quantile(draws, [tail, 1.0 - tail])
        comparisons.append(
            VariantComparison(
                variant=name,
                control=control,
                accuracy_diff=m.accuracy - base.accuracy,
                z=z,
                p_value=p_value,
                brier_diff=m.brier - base.brier,
                brier_ci_low=float(low),
                brier_ci_high=float(high),
                confidence_level=confidence_level,
            )
        )
    return metrics, comparisons
