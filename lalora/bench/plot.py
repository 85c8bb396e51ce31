"""The learning-forgetting plot: target exact match (x) vs source perplexity (y), one curve per method."""
from __future__ import annotations


def pareto_plot(report: dict, path) -> None:
    """Write a PNG: each method's points joined in order of strength; lower-right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    b = report["baseline"]
    ax.scatter([b["target_em"]], [b["source_ppl"]], marker="*", s=140, color="k", label="base model", zorder=3)
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    for m in methods:
        rows = sorted((r for r in report["results"] if r["method"] == m), key=lambda r: r["strength"])
        xs, ys = [r["target_em"] for r in rows], [r["source_ppl"] for r in rows]
        ax.plot(xs, ys, marker="o", label=m)
        for r in rows:
            if r["strength"]:
                ax.annotate(f"{r['strength']:g}", (r["target_em"], r["source_ppl"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ppl = [b["source_ppl"]] + [r["source_ppl"] for r in report["results"]]
    if max(ppl) > 2 * min(ppl):  # forgetting LoRA would squash the regularised runs into one corner
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")
        ticks = sorted({float(f"{v:.2g}") for v in _geomspace(min(ppl), max(ppl), 7)})
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("target: arithmetic exact match (higher is better)")
    ax.set_ylabel("source: held-out perplexity (lower is better)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title("Learning vs forgetting (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _geomspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
