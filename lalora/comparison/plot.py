"""PNG plots of a ``CompareResult`` (matplotlib, Agg backend: no display needed).

``plot_errors``: per method, the relative errors (random directions, top eigenvectors,
displacement, Frobenius over all weights) on a log axis. ``plot_spectra``: per block, the
reference's eigenvalues against each method's (descending, log axis).
"""
from __future__ import annotations

import math
from pathlib import Path

_FLOOR = 1e-16  # zero errors are drawn at this value on the log axis


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ok_rows(result):
    return [r for r in result.rows if r.get("status", "ok") == "ok"]


def plot_errors(result, path) -> Path:
    """Grouped bars: one group per method, one bar per error kind (log scale)."""
    plt = _plt()
    rows = _ok_rows(result)
    kinds = [("rel_err_random_mean", "random dirs (mean)"), ("rel_err_eigen_mean", "top eigvecs (mean)"),
             ("rel_err_displacement", "displacement"), ("frobenius_all", "Frobenius (all)")]
    kinds = [(k, lab) for k, lab in kinds if any(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 3.6))
    if not rows or not kinds:
        ax.text(0.5, 0.5, "no reference: no errors to plot", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / len(kinds)
        for j, (key, lab) in enumerate(kinds):
            vals = []
            for r in rows:
                v = r.get(key)
                vals.append(float("nan") if v is None or (isinstance(v, float) and math.isinf(v)) else max(float(v), _FLOOR))
            ax.bar([i + (j - (len(kinds) - 1) / 2) * width for i in range(len(rows))], vals, width, label=lab)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["name"] for r in rows], rotation=20)
        ax.set_ylabel("relative error")
        kind = (result.reference or {}).get("kind", "?")
        ax.set_title(f"error vs exact {kind}")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(result, path, max_blocks: int = 12) -> Path:
    """One panel per block (the first ``max_blocks`` LoRA matrices and ``all``): eigenvalues,
    descending, of the reference (black) and of each method."""
    plt = _plt()
    rows = [r for r in _ok_rows(result) if r.get("spectra")]
    ref = result.reference or {}
    blocks = (result.blocks[:max_blocks] + ["all"]) if ref.get("spectra") else []
    n = max(1, len(blocks))
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    if not blocks:
        axes[0][0].text(0.5, 0.5, "no reference: no spectra", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, b in zip(axes.flat, blocks):
        ax.semilogy([max(v, _FLOOR) for v in ref["spectra"][b]], "k-", lw=2, label="reference")
        for r in rows:
            if b in r["spectra"]:
                ax.semilogy([max(v, _FLOOR) for v in r["spectra"][b]], "--", lw=1, label=r["name"])
        ax.set_title(b if len(b) <= 40 else "..." + b[-37:], fontsize=7)
        ax.tick_params(labelsize=6)
    if blocks:
        axes.flat[0].legend(fontsize=6)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.94, wspace=0.3, hspace=0.45)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_result(result, path) -> list[Path]:
    """Errors to ``path`` and spectra to ``<stem>_spectra<suffix>``; returns both paths."""
    path = Path(path)
    spectra = path.with_name(f"{path.stem}_spectra{path.suffix or '.png'}")
    return [plot_errors(result, path), plot_spectra(result, spectra)]
