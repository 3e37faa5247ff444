r"""Removal effects of channel *sequences* (e.g. ``display > search``), exact.

The single-channel removal effect asks how many conversions are lost if every walk
that touches channel ``c`` ended without converting. For a sequence
``q = (q_1, ..., q_m)`` of channels the question is the same for walks whose channel
sequence *contains q consecutively*: ``RE_q = P(convert) - P(convert and q never
occurs)`` under the fitted chain, relative to ``P(convert)``.

Exact for any order, no simulation: the chain is multiplied with the KMP automaton
of ``q`` (automaton state ``j`` = length of the longest prefix of ``q`` that the walk's
recent channels match). A chain transition ``s -> t`` feeds the channels it adds to
the walk -- the newest channel of ``t``, or all of ``t``'s channels when leaving
``(start)`` -- through the automaton; reaching ``j = m`` sends the walk to
``(null)``. The product chain ``(s, j)`` has ``(S + 1) m`` transient states and is
solved with a sparse LU. The channel sequence is the one the chain sees: under the
default ``repeats="collapse_states"`` a run ``a > a`` is one ``a`` (so ``a > a`` never
occurs), with ``repeats="keep"`` it occurs.

``(c,)`` reproduces the single-channel removal effect of ``c`` (tested). Effects of
different sequences overlap, so they are not normalised into a credit; each one is
also given as conversions (and value) lost: ``RE_q * total``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.markov import MarkovChain, MarkovConventions, build_chain
from services.attribution.domain.paths import Paths
from services.common.lazy_import import lazy_module

# scipy.sparse is imported at its first use: the service starts without it (services/common/lazy_import.py)
sp = lazy_module("scipy.sparse")
spla = lazy_module("scipy.sparse.linalg")

MAX_SEQUENCES = 50
MAX_SEQUENCE_LENGTH = 10


@dataclass(frozen=True)
class SequenceEffect:
    sequence: tuple[str, ...]
    removal_effect: float        # relative: RE_q / P(conv)
    removal_effect_value: float  # relative, on the value chain
    conversions_lost: float
    value_lost: float

    def to_dict(self) -> dict[str, Any]:
        return {"sequence": " > ".join(self.sequence), "removal_effect": self.removal_effect,
                "removal_effect_value": self.removal_effect_value,
                "conversions_lost": self.conversions_lost, "value_lost": self.value_lost}


def parse_sequences(items: Sequence[str | Sequence[str]], sep: str = ">") -> list[tuple[str, ...]]:
    """``"a > b"`` or ``["a", "b"]`` -> ``("a", "b")`` (validated: 1..10 channels, at most 50)."""
    if len(items) > MAX_SEQUENCES:
        raise AttributionInputError("sequences", f"at most {MAX_SEQUENCES} sequences")
    out = []
    for i, item in enumerate(items):
        parts = [p.strip() for p in item.split(sep)] if isinstance(item, str) else [str(p).strip() for p in item]
        if not parts or any(not p for p in parts) or len(parts) > MAX_SEQUENCE_LENGTH:
            raise AttributionInputError(
                f"sequences[{i}]", f"must be 1..{MAX_SEQUENCE_LENGTH} non-empty channels joined by '{sep}'")
        out.append(tuple(parts))
    return out


def _kmp_table(pattern: list[int], n_symbols: int) -> np.ndarray:
    """delta[j, c] = matched prefix length after reading c in state j (j < m)."""
    m = len(pattern)
    delta = np.zeros((m + 1, n_symbols), dtype=np.int64)
    fail = 0
    for j in range(m + 1):
        for c in range(n_symbols):
            if j < m and pattern[j] == c:
                delta[j, c] = j + 1
            elif j == 0:
                delta[j, c] = 0
            else:
                delta[j, c] = delta[fail, c]
        if 0 < j < m:
            fail = delta[fail, pattern[j]]
    return delta


def _state_channels(chain: MarkovChain) -> np.ndarray:
    """(S, order) channel codes of every state, oldest first, -1 for none."""
    base = len(chain.channel_names) + 1
    digits = np.stack([(chain.state_keys // base**j) % base for j in range(chain.order)], axis=1) - 1
    return digits[:, ::-1]


def sequence_removal_effects(
    paths: Paths | MarkovChain, sequences: Sequence[Sequence[str]], conventions: MarkovConventions | None = None
) -> list[SequenceEffect]:
    """Exact removal effect of each channel sequence (see module doc)."""
    conventions = conventions or MarkovConventions()
    if conventions.horizon is not None:
        raise AttributionInputError("sequences", "sequence removal effects use the infinite horizon (horizon=None)")
    chain = paths if isinstance(paths, MarkovChain) else build_chain(paths, conventions)
    names = chain.channel_names
    index = {n: i for i, n in enumerate(names)}
    s = chain.n_states
    p = chain.transition_probabilities()
    coo = sp.csr_matrix(p[:, :s]).tocoo()  # transitions into channel states
    conv = p[:, s + 1].toarray().ravel()
    value = conv * chain.mean_conversion_value()
    digits = _state_channels(chain) if s else np.zeros((0, chain.order), np.int64)
    newest = digits[:, -1] if s else np.zeros(0, np.int64)
    out = []
    for q in sequences:
        q = tuple(q)
        if any(c not in index for c in q):
            # A channel never seen cannot occur in a walk: nothing is lost.
            out.append(SequenceEffect(q, 0.0, 0.0, 0.0, 0.0))
            continue
        if s == 0:
            out.append(SequenceEffect(q, 0.0, 0.0, 0.0, 0.0))
            continue
        m = len(q)
        delta = _kmp_table([index[c] for c in q], len(names))
        rows, cols, data = [], [], []
        from_start = coo.row == s
        for j in range(m):
            # Ordinary moves feed the newest channel of the destination.
            jn = delta[j, newest[coo.col]]
            # Moves out of (start) feed every channel of the destination, oldest first.
            js = np.full(coo.col.size, j)
            for d in range(chain.order):
                ch = digits[coo.col, d]
                fed = delta[np.minimum(js, m), np.maximum(ch, 0)]
                js = np.where(js >= m, m, np.where(ch >= 0, fed, js))
            j_next = np.where(from_start, js, jn)
            keep = j_next < m
            rows.append(coo.row[keep] * m + j)
            cols.append(coo.col[keep] * m + j_next[keep])
            data.append(coo.data[keep])
        n = (s + 1) * m
        q_mat = sp.csr_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        rhs = np.column_stack((np.repeat(conv, m), np.repeat(value, m)))
        x = spla.splu((sp.identity(n, format="csc") - q_mat).tocsc()).solve(rhs)
        base_x = spla.splu((sp.identity(s + 1, format="csc") - sp.csr_matrix(p[:, : s + 1])).tocsc()).solve(
            np.column_stack((conv, value)))
        start = s * m
        p0, v0 = base_x[s]
        re = (p0 - x[start, 0]) / p0 if p0 > 0 else 0.0
        rv = (v0 - x[start, 1]) / v0 if v0 > 0 else 0.0
        out.append(SequenceEffect(q, float(re), float(rv), float(re * chain.total_conversions),
                                  float(rv * chain.total_value)))
    return out
