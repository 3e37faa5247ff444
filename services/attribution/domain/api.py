"""The one entry point the attribution servicer and the CLI call.

    report = attribute(paths, method="markov", order=2)
    report.to_dict()["channels"][0]   # {"channel", "share", "conversions", "revenue"}

Every method credits the conversions (and value) of the non-empty paths; conversions
of empty paths are reported as ``unattributed_conversions``. ``baselines`` always holds
first-touch, last-touch and linear beside the chosen method (they cost one pass each).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.heuristics import HEURISTICS, heuristic_attribution
from services.attribution.domain.hybrid import check_alpha, hybrid_credit
from services.attribution.domain.markov import MarkovConventions, markov_attribution
from services.attribution.domain.paths import Paths
from services.attribution.domain.shapley import shapley_attribution

METHODS = ("markov", "shapley", "hybrid", "first_touch", "last_touch", "linear")


@dataclass(frozen=True, eq=False)
class AttributionReport:
    """Per-channel credit of one method, with heuristic baselines beside it.

    Arrays are indexed like ``channel_names``. ``shares`` sum to 1 when anything was
    credited; ``conversions`` sum to ``total_conversions``; ``revenue`` to
    ``total_value`` (see the method's module for revenue conventions).
    """

    method: str
    channel_names: tuple[str, ...]
    shares: np.ndarray
    conversions: np.ndarray
    revenue: np.ndarray
    total_conversions: float
    total_value: float
    unattributed_conversions: float
    unattributed_value: float
    baselines: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per channel, sorted by conversions credited (largest first)."""
        order = np.argsort(-self.conversions, kind="stable")
        return [
            {
                "channel": self.channel_names[i],
                "share": float(self.shares[i]),
                "conversions": float(self.conversions[i]),
                "revenue": float(self.revenue[i]),
                **{
                    f"{name}_conversions": float(b["conversions"][i])
                    for name, b in self.baselines.items()
                },
            }
            for i in order
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (plain floats and lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, (np.floating, np.integer)):
                return v.item()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {
            "method": self.method,
            "total_conversions": self.total_conversions,
            "total_value": self.total_value,
            "unattributed_conversions": self.unattributed_conversions,
            "unattributed_value": self.unattributed_value,
            "channels": [
                {k: v for k, v in row.items() if not k.endswith("_conversions") or k == "conversions"}
                for row in self.rows()
            ],
            "baselines": {
                name: {
                    "conversions": dict(zip(self.channel_names, plain(b["conversions"]))),
                    "revenue": dict(zip(self.channel_names, plain(b["revenue"]))),
                }
                for name, b in self.baselines.items()
            },
            "details": plain(self.details),
        }


def _shares(conversions: np.ndarray) -> np.ndarray:
    total = conversions.sum()
    return conversions / total if total > 0 else np.zeros_like(conversions)


def attribute(
    paths: Paths,
    method: str = "markov",
    order: int | None = None,
    alpha: float = 0.5,
    conventions: MarkovConventions | dict[str, Any] | None = None,
    *,
    baselines: bool = True,
) -> AttributionReport:
    """Attribute ``paths`` with ``method`` in :data:`METHODS`.

    ``order`` (1..4) overrides ``conventions.order``; ``alpha`` weighs Markov in the
    hybrid (``alpha * markov + (1 - alpha) * shapley``); ``conventions`` is a
    :class:`MarkovConventions` or a dict of its fields (``repeats``,
    ``include_nulls``, ``warmup_states``, ``horizon``, ``revenue``, ``solver``).
    """
    if not isinstance(paths, Paths):
        raise AttributionInputError("paths", "must be a Paths instance")
    if method not in METHODS:
        raise AttributionInputError("method", f"must be one of {METHODS}, got {method!r}")
    if conventions is None:
        conv = MarkovConventions()
    elif isinstance(conventions, MarkovConventions):
        conv = conventions
    elif isinstance(conventions, dict):
        unknown = set(conventions) - set(MarkovConventions.__dataclass_fields__)
        if unknown:
            raise AttributionInputError("conventions", f"unknown fields {sorted(unknown)}")
        conv = MarkovConventions(**conventions)
    else:
        raise AttributionInputError("conventions", "must be MarkovConventions, a dict or None")
    if order is not None:
        conv = replace(conv, order=order)
    a = check_alpha(alpha)

    nonempty = paths.lengths > 0
    total_conv = float(paths.conversions[nonempty].sum())
    total_value = float(paths.values[nonempty & (paths.conversions > 0)].sum()) if method in (
        "markov", "hybrid") else float(paths.values[nonempty].sum())
    unattributed = float(paths.conversions[~nonempty].sum())
    unattributed_value = float(paths.values[~nonempty].sum())
    details: dict[str, Any] = {}
    heur = heuristic_attribution(paths) if (baselines or method in HEURISTICS) else {}

    if method in HEURISTICS:
        res = heur[method]
        conversions, revenue = res.conversions, res.revenue
    elif method == "shapley":
        sh = shapley_attribution(paths)
        conversions, revenue = sh.conversions, sh.revenue
    else:
        mk = markov_attribution(paths, conv)
        details.update(
            order=conv.order,
            conventions={
                "repeats": conv.repeats, "include_nulls": conv.include_nulls,
                "warmup_states": conv.warmup_states, "horizon": conv.horizon,
                "revenue": conv.revenue, "solver": conv.solver,
            },
            removal_effects=dict(zip(paths.channel_names, mk.removal_effects.tolist())),
            removal_effects_value=dict(zip(paths.channel_names, mk.removal_effects_value.tolist())),
            conversion_probability=mk.conversion_probability,
            n_states=mk.n_states,
            solver=mk.solver,
        )
        if method == "markov":
            conversions, revenue = mk.conversions, mk.revenue
        else:
            sh = shapley_attribution(paths)
            conversions = hybrid_credit(mk.conversions, sh.conversions, a)
            revenue = hybrid_credit(mk.revenue, sh.revenue, a)
            details["alpha"] = a
            details["markov_conversions"] = dict(zip(paths.channel_names, mk.conversions.tolist()))
            details["shapley_conversions"] = dict(zip(paths.channel_names, sh.conversions.tolist()))
    base = {
        name: {"conversions": r.conversions, "revenue": r.revenue, "shares": r.shares}
        for name, r in heur.items()
    } if baselines else {}
    return AttributionReport(
        method=method,
        channel_names=paths.channel_names,
        shares=_shares(conversions),
        conversions=conversions,
        revenue=revenue,
        total_conversions=total_conv,
        total_value=total_value,
        unattributed_conversions=unattributed,
        unattributed_value=unattributed_value,
        baselines=base,
        details=details,
    )
