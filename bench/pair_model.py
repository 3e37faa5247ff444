"""A same-person model learned across households (issue #10, session 24; TUNING only).

Every earlier person-count attempt (docs/clustering.md 4-4l) fitted each household on its
own sessions. Here a *pairwise* classifier — "are these two sessions of one household the
same member?" — is trained on the ground truth of TUNING households and applied to
households it never saw; persons are then resolved from its pair probabilities:

1. ``pair_features``: what two sessions of one household share — circular start-hour
   distance (absolute and relative to the household's own spread), weekday, weekend,
   device (same id, personal / shared types), genre-mix similarity (absolute and
   relative), maturity, length, binge, titles, VPN, and, when the sessions carry them
   (``with_context``), the time between them, whether they share a series and whether
   they overlap in time on two devices; plus a few household statistics (sessions,
   personal devices, share of sessions on them) so one model serves households of every
   kind.
2. ``train``: a HistGradientBoostingClassifier on sampled pairs of the training
   households (label: the same true member).
3. ``resolve``: each personal device with >= ``persons.MIN_DEVICE_SESSIONS`` sessions is a
   must-link group (the model's step 1, docs/clustering.md), every other session starts
   alone; average-linkage agglomeration on the pair log-odds merges the two clusters
   with the highest mean log-odds while it is above ``threshold`` (so the person count
   falls out of it); clusters with fewer than ``min_size`` sessions (and fewer than
   ``min_share`` of the household) are then dissolved, each session going to the kept
   cluster it scores highest with.

``python -m bench.pair_model [--train-seed S] [--test-seed T] [--stack] [--context]
[--learned-merge] [--merged-groups] [--movielens-tuning] [--workers 1]`` chooses the
threshold and minimum size on the training seed's households resolved from out-of-sample
pair scores (a model of half the worlds scores the other half, and the reverse), trains on
all of them, and reports on the test seed's TUNING worlds beside Hearth's batch fit, the
device heuristic and the supervised oracle on the same households; ``--stack`` adds a
second stage over the first stage's log-odds matrix (``second_order``), ``--learned-merge``
a learned merge rule along the linkage in place of the threshold (``MergeRule``),
``--movielens-tuning`` the real viewers' TUNING half. It refuses the report-only seeds as a
training or test seed; ``--reporting`` (to be read once, after a choice) reports on
REPORTING. docs/clustering.md 4m records the result: not kept (below the batch fit on a
held-out TUNING seed), so REPORTING was not read.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402

from bench import _worlds_eval as WE, worlds  # noqa: E402
from bench._clustering_eval import matched_correct  # noqa: E402
from services.clustering.domain import features as F, persons as P  # noqa: E402

WEEKEND = (5, 6)           # Saturday, Sunday (Monday = 0, features.py)
CLIP = 8.0                 # pair log-odds are clipped to +-CLIP before the linkage
TRAIN_PAIRS = 1500         # sampled pairs per training household
THRESHOLDS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
MIN_SIZES = (3, 5, 8, 12)
MIN_SHARE = 0.05

BASE_FEATURES = (
    "hour_dist", "hour_dist_rel", "same_dow", "dow_dist", "both_weekend", "one_weekend",
    "same_device", "both_personal", "one_personal", "two_personal_devices",
    "genre_cos", "genre_cos_rel", "genre_l1", "kids_diff", "teen_diff", "kids_max",
    "minutes_diff", "minutes_mean", "binge_both", "binge_one", "titles_diff", "vpn_diff",
    "log_sessions", "personal_devices", "personal_share",
)
CONTEXT_FEATURES = ("log_gap_hours", "same_series", "overlap_two_devices")


@dataclass
class Sessions:
    """Per-session columns of one household, from what the service holds: the feature
    vector, the device id and type, and (context) start / end times and series ids."""

    hour: np.ndarray
    dow: np.ndarray
    slot: np.ndarray
    personal: np.ndarray
    genre: np.ndarray          # (N, G) genre mix, rows of unit L2 norm (zero rows stay zero)
    kids: np.ndarray
    teen: np.ndarray
    minutes: np.ndarray
    binge: np.ndarray
    titles: np.ndarray
    vpn: np.ndarray
    start: np.ndarray | None
    end: np.ndarray | None
    series: np.ndarray | None  # (N, S) 0/1 series incidence
    household: np.ndarray      # (3,) log sessions, personal devices, personal share
    hour_scale: float          # the household's mean circular hour distance
    genre_scale: float         # the household's mean genre cosine

    @property
    def n(self) -> int:
        return int(self.hour.size)


def _circ(a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    d = np.abs(a - b) % period
    return np.minimum(d, period - d)


def sessions_of(X: np.ndarray, device_ids: np.ndarray, start: np.ndarray | None = None,
                end: np.ndarray | None = None, series=None) -> Sessions:
    X = np.asarray(X, dtype=np.float64)
    hour = (np.arctan2(X[:, 0], X[:, 1]) / (2 * np.pi) * 24.0) % 24.0
    dow = np.rint((np.arctan2(X[:, 2], X[:, 3]) / (2 * np.pi) * 7.0) % 7.0).astype(np.int64) % 7
    _, first, inverse = np.unique(np.asarray(device_ids), return_index=True, return_inverse=True)
    slot = np.argsort(np.argsort(first))[inverse]
    personal = P.is_personal(X)
    g = X[:, F.GENRE]
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    genre = np.where(norm > 0, g / np.maximum(norm, 1e-12), 0.0)
    inc = None
    if series is not None:
        names = sorted({s for ss in series for s in ss})
        index = {s: i for i, s in enumerate(names)}
        inc = np.zeros((X.shape[0], max(len(names), 1)), dtype=np.float32)
        for i, ss in enumerate(series):
            for s in ss:
                inc[i, index[s]] = 1.0
    devices = P.personal_slots(X, slot)
    n = X.shape[0]
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, n, 2000), rng.integers(0, n, 2000)
    keep = a != b
    hour_scale = float(_circ(hour[a[keep]], hour[b[keep]], 24.0).mean()) if keep.any() else 6.0
    genre_scale = float((genre[a[keep]] * genre[b[keep]]).sum(axis=1).mean()) if keep.any() else 0.5
    return Sessions(hour=hour, dow=dow, slot=slot, personal=personal, genre=genre,
                    kids=X[:, F.KIDS_SHARE], teen=X[:, F.TEEN_SHARE], minutes=X[:, F.LOG_MINUTES],
                    binge=X[:, F.BINGE], titles=X[:, F.LOG_TITLES], vpn=X[:, F.VPN_SHARE],
                    start=None if start is None else np.asarray(start, dtype=np.float64),
                    end=None if end is None else np.asarray(end, dtype=np.float64), series=inc,
                    household=np.array([np.log(n), len(devices), float(personal.mean())]),
                    hour_scale=max(hour_scale, 0.25), genre_scale=max(genre_scale, 0.05))


def sessions_of_household(h: worlds.WorldHousehold, context: bool = False) -> Sessions:
    return sessions_of(h.features, h.device_id, *((h.start_ts, h.end_ts, h.series) if context else ()))


def feature_names(context: bool = False) -> tuple[str, ...]:
    return BASE_FEATURES + (CONTEXT_FEATURES if context else ())


def pair_features(s: Sessions, i: np.ndarray, j: np.ndarray, context: bool = False) -> np.ndarray:
    """(len(i), len(feature_names(context))) features of the session pairs (i[k], j[k]);
    symmetric in i and j."""
    hd = _circ(s.hour[i], s.hour[j], 24.0)
    we_i, we_j = np.isin(s.dow[i], WEEKEND), np.isin(s.dow[j], WEEKEND)
    same_dev = s.slot[i] == s.slot[j]
    pi, pj = s.personal[i], s.personal[j]
    cos = (s.genre[i] * s.genre[j]).sum(axis=1)
    cols = [
        hd, hd / s.hour_scale, s.dow[i] == s.dow[j], _circ(s.dow[i], s.dow[j], 7.0), we_i & we_j, we_i ^ we_j,
        same_dev, pi & pj, pi ^ pj, pi & pj & ~same_dev,
        cos, cos - s.genre_scale, np.abs(s.genre[i] - s.genre[j]).sum(axis=1),
        np.abs(s.kids[i] - s.kids[j]), np.abs(s.teen[i] - s.teen[j]), np.maximum(s.kids[i], s.kids[j]),
        np.abs(s.minutes[i] - s.minutes[j]), (s.minutes[i] + s.minutes[j]) / 2,
        (s.binge[i] > 0) & (s.binge[j] > 0), (s.binge[i] > 0) ^ (s.binge[j] > 0),
        np.abs(s.titles[i] - s.titles[j]), np.abs(s.vpn[i] - s.vpn[j]),
    ]
    cols += [np.full(i.size, v) for v in s.household]
    if context:
        if s.start is None or s.end is None or s.series is None:
            raise ValueError("context pair features need start / end times and series ids")
        gap = np.abs(s.start[i] - s.start[j]) / 3600.0
        overlap = (np.minimum(s.end[i], s.end[j]) > np.maximum(s.start[i], s.start[j])) & ~same_dev
        cols += [np.log1p(gap), (s.series[i] * s.series[j]).sum(axis=1) > 0, overlap]
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols])


def training_pairs(h: worlds.WorldHousehold, n_pairs: int = TRAIN_PAIRS, context: bool = False,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sampled pairs of distinct sessions of one household, with label same-member."""
    s = sessions_of_household(h, context)
    rng = np.random.default_rng(seed)
    n = h.n_sessions
    i, j = rng.integers(0, n, 2 * n_pairs), rng.integers(0, n, 2 * n_pairs)
    keep = i != j
    i, j = i[keep][:n_pairs], j[keep][:n_pairs]
    return pair_features(s, i, j, context), (h.person[i] == h.person[j]).astype(np.int64)


def train(hs: list[worlds.WorldHousehold], context: bool = False, n_pairs: int = TRAIN_PAIRS, rounds: int = 300):
    parts = [training_pairs(h, n_pairs, context, seed=k) for k, h in enumerate(hs)]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    # every household weighs the same, whatever its size
    w = np.concatenate([np.full(p[1].size, 1.0 / p[1].size) for p in parts]) * len(parts)
    clf = HistGradientBoostingClassifier(max_iter=rounds, learning_rate=0.08, max_leaf_nodes=31,
                                         l2_regularization=1.0, random_state=0)
    return clf.fit(X, y, sample_weight=w)


def pair_logodds(clf, s: Sessions, context: bool = False) -> np.ndarray:
    """(N, N) symmetric matrix of the classifier's same-member log-odds (diagonal 0)."""
    n = s.n
    i, j = np.triu_indices(n, 1)
    p = clf.predict_proba(pair_features(s, i, j, context))[:, 1]
    lo = np.clip(np.log(np.maximum(p, 1e-9) / np.maximum(1 - p, 1e-9)), -CLIP, CLIP)
    L = np.zeros((n, n))
    L[i, j] = lo
    L[j, i] = lo
    return L


def must_link_groups(s: Sessions) -> np.ndarray:
    """(N,) must-link group 0..G-1 per session: each personal device with enough sessions
    is one group, -1 for every other session (a shared device, or a personal one with fewer
    than persons.MIN_DEVICE_SESSIONS)."""
    group = np.full(s.n, -1, dtype=np.int64)
    g = 0
    for slot in sorted(set(int(x) for x in s.slot[s.personal])):
        sel = (s.slot == slot) & s.personal
        if sel.sum() >= P.MIN_DEVICE_SESSIONS:
            group[sel] = g
            g += 1
    return group


def model_groups(h: worlds.WorldHousehold) -> np.ndarray:
    """The model's own personal-device groups (one owner's devices merged by the held-out
    test, persons.personal_device_groups) as must-links instead of one group a device."""
    return P.personal_device_groups(h.features, h.device_slots())


def groups_of(h: worlds.WorldHousehold, s: Sessions, merged: bool) -> np.ndarray:
    return model_groups(h) if merged else must_link_groups(s)


def average_linkage(L: np.ndarray, group: np.ndarray, threshold: float, min_clusters: int = 1) -> np.ndarray:
    """(N,) cluster labels 0..K-1: start from the must-link groups (``group`` >= 0) and
    singletons, merge the pair of clusters with the highest mean pair score while that
    mean is above ``threshold`` and more than ``min_clusters`` clusters are left."""
    n = L.shape[0]
    init = np.empty(n, dtype=np.int64)
    ids: dict[int, int] = {}
    k = 0
    for t in range(n):
        if group[t] >= 0:
            if group[t] not in ids:
                ids[group[t]] = k
                k += 1
            init[t] = ids[group[t]]
        else:
            init[t] = k
            k += 1
    A = np.zeros((k, n))
    A[init, np.arange(n)] = 1.0
    size = A.sum(axis=1)
    M = (A @ L @ A.T) / np.outer(size, size)
    np.fill_diagonal(M, -np.inf)
    alive = np.ones(k, dtype=bool)
    parent = np.arange(k)
    while alive.sum() > max(min_clusters, 1):
        flat = int(np.argmax(M))
        a, b = divmod(flat, k)
        if not np.isfinite(M[a, b]) or M[a, b] <= threshold:
            break
        na, nb = size[a], size[b]
        row = (na * M[a] + nb * M[b]) / (na + nb)
        M[a, :], M[:, a] = row, row
        M[a, a] = -np.inf
        M[b, :], M[:, b] = -np.inf, -np.inf
        size[a] = na + nb
        alive[b] = False
        parent[parent == b] = a
    labels = parent[init]
    return np.unique(labels, return_inverse=True)[1]


def dissolve_small(L: np.ndarray, labels: np.ndarray, min_size: int, min_share: float = MIN_SHARE) -> np.ndarray:
    """Clusters with fewer than ``min_size`` sessions and less than ``min_share`` of the
    household are dissolved: each of their sessions goes to the kept cluster with the
    highest mean pair score to it. When no cluster is kept, the largest one is."""
    counts = np.bincount(labels)
    kept = np.flatnonzero((counts >= min_size) | (counts >= min_share * labels.size))
    if kept.size == 0:
        kept = np.array([int(np.argmax(counts))])
    if kept.size == counts.size:
        return np.unique(labels, return_inverse=True)[1]
    A = np.zeros((kept.size, labels.size))
    for r, c in enumerate(kept):
        A[r, labels == c] = 1.0 / counts[c]
    score = L @ A.T                        # (N, kept) mean score of each session to each kept cluster
    out = labels.copy()
    small = ~np.isin(labels, kept)
    out[small] = kept[np.argmax(score[small], axis=1)]
    return np.unique(out, return_inverse=True)[1]


def resolve(L: np.ndarray, group: np.ndarray, threshold: float, min_size: int,
            min_share: float = MIN_SHARE) -> np.ndarray:
    return dissolve_small(L, average_linkage(L, group, threshold), min_size, min_share)


# ---- a second stage: what the two sessions' pair scores with the rest say ---------

STACK_FEATURES = ("logodds", "row_corr", "group_cos", "group_same", "group_min", "groups", "row_means")


def second_order(L: np.ndarray, group: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Features of the pairs (i, j) from the first stage's log-odds matrix ``L``: the pair's
    own log-odds, the correlation of the two sessions' rows (two sessions of one member
    resemble the same others), and their profiles of mean log-odds to each must-link group
    (cosine, the same best group, the larger of the two's smaller group score)."""
    n = L.shape[0]
    Lc = L.copy()
    np.fill_diagonal(Lc, np.nan)
    mu = np.nanmean(Lc, axis=1) if n > 1 else np.zeros(n)
    sd = (np.nanstd(Lc, axis=1) if n > 1 else np.zeros(n)) + 1e-6
    Z = np.nan_to_num((Lc - mu[:, None]) / sd[:, None])
    corr = (Z[i] * Z[j]).sum(axis=1) / max(n - 2, 1)
    k = int(group.max()) + 1
    if k > 0:
        G = np.column_stack([L[:, group == g].mean(axis=1) for g in range(k)])
        gi, gj = G[i], G[j]
        cos = (gi * gj).sum(axis=1) / (np.linalg.norm(gi, axis=1) * np.linalg.norm(gj, axis=1) + 1e-9)
        same = (gi.argmax(axis=1) == gj.argmax(axis=1)).astype(np.float64)
        gmin = np.minimum(gi, gj).max(axis=1)
    else:
        cos = same = gmin = np.zeros(i.size)
    return np.column_stack([L[i, j], corr, cos, same, gmin, np.full(i.size, float(k)), mu[i] + mu[j]])


def _to_matrix(n: int, i: np.ndarray, j: np.ndarray, p: np.ndarray) -> np.ndarray:
    lo = np.clip(np.log(np.maximum(p, 1e-9) / np.maximum(1 - p, 1e-9)), -CLIP, CLIP)
    L = np.zeros((n, n))
    L[i, j] = lo
    L[j, i] = lo
    return L


def _split_by_world(hs: list[worlds.WorldHousehold]) -> tuple[list, list]:
    """Two halves of the households by world (even / odd index in the sorted worlds)."""
    ids = sorted({h.world_id for h in hs})
    first = set(ids[0::2])
    return [h for h in hs if h.world_id in first], [h for h in hs if h.world_id not in first]


class PairModel:
    """The pair classifier and, with ``stack``, a second stage over its log-odds matrix
    (trained on first-stage log-odds of households the first stage did not see: the
    training households' worlds in two halves, each scored by a first stage of the other)."""

    def __init__(self, context: bool = False, stack: bool = False, merged: bool = False):
        self.context, self.stack, self.merged = context, stack, merged
        self.first = self.second = None

    def fit(self, hs: list[worlds.WorldHousehold]) -> "PairModel":
        self.first = train(hs, self.context)
        if self.stack:
            a, b = _split_by_world(hs)
            rows = []
            for fit_on, score in ((a, b), (b, a)):
                first = train(fit_on, self.context)
                for k, h in enumerate(score):
                    s = sessions_of_household(h, self.context)
                    L = pair_logodds(first, s, self.context)
                    rng = np.random.default_rng(k)
                    i, j = rng.integers(0, s.n, 2 * TRAIN_PAIRS), rng.integers(0, s.n, 2 * TRAIN_PAIRS)
                    keep = i != j
                    i, j = i[keep][:TRAIN_PAIRS], j[keep][:TRAIN_PAIRS]
                    Z = np.hstack((pair_features(s, i, j, self.context), second_order(L, groups_of(h, s, self.merged), i, j)))
                    rows.append((Z, (h.person[i] == h.person[j]).astype(np.int64)))
            X = np.vstack([r[0] for r in rows])
            y = np.concatenate([r[1] for r in rows])
            w = np.concatenate([np.full(r[1].size, 1.0 / r[1].size) for r in rows]) * len(rows)
            self.second = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.08, max_leaf_nodes=31,
                                                         l2_regularization=1.0, random_state=0).fit(X, y, sample_weight=w)
        return self

    def logodds(self, h: worlds.WorldHousehold) -> tuple[np.ndarray, np.ndarray]:
        """(L, must-link groups) of one household."""
        s = sessions_of_household(h, self.context)
        L = pair_logodds(self.first, s, self.context)
        g = groups_of(h, s, self.merged)
        if self.second is not None:
            i, j = np.triu_indices(s.n, 1)
            Z = np.hstack((pair_features(s, i, j, self.context), second_order(L, g, i, j)))
            L = _to_matrix(s.n, i, j, self.second.predict_proba(Z)[:, 1])
        return L, g


def held_out_logodds(hs: list[worlds.WorldHousehold], **kw) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every training household's (L, groups) from a PairModel fitted on the other half of
    the worlds (so choices made on them are made on out-of-sample pair scores)."""
    a, b = _split_by_world(hs)
    out = {}
    for fit_on, score in ((a, b), (b, a)):
        pm = PairModel(**kw).fit(fit_on)
        for h in score:
            out[h.household_id + h.world_id] = pm.logodds(h)
    return [out[h.household_id + h.world_id] for h in hs]


# ---- a learned merge rule along the linkage ---------------------------------------------

MERGE_FEATURES = ("mean", "share_positive", "cohesion_min", "cohesion_max", "log_size_min", "log_size_max",
                  "groups_both", "groups_one", "mean_rel", "clusters_big", "log_sessions")
SURE = 4.0            # mean log-odds beyond which the linkage merges (above) or stops (below) unasked
MERGE_MIN_SIZE = 5    # clusters smaller than this are dissolved after the rule (persons.MIN_DEVICE_SESSIONS)


def learned_linkage(L: np.ndarray, group: np.ndarray, decide, truth: np.ndarray | None = None,
                    record: list | None = None) -> np.ndarray:
    """Average linkage where a merge of two clusters whose mean log-odds lies within
    +-``SURE`` is decided by ``decide(features) -> bool`` (a learned rule); a refused pair
    is not asked again until one of its clusters changes. With ``truth`` the decision is
    the truth's (the two clusters' majority members are the same) and each asked pair's
    features and label are appended to ``record`` (the rule's training rows)."""
    n = L.shape[0]
    init = average_linkage(L, group, np.inf)             # the groups and singletons, nothing merged
    k = int(init.max()) + 1
    A = np.zeros((k, n))
    A[init, np.arange(n)] = 1.0
    size = A.sum(axis=1)
    S = A @ L @ A.T
    pos = A @ (L > 0).astype(np.float64) @ A.T
    inner = np.diag(S).copy() / 2.0                       # sum over the pairs inside each cluster
    inner_pairs = size * (size - 1) / 2.0
    np.fill_diagonal(S, 0.0)
    has_group = np.zeros(k, dtype=bool)
    has_group[np.unique(init[group >= 0])] = True
    hh_mean = float(L[np.triu_indices(n, 1)].mean()) if n > 1 else 0.0
    members = [list(np.flatnonzero(init == c)) for c in range(k)]
    majority = None
    if truth is not None:
        majority = np.array([np.bincount(truth[m]).argmax() for m in members])
    alive = np.ones(k, dtype=bool)
    refused = np.zeros((k, k), dtype=bool)
    parent = np.arange(k)
    while alive.sum() > 1:
        M = S / np.outer(size, size)
        M[~alive, :] = -np.inf
        M[:, ~alive] = -np.inf
        np.fill_diagonal(M, -np.inf)
        M[refused] = -np.inf
        a, b = divmod(int(np.argmax(M)), k)
        m = M[a, b]
        if not np.isfinite(m) or m < -SURE:
            break
        if m <= SURE:
            coh = [inner[c] / inner_pairs[c] if inner_pairs[c] > 0 else np.nan for c in (a, b)]
            big = int((alive & (size >= MERGE_MIN_SIZE)).sum())
            x = np.array([m, pos[a, b] / (size[a] * size[b]), np.nanmin(coh) if not np.isnan(coh).all() else np.nan,
                          np.nanmax(coh) if not np.isnan(coh).all() else np.nan,
                          np.log(min(size[a], size[b])), np.log(max(size[a], size[b])),
                          float(has_group[a] and has_group[b]), float(has_group[a] != has_group[b]),
                          m - hh_mean, big, np.log(n)])
            if truth is not None:
                ok = bool(majority[a] == majority[b])
                record.append((x, ok))
            else:
                ok = bool(decide(x))
            if not ok:
                refused[a, b] = refused[b, a] = True
                continue
        inner[a] += inner[b] + S[a, b]
        inner_pairs[a] += inner_pairs[b] + size[a] * size[b]
        S[a, :] += S[b, :]
        S[:, a] = S[a, :]
        S[a, a] = 0.0
        pos[a, :] += pos[b, :]
        pos[:, a] = pos[a, :]
        size[a] += size[b]
        has_group[a] |= has_group[b]
        alive[b] = False
        S[b, :] = S[:, b] = 0.0
        refused[a, :] = refused[:, a] = False
        parent[parent == b] = a
        if truth is not None:
            members[a] = members[a] + members[b]
            majority[a] = np.bincount(truth[members[a]]).argmax()
    return np.unique(parent[init], return_inverse=True)[1]


class MergeRule:
    """"Are these two clusters one member?" learned from the truth along the linkage of
    training households (their out-of-sample pair log-odds)."""

    def fit(self, Ls: list[tuple[np.ndarray, np.ndarray]], hs: list[worlds.WorldHousehold]) -> "MergeRule":
        rows: list = []
        weights = []
        for (L, g), h in zip(Ls, hs):
            before = len(rows)
            learned_linkage(L, g, None, truth=h.person, record=rows)
            weights += [1.0 / max(len(rows) - before, 1)] * (len(rows) - before)
        X = np.array([r[0] for r in rows])
        y = np.array([r[1] for r in rows], dtype=np.int64)
        self.clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.08, l2_regularization=1.0,
                                                  random_state=0).fit(X, y, sample_weight=np.array(weights) * len(hs))
        self.rows = len(rows)
        return self

    def decide(self, x: np.ndarray) -> bool:
        return bool(self.clf.predict_proba(x[None, :])[0, 1] > 0.5)

    def resolve(self, L: np.ndarray, group: np.ndarray) -> np.ndarray:
        return dissolve_small(L, learned_linkage(L, group, self.decide), MERGE_MIN_SIZE)


# ---- evaluation ------------------------------------------------------------------------

def _tuning_worlds(seed: int, lo: int, hi: int) -> list[worlds.WorldHousehold]:
    if seed in worlds.REPORT_ONLY_SEEDS:
        raise SystemExit(f"{seed} is a report-only seed (worlds.REPORT_ONLY_SEEDS), never used for tuning")
    split = worlds.TUNING if seed == worlds.TUNING.seed else worlds.Split(**{**worlds.TUNING.__dict__, "seed": seed})
    return worlds.generate(split, world_indices=range(lo, hi))


def figures(hs: list[worlds.WorldHousehold], preds: list[np.ndarray]) -> dict:
    r = WE.summarise(hs, preds, None)
    out = {k: round(r[k], 4) if isinstance(r[k], float) else r[k]
           for k in ("session_accuracy", "household_size_exact", "single_person_kept", "households", "sessions")}
    sizes = [(np.unique(p).size - h.n_persons) for h, p in zip(hs, preds)]
    out["under"] = int(sum(d < 0 for d in sizes))
    out["over"] = int(sum(d > 0 for d in sizes))
    return out


def choose(hs: list[worlds.WorldHousehold], Ls: list[tuple[np.ndarray, np.ndarray]], log) -> tuple[dict, tuple[float, int]]:
    """The (threshold, min size) with the best session accuracy + size exact over the
    training households, resolved from their out-of-sample log-odds."""
    preds: dict[tuple[float, int], list[np.ndarray]] = {(t, m): [] for t in THRESHOLDS for m in MIN_SIZES}
    for L, g in Ls:
        for t in THRESHOLDS:
            base = average_linkage(L, g, t)
            for m in MIN_SIZES:
                preds[(t, m)].append(dissolve_small(L, base, m))
    table = {f"{t}/{m}": figures(hs, p) for (t, m), p in preds.items()}
    for k, v in table.items():
        log(f"  cross-fit {k}: {v}")
    best = max(preds, key=lambda key: (table[f"{key[0]}/{key[1]}"]["session_accuracy"]
                                       + table[f"{key[0]}/{key[1]}"]["household_size_exact"]))
    return table, best


def _baselines(h: worlds.WorldHousehold) -> dict[str, np.ndarray]:
    return {"hearth_batch": WE.hearth_batch(h)[0], "device_heuristic": WE.device_heuristic(h)[0],
            "supervised_oracle": WE.supervised_oracle(h)[0]}


def report(pm: PairModel, hs: list[worlds.WorldHousehold], choice: tuple[float, int], workers: int,
           rule: MergeRule | None = None) -> dict:
    t, m = choice
    pair, learned = [], []
    for h in hs:
        L, g = pm.logodds(h)
        pair.append(resolve(L, g, t, m))
        if rule is not None:
            learned.append(rule.resolve(L, g))
    with ProcessPoolExecutor(workers) as pool:
        base = list(pool.map(_baselines, hs))
    out = {"pair_model": figures(hs, pair)}
    if rule is not None:
        out["pair_model_learned_merge"] = figures(hs, learned)
    for name in ("hearth_batch", "device_heuristic", "supervised_oracle"):
        out[name] = figures(hs, [b[name] for b in base])
    methods = {"pair_model": pair, **({"pair_model_learned_merge": learned} if rule is not None else {}),
               "hearth_batch": [b["hearth_batch"] for b in base]}
    out["by_size"] = {size: {name: figures([hs[k] for k in idx], [p[k] for k in idx]) for name, p in methods.items()}
                      for size in sorted({h.n_persons for h in hs})
                      for idx in [[k for k, h in enumerate(hs) if h.n_persons == size]]}
    hearth_right = np.concatenate([matched_correct(h.person, b["hearth_batch"]) for h, b in zip(hs, base)])
    pair_right = np.concatenate([matched_correct(h.person, p) for h, p in zip(hs, learned or pair)])
    out["sessions_pair_right_hearth_wrong"] = int((pair_right & ~hearth_right).sum())
    out["sessions_hearth_right_pair_wrong"] = int((hearth_right & ~pair_right).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seed", type=int, default=worlds.TUNING.seed)
    ap.add_argument("--train-worlds", default="0:4", help="TUNING worlds (per family) of the training seed, lo:hi")
    ap.add_argument("--test-seed", type=int, default=20_260_002, help="another TUNING-split seed")
    ap.add_argument("--test-worlds", default="0:4")
    ap.add_argument("--context", action="store_true",
                    help="also the time between sessions, a shared series and overlap on two devices")
    ap.add_argument("--stack", action="store_true", help="a second stage over the first stage's log-odds matrix")
    ap.add_argument("--learned-merge", action="store_true", help="also the learned merge rule along the linkage")
    ap.add_argument("--merged-groups", action="store_true",
                    help="the model's merged personal-device groups as must-links (default: one a device)")
    ap.add_argument("--movielens-tuning", action="store_true", help="also the real viewers' TUNING half")
    ap.add_argument("--reporting", action="store_true", help="REPORTING instead of the test seed (read once)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    kw = {"context": args.context, "stack": args.stack, "merged": args.merged_groups}
    lo, hi = (int(x) for x in args.train_worlds.split(":"))
    train_hs = _tuning_worlds(args.train_seed, lo, hi)
    log(f"training households {len(train_hs)} (seed {args.train_seed}, worlds {lo}:{hi}), {kw}")
    Ls = held_out_logodds(train_hs, **kw)
    table, choice = choose(train_hs, Ls, log)
    log(f"choice threshold/min_size {choice}")
    rule = None
    if args.learned_merge:
        rule = MergeRule().fit(Ls, train_hs)
        log(f"merge rule trained on {rule.rows} asked merges; on its own training households "
            f"{figures(train_hs, [rule.resolve(L, g) for L, g in Ls])}")
    pm = PairModel(**kw).fit(train_hs)
    result = {"train_seed": args.train_seed, "train_worlds": args.train_worlds, **kw,
              "choice": list(choice), "cross_fit": table}
    if args.reporting:
        result["reporting"] = report(pm, worlds.generate(worlds.REPORTING), choice, args.workers, rule)
        log(f"REPORTING {json.dumps(result['reporting'])}")
    else:
        lo, hi = (int(x) for x in args.test_worlds.split(":"))
        test = _tuning_worlds(args.test_seed, lo, hi)
        result["test_seed"], result["test_worlds"] = args.test_seed, args.test_worlds
        result["test"] = report(pm, test, choice, args.workers, rule)
        log(f"test {json.dumps(result['test'])}")
    if args.movielens_tuning:
        from bench import worlds_movielens
        ml = worlds_movielens.generate(worlds_per_family=4, split="tuning")
        result["movielens_tuning"] = report(pm, ml, choice, args.workers, rule)
        log(f"movielens-tuning {json.dumps(result['movielens_tuning'])}")
    result["elapsed_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
