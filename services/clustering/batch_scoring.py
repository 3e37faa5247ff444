"""Scoring bare feature vectors of many households in one vectorised pass.

The service's batch path (``AssignSessions``) receives vectors of many households in
one message. Household models that a mixture answers are stacked into one
``ScoringTable`` and scored together by the domain's ``assign_many`` — the same
scorer `make bench-assign` measures in process — instead of one ``assign_batch``
call per household. Models that cannot be stacked (cold start, the k-means variant or
fallback, a mixture family or temperature other than the group's) answer through
their own ``assign_batch``; the answers are the same numbers either way (float32
arithmetic, tests/integration/test_clustering_grpc.py checks it).

This module only adapts; the model and the scorer live in domain/model.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from services.clustering.domain.model import MIN_SESSIONS, BatchAssignment, HouseholdModel, ScoringTable, assign_many


def _stack_key(model: HouseholdModel):
    """Models whose answers one table can give: a mixture, the same family (layout of
    phi), temperature and confidence map switch. None = answers alone. The family by its
    equality (``ScoringTable.from_models`` stacks only equal ones), a hashable family
    itself (a frozen dataclass: its fields' hash, ~1 µs; its repr was ~5 µs a household a
    message), another by its repr."""
    if model.active_variant != "gmm" or model.mixture is None:
        return None
    family = model.family
    try:
        hash(family)
    except TypeError:
        family = repr(family)
    return (family, float(model.temperature), bool(model.calibrated))


def score_households(models: Mapping[str, HouseholdModel], rows: Mapping[str, np.ndarray],
                     X: np.ndarray) -> dict[str, BatchAssignment]:
    """``rows[account]``: indices into ``X`` (N, FEATURE_DIM) of that household's
    vectors (no device ids: bare vectors). Returns each household's BatchAssignment
    over its rows, in the order of ``rows[account]``."""
    out: dict[str, BatchAssignment] = {}
    groups: dict[object, list[str]] = defaultdict(list)
    for account, model in models.items():
        key = _stack_key(model)
        if key is None:
            out[account] = model.assign_batch(X[rows[account]])
        else:
            groups[key].append(account)
    for accounts in groups.values():
        try:
            table = ScoringTable.from_models([models[a] for a in accounts])
            table.split()
        except ValueError:   # a family the fast path does not cover: answer one by one
            for a in accounts:
                out[a] = models[a].assign_batch(X[rows[a]])
            continue
        index = np.concatenate([rows[a] for a in accounts])
        household = np.repeat(np.arange(len(accounts)), [rows[a].size for a in accounts])
        _, _, P = assign_many(table, household, X[index])
        start = 0
        for h, a in enumerate(accounts):
            n, model = rows[a].size, models[a]
            k = len(model.person_ids)
            probs = P[start:start + n, :k].astype(np.float64)
            start += n
            idx = probs.argmax(axis=1)
            out[a] = BatchAssignment(tuple(model.person_ids), idx, probs[np.arange(n), idx], probs,
                                     model.active_variant, max(0, MIN_SESSIONS - model.n_sessions))
    return out

