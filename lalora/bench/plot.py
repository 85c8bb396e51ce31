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


def summary_pareto_plot(report: dict, path) -> None:
    """The front of a grid report (``lalora.bench.grid``): mean over seeds with +-1 sd error bars; y is the
    source-loss increase over the base model in nats (``ln(ppl / base ppl)`` per seed: the seeds evaluate
    different texts, so the perplexities themselves spread far more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    b = s["baseline"]
    ax.errorbar([b["target_em"]["mean"]], [0.0], xerr=[b["target_em"]["sd"]], fmt="*", ms=12, color="k",
                label="base model", zorder=3)
    for m in dict.fromkeys(r["method"] for r in s["rows"]):
        rows = sorted((r for r in s["rows"] if r["method"] == m), key=lambda r: r["strength"])
        ax.errorbar([r["target_em"]["mean"] for r in rows], [r["source_nats"]["mean"] for r in rows],
                    xerr=[r["target_em"]["sd"] for r in rows], yerr=[r["source_nats"]["sd"] for r in rows],
                    marker="o", capsize=3, label=m)
        for r in rows:
            if r["strength"]:
                ax.annotate(f"{r['strength']:g}", (r["target_em"]["mean"], r["source_nats"]["mean"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    nats = [r["source_nats"]["mean"] for r in s["rows"]]
    if max(nats) > 0 and max(nats) > 20 * sorted(nats)[len(nats) // 2]:  # plain LoRA far above the rest
        ax.set_yscale("symlog", linthresh=0.01)
    seeds = b["target_em"]["n"]  # the seeds measured so far (a partial report has fewer than the grid)
    ax.set_xlabel("target: arithmetic exact match (higher is better)")
    ax.set_ylabel("source-loss increase, nats (lower is better)")
    ax.set_title(f"Learning vs forgetting, mean ± sd over {seeds} seeds (labels: strength)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_data_plot(report: dict, path) -> None:
    """Source perplexity and target EM against the number of fit examples, one line per (fit data, method,
    strength); the base model and the fit-free methods (lora, l2) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, metric, label in ((axes[0], "source_nats", "source-loss increase, nats (lower is better)"),
                              (axes[1], "target_em", "target: arithmetic exact match")):
        ax.axhline(s["baseline"][metric]["mean"], color="k", ls=":", label="base model")
        for r in (r for r in s["rows"] if r["fit_on"] is None):
            ax.axhline(r[metric]["mean"], color="grey", ls="--", lw=1, label=f"{r['method']} {r['strength']:g}")
        fitted = [r for r in s["rows"] if r["fit_on"] is not None]
        color = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(r["fit_on"] for r in fitted))}  # one per fit data
        style = {k: ("-", "--", ":", "-.")[i % 4]  # one line style per (method, strength)
                 for i, k in enumerate(sorted(dict.fromkeys((r["method"], r["strength"]) for r in fitted),
                                              key=lambda k: (k[0], -k[1])))}
        for key in dict.fromkeys((r["fit_on"], r["method"], r["strength"]) for r in fitted):
            rows = sorted((r for r in fitted if (r["fit_on"], r["method"], r["strength"]) == key),
                          key=lambda r: r["n_source_fit"])
            ax.errorbar([r["n_source_fit"] for r in rows], [r[metric]["mean"] for r in rows],
                        yerr=[r[metric]["sd"] for r in rows], marker="o", capsize=3, color=color[key[0]],
                        ls=style[key[1:]], label=f"{key[1]} {key[2]:g}, fit on {key[0]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("examples the precision is fitted on")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if max(r["source_nats"]["mean"] for r in s["rows"]) > 0.5:  # plain LoRA far above the penalized runs
        axes[0].set_yscale("symlog", linthresh=0.01)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.suptitle("Which source data, and how much")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
