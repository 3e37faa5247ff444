"""Pictures of an attribution report (``hearth attribute ... --plot out.png``).

Two panels, plain matplotlib (no graph library):

* **Credit per channel and method**, side by side: the chosen method and every
  heuristic baseline as grouped bars of conversions credited, with the bootstrap
  interval as an error bar when the report has intervals.
* **Transition graph** of the fitted chain at the report's order when it is 1 or 2
  (order 1 otherwise, or when order 2 has more than ``MAX_GRAPH_STATES`` states):
  channel states on a circle, ``(start)`` left, ``(conversion)`` and ``(null)``
  right; an arrow per transition with probability >= ``MIN_EDGE_PROBABILITY``, its
  width proportional to the probability, labelled when >= 0.2.
"""

from __future__ import annotations

import numpy as np

from services.attribution.domain.api import AttributionReport
from services.attribution.domain.markov import MarkovConventions, build_chain
from services.attribution.domain.paths import Paths

MAX_GRAPH_STATES = 30
MIN_EDGE_PROBABILITY = 0.05


def _credit_panel(ax, report: AttributionReport) -> None:  # type: ignore[no-untyped-def]
    names = list(report.channel_names)
    order = np.argsort(-report.conversions, kind="stable")
    methods = [(report.method, report.conversions)] + [(m, b["conversions"]) for m, b in report.baselines.items()]
    width = 0.8 / len(methods)
    x = np.arange(len(names))
    for k, (method, conv) in enumerate(methods):
        values = np.asarray(conv)[order]
        iv = report.intervals.get(method)
        yerr = None
        if iv is not None:
            lo, hi = iv.conversions_lower[order], iv.conversions_upper[order]
            yerr = np.vstack((np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)))
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, values, width, label=method, yerr=yerr,
               capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels([names[i] for i in order], rotation=45, ha="right")
    ax.set_ylabel("conversions credited")
    title = "credit per channel and method"
    own = report.intervals.get(report.method)
    if own is not None:
        title += f" ({own.level:.0%} bootstrap intervals, {own.replicates} replicates)"
    ax.set_title(title)
    ax.legend(fontsize=8)


def _graph_panel(ax, paths: Paths, order: int) -> None:  # type: ignore[no-untyped-def]
    chain = build_chain(paths, MarkovConventions(order=order))
    if order == 2 and chain.n_states > MAX_GRAPH_STATES:
        order = 1
        chain = build_chain(paths, MarkovConventions(order=1))
    s = chain.n_states
    probs = chain.transition_probabilities().tocoo()
    labels = [" > ".join(t) for t in chain.state_tuples()]
    angle = np.linspace(0, 2 * np.pi, s, endpoint=False) + np.pi / 2
    pos = {i: (np.cos(a), np.sin(a)) for i, a in enumerate(angle)}
    pos[s] = (-2.0, 0.0)          # start
    pos[s + 1] = (2.0, 0.6)       # conversion
    pos[s + 2] = (2.0, -0.6)      # null
    names = {**dict(enumerate(labels)), s: "(start)", s + 1: "(conversion)", s + 2: "(null)"}
    for i, j, p in zip(probs.row, probs.col, probs.data):
        if p < MIN_EDGE_PROBABILITY or i == j:
            continue
        (x0, y0), (x1, y1) = pos[int(i)], pos[int(j)]
        color = "tab:green" if j == s + 1 else ("tab:gray" if j == s + 2 else "tab:blue")
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "lw": 0.5 + 4 * p, "color": color, "alpha": 0.6,
                                "shrinkA": 10, "shrinkB": 10, "connectionstyle": "arc3,rad=0.12"})
        if p >= 0.2:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{p:.2f}", fontsize=6, ha="center")
    for i, (x, y) in pos.items():
        ax.text(x, y, names[i], ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"})
    ax.set_xlim(-2.6, 2.8)
    ax.set_ylim(-1.4, 1.4)
    ax.set_axis_off()
    ax.set_title(f"transition graph, order {order} (edges with p >= {MIN_EDGE_PROBABILITY})")


def plot_report(report: AttributionReport, paths: Paths, out: str) -> None:
    """Write the two-panel figure of ``report`` (computed on ``paths``) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = int(report.details.get("order", 1))
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.5))
    try:
        _credit_panel(axes[0], report)
        _graph_panel(axes[1], paths.with_channel_names(report.channel_names), order if order <= 2 else 1)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
