"""Journeys from touchpoints and conversions, per account or per person.

Inputs are column arrays (one entry per touchpoint / per conversion); the output is
the compact :class:`~paths.Paths` with fractional weights plus per-path metadata.

Conventions
-----------
* **Entity.** ``level="account"`` builds one stream per account. ``level="person"``
  builds one per (account, person); person ``j`` of an account is column ``j`` of the
  person-probability matrices (the clustering service's ``p1, p2, ...`` in order).
* **Touch assignment** (person level): a touch goes to its most probable person
  (``argmax`` of its probability row; ties -> lowest index). A path holds whole
  touches, so uncertainty is carried by the conversion weights instead.
* **Conversion split** (person level): a conversion with person probabilities ``q``
  becomes one journey per person ``j`` with ``q_j > min_person_probability``, with
  ``conversions = q_j``, ``value = q_j * value`` and ``nulls = 1 - q_j`` (the same
  journey, observed once, ended in a conversion with probability ``q_j``; with
  ``include_nulls=False`` the null part is dropped). Without conversion
  probabilities, ``q_j`` is proportional to person ``j``'s touches in the window.
* **Window.** The journey of a conversion at time ``t`` holds the entity's touches
  with ``t - lookback <= ts <= t``; with ``reset_after_conversion`` (default) only
  those after the entity's previous conversion (``ts > t_prev``), so a touch
  credits at most one conversion of an entity.
* **Null journeys** (``include_nulls``): touches in no conversion window form
  non-converting journeys (``nulls = 1``), split when the entity changes, when a
  covered touch lies between two uncovered ones, or when two touches are more than
  ``lookback`` apart.
* A conversion whose window is empty has no channel to credit; its weight is
  reported in ``unattributed_conversions``/``unattributed_value`` and it creates no
  path.
* Times are numbers (any unit, ``lookback`` in the same unit) or ``datetime64`` with
  a ``timedelta64`` lookback.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths

Level = Literal["account", "person"]


@dataclass(frozen=True, eq=False)
class JourneySet:
    """Journeys plus where each came from.

    ``path_account[i]`` indexes ``accounts``; ``path_person[i]`` is the person column
    (-1 at account level); ``path_conversion[i]`` indexes the input conversions (-1
    for a null journey).
    """

    paths: Paths
    accounts: np.ndarray
    path_account: np.ndarray
    path_person: np.ndarray
    path_conversion: np.ndarray
    unattributed_conversions: float
    unattributed_value: float
    level: str
    touch_ages: np.ndarray | None = None
    """Per touch of ``paths``: time from the touch to its journey's end (the conversion,
    or the journey's last touch for a null journey), in the input's time unit
    (nanoseconds for datetime64). Feeds the time-decay heuristic."""

    def select(self, mask: np.ndarray) -> JourneySet:
        """Subset of journeys (e.g. one account or one person)."""
        m = np.asarray(mask, dtype=bool)
        return JourneySet(
            paths=self.paths.select(m),
            accounts=self.accounts,
            path_account=self.path_account[m],
            path_person=self.path_person[m],
            path_conversion=self.path_conversion[m],
            unattributed_conversions=float("nan"),
            unattributed_value=float("nan"),
            level=self.level,
            touch_ages=None if self.touch_ages is None else self.touch_ages[np.repeat(m, self.paths.lengths)],
        )

    def for_person(self, account: object, person: int) -> Paths:
        """Journeys of one person of one account (account ids are compared as strings)."""
        account = str(account)
        code = int(np.searchsorted(self.accounts, account))
        if code >= self.accounts.size or self.accounts[code] != account:
            raise AttributionInputError("account", f"unknown account {account!r}")
        return self.paths.select((self.path_account == code) & (self.path_person == person))


def _as_time(values: object, field: str) -> tuple[np.ndarray, bool]:
    arr = np.asarray(values)
    if np.issubdtype(arr.dtype, np.datetime64):
        return arr.astype("datetime64[ns]").astype(np.int64), True
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise AttributionInputError(field, "must be numbers or datetime64") from None
    if not np.all(np.isfinite(out)):
        raise AttributionInputError(field, "must be finite")
    return out, False


def _lookback(value: object, is_datetime: bool) -> float | int:
    if is_datetime:
        if not isinstance(value, np.timedelta64):
            raise AttributionInputError("lookback", "must be a numpy timedelta64 when times are datetime64")
        out = int(value.astype("timedelta64[ns]").astype(np.int64))
    else:
        if isinstance(value, np.timedelta64):
            raise AttributionInputError("lookback", "must be a number when times are numbers")
        out = float(value)  # type: ignore[arg-type]
        if not np.isfinite(out):
            raise AttributionInputError("lookback", "must be finite")
    if out <= 0:
        raise AttributionInputError("lookback", "must be positive")
    return out


def _probabilities(values: object, n: int, field: str, n_persons: int | None) -> np.ndarray:
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n:
        raise AttributionInputError(field, f"must be a ({n}, n_persons) matrix")
    if n_persons is not None and p.shape[1] != n_persons:
        raise AttributionInputError(field, f"must have {n_persons} columns like the touch probabilities")
    if p.shape[1] < 1:
        raise AttributionInputError(field, "needs at least one person column")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise AttributionInputError(field, "must be finite and non-negative")
    if n and not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise AttributionInputError(field, "rows must sum to 1")
    return p


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])`` for all i, vectorised."""
    lengths = np.maximum(hi - lo, 0)
    total = int(lengths.sum())
    starts = np.repeat(lo, lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def build_journeys(
    touch_account: Sequence[object] | np.ndarray,
    touch_ts: Sequence[object] | np.ndarray,
    touch_channel: Sequence[str] | np.ndarray,
    conv_account: Sequence[object] | np.ndarray,
    conv_ts: Sequence[object] | np.ndarray,
    conv_value: Sequence[float] | np.ndarray | None = None,
    *,
    lookback: float | np.timedelta64,
    level: Level = "account",
    touch_person_prob: np.ndarray | None = None,
    conv_person_prob: np.ndarray | None = None,
    touch_campaign: Sequence[str] | np.ndarray | None = None,
    use_campaign: bool = False,
    conv_kind: Sequence[str] | np.ndarray | None = None,
    kinds: Collection[str] | None = None,
    reset_after_conversion: bool = True,
    include_nulls: bool = True,
    min_person_probability: float = 0.0,
    channel_names: Sequence[str] | None = None,
) -> JourneySet:
    """Build journeys (see the module docstring for every convention).

    ``touch_device`` is deliberately not an input: devices are evidence for the
    identity resolver, whose output arrives here as ``touch_person_prob``.
    """
    n_t = len(touch_account)
    n_c = len(conv_account)
    for name, arr, n in (
        ("touch_ts", touch_ts, n_t), ("touch_channel", touch_channel, n_t),
        ("conv_ts", conv_ts, n_c),
    ):
        if len(arr) != n:
            raise AttributionInputError(name, f"must have {n} entries")
    if level not in ("account", "person"):
        raise AttributionInputError("level", f"must be 'account' or 'person', got {level!r}")
    t_time, t_dt = _as_time(touch_ts, "touch_ts")
    c_time, c_dt = _as_time(conv_ts, "conv_ts")
    if n_t and n_c and t_dt != c_dt:
        raise AttributionInputError("conv_ts", "must use the same time type as touch_ts")
    lb = _lookback(lookback, t_dt if n_t else c_dt)
    value = np.zeros(n_c) if conv_value is None else np.asarray(conv_value, dtype=np.float64)
    if value.shape != (n_c,) or not np.all(np.isfinite(value)) or np.any(value < 0):
        raise AttributionInputError("conv_value", f"must be {n_c} finite non-negative numbers")
    if not 0.0 <= min_person_probability < 1.0:
        raise AttributionInputError("min_person_probability", "must be in [0, 1)")

    # Conversion kinds filter.
    conv_keep = np.ones(n_c, dtype=bool)
    if kinds is not None:
        if conv_kind is None or len(conv_kind) != n_c:
            raise AttributionInputError("conv_kind", "needed (one per conversion) when kinds is given")
        conv_keep = np.isin(np.asarray(conv_kind, dtype=object), list(kinds))

    # Channel labels -> codes.
    labels = np.asarray(touch_channel, dtype=object).astype(str) if n_t else np.zeros(0, dtype=str)
    if use_campaign:
        if touch_campaign is None or len(touch_campaign) != n_t:
            raise AttributionInputError("touch_campaign", "needed (one per touch) when use_campaign is set")
        labels = np.char.add(np.char.add(labels, "/"), np.asarray(touch_campaign, dtype=object).astype(str))
    if channel_names is None:
        names, codes = np.unique(labels, return_inverse=True)
    else:
        names = np.asarray([str(c) for c in channel_names])
        order = np.argsort(names)
        pos = np.searchsorted(names[order], labels)
        pos = np.minimum(pos, max(names.size - 1, 0))
        if n_t and (names.size == 0 or np.any(names[order][pos] != labels)):
            raise AttributionInputError("touch_channel", "contains a channel not in channel_names")
        codes = order[pos] if n_t else np.zeros(0, np.int64)

    # Accounts -> codes.
    t_acc = np.asarray(touch_account, dtype=object)
    c_acc = np.asarray(conv_account, dtype=object)
    try:
        accounts, acc_codes = np.unique(np.concatenate((t_acc, c_acc)).astype(str), return_inverse=True)
    except TypeError:  # pragma: no cover - mixed unorderable labels
        raise AttributionInputError("touch_account", "account ids must be strings or numbers") from None
    t_acc_code, c_acc_code = acc_codes[:n_t], acc_codes[n_t:]

    # Entities.
    if level == "person":
        if touch_person_prob is None:
            raise AttributionInputError("touch_person_prob", "needed at level='person'")
        tp = _probabilities(touch_person_prob, n_t, "touch_person_prob", None)
        n_persons = tp.shape[1]
        t_person = np.argmax(tp, axis=1) if n_t else np.zeros(0, np.int64)
        cp = None if conv_person_prob is None else _probabilities(
            conv_person_prob, n_c, "conv_person_prob", n_persons
        )
    else:
        n_persons = 1
        t_person = np.zeros(n_t, dtype=np.int64)
        cp = None
    t_entity = t_acc_code.astype(np.int64) * n_persons + t_person

    # Conversion records: one per (conversion, person) at person level.
    conv_idx = np.flatnonzero(conv_keep)
    rec_conv = np.repeat(conv_idx, n_persons)
    rec_person = np.tile(np.arange(n_persons), conv_idx.size)
    rec_entity = c_acc_code[rec_conv].astype(np.int64) * n_persons + rec_person
    rec_time = c_time[rec_conv]

    # Sort touches by (entity, time) and search windows on a combined rank key.
    all_times = np.concatenate((t_time, rec_time, rec_time - lb))
    uniq_t, ranks = np.unique(all_times, return_inverse=True)
    n_rank = uniq_t.size + 1
    t_rank = ranks[:n_t]
    r_rank = ranks[n_t : n_t + rec_time.size]
    r_low_rank = ranks[n_t + rec_time.size :]
    t_order = np.lexsort((t_rank, t_entity))
    t_key = t_entity[t_order] * n_rank + t_rank[t_order]
    r_order = np.lexsort((r_rank, rec_entity))
    rec_conv, rec_person, rec_entity = rec_conv[r_order], rec_person[r_order], rec_entity[r_order]
    r_rank, r_low_rank = r_rank[r_order], r_low_rank[r_order]
    def windows(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Touch index ranges [lower, upper) of the kept records (reset among kept)."""
        ent, rk, low = rec_entity[keep], r_rank[keep], r_low_rank[keep]
        upper = np.searchsorted(t_key, ent * n_rank + rk, side="right")
        lower = np.searchsorted(t_key, ent * n_rank + low, side="left")
        if reset_after_conversion and ent.size:
            same_prev = np.zeros(ent.size, dtype=bool)
            same_prev[1:] = ent[1:] == ent[:-1]
            after_prev = np.searchsorted(t_key, ent * n_rank + np.roll(rk, 1), side="right")
            lower = np.where(same_prev, np.maximum(lower, after_prev), lower)
        return np.minimum(lower, upper), upper

    everyone = np.ones(rec_entity.size, dtype=bool)
    if level == "person":
        if cp is not None:
            q = cp[rec_conv, rec_person]
        else:
            # Share of the conversion's window touches per person (every conversion of
            # the account resets every person's window, as at account level).
            lo_all, up_all = windows(everyone)
            counts = (up_all - lo_all).astype(np.float64)
            per_conv = np.bincount(rec_conv, weights=counts, minlength=n_c)
            q = np.divide(counts, per_conv[rec_conv], out=np.zeros_like(counts), where=per_conv[rec_conv] > 0)
        q = np.where(q > min_person_probability, q, 0.0)
        # Renormalise after dropping persons under the threshold.
        tot = np.bincount(rec_conv, weights=q, minlength=n_c)
        q = np.divide(q, tot[rec_conv], out=np.zeros_like(q), where=tot[rec_conv] > 0)
        keep_rec = q > 0
    else:
        q = np.ones(rec_conv.size)
        keep_rec = everyone
    # Only records that carry weight open a window (and reset it): a person with no
    # share of a conversion keeps their touches for their own later conversion.
    lower_k, upper_k = windows(keep_rec)
    rec_conv_k, rec_person_k, rec_entity_k, q_k = (
        rec_conv[keep_rec], rec_person[keep_rec], rec_entity[keep_rec], q[keep_rec]
    )
    empty = upper_k == lower_k
    unattributed_conv = float(q_k[empty].sum())
    unattributed_value = float((q_k * value[rec_conv_k])[empty].sum())
    used = ~empty
    upper_k, lower_k = upper_k[used], lower_k[used]
    rec_conv_k, rec_person_k, rec_entity_k, q_k = rec_conv_k[used], rec_person_k[used], rec_entity_k[used], q_k[used]

    sorted_codes = codes[t_order].astype(np.int32) if n_t else np.zeros(0, np.int32)
    conv_touch_idx = _ranges(lower_k, upper_k)
    conv_lengths = upper_k - lower_k
    conv_w = q_k
    conv_v = q_k * value[rec_conv_k]
    conv_null = (1.0 - q_k) if (include_nulls and level == "person") else np.zeros(q_k.size)
    conv_null = np.clip(conv_null, 0.0, None)

    # Null journeys from uncovered touches.
    covered = np.zeros(n_t + 1, dtype=np.int64)
    np.add.at(covered, lower_k, 1)
    np.add.at(covered, upper_k, -1)
    is_covered = np.cumsum(covered[:-1]) > 0
    if include_nulls and n_t:
        free = np.flatnonzero(~is_covered)
        ent = t_entity[t_order][free]
        tm = t_time[t_order][free]
        new = np.ones(free.size, dtype=bool)
        new[1:] = (ent[1:] != ent[:-1]) | (free[1:] != free[:-1] + 1) | ((tm[1:] - tm[:-1]) > lb)
        starts = np.flatnonzero(new)
        null_lengths = np.diff(np.concatenate((starts, [free.size])))
        null_idx = free
        null_entity = ent[starts]
        null_end = np.repeat(np.maximum.reduceat(tm, starts), null_lengths) if free.size else np.zeros(0)
    else:
        null_lengths = np.zeros(0, dtype=np.int64)
        null_idx = np.zeros(0, dtype=np.int64)
        null_entity = np.zeros(0, dtype=np.int64)
        null_end = np.zeros(0)

    lengths = np.concatenate((conv_lengths, null_lengths)).astype(np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    touch_idx = np.concatenate((conv_touch_idx, null_idx)).astype(np.int64)
    n_null = null_lengths.size
    paths = Paths(
        channels=sorted_codes[touch_idx] if touch_idx.size else np.zeros(0, np.int32),
        offsets=offsets,
        conversions=np.concatenate((conv_w, np.zeros(n_null))),
        values=np.concatenate((conv_v, np.zeros(n_null))),
        nulls=np.concatenate((conv_null, np.ones(n_null))),
        channel_names=tuple(str(n) for n in names),
    )
    entity = np.concatenate((rec_entity_k, null_entity)).astype(np.int64)
    sorted_times = t_time[t_order].astype(np.float64) if n_t else np.zeros(0)
    journey_end = np.concatenate((np.repeat(c_time[rec_conv_k].astype(np.float64), conv_lengths), null_end))
    touch_ages = np.clip(journey_end - sorted_times[touch_idx], 0.0, None) if touch_idx.size else np.zeros(0)
    return JourneySet(
        paths=paths,
        accounts=accounts,
        path_account=entity // n_persons,
        path_person=(entity % n_persons) if level == "person" else np.full(entity.size, -1),
        path_conversion=np.concatenate((rec_conv_k, np.full(n_null, -1))).astype(np.int64),
        unattributed_conversions=unattributed_conv,
        unattributed_value=unattributed_value,
        level=level,
        touch_ages=touch_ages,
    )
