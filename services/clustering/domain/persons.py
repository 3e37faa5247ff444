"""Device evidence first: which of a household's personal devices belong to one person.

A personal device (mobile, tablet, desktop) is strong evidence of one person; a TV, a
console or an unknown device is not. ``personal_device_groups`` turns a household's
personal devices into *person groups*: every personal device with enough sessions
starts as its own group, and two groups are merged while the sessions of the one are
not told apart from those of the other out of sample (one person's phone and laptop
are one person; two people's phones are two). The household model clamps the sessions
of each group to one person and lets EM explain the rest — sessions on shared devices
go to the person whose habits they fit, and members who only ever use the TV are born
as extra components when BIC asks for them (model.py, docs/clustering.md).

Why a held-out separability test instead of a likelihood ratio: the mixture's
likelihood prefers splitting sessions by *kind* (length, genre lumps) over splitting by
person (docs/clustering.md, the diagnosis of issue #10), so it would keep one person's
two devices apart whenever they are used for different kinds of viewing. Whether a
classifier trained on some of the two devices' sessions can tell the rest apart is a
direct question about persons: one person's devices share their hours and tastes.
It is ridge regression with its closed-form leave-one-out predictions (no refits), so a
household with a handful of devices costs a few small matrix solves.

Pure numpy; no state.
"""

from __future__ import annotations

import numpy as np

from services.clustering.domain import features as F
from services.clustering.domain.kmeans import IncrementalKMeans

PERSONAL_DEVICE_TYPES = ("mobile", "tablet", "desktop")
PERSONAL_TYPE_INDEX = np.array([F.DEVICE_TYPES.index(t) for t in PERSONAL_DEVICE_TYPES])
MIN_DEVICE_SESSIONS = 5   # a personal device with fewer sessions is not (yet) a person of its own
# Two groups are one person while the leave-one-out AUC of telling them apart stays
# below MERGE_AUC. Tuning worlds (TUNING split, 2 worlds x 6 households of each tuning
# family, batch session accuracy): ridge 3 / AUC 0.6: 0.737, 3 / 0.7: 0.742,
# 30 / 0.6: 0.747, 30 / 0.7: 0.751, 100 / 0.65: 0.751.
MERGE_AUC = 0.7
SUCCESSOR_Z = 6.0         # a device taking over from one of its type is another person's only this far above chance
RIDGE = 30.0              # ridge penalty on standardised features
# Households without a personal device: two persons the mixture found are kept apart
# only while their viewing *hours* (two-hour bins, by weekend, and the weekday) tell them
# apart out of sample beyond chance: the leave-one-out AUC at least SHARED_ONLY_SPLIT_Z
# standard deviations of its no-difference spread above 0.5 (auc_z); see
# merge_by_viewing_hours. Tuned on the TUNING worlds (docs/clustering.md): it replaced
# a fixed AUC of 0.6, which was chance for small households and too strict for large ones.
SHARED_ONLY_SPLIT_Z = 2.0
_HOUR_CENTRES = np.arange(0.0, 24.0, 2.0) + 1.0
# person_features' first columns: hour bins, hour bins at weekends, weekend flag, weekday.
_RHYTHM_COLUMNS = slice(0, 2 * _HOUR_CENTRES.size + 1 + 2)


def person_features(X: np.ndarray) -> np.ndarray:
    """What says *who* rather than *where*: soft two-hour bins of the start hour (also
    split by weekend), weekend flag, day of week, genre mix, maturity, lengths, binge,
    VPN — the device block left out. (N, 45)."""
    X = np.asarray(X, dtype=np.float64)
    hour = (np.arctan2(X[:, F.HOUR.start], X[:, F.HOUR.start + 1]) / (2 * np.pi) * 24.0) % 24.0
    dow = np.rint(np.arctan2(X[:, F.DOW.start], X[:, F.DOW.start + 1]) / (2 * np.pi) * 7.0) % 7
    d = np.abs(hour[:, None] - _HOUR_CENTRES[None])
    d = np.minimum(d, 24.0 - d)
    bins = np.exp(-0.5 * (d / 1.5) ** 2)
    weekend = (dow >= 5).astype(np.float64)[:, None]
    return np.hstack((bins, bins * weekend, weekend, X[:, F.DOW], X[:, F.GENRE], X[:, F.KIDS_SHARE:]))


def viewing_hours(X: np.ndarray) -> np.ndarray:
    """The columns of ``person_features`` that say *when* a session is watched (two-hour
    bins, by weekend, the weekend flag and the weekday): what tells two people apart
    and not one person's kinds of viewing (see merge_by_viewing_hours). (N, 27)."""
    return person_features(X)[:, _RHYTHM_COLUMNS]


def _standardised(Z: np.ndarray) -> np.ndarray:
    return (Z - Z.mean(axis=0)) / np.maximum(Z.std(axis=0), 1e-3)


def is_personal(X: np.ndarray) -> np.ndarray:
    """(N,) bool: the session's device type is a personal one."""
    return np.isin(np.asarray(X)[:, F.DEVICE].argmax(axis=1), PERSONAL_TYPE_INDEX)


def loo_predictions(Z: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """(n,) leave-one-out predictions of ridge regression of y on Z (closed form: each
    session's score from a fit without it)."""
    n = Z.shape[0]
    A = np.hstack((np.ones((n, 1)), Z))
    reg = ridge * np.eye(A.shape[1])
    reg[0, 0] = 0.0
    G = np.linalg.solve(A.T @ A + reg, A.T)          # (d+1, n)
    fitted = A @ (G @ y)
    lev = np.einsum("ij,ji->i", A, G)
    return y - (y - fitted) / np.maximum(1.0 - lev, 1e-6)


def loo_auc(Z: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> float:
    """Leave-one-out AUC of ridge regression of y (0/1) on Z: 0.5 = indistinguishable."""
    pred = loo_predictions(Z, y, ridge)
    pos, neg = pred[y == 1], pred[y == 0]
    if not pos.size or not neg.size:
        return 0.5
    ranks = np.argsort(np.argsort(np.concatenate((pos, neg)))) + 1.0
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def personal_slots(X: np.ndarray, slots: np.ndarray, min_sessions: int = MIN_DEVICE_SESSIONS) -> list[int]:
    """The personal devices among ``slots`` (in order of first appearance): a slot with at
    least ``min_sessions`` sessions, most of them of a personal device type."""
    slots = np.asarray(slots, dtype=np.int64)
    personal = is_personal(X)
    return [int(s) for s in dict.fromkeys(slots[slots >= 0].tolist())
            if (slots == s).sum() >= min_sessions and personal[slots == s].mean() > 0.5]


def personal_device_groups(X: np.ndarray, slots: np.ndarray, merge_auc: float = MERGE_AUC,
                           min_sessions: int = MIN_DEVICE_SESSIONS, min_z: float = 0.0,
                           successor_z: float | None = None, held: dict[int, int] | None = None,
                           held_apart_merge_auc: float | None = None) -> np.ndarray:
    """(N,) person group of each session, -1 for sessions that carry no identity
    (shared device types, unknown slot, a personal device with < ``min_sessions``).
    Groups are numbered 0..G-1 in order of first appearance of their devices.

    A slot is personal when most of its sessions are of a personal type. Greedy
    agglomeration: repeatedly merge the pair of groups whose sessions are least
    distinguishable (lowest leave-one-out AUC), while that AUC < ``merge_auc``.
    ``min_z`` > 0: a pair is also merged while its AUC is less than ``min_z`` spreads
    above chance (``auc_z``) — a fixed AUC is chance for devices with a handful of
    sessions each (the start of a stream, model.STREAM_GROUP_MIN_Z); 0 (the default)
    leaves the fixed bar alone. A device that takes over from another of the same
    type (a phone replaced) is first pooled with it (_pool_successors, ``successor_z``,
    default SUCCESSOR_Z; 0 turns it off)."""
    X = np.asarray(X, dtype=np.float64)
    slots = np.asarray(slots, dtype=np.int64)
    successor_z = SUCCESSOR_Z if successor_z is None else successor_z
    group = np.full(X.shape[0], -1, dtype=np.int64)
    devices = personal_slots(X, slots, min_sessions)
    if not devices:
        return group
    members = [[s] for s in devices]
    if len(members) > 1:
        Z = _standardised(person_features(X))
        if successor_z > 0:
            members = _pool_successors(X, Z, slots, members, merge_auc, successor_z)
        auc: dict[tuple[int, int], float] = {}
        while len(members) > 1:
            masks = [np.isin(slots, m) for m in members]
            best = None
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    key = (min(members[a]), min(members[b]))
                    if key not in auc:
                        both = masks[a] | masks[b]
                        auc[key] = loo_auc(Z[both], masks[a][both].astype(np.float64))
                    bar = merge_auc
                    if held and held_apart_merge_auc is not None:
                        pa = {held[s] for s in members[a] if s in held}
                        pb = {held[s] for s in members[b] if s in held}
                        if pa and pb and not pa & pb:
                            bar = held_apart_merge_auc   # the current model holds them apart
                    mergeable = (auc[key] < bar
                                 or auc_z(auc[key], int(masks[a].sum()), int(masks[b].sum())) < min_z)
                    if mergeable and (best is None or auc[key] < best[0]):
                        best = (auc[key], a, b)
            if best is None:
                break
            _, a, b = best
            members[a] = members[a] + members[b]
            del members[b]
            auc = {k: v for k, v in auc.items() if not (set(k) & set(members[a]))}
    for g, m in enumerate(members):
        group[np.isin(slots, m)] = g
    return group


def _pool_successors(X: np.ndarray, Z: np.ndarray, slots: np.ndarray, members: list[list[int]],
                     merge_auc: float, successor_z: float) -> list[list[int]]:
    """A personal device whose first session comes after the last session of another
    personal device of the same type (rows in time order) takes over from it — a phone
    replaced gets a new device id — and is pooled with it unless their sessions are told
    apart: leave-one-out AUC >= ``merge_auc`` and at least ``successor_z`` spreads above
    chance (auc_z). Why: the greedy merge compares the new phone's few sessions with
    every device, and the owner's old phone (stopped) and their other devices were
    split three ways by the fixed bar, then merged back under the new phone's id
    (TUNING households with a phone replaced half-way, docs/clustering.md). A newcomer's
    phone after a leaver's is still a person of its own when their habits differ."""
    dtype = X[:, F.DEVICE].argmax(axis=1)
    rows = {s: np.flatnonzero(slots == s) for m in members for s in m}
    kind = {s: int(np.bincount(dtype[r]).argmax()) for s, r in rows.items()}
    out: list[list[int]] = []
    for m in members:
        s = m[0]
        before = [c for c in out if kind[c[-1]] == kind[s] and rows[c[-1]][-1] < rows[s][0]]
        if before:
            c = max(before, key=lambda c: rows[c[-1]][-1])
            a, b = np.isin(slots, c), slots == s
            both = a | b
            auc = loo_auc(Z[both], a[both].astype(np.float64))
            if auc < merge_auc or auc_z(auc, int(a.sum()), int(b.sum())) < successor_z:
                c.append(s)
                continue
        out.append(list(m))
    return out


def auc_z(auc: float, n_a: int, n_b: int) -> float:
    """How far ``auc`` is above chance in units of its spread under "the two groups are
    alike" (the Mann-Whitney null: sd = sqrt((n_a + n_b + 1) / (12 n_a n_b))). The
    spread shrinks with the number of sessions: an AUC of 0.6 is chance for 40 sessions
    and strong evidence for 400."""
    if n_a < 1 or n_b < 1:
        return 0.0
    return float((auc - 0.5) / np.sqrt((n_a + n_b + 1) / (12.0 * n_a * n_b)))


def least_separable_pair(Z: np.ndarray, labels: np.ndarray, ridge: float = RIDGE,
                         by_z: bool = False) -> tuple[float, int, int]:
    """(AUC, a, b), a < b: the two labels whose sessions are hardest to tell apart on
    ``Z`` (leave-one-out AUC of ridge regression, as for device groups); ``by_z``: the
    pair with the lowest ``auc_z`` instead, and that z in place of the AUC.
    (1.0, -1, -1) (by_z: (inf, -1, -1)) with fewer than two labels."""
    names = np.unique(labels)
    best = (np.inf if by_z else 1.0, -1, -1)
    for i in range(names.size):
        for j in range(i + 1, names.size):
            both = (labels == names[i]) | (labels == names[j])
            auc = loo_auc(_standardised(Z[both]), (labels[both] == names[i]).astype(np.float64), ridge)
            if by_z:
                auc = auc_z(auc, int((labels == names[i]).sum()), int((labels == names[j]).sum()))
            if auc < best[0]:
                best = (auc, int(names[i]), int(names[j]))
    return best


def merge_by_viewing_hours(X: np.ndarray, labels: np.ndarray, min_z: float | None = None) -> np.ndarray | None:
    """For a household whose sessions carry no identity (shared devices only): the
    labels with the least hour-separable pair of persons merged, renumbered 0..k-2, or
    None when every pair is told apart by its viewing hours beyond chance
    (``auc_z`` of the leave-one-out AUC >= ``min_z``, default SHARED_ONLY_SPLIT_Z).

    Why hours: with nothing but content and timing to go on, the mixture also splits one
    person's sessions by *kind* (long binges vs single titles, genre lumps), and those
    kinds are told apart by content and length, not by when they are watched. Two
    people sharing a TV differ in when they watch as well (different hours or days), so
    a split whose parts watch at the same times is taken for one person.

    Why a z-score and not a fixed AUC: the AUC of two groups that are alike scatters
    around 0.5 by sqrt((n_a + n_b + 1) / (12 n_a n_b)), so a fixed bar (0.6 before) is
    passed by chance in a small household (a single person's kinds split into 20 + 20
    sessions pass 0.6 about one time in seven) and is too high for a large one (for
    150 + 150 sessions, 0.57 is already 2.1 standard deviations above chance)."""
    min_z = SHARED_ONLY_SPLIT_Z if min_z is None else min_z
    labels = np.asarray(labels)
    if np.unique(labels).size < 2:
        return None
    z, a, b = least_separable_pair(viewing_hours(X), labels, by_z=True)
    if z >= min_z:
        return None
    merged = np.where(labels == b, a, labels)
    return np.unique(merged, return_inverse=True)[1]


def hour_seedings(X: np.ndarray, k_max: int, seed: int = 0) -> list[np.ndarray]:
    """Seedings for a mixture of 2..``k_max`` persons that split the sessions by *when*
    they are watched, two per k: k-means on the standardised two-hour bins of the start
    hour alone (with the weekend and weekday columns, k-means may split a person's
    weekends from their weekdays) and on all of ``viewing_hours`` (people also differ by
    weekday). TUNING worlds, the 39 households without a personal device: bins alone
    size exact 0.487 -> 0.513, all columns 0.513, both 0.538 (accuracy 0.721 -> 0.724,
    single-person kept 1.00).

    Why: EM keeps, for each number of persons, the seeding with the highest likelihood,
    and its k-means++ seedings on all features mostly start from splits by kind (long
    binges vs single titles, genre lumps), which the hours merge then takes back — so
    two people who watch at different hours are found only when a seeding starts near
    them. Seeded by hours, EM can reach that split and the likelihood weighs it against
    the kind splits."""
    rhythm = viewing_hours(X)
    views = (_standardised(rhythm[:, :_HOUR_CENTRES.size]), _standardised(rhythm))
    out = []
    for k in range(2, min(k_max, rhythm.shape[0]) + 1):
        for Z in views:
            km = IncrementalKMeans.fit(Z, k, seed=seed)
            if km.n_components == k:
                out.append(km.predict(Z))
    return out


def novel_sessions(X: np.ndarray, known: np.ndarray, share: float) -> np.ndarray:
    """Indices of the ``share`` of the sessions whose person is not known (``known``
    False: shared devices) that look least like the sessions whose person is known (the
    personal-device groups): the highest leave-one-out scores of ridge regression of
    "unknown" on person_features. A member who only watches the TV is in those; a device
    owner's own TV sessions look like their phone sessions and are not. Empty when
    either side has fewer than 10 sessions."""
    known = np.asarray(known, dtype=bool)
    unknown = np.flatnonzero(~known)
    if unknown.size < 10 or known.sum() < 10:
        return np.zeros(0, dtype=np.int64)
    score = loo_predictions(_standardised(person_features(X)), (~known).astype(np.float64))
    cut = np.quantile(score[unknown], 1.0 - share)
    return unknown[score[unknown] >= cut]


def differ_in_hours(X: np.ndarray, who: np.ndarray, min_z: float) -> bool:
    """Are the sessions marked ``who`` told apart from all the others by *when* they are
    watched (viewing_hours; leave-one-out AUC at least ``min_z`` spreads above chance,
    auc_z)? The stream's newcomer test asks it of the person it would add: a member who
    joins watches at hours of their own (or on days of their own), while a binge run or a
    new kind of viewing by someone already there falls at that person's usual hours.
    False with fewer than two sessions on either side."""
    who = np.asarray(who, dtype=bool)
    n_a, n_b = int(who.sum()), int((~who).sum())
    if n_a < 2 or n_b < 2:
        return False
    auc = loo_auc(_standardised(viewing_hours(X)), who.astype(np.float64))
    return auc_z(auc, n_a, n_b) >= min_z



def own_and_shared_devices(device_ids: np.ndarray, personal_type: np.ndarray, person_ids: np.ndarray,
                           sessions: np.ndarray, person: str) -> tuple[list[str], list[str]]:
    """Of the devices ``person``'s sessions are on: (own, shared), each sorted. One row per
    (device, device type, assigned person) of those devices' stored sessions, with its
    count of ``sessions`` (``personal_type``: the type is a personal one; ``person_ids``:
    "" for sessions not assigned yet).

    A device is the person's **own** when, as the model reads devices (``personal_slots``),
    most of its sessions are of a personal type, and most of its *assigned* sessions are
    the person's: a record there that names nobody is then the person's, by the device
    alone. Every other device is **shared**: a TV is one whoever watched it, and so is
    another member's phone the person borrowed — a record there that names nobody may be
    another member's. What an erasure does with the two is docs/privacy.md §6's:
    attribution's person erasure fences the unnamed touchpoints of the own devices, and of
    a shared one only where one of the person's erased touchpoints was."""
    device_ids = np.asarray(device_ids, dtype=object)
    personal_type = np.asarray(personal_type, dtype=bool)
    person_ids = np.asarray(person_ids, dtype=object)
    sessions = np.asarray(sessions, dtype=np.float64)
    own, shared = [], []
    for device in sorted(set(device_ids[(person_ids == person) & (sessions > 0)].tolist())):
        on = device_ids == device
        assigned = on & (person_ids != "")
        personal_share = sessions[on & personal_type].sum() / sessions[on].sum()
        persons_share = sessions[assigned & (person_ids == person)].sum() / sessions[assigned].sum()
        (own if personal_share > 0.5 and persons_share > 0.5 else shared).append(device)
    return own, shared
