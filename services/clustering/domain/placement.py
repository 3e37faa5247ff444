"""Placing shared-device sessions: a discriminative step after the device-first fit.

After ``HouseholdModel._fit_gmm`` has built persons from the devices outward (persons.py:
each personal-device group is one person, its sessions clamped; members without a
personal device born as extra components), the sessions on shared devices (TV, console,
"other") are placed by semi-supervised EM. EM drifts: a group person who has only a few
personal-device sessions is re-estimated mostly from the shared sessions EM hands it, so
the components end up splitting the TV's sessions by *kind* (binges vs single titles,
genre lumps) rather than by person — on the TUNING worlds a two-person household whose
members are told apart 0.97 of the time by a supervised classifier had its TV sessions
placed right 0.56 of the time (the device heuristic: 0.81).

The step: a per-household, strongly regularised multinomial logistic regression of
*who* on the who-features (persons.person_features: hours by weekend, weekday, genre mix,
maturity, lengths, binge, VPN; no device block) is trained on the sessions whose person
is known — the personal-device groups' sessions — plus, for a person without a device
(born by BIC), the sessions the mixture gave them. Its probabilities become the
responsibilities of every other session, and the mixture's statistics are re-estimated
from them once (one M-step; ``discriminative_responsibilities`` returns the
responsibilities, model.py builds the mixture). The answer is still the mixture's
linear scorer, so assignment cost and the batch scorer do not change (model.py then
gives that scorer its own block weights, PLACED_BLOCK_WEIGHTS, stored in the model
header). Why a classifier and not more EM: it is fitted only on evidence of who watched
(the clamped sessions), so the shared sessions cannot pull a person's parameters
towards a kind of viewing; the M-step afterwards lets the shared sessions inform the
persons' hours and tastes without re-deciding who they belong to. Measured on the
TUNING worlds (docs/clustering.md, "Placing shared-device sessions").

Pure; scikit-learn's LogisticRegression (lbfgs), a few milliseconds per household.
"""

from __future__ import annotations

import warnings

import numpy as np

from services.clustering.domain.persons import person_features

# Inverse L2 strength of the logistic regression on standardised who-features. TUNING
# worlds (2 worlds x 8 households of each tuning family; the 28 households with a
# personal-device group and >= 2 persons; session accuracy, one M-step from the
# classifier's probabilities): EM only 0.729; C 0.01: 0.756; 0.03: 0.758; 0.1: 0.756.
PLACEMENT_C = 0.03


def discriminative_responsibilities(X: np.ndarray, known: np.ndarray, assigned: np.ndarray, k: int,
                                    c: float = PLACEMENT_C) -> np.ndarray | None:
    """(N, k) responsibilities: one-hot on sessions whose person is ``known`` (>= 0,
    the personal-device groups), the classifier's probabilities elsewhere; None when
    there are not two persons to tell apart in the training sessions.

    ``X`` (N, FEATURE_DIM) session features; ``known`` (N,) person index or -1;
    ``assigned`` (N,) the mixture's current person per session, used as the training
    label of persons who own no known session (members without a personal device)."""
    X = np.asarray(X, dtype=np.float64)
    known = np.asarray(known, dtype=np.int64)
    assigned = np.asarray(assigned, dtype=np.int64)
    n = X.shape[0]
    if known.shape != (n,) or assigned.shape != (n,):
        raise ValueError(f"known and assigned must have shape ({n},), got {known.shape}, {assigned.shape}")
    if n == 0 or k < 2 or assigned.min(initial=0) < 0 or assigned.max(initial=0) >= k or known.max(initial=-1) >= k:
        return None
    labelled = known >= 0
    deviceless = ~np.isin(assigned, np.unique(known[labelled]))
    train = labelled | deviceless
    y = np.where(labelled, known, assigned)
    classes = np.unique(y[train])
    if classes.size < 2:
        return None
    Z = person_features(X)
    Z = (Z - Z.mean(axis=0)) / np.maximum(Z.std(axis=0), 1e-3)
    # Imported here, not at the top: scikit-learn is ~0.9 CPU-s of a clustering process's
    # start-up and only a fit places sessions (docs/benchmarks.md "## bench-assign", perf20).
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=300).fit(Z[train], y[train])
    R = np.zeros((n, k))
    R[:, clf.classes_] = clf.predict_proba(Z)
    R[labelled] = 0.0
    R[np.flatnonzero(labelled), known[labelled]] = 1.0
    return R
