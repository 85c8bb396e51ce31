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
    ax.set_xlabel("target: arithmetic exact match (higher is better)")
    ax.set_ylabel("source: held-out perplexity (lower is better)")
    ax.set_title("Learning vs forgetting (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
