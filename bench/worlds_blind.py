"""Blind worlds: a second, independent household generator for issue #10's evaluation.

Why a second one: ``bench/worlds.py`` was written by the team that tunes the model, and
an outside evaluator who generated households their own way saw Hearth fall from 0.94
to 0.58. This module was written WITHOUT reading the model (``services/clustering/
domain/model.py``, ``persons.py``, ``placement.py``, ``drift.py``) or the parameter values
of ``bench/worlds.py``: only from the issue text and the public event schema
(``events.ViewingEvent``, ``validate_batch``, ``sessions.build_sessions``). From
``bench/worlds.py`` it borrows the household *container* (``WorldHousehold``,
``CompositionChange``) so that ``bench/_worlds_eval.py`` scores it unchanged; nothing
else. A unit test checks its imports.

REPORT ONLY. ``BLIND_SEED`` is never used to choose anything: no threshold, weight or
rule of the model may be tuned on these worlds (there is deliberately no tuning split).
``python -m bench.accuracy --blind-only`` prints the report (docs/benchmarks.md,
"bench-accuracy: blind worlds").

Its assumptions differ from the first generator's on purpose:

* **Tastes** are a latent-factor model (MovieLens-like): titles and members are vectors
  in R^d, a title's pull is its popularity (Zipf over a random rank) plus the member's
  affinity u.v / temperature; members of one household share part of their vector
  (``overlap``). A title's genres are the 1-4 genre directions its vector is closest to
  (so genres co-occur as they do in real catalogues, and one-title sessions are lumpy).
  Genre *names* are a world's choice: some worlds send MovieLens-style names ("Sci-Fi",
  "Children", "Film-Noir", "K-Drama") that Hearth's vocabulary does not know.
* **When** people watch is a self-exciting (Hawkes) process per member: a baseline
  intensity from the member's hour-of-day peaks (local time; each world has its own UTC
  offset) and weekday/weekend factor, plus excitation after each session (one episode
  makes the next one likely tonight). Sessions of one member never overlap.
* **Devices**: phones, laptops, a kids' tablet SHARED by the children, one or two TVs,
  consoles; a member replaces a phone mid-period (new device id: churn); a member
  travels for a week (hours shifted by the trip's time zone, personal devices or a hotel
  device only).
* **Content**: binge runs through a series (episodes in order, progress remembered),
  loose title mixes, a "devotee" who mostly watches one long series, browse fragments
  (a ``browse`` event and at most a minute or two of play).
* **People**: household sizes 1-6, children, guests (a visitor picks what a member
  watches on the shared TV: the session is labelled with the host member, the person
  the account's owner would name), members joining or leaving mid-period.

Events are emitted the way a player reports them (``play_start``, a ``heartbeat`` every
few minutes carrying the seconds watched since the previous event, ``play_stop``) and go
through ``validate_batch`` and ``build_sessions`` per device, so sessions are cut by the
service's inactivity gap and two people on one TV within that gap become ONE session (its
truth: whoever watched most of it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from bench.worlds import CompositionChange, WorldHousehold
from services.clustering.domain.events import ViewingEvent, validate_batch
from services.clustering.domain.sessions import build_sessions

BLIND_SEED = 31_337_007        # REPORTING ONLY: never tune on it (see the module docstring)
EPOCH = 1_709_510_400.0        # 2024-03-04 00:00 UTC, a Monday
DAY_S = 86_400.0
HOUR_S = 3_600.0
MAX_SESSIONS = 420             # a household's sessions are cut to its first ones (bench run time)
MIN_SESSIONS = 12
MAX_EVENTS_PER_CALL = 10_000   # validate_batch's limit

# Canonical genres -> (a name in Hearth's vocabulary's spelling, an outside name).
# The outside names are what a MovieLens-fed caller sends; several are unknown to Hearth.
GENRE_NAMES = {
    "action": ("action", "Action"), "adventure": ("adventure", "Adventure"),
    "animation": ("animation", "Animation"), "children": ("kids", "Children"),
    "comedy": ("comedy", "Comedy"), "crime": ("crime", "True Crime"),
    "documentary": ("documentary", "Documentary"), "drama": ("drama", "Drama"),
    "fantasy": ("fantasy", "Fantasy"), "noir": ("thriller", "Film-Noir"),
    "horror": ("horror", "Horror"), "musical": ("music", "Musical"),
    "mystery": ("thriller", "Mystery"), "romance": ("romance", "Romance"),
    "scifi": ("scifi", "Sci-Fi"), "war": ("drama", "War"), "western": ("action", "Western"),
    "reality": ("reality", "Reality"), "anime": ("animation", "Anime"),
    "standup": ("comedy", "Stand-Up"), "news": ("news", "News"), "sports": ("sports", "Sports"),
    "kdrama": ("drama", "K-Drama"),
}
CANONICAL = tuple(GENRE_NAMES)


@dataclass(frozen=True)
class BlindFamily:
    """Ranges a world draws its assumptions from (each a (low, high) uniform range)."""

    name: str
    sizes: tuple[tuple[int, float], ...]   # (household size, weight)
    kid_chance: tuple[float, float]        # a member after the first two is a child
    overlap: tuple[float, float]           # share of a member's taste vector the household shares
    phone: tuple[float, float]             # an adult owns a phone
    laptop: tuple[float, float]            # an adult owns a second screen (own tablet or desktop)
    personal_share: tuple[float, float]    # an owner's sessions on own devices
    two_tvs: float                         # chance the household has a second TV
    console: float                         # chance of a console (used by some members)
    churn: tuple[float, float]             # a phone owner replaces the phone mid-period
    travel: tuple[float, float]            # a member travels for a week
    guests_per_month: tuple[float, float]
    change: tuple[float, float]            # a household of 2+ has a member join or leave
    devotee: float                         # a member mostly watches one series
    off_hours: float                       # an adult's main peak is anywhere in the day


FAMILIES: dict[str, BlindFamily] = {f.name: f for f in (
    # Parents and children: the children share a tablet and the TV; parents on phones.
    BlindFamily("nest", ((3, 0.3), (4, 0.35), (5, 0.25), (6, 0.1)), kid_chance=(0.7, 1.0),
                overlap=(0.2, 0.6), phone=(0.6, 1.0), laptop=(0.0, 0.4), personal_share=(0.2, 0.6),
                two_tvs=0.4, console=0.4, churn=(0.0, 0.3), travel=(0.0, 0.2),
                guests_per_month=(0.0, 2.0), change=(0.0, 0.2), devotee=0.1, off_hours=0.1),
    # Couples and small households: similar tastes, mostly one TV.
    BlindFamily("couples", ((1, 0.3), (2, 0.5), (3, 0.2)), kid_chance=(0.0, 0.3),
                overlap=(0.5, 0.9), phone=(0.3, 0.8), laptop=(0.1, 0.5), personal_share=(0.1, 0.4),
                two_tvs=0.15, console=0.2, churn=(0.0, 0.3), travel=(0.0, 0.3),
                guests_per_month=(0.0, 3.0), change=(0.1, 0.4), devotee=0.15, off_hours=0.15),
    # Unrelated adults sharing a flat: own devices, different tastes and hours.
    BlindFamily("sharers", ((2, 0.3), (3, 0.35), (4, 0.25), (5, 0.1)), kid_chance=(0.0, 0.0),
                overlap=(0.0, 0.3), phone=(0.7, 1.0), laptop=(0.4, 0.9), personal_share=(0.5, 0.9),
                two_tvs=0.2, console=0.5, churn=(0.0, 0.4), travel=(0.1, 0.4),
                guests_per_month=(0.5, 4.0), change=(0.1, 0.4), devotee=0.2, off_hours=0.3),
    # Few personal devices at all: everybody on the TV(s); the hard case for device evidence.
    BlindFamily("one_screen", ((1, 0.2), (2, 0.4), (3, 0.25), (4, 0.15)), kid_chance=(0.0, 0.6),
                overlap=(0.1, 0.7), phone=(0.0, 0.3), laptop=(0.0, 0.2), personal_share=(0.0, 0.3),
                two_tvs=0.5, console=0.3, churn=(0.0, 0.2), travel=(0.0, 0.2),
                guests_per_month=(0.0, 2.0), change=(0.0, 0.3), devotee=0.2, off_hours=0.25),
    # Single people (and a few pairs) who watch a lot, on everything, at odd hours:
    # a household of one must stay one whatever its genre spread.
    BlindFamily("solo", ((1, 0.75), (2, 0.25)), kid_chance=(0.0, 0.0),
                overlap=(0.0, 0.5), phone=(0.5, 1.0), laptop=(0.3, 0.9), personal_share=(0.3, 0.8),
                two_tvs=0.3, console=0.3, churn=(0.1, 0.5), travel=(0.1, 0.5),
                guests_per_month=(0.0, 3.0), change=(0.0, 0.5), devotee=0.25, off_hours=0.35),
)}


@dataclass(frozen=True)
class BlindWorld:
    """One draw of every assumption (global ranges are written out here)."""

    family: BlindFamily
    world_id: str
    utc_offset_h: float
    dims: int
    item_vectors: np.ndarray        # (items, dims): movies and series
    item_popularity: np.ndarray     # (items,) log popularity
    item_is_series: np.ndarray      # (items,) bool
    item_episodes: np.ndarray       # (items,) episodes (1 for a movie)
    item_runtime_s: np.ndarray      # (items,) a movie's or an episode's length
    item_genres: tuple[tuple[str, ...], ...]
    item_maturity: tuple[str, ...]
    kids_direction: np.ndarray
    taste_strength: float
    overlap: float
    kid_chance: float
    phone: float
    laptop: float
    personal_share: float
    churn: float
    travel: float
    guests_per_month: float
    change: float
    rate_per_day: tuple[float, float]
    branching: float                # Hawkes branching ratio (expected sessions one session triggers)
    decay_h: float                  # Hawkes excitation time scale
    weekend_factor: tuple[float, float]
    binge_chance: float
    titles_mean: float
    browse_chance: float
    heartbeat_s: float
    days: int


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def make_world(family: BlindFamily, rng: np.random.Generator, world_id: str) -> BlindWorld:
    dims = int(rng.integers(4, 13))
    n_genres = int(rng.integers(10, len(CANONICAL) + 1))
    canon = [str(g) for g in rng.choice(CANONICAL, n_genres, replace=False)]
    if "children" not in canon:
        canon[0] = "children"
    outside = rng.uniform(0.0, 1.0)              # share of genres sent under outside names
    names = {g: GENRE_NAMES[g][1] if rng.random() < outside else GENRE_NAMES[g][0] for g in canon}
    gdir = rng.normal(size=(len(canon), dims))
    gdir /= np.linalg.norm(gdir, axis=1, keepdims=True)
    kids_dir = gdir[canon.index("children")]
    n_items = int(rng.integers(150, 1500))
    V = rng.normal(size=(n_items, dims))
    # A kids' corner of the catalogue: some titles pulled toward the children direction.
    kids_titles = rng.random(n_items) < rng.uniform(0.08, 0.25)
    V[kids_titles] += rng.uniform(1.5, 3.0) * kids_dir
    rank = rng.permutation(n_items) + 1
    popularity = -rng.uniform(0.6, 1.3) * np.log(rank)
    is_series = rng.random(n_items) < rng.uniform(0.2, 0.6)
    episodes = np.where(is_series, rng.integers(4, 41, n_items), 1)
    runtime = np.where(is_series, rng.uniform(18, 62, n_items), rng.uniform(75, 160, n_items)) * 60.0
    sharp = rng.uniform(1.0, 4.0)
    genres, maturity = [], []
    for j in range(n_items):
        w = np.exp(sharp * (gdir @ V[j]) / np.sqrt(dims) * 2.0)
        k = min(1 + int(rng.binomial(3, rng.uniform(0.2, 0.6))), len(canon))
        picks = rng.choice(len(canon), k, replace=False, p=w / w.sum())
        gs = tuple(sorted({names[canon[p]] for p in picks}))
        genres.append(gs)
        if kids_titles[j] or canon[picks[0]] == "children":
            maturity.append("kids")
        else:
            maturity.append("teen" if rng.random() < 0.25 else "adult")
    lo_rate = rng.uniform(0.2, 1.2)
    return BlindWorld(
        family=family, world_id=world_id, utc_offset_h=float(rng.integers(-8, 10)), dims=dims,
        item_vectors=V, item_popularity=popularity, item_is_series=is_series, item_episodes=episodes,
        item_runtime_s=runtime, item_genres=tuple(genres), item_maturity=tuple(maturity),
        kids_direction=kids_dir, taste_strength=rng.uniform(0.5, 2.5), overlap=_u(rng, family.overlap),
        kid_chance=_u(rng, family.kid_chance), phone=_u(rng, family.phone), laptop=_u(rng, family.laptop),
        personal_share=_u(rng, family.personal_share), churn=_u(rng, family.churn),
        travel=_u(rng, family.travel), guests_per_month=_u(rng, family.guests_per_month),
        change=_u(rng, family.change), rate_per_day=(lo_rate, lo_rate * rng.uniform(1.5, 4.0)),
        branching=rng.uniform(0.0, 0.6), decay_h=rng.uniform(0.5, 12.0),
        weekend_factor=(rng.uniform(0.6, 1.0), rng.uniform(1.0, 2.5)),
        binge_chance=rng.uniform(0.1, 0.6), titles_mean=rng.uniform(1.0, 3.0),
        browse_chance=rng.uniform(0.0, 0.15), heartbeat_s=rng.uniform(300, 1200),
        days=int(rng.integers(30, 121)),
    )


@dataclass
class _Member:
    index: int
    kid: bool
    taste: np.ndarray               # probability over catalogue items
    peaks: list[tuple[float, float, float]]  # (local hour, concentration, weight)
    weekend: float
    rate: float                     # sessions per day before excitation
    devices: dict[str, list[tuple[str, str, float]]]  # kind -> [(device id, type, valid from)]
    personal_share: float
    tv: str
    console: bool
    devotee_item: int | None
    active: tuple[float, float]     # seconds since EPOCH when the member watches
    trip: tuple[float, float, float] | None  # (start, end, hour shift)


def _hour_density(hours: np.ndarray, peaks) -> np.ndarray:
    ang = 2 * np.pi * hours / 24.0
    dens = sum(w * np.exp(k * (np.cos(ang - 2 * np.pi * p / 24.0) - 1.0)) for p, k, w in peaks)
    grid = np.arange(0, 24, 0.25)
    g_ang = 2 * np.pi * grid / 24.0
    mean = np.mean(sum(w * np.exp(k * (np.cos(g_ang - 2 * np.pi * p / 24.0) - 1.0)) for p, k, w in peaks))
    return dens / mean


def _make_member(world: BlindWorld, rng: np.random.Generator, i: int, kid: bool, shared: np.ndarray,
                 tvs: list[str], has_console: bool, kids_tablet: str | None, hid: str) -> _Member:
    own = rng.normal(size=world.dims)
    u = np.sqrt(world.overlap) * shared + np.sqrt(1.0 - world.overlap) * own
    if kid:
        u = u + rng.uniform(1.5, 3.0) * world.kids_direction
    score = world.item_popularity + world.taste_strength * (world.item_vectors @ u) / np.sqrt(world.dims)
    if kid:
        score = score + np.where(np.array(world.item_maturity) == "kids", 0.0, -rng.uniform(1.5, 4.0))
    elif rng.random() < 0.7:
        score = score + np.where(np.array(world.item_maturity) == "kids", -3.0, 0.0)
    p = np.exp(score - score.max())
    p /= p.sum()
    if kid:
        peaks = [(rng.uniform(15, 19.5), rng.uniform(1.5, 5), 1.0), (rng.uniform(7, 10), rng.uniform(2, 6), 0.5)]
    else:
        main = rng.uniform(0, 24) if rng.random() < world.family.off_hours else rng.uniform(18.5, 23.5)
        peaks = [(main, rng.uniform(1.0, 8.0), 1.0)]
        if rng.random() < 0.5:
            peaks.append((rng.uniform(6, 14), rng.uniform(1.5, 6), rng.uniform(0.1, 0.6)))
    devices: dict[str, list[tuple[str, str, float]]] = {}
    period = world.days * DAY_S
    if not kid and rng.random() < world.phone:
        phone = [(f"{hid}-m{i}-phone", "mobile", 0.0)]
        if rng.random() < world.churn:   # replaced mid-period: a new device id from then on
            phone.append((f"{hid}-m{i}-phone2", "mobile", rng.uniform(0.2, 0.8) * period))
        devices["phone"] = phone
    if not kid and rng.random() < world.laptop:
        devices["laptop"] = [(f"{hid}-m{i}-laptop", "desktop" if rng.random() < 0.4 else "tablet", 0.0)]
    if kid and kids_tablet is not None:
        devices["tablet"] = [(kids_tablet, "tablet", 0.0)]
    share = float(np.clip(rng.beta(2, 2) * 0.5 + world.personal_share * 0.75, 0.0, 0.97)) if devices else 0.0
    devotee = None
    if rng.random() < world.family.devotee:
        series = np.flatnonzero(world.item_is_series & (world.item_episodes >= 12))
        if series.size:
            devotee = int(rng.choice(series))
    trip = None
    if not kid and rng.random() < world.travel:
        start = rng.uniform(0.1, 0.8) * period
        trip = (start, start + rng.uniform(4, 10) * DAY_S, float(rng.choice([-9, -6, -3, 3, 5, 8])))
    rate = rng.uniform(*world.rate_per_day) * (0.6 if kid else 1.0)
    return _Member(i, kid, p, peaks, rng.uniform(*world.weekend_factor), rate, devices, share,
                   tvs[int(rng.integers(len(tvs)))] if len(tvs) > 1 and rng.random() < 0.8 else tvs[0],
                   has_console and rng.random() < 0.5, devotee, (0.0, period), trip)


def _intensity(m: _Member, world: BlindWorld, t: float) -> float:
    """Baseline sessions per second at ``t`` (seconds since EPOCH)."""
    if not m.active[0] <= t < m.active[1]:
        return 0.0
    shift, factor = 0.0, 1.0
    if m.trip and m.trip[0] <= t < m.trip[1]:
        shift, factor = m.trip[2], 0.6
    local = t / HOUR_S + world.utc_offset_h + shift
    hour = np.array([local % 24.0])
    dow = int((local // 24) % 7)
    week = m.weekend if dow >= 5 else 1.0
    norm = (5 + 2 * m.weekend) / 7.0
    return float(m.rate / DAY_S * _hour_density(hour, m.peaks)[0] * week / norm * factor)


def _session_times(m: _Member, world: BlindWorld, rng: np.random.Generator) -> list[float]:
    """Hawkes process by Ogata thinning; sessions of one member never overlap (a start
    within the previous session's estimated span is dropped)."""
    peak = max(_hour_density(np.arange(0, 24, 0.25), m.peaks)) * max(m.weekend, 1.0) / ((5 + 2 * m.weekend) / 7.0)
    mu_max = m.rate / DAY_S * peak
    beta = 1.0 / (world.decay_h * HOUR_S)
    alpha = world.branching * beta
    t, excite, out = m.active[0], 0.0, []
    busy_until = -np.inf
    while True:
        bound = mu_max + excite
        step = rng.exponential(1.0 / bound)
        t += step
        excite *= np.exp(-beta * step)
        if t >= m.active[1]:
            return out
        lam = _intensity(m, world, t) + excite
        if rng.random() * bound <= lam and t > busy_until:
            out.append(t)
            excite += alpha
            busy_until = t + 40 * 60.0


def _device_for(m: _Member, world: BlindWorld, t: float, rng: np.random.Generator, hid: str) -> tuple[str, str]:
    travelling = m.trip is not None and m.trip[0] <= t < m.trip[1]
    personal = list(m.devices.values())
    if travelling:
        if not personal or rng.random() < 0.3:
            return f"{hid}-m{m.index}-hotel{int(m.trip[0])}", "other"
        use = personal[int(rng.integers(len(personal)))]
    elif personal and rng.random() < m.personal_share:
        use = personal[int(rng.integers(len(personal)))]
    else:
        if m.console and rng.random() < 0.3:
            return f"{hid}-console", "console"
        return m.tv, "tv"
    current = [d for d in use if d[2] <= t][-1]
    return current[0], current[1]


def _play_events(title: str, series: str | None, genres, maturity: str, t0: float, watched: float,
                 heartbeat: float, device: tuple[str, str], hid: str, seq: list[int], vpn: bool):
    ev = []

    def add(kind: str, ts: float, dur: float) -> None:
        seq[0] += 1
        ev.append(ViewingEvent(event_id=f"{hid}-e{seq[0]}", account_id=hid, device_id=device[0],
                               device_type=device[1], ts=EPOCH + ts, kind=kind, title_id=title, series_id=series,
                               genres=genres, duration_s=dur, maturity=maturity, vpn=vpn))
    add("play_start", t0, 0.0)
    done = 0.0
    while watched - done > heartbeat:
        done += heartbeat
        add("heartbeat", t0 + done, heartbeat)
    add("play_stop", t0 + watched, watched - done)
    return ev


def _session_events(m: _Member, world: BlindWorld, t: float, device, rng, hid, seq, progress, taste=None):
    """Events of one viewing session of member ``m`` starting at ``t``."""
    p = m.taste if taste is None else taste
    vpn = bool(m.trip is not None and m.trip[0] <= t < m.trip[1] and rng.random() < 0.5)
    if rng.random() < world.browse_chance:   # a browse fragment: looking, barely playing
        j = int(rng.choice(p.size, p=p))
        seq[0] += 1
        ev = [ViewingEvent(event_id=f"{hid}-e{seq[0]}", account_id=hid, device_id=device[0], device_type=device[1],
                           ts=EPOCH + t, kind="browse", title_id=f"{world.world_id}-t{j}",
                           genres=world.item_genres[j], maturity=world.item_maturity[j])]
        if rng.random() < 0.5:
            ev += _play_events(f"{world.world_id}-t{j}", None, world.item_genres[j], world.item_maturity[j],
                               t + 20, rng.uniform(10, 150), world.heartbeat_s, device, hid, seq, vpn)
        return ev
    plays: list[int] = []
    if m.devotee_item is not None and taste is None and rng.random() < 0.8:
        plays = [m.devotee_item] * int(1 + rng.poisson(1.5))
    elif rng.random() < world.binge_chance:
        series = np.flatnonzero(world.item_is_series)
        if series.size:
            w = p[series] / p[series].sum()
            plays = [int(rng.choice(series, p=w))] * int(2 + rng.poisson(1.5))
    if not plays:
        plays = [int(j) for j in rng.choice(p.size, int(1 + rng.poisson(world.titles_mean - 1.0)), p=p)]
    ev, clock = [], t
    for n, j in enumerate(plays):
        if world.item_is_series[j]:
            ep = progress[(m.index, j)] % int(world.item_episodes[j])
            progress[(m.index, j)] += 1
            title, series = f"{world.world_id}-t{j}-e{ep}", f"{world.world_id}-t{j}"
        else:
            title, series = f"{world.world_id}-t{j}", None
        run = float(world.item_runtime_s[j])
        frac = rng.beta(8, 1.5) if rng.random() < 0.75 else rng.uniform(0.05, 0.6)
        watched = max(30.0, run * frac)
        ev += _play_events(title, series, world.item_genres[j], world.item_maturity[j], clock, watched,
                           world.heartbeat_s, device, hid, seq, vpn)
        clock += watched + rng.uniform(5, 180)
        if frac < 0.5 and rng.random() < 0.5:
            break
    return ev


def make_household(world: BlindWorld, rng: np.random.Generator, household_id: str,
                   viewer_taste=None, keep_events: bool = False) -> WorldHousehold | None:
    """One household's sessions through the real validation and session builder, with the
    person each session belongs to (majority of its watch seconds). None when the draw
    left fewer than MIN_SESSIONS sessions (the caller draws again). ``viewer_taste``
    (kid: bool, guest: bool) -> probabilities over the catalogue: each member's and guest's
    taste comes from it instead of the latent factors (bench/worlds_movielens.py: real
    viewers)."""
    fam = world.family
    sizes, weights = zip(*fam.sizes)
    size = int(rng.choice(sizes, p=np.array(weights) / sum(weights)))
    period = world.days * DAY_S
    tvs = [f"{household_id}-tv1"] + ([f"{household_id}-tv2"] if rng.random() < fam.two_tvs else [])
    has_console = rng.random() < fam.console
    kids = [i >= 2 and rng.random() < world.kid_chance for i in range(size)]
    if size >= 3 and fam.name == "nest":
        kids[-1] = True
    kids_tablet = f"{household_id}-kids-tablet" if sum(kids) >= 1 and rng.random() < 0.8 else None
    shared = rng.normal(size=world.dims)
    members = [_make_member(world, rng, i, kids[i], shared, tvs, has_console, kids_tablet, household_id)
               for i in range(size)]
    if viewer_taste is not None:
        for m in members:
            m.taste = viewer_taste(m.kid, False)
    change = None
    if size >= 2 and rng.random() < world.change:
        who = int(rng.integers(1, size))
        at = rng.uniform(0.3, 0.7) * period
        kind = "join" if rng.random() < 0.5 else "leave"
        members[who].active = (at, period) if kind == "join" else (0.0, at)
        change = (kind, who, at)
    events: list[ViewingEvent] = []
    owner: dict[str, int] = {}
    seq, progress = [0], defaultdict(int)
    for m in members:
        for t in _session_times(m, world, rng):
            device = _device_for(m, world, t, rng, household_id)
            new = _session_events(m, world, t, device, rng, household_id, seq, progress)
            owner.update({e.event_id: m.index for e in new})
            events += new
    # Guests: a visitor chooses what is watched on the shared TV in the evening; the host
    # (a member at home then) is the session's person.
    n_visits = rng.poisson(world.guests_per_month * world.days / 30.0)
    for _ in range(n_visits):
        host = members[int(rng.integers(size))]
        day = rng.uniform(0, world.days - 1)
        t = np.floor(day) * DAY_S + (rng.uniform(19, 22.5) - world.utc_offset_h) * HOUR_S
        if viewer_taste is None:
            guest = rng.normal(size=world.dims)
            score = world.item_popularity + 1.5 * (world.item_vectors @ guest) / np.sqrt(world.dims)
            taste = np.exp(score - score.max())
        else:
            taste = viewer_taste(False, True)
        for k in range(int(1 + rng.poisson(0.5))):
            new = _session_events(host, world, t + k * 2.5 * HOUR_S, (tvs[0], "tv"), rng, household_id, seq,
                                  progress, taste / taste.sum())
            owner.update({e.event_id: host.index for e in new})
            events += new
    if not events:
        return None
    now = EPOCH + period + 7 * DAY_S
    valid = [e for a in range(0, len(events), MAX_EVENTS_PER_CALL)
             for e in validate_batch(events[a:a + MAX_EVENTS_PER_CALL], now=now)]
    by_device: dict[str, list[ViewingEvent]] = defaultdict(list)
    for e in valid:
        by_device[e.device_id].append(e)
    sessions = sorted((s for evs in by_device.values() for s in build_sessions(evs)),
                      key=lambda s: (s.start_ts, s.device_id))[:MAX_SESSIONS]
    if len(sessions) < MIN_SESSIONS:
        return None
    duration = {e.event_id: e.duration_s for e in valid}
    ev_of = {e.event_id: e for e in valid}
    person = []
    for s in sessions:
        secs: dict[int, float] = defaultdict(float)
        for eid in s.event_ids:
            secs[owner[eid]] += duration[eid]
        first = owner[s.event_ids[0]]
        person.append(max(secs, key=lambda p: (secs[p], p == first)) if any(secs.values()) else first)
    present = sorted(set(person))
    relabel = {p: i for i, p in enumerate(present)}
    person_arr = np.array([relabel[p] for p in person], dtype=np.int64)
    start = np.array([s.start_ts for s in sessions])
    changes = []
    if change is not None and change[1] in relabel:
        idx = int(np.searchsorted(start, EPOCH + change[2]))
        after_has, before_has = (person_arr[idx:] == relabel[change[1]]).any(), (person_arr[:idx] == relabel[change[1]]).any()
        # A change the sessions show: a joiner seen only after it, a leaver only before it.
        if 0 < idx < len(sessions) and ((change[0] == "join" and after_has and not before_has)
                                        or (change[0] == "leave" and before_has and not after_has)):
            changes.append(CompositionChange(change[0], relabel[change[1]], idx))
    # Share of the genre labels (event x genre) in the kept sessions that Hearth's
    # vocabulary does not know (the session builder counts them per name and event).
    labels_of = {e.event_id: len(set(e.genres)) for e in valid}
    n_unknown = sum(c for s in sessions for _, c in s.unknown_genres)
    n_labels = sum(labels_of[eid] for s in sessions for eid in s.event_ids)
    return WorldHousehold(
        household_id=household_id, family=fam.name, world_id=world.world_id,
        features=np.vstack([s.features for s in sessions]).astype(np.float32), person=person_arr,
        device_id=np.array([s.device_id for s in sessions]), device_type=np.array([s.device_type for s in sessions]),
        start_ts=start, watch_seconds=np.array([s.watch_seconds for s in sessions]),
        end_ts=np.array([s.end_ts for s in sessions]), series=WorldHousehold.session_series(sessions, valid),
        unknown_genre_share=n_unknown / max(n_labels, 1), changes=changes,
        # the valid events of the kept sessions, in time order (what a client posts)
        **({"events": tuple(sorted((e for s in sessions for e in (ev_of[eid] for eid in s.event_ids)),
                                   key=lambda e: (e.ts, e.event_id))),
            "session_ids": tuple(s.session_id for s in sessions)} if keep_events else {}))


def generate(families: tuple[str, ...] | None = None, worlds_per_family: int = 3, households_per_world: int = 4,
             seed: int = BLIND_SEED, keep_events: bool = False) -> list[WorldHousehold]:
    """Households of every family (``FAMILIES`` order), world by world. Deterministic: the
    same arguments give the same households, and fewer households per world give a
    prefix of each world's households."""
    out = []
    fam_seqs = np.random.SeedSequence(seed).spawn(len(FAMILIES))
    for fam_seq, (name, fam) in zip(fam_seqs, FAMILIES.items()):
        if families is not None and name not in families:
            continue
        for w, world_seq in enumerate(fam_seq.spawn(worlds_per_family)):
            world_part, house_seq = world_seq.spawn(2)
            world = make_world(fam, np.random.default_rng(world_part), f"blind-{name}-w{w}")
            for h, h_seq in enumerate(house_seq.spawn(households_per_world)):
                rng = np.random.default_rng(h_seq)
                for attempt in range(20):
                    hh = make_household(world, rng, f"{world.world_id}-h{h}" + (f"r{attempt}" if attempt else ""),
                                        keep_events=keep_events)
                    if hh is not None:
                        out.append(hh)
                        break
    return out
