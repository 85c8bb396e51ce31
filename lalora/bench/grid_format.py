"""Markdown of a ``lalora.bench.grid`` report: the summary (mean +- sd over seeds), the paired differences, and
each cell's own table."""
from __future__ import annotations

from .run import format_table


def _cell(stats: dict | None, digits: int) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def format_summary(report: dict) -> str:
    """The summary table; the fit-data columns only when the grid varies them."""
    g, s = report["grid"], report["summary"]
    fit_cols = len(g["fit_on"]) > 1 or len(g["n_source_fit"]) > 1
    head = (["fit data", "n fit"] if fit_cols else []) + ["method", "strength", "target EM", "source ppl",
                                                          "source loss increase (nats)", "source token acc", "seeds"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * (2 if fit_cols else 0) + "---|---:|---:|---:|---:|---:|---:|"]
    b = s["baseline"]
    base = (["-", "-"] if fit_cols else []) + ["base model", "-", _cell(b.get("target_em"), 3),
                                                _cell(b.get("source_ppl"), 2), "0", _cell(b.get("source_acc"), 4),
                                                str(b["source_ppl"]["n"])]
    lines.append("| " + " | ".join(base) + " |")
    for r in s["rows"]:
        fit = [r["fit_on"] or "-", "-" if r["n_source_fit"] is None else str(r["n_source_fit"])] if fit_cols else []
        cols = fit + [r["method"], f"{r['strength']:g}", _cell(r.get("target_em"), 3), _cell(r.get("source_ppl"), 2),
                      _cell(r.get("source_nats"), 3), _cell(r.get("source_acc"), 4), str(r["seeds"])]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def format_paired(report: dict) -> str:
    """Within-seed differences ``a - b`` (mean, sd, 95% interval); '*' where the interval excludes 0."""
    rows = report["paired"]
    if not rows:
        return ""
    lines = ["| a | b | seeds | source ppl a - b | source nats a - b | 95% | target EM a - b | 95% |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, n, e = r["source_ppl"], r["source_nats"], r["target_em"]
        lines.append(f"| {r['a']} | {r['b']} | {r['seeds']} | {p['mean']:+.2f} ± {p['sd']:.2f} | "
                     f"{n['mean']:+.4f} ± {n['sd']:.4f} | ±{n['ci95']:.4f}{' *' if n['beyond_noise'] else ''} | "
                     f"{e['mean']:+.3f} ± {e['sd']:.3f} | ±{e['ci95']:.3f}{' *' if e['beyond_noise'] else ''} |")
    return "\n".join(lines)


def format_grid(report: dict) -> str:
    """Summary, paired differences and the per-cell tables."""
    parts = ["## Summary (mean ± sd over seeds)", format_summary(report)]
    paired = format_paired(report)
    if paired:
        parts += ["## Paired differences (within a seed; * : the 95% t interval excludes 0)", paired]
    for c in report["cells"]:
        parts += [f"## seed {c['seed']}, fit on {c['fit_on']} ({c['n_source_fit']} examples)", format_table(c)]
    notes = report.get("notes", [])
    if notes:
        parts.append("\n".join(f"note: {n}" for n in notes))
    return "\n\n".join(parts)
