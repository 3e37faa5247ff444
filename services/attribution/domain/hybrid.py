r"""Hybrid Markov/Shapley credit and persona priors for sparse person-level chains.

Hybrid
------
``H = alpha * M + (1 - alpha) * S`` per channel, where ``M`` is the exact Markov credit
and ``S`` the exact Shapley credit (both in conversions, both summing to the total
conversions of non-empty paths, so ``H`` does too). ``alpha = 1`` is pure Markov
(sequence-aware, removal effects), ``alpha = 0`` pure Shapley (order-free, fair split
of co-occurrence). Revenue is mixed the same way.

Persona priors
--------------
A single person has few journeys, so their own transition counts ``n_{st}`` give a
noisy chain: unseen transitions get probability 0 and a single null ending can erase
a channel. Persons of the same *persona* (e.g. "kids", "weekend binger", as the
clustering service labels them) behave alike, so their pooled chain ``p^0`` is a
prior for each member. With a Dirichlet prior of strength ``kappa`` (pseudo-counts per
row) on every row of the person's transition matrix,

.. math::  \Pr(t \mid s) \sim \mathrm{Dir}(\kappa\, p^0_{s\cdot}), \qquad
           \hat p_{st} = \frac{n_{st} + \kappa\, p^0_{st}}{n_s + \kappa}

is the posterior mean (``n_s = \sum_t n_{st}``). A row the person never visited is
the prior row; a row the prior lacks is the person's own estimate. ``kappa -> 0``
gives the person's raw chain, ``kappa -> inf`` the persona chain. The smoothed chain
is then solved exactly like any other (:func:`~markov.solve_removal_effects`) and its
credit is scaled to the person's own conversions.

The measured effect (bench/attribution.py, ``persona_prior`` block; docs/attribution.md)
is the attribution error against each person's *true* chain with and without the
prior on subsampled journeys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.markov import (
    MarkovChain,
    MarkovConventions,
    MarkovResult,
    build_chain,
    result_from_effects,
    solve_removal_effects,
)
from services.attribution.domain.paths import Paths, concat_paths
from services.common.lazy_import import lazy_module

# scipy.sparse is imported at its first use: the service starts without it (services/common/lazy_import.py)
sp = lazy_module("scipy.sparse")


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not np.isfinite(a) or not 0.0 <= a <= 1.0:
        raise AttributionInputError("alpha", f"must be in [0, 1], got {alpha!r}")
    return a


def check_strength(strength: float) -> float:
    """Persona prior strength kappa (pseudo-journeys per row): finite and >= 0."""
    try:
        k = float(strength)
    except (TypeError, ValueError):
        raise AttributionInputError("prior_strength", f"must be a number, got {strength!r}") from None
    if not np.isfinite(k) or k < 0:
        raise AttributionInputError("prior_strength", f"must be finite and >= 0, got {strength!r}")
    return k


def hybrid_credit(markov: np.ndarray, shapley: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * markov + (1 - alpha) * shapley`` (arrays over the same channels)."""
    a = check_alpha(alpha)
    m = np.asarray(markov, dtype=np.float64)
    s = np.asarray(shapley, dtype=np.float64)
    if m.shape != s.shape:
        raise AttributionInputError("shapley", f"shape {s.shape} differs from markov {m.shape}")
    return a * m + (1.0 - a) * s


@dataclass(frozen=True, eq=False)
class SmoothedChain:
    """A chain on the union state space of a person and their persona prior."""

    probabilities: sp.csr_matrix
    membership: sp.csr_matrix
    mean_value: np.ndarray
    state_keys: np.ndarray


def _reindex(chain: MarkovChain, keys: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts and conversion values of ``chain`` moved onto the state set ``keys``."""
    n = keys.size
    old = chain.n_states
    pos = np.searchsorted(keys, chain.state_keys)
    # Old index -> new index for states, start, conversion and null.
    rows_map = np.concatenate((pos, [n]))
    cols_map = np.concatenate((pos, [n, n + 1, n + 2]))
    coo = chain.counts.tocoo()
    counts = sp.csr_matrix(
        (coo.data, (rows_map[coo.row], cols_map[coo.col])), shape=(n + 1, n + 3)
    )
    value = np.zeros(n + 1)
    value[rows_map[: old + 1]] = chain.conversion_value
    return counts, value


def smooth_chain(person: MarkovChain, prior: MarkovChain, strength: float) -> SmoothedChain:
    """Posterior-mean chain ``(n_st + kappa p0_st) / (n_s + kappa)`` (see module doc)."""
    kappa = float(strength)
    if not np.isfinite(kappa) or kappa < 0:
        raise AttributionInputError("strength", f"must be finite and >= 0, got {strength!r}")
    if person.order != prior.order:
        raise AttributionInputError("prior", "must have the same order as the person chain")
    if person.channel_names != prior.channel_names:
        raise AttributionInputError("prior", "must use the same channel vocabulary (align Paths first)")
    keys = np.union1d(person.state_keys, prior.state_keys)
    n_counts, n_value = _reindex(person, keys)
    p_counts, p_value = _reindex(prior, keys)
    n_row = np.asarray(n_counts.sum(axis=1)).ravel()
    p_row = np.asarray(p_counts.sum(axis=1)).ravel()
    prior_prob = sp.diags(np.divide(1.0, p_row, out=np.zeros_like(p_row), where=p_row > 0)) @ p_counts
    # A row absent from the prior keeps the person's own estimate (kappa acts as 0).
    k_row = np.where(p_row > 0, kappa, 0.0)
    denom = n_row + k_row
    inv = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > 0)
    probabilities = sp.csr_matrix(sp.diags(inv) @ (n_counts + sp.diags(k_row) @ prior_prob))
    # Value per conversion: the person's own mean where they converted, else the prior's.
    n_conv = n_counts[:, keys.size + 1].toarray().ravel()
    p_conv = p_counts[:, keys.size + 1].toarray().ravel()
    own = np.divide(n_value, n_conv, out=np.zeros_like(n_value), where=n_conv > 0)
    pooled = np.divide(p_value, p_conv, out=np.zeros_like(p_value), where=p_conv > 0)
    mean_value = np.where(n_conv > 0, own, pooled)
    template = MarkovChain(
        order=person.order,
        channel_names=person.channel_names,
        state_keys=keys,
        counts=sp.csr_matrix((keys.size + 1, keys.size + 3)),
        conversion_value=np.zeros(keys.size + 1),
        total_conversions=0.0,
        total_value=0.0,
        max_states_per_path=0,
        n_paths=0,
    )
    return SmoothedChain(probabilities, template.membership(), mean_value, keys)


def _align(a: Paths, b: Paths) -> tuple[Paths, Paths]:
    names = list(a.channel_names) + [n for n in b.channel_names if n not in set(a.channel_names)]
    return a.with_channel_names(names), b.with_channel_names(names)


def smoothed_markov_attribution(
    person_paths: Paths,
    persona_paths: Paths,
    strength: float,
    conventions: MarkovConventions | None = None,
) -> MarkovResult:
    """Markov credit of one person's journeys smoothed towards their persona's chain.

    ``persona_paths`` are the pooled journeys of the persona (other members, or all
    members: including the person only adds their counts to the prior). Credits are
    scaled to the person's own conversions and value.
    """
    conventions = conventions or MarkovConventions()
    if conventions.horizon is not None:
        raise AttributionInputError("horizon", "persona smoothing supports horizon=None only")
    person_paths, persona_paths = _align(person_paths, persona_paths)
    person = build_chain(person_paths, conventions)
    prior = build_chain(persona_paths, conventions)
    smoothed = smooth_chain(person, prior, strength)
    n_ch = len(person.channel_names)
    if smoothed.state_keys.size == 0:
        zeros = np.zeros(n_ch)
        return MarkovResult(
            person.channel_names, zeros, zeros.copy(), zeros.copy(), zeros.copy(), 0.0,
            person.total_conversions, person.total_value, 0, "none", conventions,
        )
    effects = solve_removal_effects(
        smoothed.probabilities, smoothed.membership, smoothed.mean_value, solver=conventions.solver
    )
    return result_from_effects(
        effects, person.channel_names, person.total_conversions, person.total_value,
        int(smoothed.state_keys.size), conventions,
    )


def pooled_paths(groups: list[Paths]) -> Paths:
    """Concatenate the journeys of a persona's members into one prior data set."""
    if not groups:
        raise AttributionInputError("groups", "need at least one member's paths")
    return concat_paths(groups)
