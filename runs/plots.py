"""
The pictures the commands draw (matplotlib, headless): the latency predictor's scatter (latency.py fit) and the
search's candidates with their Pareto front and its convergence (search.py).
"""

import numpy as np


def pyplot():
    """matplotlib's pyplot without a display, imported only when a picture is drawn."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    return plt


def plot_predictor(y, p, test, title, path):
    """Predicted vs measured latency, held-out subnets highlighted, with the y = x line."""
    plt = pyplot()
    train = np.setdiff1d(np.arange(len(y)), test)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y[train], p[train], s=8, c="lightgrey", label="train + valid")
    ax.scatter(y[test], p[test], s=12, c="tab:blue", label="test (held out)")
    lo, hi = min(y.min(), p.min()), max(y.max(), p.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xlabel="measured latency, ms", ylabel="predicted latency, ms", title=title)
    ax.legend()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def pareto(points):
    """The (latency, loss) points no other point beats on both, by latency."""
    front, best = [], float("inf")
    for lat, loss in sorted(points):
        if loss < best:
            front.append((lat, loss))
            best = loss
    return front


def plot_search(results, candidates, latency: str, protocol: str, out_dir):
    """candidates.png: every scored subnet, the Pareto front, the budgets and the chosen subnets (a winner whose
    re-measured latency is over its budget marked so; winners that coincide drawn smaller, one inside the other).
    convergence.png: the best validation loss per iteration, per budget."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(*zip(*candidates), s=6, c="lightgrey", label="scored subnets")
    ax.plot(*zip(*pareto(candidates)), drawstyle="steps-post", c="k", lw=1, label="Pareto front")
    lats = [lat for lat, _ in candidates]
    span = (max(lats) - min(lats)) or max(lats) * 0.05
    for i, (r, color) in enumerate(zip(results, plt.cm.tab10.colors)):
        if r["budget_ms"] <= max(lats) + span:  # a budget far right of every subnet would squeeze them: not drawn
            ax.axvline(r["budget_ms"], ls="--", c=color, lw=1)
        same = sum(q["arch"] == r["arch"] for q in results[:i])  # winners already drawn at this point
        over = "" if r["within_budget"] else f", {r['over_budget_pct']:.1f}% OVER budget"
        ax.scatter(r["search_latency_ms"], r["valid_loss"], marker="*", s=150 / (1 + same), color=color, zorder=3 + i,
                   label=f"best for {r['budget_ms']:g} ms (re-measured {r['measured_ms']:.1f} ms{over})")
    ax.set(xlabel=f"{latency} latency, ms ({protocol})", ylabel="valid loss, nats/token (supernet subnet)")
    ax.legend(fontsize=8)
    fig.savefig(out_dir / "candidates.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(1, len(r["history"]) + 1), r["history"], marker="o", label=f"{r['budget_ms']:g} ms")
    ax.set(xlabel="iteration", ylabel="best valid loss, nats/token", title="evolutionary search convergence")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole
    ax.legend()
    fig.savefig(out_dir / "convergence.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
