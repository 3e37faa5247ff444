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

PERSONAL_DEVICE_TYPES = ("mobile", "tablet", "desktop")
PERSONAL_TYPE_INDEX = np.array([F.DEVICE_TYPES.index(t) for t in PERSONAL_DEVICE_TYPES])
MIN_DEVICE_SESSIONS = 5   # a personal device with fewer sessions is not (yet) a person of its own
# Two groups are one person while the leave-one-out AUC of telling them apart stays
# below MERGE_AUC. Tuning worlds (TUNING split, 2 worlds x 6 households of each tuning
# family, batch session accuracy): ridge 3 / AUC 0.6: 0.737, 3 / 0.7: 0.742,
# 30 / 0.6: 0.747, 30 / 0.7: 0.751, 100 / 0.65: 0.751.
MERGE_AUC = 0.7
RIDGE = 30.0              # ridge penalty on standardised features
_HOUR_CENTRES = np.arange(0.0, 24.0, 2.0) + 1.0


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


def _standardised(Z: np.ndarray) -> np.ndarray:
    return (Z - Z.mean(axis=0)) / np.maximum(Z.std(axis=0), 1e-3)


def is_personal(X: np.ndarray) -> np.ndarray:
    """(N,) bool: the session's device type is a personal one."""
    return np.isin(np.asarray(X)[:, F.DEVICE].argmax(axis=1), PERSONAL_TYPE_INDEX)


def loo_auc(Z: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> float:
    """Leave-one-out AUC of ridge regression of y (0/1) on Z: 0.5 = indistinguishable."""
    n = Z.shape[0]
    A = np.hstack((np.ones((n, 1)), Z))
    reg = ridge * np.eye(A.shape[1])
    reg[0, 0] = 0.0
    G = np.linalg.solve(A.T @ A + reg, A.T)          # (d+1, n)
    fitted = A @ (G @ y)
    lev = np.einsum("ij,ji->i", A, G)
    pred = y - (y - fitted) / np.maximum(1.0 - lev, 1e-6)
    pos, neg = pred[y == 1], pred[y == 0]
    if not pos.size or not neg.size:
        return 0.5
    ranks = np.argsort(np.argsort(np.concatenate((pos, neg)))) + 1.0
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def personal_device_groups(X: np.ndarray, slots: np.ndarray, merge_auc: float = MERGE_AUC,
                           min_sessions: int = MIN_DEVICE_SESSIONS) -> np.ndarray:
    """(N,) person group of each session, -1 for sessions that carry no identity
    (shared device types, unknown slot, a personal device with < ``min_sessions``).
    Groups are numbered 0..G-1 in order of first appearance of their devices.

    A slot is personal when most of its sessions are of a personal type. Greedy
    agglomeration: repeatedly merge the pair of groups whose sessions are least
    distinguishable (lowest leave-one-out AUC), while that AUC < ``merge_auc``."""
    X = np.asarray(X, dtype=np.float64)
    slots = np.asarray(slots, dtype=np.int64)
    personal = is_personal(X)
    group = np.full(X.shape[0], -1, dtype=np.int64)
    devices = [int(s) for s in dict.fromkeys(slots[slots >= 0].tolist())
               if (slots == s).sum() >= min_sessions and personal[slots == s].mean() > 0.5]
    if not devices:
        return group
    members = [[s] for s in devices]
    if len(members) > 1:
        Z = _standardised(person_features(X))
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
                    if best is None or auc[key] < best[0]:
                        best = (auc[key], a, b)
            assert best is not None
            if best[0] >= merge_auc:
                break
            _, a, b = best
            members[a] = members[a] + members[b]
            del members[b]
            auc = {k: v for k, v in auc.items() if not (set(k) & set(members[a]))}
    for g, m in enumerate(members):
        group[np.isin(slots, m)] = g
    return group
