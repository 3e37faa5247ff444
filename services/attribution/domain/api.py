"""The one entry point the attribution servicer and the CLI call.

    report = attribute(paths, method="markov", order=2)
    report.to_dict()["channels"][0]   # {"channel", "share", "conversions", "revenue"}

Every method credits the conversions (and value) of the non-empty paths; conversions
of empty paths are reported as ``unattributed_conversions``. ``baselines`` always holds
every heuristic beside the chosen method (they cost one pass each; time decay only
when touch ages are known). Options (all keyword): ``order="auto"`` (cross-validated
choice, ``order_selection.py``), ``bootstrap=BootstrapSpec(replicates, seed, level)``
(intervals for the method and every baseline, ``bootstrap.py``), ``sequences`` (exact
sequence removal effects, ``sequences.py``), ``prior_paths`` + ``prior_strength``
(persona Dirichlet prior on the Markov part, ``hybrid.py``), ``heuristic_params``
(half-life, position weights) and ``touch_ages`` (days before each journey's end).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from services.attribution.domain.bootstrap import BootstrapSpec, Intervals, bootstrap_intervals
from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.heuristics import (
    HEURISTICS, HeuristicParams, check_touch_ages, credited_values, heuristic_attribution)
from services.attribution.domain.hybrid import check_alpha, check_strength, hybrid_credit, smoothed_markov_attribution
from services.attribution.domain.markov import MarkovConventions, markov_attribution
from services.attribution.domain.order_selection import DEFAULT_FOLDS, choose_order
from services.attribution.domain.paths import Paths
from services.attribution.domain.sequences import parse_sequences, sequence_removal_effects
from services.attribution.domain.shapley import shapley_attribution

METHODS = ("markov", "shapley", "hybrid", *HEURISTICS)


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
    intervals: dict[str, Intervals] = field(default_factory=dict)
    """Bootstrap intervals keyed by method (the chosen one and every baseline)."""

    def rows(self) -> list[dict[str, Any]]:
        """One dict per channel, sorted by conversions credited (largest first).

        With intervals: ``conversions_lower``/``_upper``/``_se``, ``revenue_lower``/
        ``_upper``, ``share_lower``/``_upper`` of the method, and
        ``<baseline>_conversions_lower``/``_upper`` beside each baseline column.
        """
        order = np.argsort(-self.conversions, kind="stable")
        own = self.intervals.get(self.method)
        rows = []
        for i in order:
            row: dict[str, Any] = {
                "channel": self.channel_names[i],
                "share": float(self.shares[i]),
                "conversions": float(self.conversions[i]),
                "revenue": float(self.revenue[i]),
            }
            if own is not None:
                row.update(_interval_fields(own, i))
            for name, b in self.baselines.items():
                row[f"{name}_conversions"] = float(b["conversions"][i])
                iv = self.intervals.get(name)
                if iv is not None:
                    row[f"{name}_conversions_lower"] = float(iv.conversions_lower[i])
                    row[f"{name}_conversions_upper"] = float(iv.conversions_upper[i])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (plain floats and lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, (np.floating, np.integer)):
                return v.item()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        def baseline(name: str, b: dict[str, np.ndarray]) -> dict[str, Any]:
            out = {
                "conversions": dict(zip(self.channel_names, plain(b["conversions"]))),
                "revenue": dict(zip(self.channel_names, plain(b["revenue"]))),
            }
            iv = self.intervals.get(name)
            if iv is not None:
                out["intervals"] = {n: _interval_fields(iv, i) for i, n in enumerate(self.channel_names)}
            return out

        own = self.intervals.get(self.method)
        return {
            "method": self.method,
            "total_conversions": self.total_conversions,
            "total_value": self.total_value,
            "unattributed_conversions": self.unattributed_conversions,
            "unattributed_value": self.unattributed_value,
            "channels": [
                {k: v for k, v in row.items() if not k.startswith(tuple(f"{b}_" for b in self.baselines))}
                for row in self.rows()
            ],
            "baselines": {name: baseline(name, b) for name, b in self.baselines.items()},
            "bootstrap": (
                {"replicates": own.replicates, "seed": own.seed, "level": own.level,
                 "interval": "percentile", "unit": "journey (Poisson weights)"}
                if own is not None else None
            ),
            "details": plain(self.details),
        }


def _interval_fields(iv: Intervals, i: int) -> dict[str, float]:
    return {
        "conversions_lower": float(iv.conversions_lower[i]),
        "conversions_upper": float(iv.conversions_upper[i]),
        "conversions_se": float(iv.conversions_se[i]),
        "revenue_lower": float(iv.revenue_lower[i]),
        "revenue_upper": float(iv.revenue_upper[i]),
        "share_lower": float(iv.share_lower[i]),
        "share_upper": float(iv.share_upper[i]),
    }


def _shares(conversions: np.ndarray) -> np.ndarray:
    total = conversions.sum()
    return conversions / total if total > 0 else np.zeros_like(conversions)


def _conventions(conventions: MarkovConventions | dict[str, Any] | None) -> MarkovConventions:
    if conventions is None:
        return MarkovConventions()
    if isinstance(conventions, MarkovConventions):
        return conventions
    if isinstance(conventions, dict):
        unknown = set(conventions) - set(MarkovConventions.__dataclass_fields__)
        if unknown:
            raise AttributionInputError("conventions", f"unknown fields {sorted(unknown)}")
        return MarkovConventions(**conventions)
    raise AttributionInputError("conventions", "must be MarkovConventions, a dict or None")


def _union_vocabulary(paths: Paths, prior: Paths) -> tuple[Paths, Paths]:
    names = list(paths.channel_names) + [n for n in prior.channel_names if n not in set(paths.channel_names)]
    return paths.with_channel_names(names), prior.with_channel_names(names)


def attribute(
    paths: Paths,
    method: str = "markov",
    order: int | str | None = None,
    alpha: float = 0.5,
    conventions: MarkovConventions | dict[str, Any] | None = None,
    *,
    baselines: bool = True,
    touch_ages: np.ndarray | None = None,
    heuristic_params: HeuristicParams | None = None,
    bootstrap: BootstrapSpec | None = None,
    sequences: list[str] | list[list[str]] | None = None,
    prior_paths: Paths | None = None,
    prior_strength: float = 0.0,
    order_folds: int = DEFAULT_FOLDS,
    order_seed: int = 0,
) -> AttributionReport:
    """Attribute ``paths`` with ``method`` in :data:`METHODS`.

    ``order`` (1..4 or ``"auto"``) overrides ``conventions.order``; ``alpha`` weighs
    Markov in the hybrid (``alpha * markov + (1 - alpha) * shapley``); ``conventions``
    is a :class:`MarkovConventions` or a dict of its fields (``repeats``,
    ``include_nulls``, ``warmup_states``, ``horizon``, ``revenue``, ``solver``).
    See the module doc for the keyword options.
    """
    if not isinstance(paths, Paths):
        raise AttributionInputError("paths", "must be a Paths instance")
    if method not in METHODS:
        raise AttributionInputError("method", f"must be one of {METHODS}, got {method!r}")
    conv = _conventions(conventions)
    params = heuristic_params or HeuristicParams()
    ages = check_touch_ages(paths, touch_ages)
    if method == "time_decay" and ages is None:
        raise AttributionInputError("method", "time_decay needs touch times (journeys from touchpoints); "
                                    "path files carry none")
    a = check_alpha(alpha)
    kappa = check_strength(prior_strength)
    if prior_paths is not None and not isinstance(prior_paths, Paths):
        raise AttributionInputError("prior_paths", "must be a Paths instance or None")
    use_prior = prior_paths is not None and kappa > 0 and method in ("markov", "hybrid")
    if use_prior:
        paths, prior_paths = _union_vocabulary(paths, prior_paths)
    seqs = parse_sequences(sequences) if sequences else []
    details: dict[str, Any] = {}
    uses_chain = method in ("markov", "hybrid") or bool(seqs)
    if isinstance(order, str):
        if order != "auto":
            raise AttributionInputError("order", f"must be an integer in 1..4 or 'auto', got {order!r}")
        if uses_chain:
            data = paths.without_empty()
            if conv.include_nulls and data.nulls.sum() > 0 and data.conversions.sum() > 0:
                selection = choose_order(paths, conv, folds=order_folds, seed=order_seed)
                conv = replace(conv, order=selection.chosen)
                details["order_selection"] = selection.to_dict()
            else:
                # Nothing to predict (one outcome only, e.g. one person's few journeys):
                # order 1, and say so rather than fail the whole request.
                conv = replace(conv, order=1)
                details["order_selection"] = {
                    "chosen": 1, "fallback": "needs converting and non-converting journeys; used order 1"}
    elif order is not None:
        conv = replace(conv, order=order)

    nonempty = paths.lengths > 0
    total_conv = float(paths.conversions[nonempty].sum())
    total_value = float(credited_values(paths)[nonempty].sum())
    unattributed = float(paths.conversions[~nonempty].sum())
    unattributed_value = float(credited_values(paths)[~nonempty].sum())
    heur = heuristic_attribution(paths, params, ages) if (baselines or method in HEURISTICS) else {}
    details["heuristics"] = {"half_life_days": params.half_life_days,
                             "position_weights": list(params.position_weights)}

    if method in HEURISTICS:
        res = heur[method]
        conversions, revenue = res.conversions, res.revenue
    elif method == "shapley":
        sh = shapley_attribution(paths)
        conversions, revenue = sh.conversions, sh.revenue
    else:
        if use_prior:
            mk = smoothed_markov_attribution(paths, prior_paths, kappa, conv)
            details["persona_prior"] = {"strength": kappa,
                                        "prior_journeys": float(prior_paths.conversions.sum() + prior_paths.nulls.sum())}
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
    if seqs:
        if "order" not in details:
            details["order"] = conv.order
        details["sequences"] = [e.to_dict() for e in sequence_removal_effects(paths, seqs, conv)]
    base = {
        name: {"conversions": r.conversions, "revenue": r.revenue, "shares": r.shares}
        for name, r in heur.items()
    } if baselines else {}
    intervals: dict[str, Intervals] = {}
    if bootstrap is not None and bootstrap.replicates > 0:
        intervals = bootstrap_intervals(
            paths, [method, *base], bootstrap, conventions=conv, alpha=a, heuristic_params=params,
            touch_ages=ages, prior_paths=prior_paths if use_prior else None, prior_strength=kappa,
        )
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
        intervals=intervals,
    )
