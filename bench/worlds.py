"""Randomized world families: households Hearth was never tuned on.

This generator is deliberately independent of ``services/clustering/domain/simulator.py``
(the model's own simulator): it shares no code, no archetypes and no parameter values
with it, and nothing under ``services/`` may import it (a test checks). Its output goes
through the service's real code path: ``ViewingEvent`` objects are validated and turned
into sessions by ``build_sessions`` (which computes the feature vectors), exactly as
``IngestEvents`` does, so the model sees what it would see in production — including
sessions of two people merged on a shared TV, zero-watch-time browse fragments, genres
outside the feature vocabulary and late joiners.

Three levels of randomness:

* a **family** (``FAMILIES``) is a set of *ranges* for the assumptions;
* a **world** draws one value of every assumption from its family's ranges (hour-of-day
  and weekday profile shapes, device ownership and sharing, taste concentration and
  overlap between members, titles per session, session length, binge runs, household
  sizes, members joining and leaving, a title catalogue with its own genre sets);
* a **household** draws its members from the world's assumptions.

Tuning and reporting are disjoint by construction (``TUNING`` / ``REPORTING``): model
choices may only be measured on ``TUNING`` (its own seeds, and only some of the
families); the benchmark reports on ``REPORTING`` (other seeds, every family; the
families tuning never saw are listed in ``HELD_OUT_FAMILIES`` and reported apart).
``ECE_REPORTING`` (other seeds again, every family, 300 households) is where issue #10's ECE
targets are judged (report only, as REPORTING).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.clustering.domain.events import ViewingEvent, validate_batch
from services.clustering.domain.features import FEATURE_DIM, GenreVocabulary
from services.clustering.domain.sessions import build_sessions

DAY_S = 86_400.0
EPOCH = 1_735_689_600.0  # 2025-01-01 00:00 UTC (a Wednesday)
# Genres as callers send them: the feature vocabulary and some it does not know
# ("anime", "true_crime", "standup", "k_drama" end up as unknown genres).
CATALOGUE_GENRES = (
    "action", "adventure", "animation", "comedy", "crime", "documentary", "drama", "family",
    "fantasy", "horror", "kids", "music", "news", "reality", "romance", "scifi", "sports",
    "thriller", "anime", "true_crime", "standup", "k_drama",
)
PERSONAL_TYPES = ("mobile", "tablet", "desktop")
SHARED_TYPES = ("tv", "console", "other")


@dataclass(frozen=True)
class FamilySpec:
    """Ranges (lo, hi) every world of the family draws from (uniform unless said)."""

    name: str
    size_weights: tuple[float, ...]        # P(household size 1..6) (Dirichlet-perturbed per world)
    personal_device_p: tuple[float, float]  # P(a member owns a personal device)
    extra_personal_p: tuple[float, float]   # P(a device owner has a second one)
    shared_use: tuple[float, float]         # share of an owner's sessions on a shared device
    n_shared: tuple[int, int]               # shared devices (TV, console) per household
    shared_device_sharing: tuple[float, float]  # P(a personal device is lent to another member)
    peaks: tuple[int, int]                  # hour-of-day peaks per member
    peak_width: tuple[float, float]         # std of a peak (hours)
    weekend_shift: tuple[float, float]      # hours the peaks move at weekends
    weekday_contrast: tuple[float, float]   # spread of the weekday rate profile
    taste_alpha: tuple[float, float]        # Dirichlet concentration of a member's taste
    taste_overlap: tuple[float, float]      # weight of the household's common taste
    titles_mean: tuple[float, float]        # extra titles per non-binge session (Poisson)
    minutes_median: tuple[float, float]     # median minutes watched per title
    binge_p: tuple[float, float]            # P(a session is a binge run)
    binge_episodes: tuple[int, int]         # episodes in a binge run
    rate_per_week: tuple[float, float]      # sessions per member per week
    kids_p: tuple[float, float]             # P(a member beyond the first is a child)
    join_leave_p: tuple[float, float]       # P(a multi-person household has a member join/leave)
    browse_p: tuple[float, float]           # P(a session is a zero-watch browse fragment)
    days: tuple[int, int]


FAMILIES: dict[str, FamilySpec] = {
    "living_room": FamilySpec(
        "living_room", (0.2, 0.35, 0.2, 0.15, 0.07, 0.03), (0.2, 0.5), (0.0, 0.2), (0.6, 0.9), (1, 2),
        (0.0, 0.1), (1, 2), (0.8, 2.0), (-1.0, 2.0), (0.1, 0.5), (0.3, 1.5), (0.2, 0.6),
        (0.2, 1.0), (25, 60), (0.03, 0.15), (3, 6), (2, 6), (0.0, 0.3), (0.0, 0.3), (0.0, 0.05), (40, 80)),
    "mobile_first": FamilySpec(
        "mobile_first", (0.3, 0.3, 0.2, 0.1, 0.07, 0.03), (0.7, 1.0), (0.1, 0.5), (0.05, 0.4), (0, 1),
        (0.0, 0.2), (1, 3), (1.0, 3.0), (-2.0, 3.0), (0.0, 0.6), (0.2, 1.0), (0.0, 0.4),
        (0.0, 0.6), (15, 45), (0.05, 0.25), (3, 8), (3, 9), (0.0, 0.2), (0.1, 0.5), (0.0, 0.08), (35, 70)),
    "family_kids": FamilySpec(
        "family_kids", (0.05, 0.15, 0.3, 0.3, 0.15, 0.05), (0.3, 0.8), (0.0, 0.3), (0.3, 0.7), (1, 2),
        (0.05, 0.3), (1, 2), (0.7, 2.5), (-1.5, 2.5), (0.2, 0.7), (0.3, 1.2), (0.1, 0.5),
        (0.3, 1.5), (20, 50), (0.05, 0.2), (3, 6), (1.5, 4), (0.4, 0.8), (0.0, 0.3), (0.0, 0.05), (40, 80)),
    "shift_workers": FamilySpec(
        "shift_workers", (0.25, 0.35, 0.2, 0.12, 0.05, 0.03), (0.4, 0.9), (0.0, 0.3), (0.2, 0.6), (1, 2),
        (0.0, 0.2), (2, 3), (1.0, 3.5), (-3.0, 4.0), (0.3, 1.0), (0.3, 1.5), (0.1, 0.5),
        (0.0, 1.2), (20, 70), (0.03, 0.2), (3, 7), (2, 8), (0.0, 0.2), (0.1, 0.4), (0.0, 0.05), (40, 80)),
    "bingers": FamilySpec(
        "bingers", (0.3, 0.35, 0.18, 0.1, 0.05, 0.02), (0.3, 0.8), (0.0, 0.3), (0.3, 0.8), (1, 2),
        (0.0, 0.15), (1, 2), (1.0, 2.5), (-1.0, 3.0), (0.1, 0.6), (0.2, 1.0), (0.2, 0.6),
        (0.0, 0.8), (35, 55), (0.2, 0.5), (3, 10), (2, 6), (0.0, 0.3), (0.0, 0.3), (0.0, 0.04), (40, 80)),
    "flatshare": FamilySpec(
        "flatshare", (0.1, 0.3, 0.3, 0.2, 0.07, 0.03), (0.6, 1.0), (0.0, 0.4), (0.1, 0.5), (0, 2),
        (0.0, 0.3), (1, 3), (1.0, 3.0), (-1.0, 3.0), (0.0, 0.5), (0.5, 2.0), (0.3, 0.7),
        (0.0, 1.0), (20, 60), (0.05, 0.3), (3, 7), (2, 8), (0.0, 0.05), (0.3, 0.7), (0.0, 0.06), (35, 75)),
}


@dataclass(frozen=True)
class Split:
    """Which families and which seeds a use of the worlds may draw."""

    name: str
    families: tuple[str, ...]
    seed: int
    worlds_per_family: int
    households_per_world: int


# THE split. Model choices (thresholds, priors, temperatures, calibration maps) are
# measured on TUNING only; bench-accuracy reports on REPORTING. The seeds never meet
# (SeedSequence(seed) of different integers), and three families are never tuned on.
TUNING = Split("tuning", ("living_room", "mobile_first", "bingers"), seed=20_260_001,
               worlds_per_family=4, households_per_world=12)
REPORTING = Split("reporting", tuple(FAMILIES), seed=90_260_001,
                  worlds_per_family=2, households_per_world=5)
HELD_OUT_FAMILIES = tuple(f for f in FAMILIES if f not in TUNING.families)
# Issue #10's ECE targets (<= 0.05 before feedback, <= 0.02 after feedback on 3.75 %) are judged
# here, not on REPORTING: REPORTING's 60 households cannot tell 0.02 from the figure's own
# household noise (~0.03 there; ece35, session 35). Fresh seeds of every family, disjoint from
# TUNING, REPORTING, the fresh TUNING seeds, the blind and the real viewers' seeds (a test
# fails on an overlap), sized on TUNING so that the 2.5-97.5 % range of household-resampled
# ECEs after feedback is about +-0.01 wide (ece36, session 36: docs/benchmarks.md "An ECE
# population"). REPORT ONLY, read by the lead: nothing may be chosen, tuned or looked at on
# it (`python -m bench.accuracy --ece-population`, `make bench-ece`; its mechanics are
# checked with `--ece-split tuning`).
ECE_REPORTING = Split("ece_reporting", tuple(FAMILIES), seed=73_360_013,
                      worlds_per_family=10, households_per_world=5)
# The seeds no tuning run may use (the benches that take a TUNING --seed refuse them).
REPORT_ONLY_SEEDS = (REPORTING.seed, ECE_REPORTING.seed)


@dataclass
class World:
    family: str
    world_id: str
    params: dict
    catalogue_genres: list[tuple[str, ...]]
    catalogue_series: np.ndarray      # series index or -1 (a film)
    catalogue_maturity: np.ndarray    # 0 kids, 1 teen, 2 adult
    catalogue_popularity: np.ndarray


@dataclass
class CompositionChange:
    kind: str               # "join" | "leave"
    person: int
    session_index: int      # first session at or after the change (in time order)


@dataclass
class WorldHousehold:
    """One household's sessions (time order) as the service builds them, with truth."""

    household_id: str
    family: str
    world_id: str
    features: np.ndarray      # (N, FEATURE_DIM) float32, from the real session builder
    person: np.ndarray        # (N,) true person 0..n-1 (majority of watch time)
    device_id: np.ndarray     # (N,) str
    device_type: np.ndarray   # (N,) str
    start_ts: np.ndarray      # (N,) float
    watch_seconds: np.ndarray
    unknown_genre_share: float
    changes: list[CompositionChange] = field(default_factory=list)
    # Per session: its last event's time (the session builder's end_ts) and the series ids
    # its events carry (sorted). None for households built by hand in tests. Evidence the
    # 35 features do not hold: which sessions overlap in time, which continue a series
    # (bench.evidence_probe measures what each says about persons).
    end_ts: np.ndarray | None = None
    series: tuple[tuple[str, ...], ...] | None = None
    # The raw events behind the sessions, in time order (what a client posts to
    # POST /v1/events; bench.api_accuracy), and each session's id as the session builder
    # gives it. Kept only when the generator is asked to (``keep_events``): they are many
    # times the size of the features and the other benchmarks pickle households.
    events: tuple[ViewingEvent, ...] | None = None
    session_ids: tuple[str, ...] | None = None

    @staticmethod
    def session_series(sessions, events) -> tuple[tuple[str, ...], ...]:
        """The series ids each session's events carry (sorted; empty when none): the
        ``series`` field from the session builder's output and the events it was given."""
        series_of = {ev.event_id: ev.series_id for ev in events if ev.series_id}
        return tuple(tuple(sorted({series_of[e] for e in s.event_ids if e in series_of})) for s in sessions)

    @property
    def n_sessions(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_persons(self) -> int:
        return int(np.unique(self.person).size)

    def device_slots(self) -> np.ndarray:
        """Device ids as 0..D-1 in order of first appearance (what the model gets)."""
        _, first, inverse = np.unique(self.device_id, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))
        return order[inverse]


def _u(rng: np.random.Generator, r: tuple) -> float:
    lo, hi = r
    if isinstance(lo, int) and isinstance(hi, int):
        return int(rng.integers(lo, hi + 1))
    return float(rng.uniform(lo, hi))


def make_world(family: str, rng: np.random.Generator, world_id: str, unknown_genre_share: float = 0.0) -> World:
    spec = FAMILIES[family]
    params = {name: _u(rng, getattr(spec, name)) for name in (
        "personal_device_p", "extra_personal_p", "shared_use", "n_shared", "shared_device_sharing",
        "peak_width", "weekend_shift", "weekday_contrast", "taste_alpha", "taste_overlap", "titles_mean",
        "minutes_median", "binge_p", "rate_per_week", "kids_p", "join_leave_p", "browse_p", "days")}
    params["peaks"] = spec.peaks
    params["binge_episodes"] = spec.binge_episodes
    params["size_p"] = rng.dirichlet(np.asarray(spec.size_weights) * 30.0)
    params["hour_offset"] = float(rng.uniform(-3, 3))   # the world's time zone vs UTC
    n_titles = int(rng.integers(300, 900))
    n_genres = len(CATALOGUE_GENRES)
    genre_pop = rng.dirichlet(np.full(n_genres, 1.5))
    genres, series, maturity = [], np.full(n_titles, -1), np.zeros(n_titles, dtype=np.int64)
    n_series = int(n_titles * rng.uniform(0.2, 0.5))
    for t in range(n_titles):
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        genres.append(tuple(CATALOGUE_GENRES[i] for i in rng.choice(n_genres, k, replace=False, p=genre_pop)))
        if "kids" in genres[-1] or ("animation" in genres[-1] and rng.random() < 0.5):
            maturity[t] = 0
        else:
            maturity[t] = int(rng.choice([1, 2], p=[0.25, 0.75]))
        if t < n_series:
            series[t] = t
    popularity = rng.pareto(1.2, n_titles) + 1.0
    if unknown_genre_share > 0:
        genres = _rename_to_unknown(genres, unknown_genre_share, rng)
    return World(family, world_id, params, genres, series, maturity, popularity / popularity.sum())


def _rename_to_unknown(genres: list[tuple[str, ...]], share: float, rng: np.random.Generator
                       ) -> list[tuple[str, ...]]:
    """The catalogue as a caller with its own genre names sends it: each vocabulary
    genre is, with probability ``share``, renamed in every title to a name Hearth's
    vocabulary does not know (``drama~``), as a service whose genre list differs from
    Hearth's would send it. Members' tastes are over the underlying genres, so the
    person structure is unchanged; only the names Hearth sees differ. Drawn after
    everything else of the world, from the world's generator: with ``share = 0`` (the
    default, REPORTING) the world is exactly the one generated without the knob."""
    renamed = {g for g in CATALOGUE_GENRES[:18] if rng.random() < share}
    return [tuple(f"{g}~" if g in renamed else g for g in title) for title in genres]


@dataclass
class _Member:
    peaks: np.ndarray            # (P, 3) hour, std, weight (weekday); weekend = hour + shift
    weekend_shift: float
    weekday_rate: np.ndarray     # (7,) relative
    taste: np.ndarray            # (n_catalogue_genres,)
    is_kid: bool
    own_devices: list[int]
    shared_use: float
    rate: float
    minutes: float
    binge_p: float
    active_from: float
    active_until: float


def _title_weights(world: World, taste: np.ndarray, is_kid: bool) -> np.ndarray:
    gi = {g: i for i, g in enumerate(CATALOGUE_GENRES)}
    # a renamed genre ("drama~1", the unknown-genre knob) is still its underlying genre to a member's taste
    score = np.array([np.mean([taste[gi[g.partition("~")[0]]] for g in gs]) for gs in world.catalogue_genres])
    w = world.catalogue_popularity * score ** 2
    if is_kid:
        w = w * np.where(world.catalogue_maturity == 0, 20.0, np.where(world.catalogue_maturity == 1, 0.5, 0.02))
    else:
        w = w * np.where(world.catalogue_maturity == 0, 0.15, 1.0)
    return w / w.sum()


def make_household(world: World, rng: np.random.Generator, household_id: str,
                   force_size: int | None = None, vocabulary: GenreVocabulary | None = None,
                   keep_events: bool = False) -> WorldHousehold:
    p = world.params
    size = force_size or int(rng.choice(np.arange(1, 7), p=p["size_p"]))
    days = float(p["days"])
    # Devices: shared ones first (TV/console), then personal ones per owner.
    devices: list[tuple[str, str]] = []
    for j in range(int(p["n_shared"])):
        devices.append((f"{household_id}-shared{j}", "tv" if j == 0 else str(rng.choice(SHARED_TYPES))))
    common_taste = rng.dirichlet(np.full(len(CATALOGUE_GENRES), p["taste_alpha"]))
    members: list[_Member] = []
    for m in range(size):
        is_kid = m > 0 and rng.random() < p["kids_p"]
        own = []
        if rng.random() < p["personal_device_p"] or int(p["n_shared"]) == 0:
            for _ in range(1 + (rng.random() < p["extra_personal_p"])):
                devices.append((f"{household_id}-m{m}d{len(own)}", str(rng.choice(PERSONAL_TYPES))))
                own.append(len(devices) - 1)
        n_peaks = int(rng.integers(p["peaks"][0], p["peaks"][1] + 1))
        centre = (np.array([16.0, 20.5, 23.0]) if not is_kid else np.array([8.0, 16.0, 18.5]))
        hours = rng.choice(centre, n_peaks) + rng.normal(0, 2.5, n_peaks)
        peaks = np.column_stack((hours, np.full(n_peaks, p["peak_width"]) * rng.uniform(0.7, 1.3, n_peaks),
                                 rng.dirichlet(np.ones(n_peaks))))
        own_taste = rng.dirichlet(np.full(len(CATALOGUE_GENRES), p["taste_alpha"]))
        taste = (1 - p["taste_overlap"]) * own_taste + p["taste_overlap"] * common_taste
        weekday = np.exp(rng.normal(0, p["weekday_contrast"], 7))
        members.append(_Member(
            peaks, p["weekend_shift"] * rng.uniform(0.5, 1.5), weekday / weekday.mean(), taste, is_kid, own,
            float(np.clip(p["shared_use"] * rng.uniform(0.7, 1.3), 0, 1)) if own else 1.0,
            p["rate_per_week"] * rng.uniform(0.5, 1.6), p["minutes_median"] * rng.uniform(0.6, 1.5),
            float(np.clip(p["binge_p"] * rng.uniform(0.5, 1.5), 0, 0.9)), 0.0, days))
    # Members joining or leaving (one change per household at most).
    change_kind = None
    if size >= 2 and rng.random() < p["join_leave_p"]:
        change_kind = str(rng.choice(["join", "leave"]))
        who = int(rng.integers(1, size))
        at = float(rng.uniform(0.35, 0.65) * days)
        if change_kind == "join":
            members[who].active_from = at
        else:
            members[who].active_until = at
    shared = [i for i, (_, t) in enumerate(devices) if t in SHARED_TYPES and "-shared" in devices[i][0]]
    events: list[ViewingEvent] = []
    truth_of_event: dict[str, int] = {}
    n_ev = 0
    title_w = [_title_weights(world, mem.taste, mem.is_kid) for mem in members]
    for m, mem in enumerate(members):
        start_day, end_day = mem.active_from, min(mem.active_until, days)
        n_sessions = rng.poisson(mem.rate * (end_day - start_day) / 7.0)
        if n_sessions == 0:
            continue
        # day of each session by the weekday profile
        day_grid = np.arange(int(np.floor(start_day)), int(np.ceil(end_day)))
        dow = (day_grid + 2) % 7  # EPOCH is a Wednesday (Monday = 0)
        dw = mem.weekday_rate[dow]
        day = rng.choice(day_grid, n_sessions, p=dw / dw.sum())
        peak = rng.choice(len(mem.peaks), n_sessions, p=mem.peaks[:, 2])
        weekend = ((day + 2) % 7) >= 5
        hour = (mem.peaks[peak, 0] + weekend * mem.weekend_shift + rng.normal(0, 1, n_sessions) * mem.peaks[peak, 1]
                + p["hour_offset"])
        start = EPOCH + day * DAY_S + np.mod(hour, 24.0) * 3600.0
        for s in range(n_sessions):
            # device
            if mem.own_devices and (rng.random() >= mem.shared_use or not shared):
                dev = int(rng.choice(mem.own_devices))
            elif shared:
                dev = int(rng.choice(shared))
            else:
                dev = int(rng.choice(mem.own_devices))
            # occasionally a personal device is lent to another member
            if rng.random() < p["shared_device_sharing"] * 0.3:
                others = [d for j, o in enumerate(members) if j != m for d in o.own_devices]
                if others:
                    dev = int(rng.choice(others))
            device_id, device_type = devices[dev]
            t = float(start[s])
            if rng.random() < p["browse_p"]:
                plays = [(None, 0.0)]
            elif rng.random() < mem.binge_p:
                ser = np.flatnonzero(world.catalogue_series >= 0)
                w = title_w[m][ser]
                first = int(rng.choice(ser, p=w / w.sum()))
                n_ep = int(rng.integers(p["binge_episodes"][0], p["binge_episodes"][1] + 1))
                ep_len = float(rng.uniform(20, 55)) * 60
                plays = [((first, e), ep_len * rng.uniform(0.8, 1.0)) for e in range(n_ep)]
            else:
                n_t = 1 + rng.poisson(p["titles_mean"])
                ts_ = rng.choice(len(world.catalogue_genres), n_t, p=title_w[m])
                plays = [((int(x), 0), mem.minutes * 60 * float(np.exp(rng.normal(0, 0.6)))) for x in ts_]
            for title, seconds in plays:
                seconds = float(min(seconds, 4 * 3600.0))
                if title is None:
                    ev = ViewingEvent(f"e{n_ev}", household_id, device_id, device_type, t, "browse")
                    events.append(ev)
                    truth_of_event[ev.event_id] = m
                    n_ev += 1
                    t += 60.0
                    continue
                tid, ep = title
                genres = world.catalogue_genres[tid]
                series = world.catalogue_series[tid]
                maturity = ("kids", "teen", "adult")[int(world.catalogue_maturity[tid])]
                title_id = f"t{tid}" if series < 0 else f"t{tid}e{ep}"
                series_id = None if series < 0 else f"s{series}"
                # play_start, a heartbeat, play_stop; the watch time split between them
                parts = rng.dirichlet(np.ones(2)) * seconds
                for kind, dur, dt in (("play_start", 0.0, 0.0), ("heartbeat", parts[0], parts[0]),
                                      ("play_stop", parts[1], parts[1])):
                    ev = ViewingEvent(f"e{n_ev}", household_id, device_id, device_type, t + dt, kind, title_id,
                                      series_id, genres, float(dur), maturity)
                    events.append(ev)
                    truth_of_event[ev.event_id] = m
                    n_ev += 1
                t += seconds + float(rng.uniform(5, 120))
    validate_batch(events[:10_000], now=EPOCH + 400 * DAY_S)  # the ingest validation (first batch)
    by_device: dict[str, list[ViewingEvent]] = {}
    for ev in events:
        by_device.setdefault(ev.device_id, []).append(ev)
    sessions = []
    for evs in by_device.values():
        sessions.extend(build_sessions(evs, vocabulary=vocabulary))
    sessions.sort(key=lambda s: (s.start_ts, s.session_id))
    if not sessions:
        return make_household(world, rng, household_id, force_size, vocabulary, keep_events)
    dur = {ev.event_id: ev.duration_s for ev in events}
    person = np.empty(len(sessions), dtype=np.int64)
    for i, s in enumerate(sessions):
        votes = np.zeros(size)
        for eid in s.event_ids:
            votes[truth_of_event[eid]] += dur[eid] + 1e-3
        person[i] = int(votes.argmax())
    # persons 0..n-1 in order of appearance (members who never watched do not count)
    _, first = np.unique(person, return_index=True)
    order = person[np.sort(first)]
    remap = {int(o): i for i, o in enumerate(order)}
    person = np.array([remap[int(x)] for x in person])
    starts = np.array([s.start_ts for s in sessions])
    changes = []
    if change_kind is not None:
        who = [i for i, mem in enumerate(members) if mem.active_from > 0 or mem.active_until < days][0]
        if who in remap:
            at = members[who].active_from if change_kind == "join" else members[who].active_until
            idx = int(np.searchsorted(starts, EPOCH + at * DAY_S))
            if 10 <= idx < len(sessions) - 10:
                changes.append(CompositionChange(change_kind, remap[who], idx))
    known = set(CATALOGUE_GENRES[:18])
    all_g = [g for ev in events for g in ev.genres]
    unknown_share = float(np.mean([g not in known for g in all_g])) if all_g else 0.0
    X = np.vstack([s.features for s in sessions]).astype(np.float32)
    assert X.shape[1] == FEATURE_DIM
    return WorldHousehold(household_id, world.family, world.world_id, X, person,
                          np.array([s.device_id for s in sessions]), np.array([s.device_type for s in sessions]),
                          starts, np.array([s.watch_seconds for s in sessions]), unknown_share, changes,
                          np.array([s.end_ts for s in sessions]), WorldHousehold.session_series(sessions, events),
                          *((tuple(sorted(events, key=lambda e: (e.ts, e.event_id))),
                             tuple(s.session_id for s in sessions)) if keep_events else ()))


def generate(split: Split, families: tuple[str, ...] | None = None, worlds_per_family: int | None = None,
             households_per_world: int | None = None, unknown_genre_share: float = 0.0,
             vocabulary: GenreVocabulary | None = None,
             world_indices: Sequence[int] | None = None, keep_events: bool = False) -> list[WorldHousehold]:
    """Households of a split. Household (family f, world w, household i) depends only on
    (split.seed, f, w, i): asking for fewer households gives a prefix of the same ones.
    ``unknown_genre_share`` > 0 (a tuning knob; see ``_rename_to_unknown``) renames that
    share of the catalogue's genres to names outside the vocabulary: the same members,
    devices and sessions, only the genre names differ. ``vocabulary``: the session
    builder's (default: the service's default, feature schema 2). ``world_indices``: these
    worlds of each family instead of the first ``worlds_per_family`` (world w is the same
    household set whichever others are asked for). ``keep_events``: each household also
    carries its raw events and session ids (WorldHousehold.events; the same households)."""
    fams = families or split.families
    unknown = [f for f in fams if f not in split.families]
    if unknown:
        raise ValueError(f"families {unknown} are not in the {split.name} split")
    n_worlds = worlds_per_family or split.worlds_per_family
    n_house = households_per_world or split.households_per_world
    out = []
    for f in fams:
        fam_index = list(FAMILIES).index(f)
        for w in (range(n_worlds) if world_indices is None else world_indices):
            ss = np.random.SeedSequence([split.seed, fam_index, w])
            world_ss, *house_ss = ss.spawn(1 + n_house)
            world = make_world(f, np.random.default_rng(world_ss), f"{split.name}-{f}-w{w}", unknown_genre_share)
            for i, hs in enumerate(house_ss):
                out.append(make_household(world, np.random.default_rng(hs), f"{f[:4]}{w}h{i}", vocabulary=vocabulary,
                                          keep_events=keep_events))
    return out
