"""Seeded household simulator with ground truth, for tests and benchmarks.

A household of 1-6 persons watches over ``days`` days. Every person follows a persona
(archetype + personal perturbation): a daily rhythm (one or two peaks of start hour,
different on weekends), a weekly rhythm, device preferences (the living-room TV is
shared: every persona puts some weight on ``tv``), a genre mix, a maturity profile,
a session length and a binge propensity. On top of that:

* binge sessions: >= 3 episodes of one series (the ``binge`` feature is 1);
* nested sessions: a parent and a child co-view kids titles on the shared TV. The
  ground-truth person of such a session is the **child** (the primary audience, whose
  content it is); the parent is recorded in ``co_viewer``;
* VPN habits and travel: a traveller's sessions shift in UTC hour (time zone), move to
  mobile devices and often come through a VPN;
* drift (non-stable households only), one event per household, starting at a day in the
  middle of the period: ``behavioural`` (one person's genre mix changes), ``composition``
  (a person joins or leaves), ``seasonal`` (every person shifts towards seasonal content
  and later hours), ``gradual`` (one person's rhythm and genres move linearly until the
  end), ``sudden`` (one person's rhythm and devices change at once);
* small accounts: ``n_sessions`` caps a household at its first 3-9 sessions (cold start).

``difficulty`` in [0, 1] controls overlap between persons: it widens the hour peaks,
pulls every person's preferences towards the household average, raises the share of the
shared TV and makes genre mixes noisier. ``DEFAULT_DIFFICULTY`` is calibrated so that
scikit-learn's GaussianMixture with BIC (k in 1..6, full covariances, batch per
household) reaches 0.70-0.80 Hungarian-matched session accuracy (bench/accuracy.py
prints that reference on every run).

Determinism: household ``i`` of ``simulate_population(seed=s)`` depends only on
``(s, i)`` (one spawned SeedSequence per household), so the first households do not
change when more are requested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.clustering.domain import features as F

DEFAULT_DIFFICULTY = 0.3
DIFFICULTY_LEVELS: dict[str, float] = {"easy": 0.1, "default": DEFAULT_DIFFICULTY, "hard": 0.6}
DRIFT_TYPES: tuple[str, ...] = ("behavioural", "composition", "seasonal", "gradual", "sudden")
BASE_EPOCH = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
DAY_S = 86_400.0
HOUSEHOLD_SIZE_P = np.array([0.22, 0.30, 0.20, 0.14, 0.09, 0.05])

_G = {g: i for i, g in enumerate(F.GENRES)}
_D = {d: i for i, d in enumerate(F.DEVICE_TYPES)}


@dataclass(frozen=True)
class Archetype:
    name: str
    weekday_peaks: tuple[tuple[float, float, float], ...]  # (hour, std hours, weight)
    weekend_peaks: tuple[tuple[float, float, float], ...]
    weekend_factor: float  # relative daily rate on Sat/Sun
    devices: dict[str, float]
    genres: dict[str, float]
    maturity: tuple[float, float, float]  # P(kids), P(teen), P(adult) per title
    minutes: float  # median session length
    binge_p: float
    rate_per_week: float
    is_kid: bool = False
    is_adult: bool = True


ARCHETYPES: tuple[Archetype, ...] = (
    Archetype("adult_evening", ((21.0, 1.3, 1.0),), ((20.5, 1.8, 1.0),), 1.1,
              {"tv": 0.6, "mobile": 0.2, "tablet": 0.1, "desktop": 0.1},
              {"drama": 3, "crime": 3, "comedy": 2, "news": 1},
              (0.0, 0.05, 0.95), 70, 0.06, 5),
    Archetype("early_riser", ((7.0, 1.0, 0.7), (19.0, 1.5, 0.3)), ((10.0, 1.5, 1.0),), 0.9,
              {"mobile": 0.55, "tablet": 0.25, "tv": 0.2},
              {"news": 4, "documentary": 3, "music": 1},
              (0.0, 0.0, 1.0), 30, 0.02, 5),
    Archetype("night_owl", ((1.0, 1.4, 1.0),), ((2.0, 1.6, 1.0),), 1.3,
              {"desktop": 0.4, "mobile": 0.3, "tv": 0.3},
              {"horror": 4, "scifi": 3, "action": 2},
              (0.0, 0.1, 0.9), 90, 0.15, 5),
    Archetype("teen", ((17.0, 1.5, 0.5), (22.0, 1.2, 0.5)), ((14.0, 2.5, 1.0),), 1.5,
              {"mobile": 0.5, "console": 0.25, "tablet": 0.1, "tv": 0.15},
              {"animation": 3, "music": 2, "reality": 2, "comedy": 1, "action": 1},
              (0.05, 0.6, 0.35), 60, 0.12, 7, is_adult=False),
    Archetype("kid", ((16.5, 1.2, 1.0),), ((9.0, 1.5, 1.0),), 1.6,
              {"tablet": 0.55, "tv": 0.45},
              {"kids": 5, "animation": 3, "family": 2},
              (0.9, 0.05, 0.05), 45, 0.05, 6, is_kid=True, is_adult=False),
    Archetype("sports_fan", ((20.0, 1.5, 1.0),), ((15.0, 2.5, 1.0),), 3.0,
              {"tv": 0.8, "mobile": 0.2},
              {"sports": 6, "news": 1},
              (0.0, 0.0, 1.0), 100, 0.02, 3),
    Archetype("binge_watcher", ((23.0, 1.5, 1.0),), ((21.0, 2.5, 1.0),), 1.4,
              {"tablet": 0.4, "desktop": 0.3, "tv": 0.3},
              {"fantasy": 3, "thriller": 3, "crime": 1, "scifi": 1},
              (0.0, 0.1, 0.9), 150, 0.6, 4),
    Archetype("daytime", ((14.0, 1.8, 1.0),), ((13.0, 2.5, 1.0),), 0.8,
              {"tv": 0.6, "tablet": 0.4},
              {"romance": 3, "reality": 2, "family": 1, "drama": 1},
              (0.0, 0.0, 1.0), 60, 0.08, 6),
)
_ADULTS = [a for a in ARCHETYPES if a.is_adult]
_KID = next(a for a in ARCHETYPES if a.is_kid)
_TEEN = next(a for a in ARCHETYPES if a.name == "teen")
_SEASONAL_GENRES = {"sports": 3.0, "family": 2.0, "comedy": 1.0}


@dataclass(frozen=True)
class SimulatedDrift:
    """One injected drift: ``type`` in DRIFT_TYPES, ``detail`` (e.g. join/leave),
    the affected ``person`` (-1 = everyone), and where it starts: ``ts`` and
    ``session_index`` = first household session at or after ``ts``."""

    type: str
    detail: str
    person: int
    ts: float
    session_index: int


@dataclass
class SimulatedHousehold:
    """Sessions of one household, time-ordered, with ground truth.

    ``features`` (N, FEATURE_DIM) float32 from ``features.features_matrix``;
    ``person`` (N,) ground-truth person index 0..n_persons-1; ``timestamps`` (N,) UTC
    seconds; ``binge``/``nested``/``travel`` (N,) bool session tags; ``co_viewer`` (N,)
    parent index on nested sessions, else -1; ``personas`` archetype name per person.
    ``n_persons`` counts persons that appear in the sessions (the truth for size).
    """

    household_id: str
    features: np.ndarray
    person: np.ndarray
    timestamps: np.ndarray
    binge: np.ndarray
    nested: np.ndarray
    travel: np.ndarray
    co_viewer: np.ndarray
    personas: tuple[str, ...]
    drift: tuple[SimulatedDrift, ...] = field(default_factory=tuple)

    @property
    def n_sessions(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_persons(self) -> int:
        return int(np.unique(self.person).size)

    @property
    def stable(self) -> bool:
        return not self.drift


@dataclass
class _Person:
    archetype: Archetype
    weekday_peaks: np.ndarray  # (P, 3) hour, std, weight
    weekend_peaks: np.ndarray
    dow_weights: np.ndarray  # (7,)
    devices: np.ndarray  # (6,)
    genres: np.ndarray  # (19,)
    maturity: np.ndarray  # (3,)
    minutes: float
    binge_p: float
    rate_per_week: float
    vpn_p: float
    active_from: float = 0.0  # day
    active_until: float = np.inf


def _vector(spec: dict[str, float], index: dict[str, int], size: int) -> np.ndarray:
    v = np.zeros(size)
    for k, w in spec.items():
        v[index[k]] = w
    return v / v.sum()


def _make_person(rng: np.random.Generator, arch: Archetype, difficulty: float) -> _Person:
    """Archetype plus a personal perturbation; difficulty widens the hour peaks."""
    overlap = difficulty**2  # overlap grows slowly at first: easy stays clearly separable
    def peaks(spec: tuple[tuple[float, float, float], ...]) -> np.ndarray:
        p = np.array(spec, dtype=float)
        p[:, 0] = np.mod(p[:, 0] + rng.normal(0.0, 1.0, len(p)), 24.0)
        p[:, 1] = p[:, 1] * rng.uniform(0.8, 1.2, len(p)) * (0.35 + 0.6 * overlap)
        p[:, 2] /= p[:, 2].sum()
        return p

    dow = np.array([1, 1, 1, 1, 1, arch.weekend_factor, arch.weekend_factor], dtype=float)
    dow *= rng.lognormal(0.0, 0.2, 7)
    devices = rng.dirichlet(40.0 * _vector(arch.devices, _D, 6) + 0.05)
    genres = rng.dirichlet(15.0 * _vector(arch.genres, _G, len(F.GENRES)) + 0.02)
    return _Person(
        archetype=arch, weekday_peaks=peaks(arch.weekday_peaks),
        weekend_peaks=peaks(arch.weekend_peaks), dow_weights=dow / dow.sum(),
        devices=devices, genres=genres, maturity=np.array(arch.maturity),
        minutes=arch.minutes * rng.lognormal(0.0, 0.25), binge_p=arch.binge_p,
        rate_per_week=arch.rate_per_week * rng.lognormal(0.0, 0.35),
        vpn_p=0.7 if rng.random() < 0.08 else 0.0,
    )


def _mix_towards_household(persons: list[_Person], difficulty: float) -> None:
    """Overlap: pull device and genre preferences towards the household average and
    raise the shared-TV share. At difficulty 0 persons keep their own preferences."""
    overlap = difficulty**2
    lam = 0.5 * overlap
    dev_mean = np.mean([p.devices for p in persons], axis=0)
    gen_mean = np.mean([p.genres for p in persons], axis=0)
    tv = np.zeros(6)
    tv[_D["tv"]] = 1.0
    tv_share = 0.25 * overlap
    for p in persons:
        p.devices = (1 - tv_share) * ((1 - lam) * p.devices + lam * dev_mean) + tv_share * tv
        p.genres = (1 - lam) * p.genres + lam * gen_mean


def _choose_archetypes(rng: np.random.Generator, n_persons: int) -> list[Archetype]:
    """Distinct archetypes: at least one adult, then kid/teen/adults in random order.
    Persons of one household never share an archetype (their personal perturbation
    alone would make two same-archetype persons nearly indistinguishable)."""
    adults = list(rng.permutation(len(_ADULTS)))
    chosen = [_ADULTS[adults.pop()]]
    pool: list[Archetype] = [_KID, _TEEN] + [_ADULTS[i] for i in adults]
    # Kids and teens come first more often than not (families), adults otherwise.
    weights = np.array([2.0 if not a.is_adult else 1.0 for a in pool])
    order = rng.choice(len(pool), size=len(pool), replace=False, p=weights / weights.sum())
    chosen += [pool[i] for i in order[: n_persons - 1]]
    return chosen


def _categorical_rows(rng: np.random.Generator, probs: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """One categorical draw per row of ``probs`` (n, C), ``size[1:]`` draws each."""
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random(size)
    extra = (1,) * (len(size) - 1)
    cdf_b = cdf.reshape(cdf.shape[0], *extra, cdf.shape[1])
    return np.minimum((u[..., None] > cdf_b).sum(axis=-1), probs.shape[1] - 1)


@dataclass
class _Drawn:
    ts: np.ndarray
    device: np.ndarray
    genre_seconds: np.ndarray
    kids: np.ndarray
    teen: np.ndarray
    total: np.ndarray
    binge: np.ndarray
    titles: np.ndarray
    vpn: np.ndarray
    travel: np.ndarray


def _draw_sessions(rng: np.random.Generator, p: _Person, days: int, tz_hours: float,
                   hour_shift: callable, genre_probs: callable, device_probs: callable,
                   travel: tuple[float, float, float] | None, rate_factor: float = 1.0,
                   forced_device: int | None = None) -> _Drawn:
    """Sessions of one person. ``hour_shift(day)``/``genre_probs(day)``/``device_probs(day)``
    give per-session parameters (vectorised over the session days) so drift can depend
    on time."""
    lo, hi = max(p.active_from, 0.0), min(p.active_until, float(days))
    expected = p.rate_per_week * rate_factor * max(hi - lo, 0.0) / 7.0
    n = int(rng.poisson(expected))
    empty = np.zeros(0)
    if n == 0:
        return _Drawn(empty, empty.astype(int), np.zeros((0, len(F.GENRES))), empty, empty,
                      empty, empty, empty, empty, empty.astype(bool))
    all_days = np.arange(int(np.floor(lo)), int(np.ceil(hi)))
    w = p.dow_weights[np.mod(all_days, 7)]
    day = rng.choice(all_days, size=n, p=w / w.sum()).astype(float)
    weekend = np.mod(day, 7) >= 5
    hours = np.empty(n)
    for mask, peaks in ((~weekend, p.weekday_peaks), (weekend, p.weekend_peaks)):
        m = int(mask.sum())
        if m:
            comp = rng.choice(len(peaks), size=m, p=peaks[:, 2])
            hours[mask] = peaks[comp, 0] + peaks[comp, 1] * rng.normal(size=m)
    hours = hours + hour_shift(day)
    dev_p = device_probs(day)
    device = _categorical_rows(rng, dev_p, (n,)) if forced_device is None else np.full(n, forced_device)
    vpn = np.where(rng.random(n) < p.vpn_p, rng.uniform(0.6, 1.0, n), 0.0)
    on_trip = np.zeros(n, dtype=bool)
    if travel is not None:
        t0, t1, offset = travel
        on_trip = (day >= t0) & (day < t1)
        hours = np.where(on_trip, hours + offset, hours)
        mobile = rng.random(n) < 0.8
        device = np.where(on_trip & mobile, np.where(rng.random(n) < 0.6, _D["mobile"], _D["tablet"]), device)
        vpn = np.where(on_trip & (rng.random(n) < 0.6), rng.uniform(0.5, 1.0, n), vpn)
    ts = BASE_EPOCH + day * DAY_S + (hours - tz_hours) * 3600.0 + rng.uniform(0, 60, n)

    # Titles: binge sessions are 3+ episodes of one series; others 1-5 titles.
    t_max = 10
    binge = rng.random(n) < p.binge_p
    n_titles = np.where(binge, np.minimum(3 + rng.poisson(1.5, n), t_max),
                        np.minimum(1 + rng.poisson(0.7, n), 5))
    slot = np.arange(t_max)[None, :] < n_titles[:, None]
    gp = genre_probs(day)
    primary = _categorical_rows(rng, gp, (n, t_max))
    secondary = _categorical_rows(rng, gp, (n, t_max))
    primary[binge, :] = primary[binge, :1]  # one series: same genres for every episode
    secondary[binge, :] = secondary[binge, :1]
    has_second = rng.random((n, t_max)) < 0.3
    has_second[binge, :] = has_second[binge, :1]
    length = np.where(binge, 40.0, p.minutes / np.maximum(n_titles, 1))
    secs = (length[:, None] * 60.0 * rng.lognormal(0.0, 0.35, (n, t_max))) * slot
    genre_seconds = np.zeros((n, len(F.GENRES)))
    rows = np.repeat(np.arange(n)[:, None], t_max, axis=1)
    share = np.where(has_second, 0.5, 1.0) * secs
    np.add.at(genre_seconds, (rows, primary), share)
    np.add.at(genre_seconds, (rows, secondary), np.where(has_second, share, 0.0))
    mat = _categorical_rows(rng, np.tile(p.maturity, (n, 1)), (n, t_max))
    mat = np.where(primary == _G["kids"], 0, mat)  # kids titles are rated kids
    kids = (secs * (mat == 0)).sum(axis=1)
    teen = (secs * (mat == 1)).sum(axis=1)
    return _Drawn(ts, device.astype(int), genre_seconds, kids, teen, secs.sum(axis=1),
                  binge.astype(float), n_titles.astype(float), vpn, on_trip)


def simulate_household(rng: np.random.Generator, household_id: str = "h0",
                       difficulty: float = DEFAULT_DIFFICULTY, n_persons: int | None = None,
                       drift_type: str | None = None, days: int = 90,
                       n_sessions: int | None = None) -> SimulatedHousehold:
    """One household. ``drift_type`` None = stable; ``n_sessions`` keeps only the first
    sessions (small accounts)."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if drift_type is not None and drift_type not in DRIFT_TYPES:
        raise ValueError(f"drift_type must be one of {DRIFT_TYPES}, got {drift_type!r}")
    if n_persons is None:
        n_persons = int(rng.choice(6, p=HOUSEHOLD_SIZE_P)) + 1
    if not 1 <= n_persons <= 6:
        raise ValueError(f"n_persons must be in 1..6, got {n_persons}")
    if days < 7:
        raise ValueError(f"days must be >= 7, got {days}")
    archetypes = _choose_archetypes(rng, n_persons)
    persons = [_make_person(rng, a, difficulty) for a in archetypes]
    _mix_towards_household(persons, difficulty)
    tz = float(rng.integers(0, 3))

    drift_day = float(rng.uniform(0.45, 0.65) * days)
    drift_person = int(rng.integers(n_persons))
    detail = ""
    new_genres = rng.dirichlet(30.0 * _vector(
        ARCHETYPES[rng.integers(len(ARCHETYPES))].genres, _G, len(F.GENRES)) + 0.02)
    seasonal_genres = _vector(_SEASONAL_GENRES, _G, len(F.GENRES))
    shift_hours = float(rng.choice([-1, 1]) * rng.uniform(6.0, 9.0))
    new_devices = rng.dirichlet(np.ones(6) * 0.5)
    if drift_type == "composition":
        if n_persons == 1 or rng.random() < 0.5:
            detail = "join"
            arch = _ADULTS[rng.integers(len(_ADULTS))]
            newcomer = _make_person(rng, arch, difficulty)
            _mix_towards_household(persons + [newcomer], difficulty)
            newcomer.active_from = drift_day
            persons.append(newcomer)
            drift_person = len(persons) - 1
        else:
            detail = "leave"
            persons[drift_person].active_until = drift_day

    traveller = int(rng.integers(len(persons))) if rng.random() < 0.3 else -1
    trip_start = float(rng.uniform(0, days - 10))
    trip = (trip_start, trip_start + float(rng.uniform(4, 10)),
            float(rng.choice([-1, 1]) * rng.uniform(5, 9)))

    parts: list[tuple[_Drawn, int, int, bool]] = []
    for i, p in enumerate(persons):
        affected = drift_type == "seasonal" or (drift_type is not None and i == drift_person)

        def hour_shift(day: np.ndarray, p_affected: bool = affected) -> np.ndarray:
            if not p_affected:
                return np.zeros_like(day)
            if drift_type == "sudden":
                return np.where(day >= drift_day, shift_hours, 0.0)
            if drift_type == "gradual":
                return shift_hours * np.clip((day - drift_day) / (days - drift_day), 0, 1)
            if drift_type == "seasonal":
                return np.where(day >= drift_day, 1.5, 0.0)
            return np.zeros_like(day)

        def genre_probs(day: np.ndarray, p: _Person = p, p_affected: bool = affected) -> np.ndarray:
            base = np.tile(p.genres, (day.size, 1))
            if not p_affected:
                return base
            if drift_type == "behavioural":
                alpha = (day >= drift_day).astype(float) * 0.85
                return (1 - alpha[:, None]) * base + alpha[:, None] * new_genres
            if drift_type == "gradual":
                alpha = 0.8 * np.clip((day - drift_day) / (days - drift_day), 0, 1)
                return (1 - alpha[:, None]) * base + alpha[:, None] * new_genres
            if drift_type == "seasonal":
                alpha = (day >= drift_day).astype(float) * 0.5
                return (1 - alpha[:, None]) * base + alpha[:, None] * seasonal_genres
            return base

        def device_probs(day: np.ndarray, p: _Person = p, p_affected: bool = affected) -> np.ndarray:
            base = np.tile(p.devices, (day.size, 1))
            if p_affected and drift_type == "sudden":
                after = (day >= drift_day)[:, None]
                return np.where(after, new_devices[None, :], base)
            return base

        drawn = _draw_sessions(rng, p, days, tz, hour_shift, genre_probs, device_probs,
                               trip if i == traveller else None)
        parts.append((drawn, i, -1, False))

    # Nested co-viewing: a child and a parent on the shared TV, kids content with some
    # of the parent's genres, early evening or weekend morning.
    kids_idx = [i for i, p in enumerate(persons) if p.archetype.is_kid]
    adults_idx = [i for i, p in enumerate(persons) if p.archetype.is_adult]
    for k in kids_idx:
        parent = adults_idx[int(rng.integers(len(adults_idx)))]
        kp, pp = persons[k], persons[parent]
        co = _Person(
            archetype=kp.archetype,
            weekday_peaks=np.array([[18.5 + rng.normal(0, 0.5), 1.0 * (1 + difficulty), 1.0]]),
            weekend_peaks=np.array([[10.0 + rng.normal(0, 0.5), 1.5 * (1 + difficulty), 1.0]]),
            dow_weights=kp.dow_weights, devices=kp.devices, genres=0.75 * kp.genres + 0.25 * pp.genres,
            maturity=np.array([0.8, 0.1, 0.1]), minutes=0.5 * (kp.minutes + pp.minutes),
            binge_p=0.03, rate_per_week=1.5 * rng.lognormal(0, 0.3), vpn_p=0.0,
            active_from=kp.active_from, active_until=kp.active_until)
        drawn = _draw_sessions(rng, co, days, tz, lambda d: np.zeros_like(d),
                               lambda d, co=co: np.tile(co.genres, (d.size, 1)),
                               lambda d, co=co: np.tile(co.devices, (d.size, 1)), None,
                               forced_device=_D["tv"])
        parts.append((drawn, k, parent, True))

    ts = np.concatenate([d.ts for d, *_ in parts])
    order = np.argsort(ts, kind="stable")
    cat = lambda name: np.concatenate([getattr(d, name) for d, *_ in parts])[order]  # noqa: E731
    person = np.concatenate([np.full(d.ts.size, i) for d, i, *_ in parts])[order]
    co_viewer = np.concatenate([np.full(d.ts.size, c) for d, _, c, _ in parts])[order]
    nested = np.concatenate([np.full(d.ts.size, n) for d, _, _, n in parts])[order]
    ts = ts[order]
    feats = F.features_matrix(ts, cat("device"), np.concatenate([d.genre_seconds for d, *_ in parts])[order],
                              cat("kids"), cat("teen"), cat("total"), cat("binge"), cat("titles"), cat("vpn"))
    binge = cat("binge").astype(bool)
    travel = cat("travel").astype(bool)
    if n_sessions is not None:
        if n_sessions < 1:
            raise ValueError(f"n_sessions must be >= 1, got {n_sessions}")
        keep = slice(0, n_sessions)
        feats, person, ts, binge, nested, travel, co_viewer = (
            a[keep] for a in (feats, person, ts, binge, nested, travel, co_viewer))
    # Renumber persons 0..n-1 in order of first appearance so the truth is dense.
    _, first = np.unique(person, return_index=True)
    appearing = person[np.sort(first)]
    remap = np.full(len(persons), -1)
    remap[appearing] = np.arange(appearing.size)
    person = remap[person]
    co_viewer = np.where(co_viewer >= 0, remap[np.maximum(co_viewer, 0)], -1)
    personas = tuple(persons[i].archetype.name for i in appearing)

    drift: tuple[SimulatedDrift, ...] = ()
    if drift_type is not None:
        drift_ts = BASE_EPOCH + drift_day * DAY_S
        idx = int(np.searchsorted(ts, drift_ts))
        if idx < ts.size:
            who = -1 if drift_type == "seasonal" else int(remap[drift_person])
            drift = (SimulatedDrift(drift_type, detail, who, drift_ts, idx),)
    return SimulatedHousehold(household_id, feats, person.astype(np.int64), ts, binge, nested.astype(bool),
                              travel, co_viewer.astype(np.int64), personas, drift)


def simulate_population(n_households: int, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
                        drift_fraction: float = 0.3, days: int = 90,
                        small_accounts: bool = False) -> list[SimulatedHousehold]:
    """``n_households`` households; a ``drift_fraction`` of them carry one drift event
    (types in turn). ``small_accounts`` keeps 3-9 sessions per household (cold start)."""
    if n_households < 0:
        raise ValueError(f"n_households must be >= 0, got {n_households}")
    if not 0.0 <= drift_fraction <= 1.0:
        raise ValueError(f"drift_fraction must be in [0, 1], got {drift_fraction}")
    out = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n_households)):
        rng = np.random.default_rng(child)
        drift_type = None
        if rng.random() < drift_fraction:
            drift_type = DRIFT_TYPES[int(rng.integers(len(DRIFT_TYPES)))]
        n_sessions = int(rng.integers(3, 10)) if small_accounts else None
        out.append(simulate_household(rng, f"h{seed}-{i}", difficulty, drift_type=drift_type,
                                      days=days, n_sessions=n_sessions))
    return out
