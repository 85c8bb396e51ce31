"""Choosing the strength (docs/strength.md): train briefly at a few strengths from the same theta0, measure the
target and the held-out source loss after each run, and report the front and the largest target gain whose
source loss rose by at most a tolerance.

    report = lalora.sweep_strengths(model, precision, train_batches, source_eval=src_heldout,
                                    target_eval=tgt_heldout, strengths=(0, 0.01, 0.1, 1, 10), steps=50,
                                    max_source_increase=0.05)
    report["best"]["strength"]      # then train for real at that strength (normalize="mean-diagonal")

Each run starts from the precision's anchor theta0 (``reg.reset_to_anchor()``) with the same batches in the same
order and the same seed, so the runs differ by the strength only; the model is left at theta0. Strengths are
normalized (``normalize="mean-diagonal"``, the default here: multiples of the precision's mean diagonal,
``LaLoRARegularizer``), and every row also gives the raw lambda it stands for (``raw_strength``).

Losses are ``lalora.training.heldout_loss``: the mean over all labelled tokens (causal LMs) of the next-token
cross-entropy in nats, so a source-loss increase of 0.05 is a source perplexity about 5% higher (e^0.05 = 1.051).
The target axis is the held-out target loss (gain = its decrease from theta0), or ``target_metric(model)``
(higher is better, e.g. exact match; gain = its increase).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from .atomic_file import atomic_write_bytes, atomic_write_text
from .regularizer import LaLoRARegularizer
from .training import heldout_loss, train_lora


@dataclass
class SweepPoint:
    strength: float            # as given (normalized unless normalize=None)
    raw_strength: float        # the lambda of the penalty (strength / scale)
    source_loss: float
    source_increase: float     # source_loss - the source loss at theta0 (nats per token)
    target: float              # held-out target loss (lower is better), or target_metric (higher is better)
    target_gain: float         # improvement over theta0 (> 0: learnt)
    final_task_loss: float
    train_seconds: float


def _check(strengths, steps, max_source_increase) -> list[float]:
    out = [float(s) for s in strengths]
    if not out:
        raise ValueError("strengths is empty: give a few, e.g. (0, 0.01, 0.1, 1, 10)")
    bad = [s for s in out if not (s >= 0 and math.isfinite(s))]
    if bad:
        raise ValueError(f"strengths must be finite numbers >= 0, got {bad[0]}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (max_source_increase >= 0 and math.isfinite(max_source_increase)):
        raise ValueError(f"max_source_increase must be a finite number >= 0, got {max_source_increase}")
    return sorted(dict.fromkeys(out))


def sweep_strengths(model, precision, train_batches, *, source_eval, target_eval=None, target_metric=None,
                    strengths=(0.0, 0.01, 0.1, 1.0, 10.0), steps: int = 50, lr: float = 1e-3,
                    normalize: str | None = "mean-diagonal", form: str = "auto", prior_precision=None,
                    max_source_increase: float = 0.05, seed: int = 0, progress: bool = False,
                    uncovered: str = "warn") -> dict:
    """Train ``steps`` AdamW steps (``lalora.training.train_lora``) at each strength from theta0 and evaluate.

    ``source_eval`` / ``target_eval``: held-out batches (dicts from a tokenizer, as ``fit_precision`` takes); give
    ``target_eval`` or ``target_metric`` (a callable ``model -> float``, higher is better). Returns a JSON-able
    dict: ``base`` (theta0's losses), ``points`` (one ``SweepPoint`` per strength, ascending), ``front`` (the
    strengths no other point beats on both axes), ``best`` (the point of largest ``target_gain`` with
    ``source_increase <= max_source_increase``; None if none qualifies: raise the strengths), and the settings."""
    strengths = _check(strengths, steps, max_source_increase)
    if (target_eval is None) == (target_metric is None):
        raise ValueError("give target_eval (held-out target batches) or target_metric (model -> float), one of them")
    higher_better = target_metric is not None

    def measure():
        return heldout_loss(model, source_eval), (target_metric(model) if higher_better else
                                                  heldout_loss(model, target_eval))

    reg = LaLoRARegularizer(model, precision, strength=1.0, normalize=normalize, form=form,
                            prior_precision=prior_precision, uncovered=uncovered, _caller="sweep_strengths")
    base_source, base_target = measure()
    points = []
    for s in strengths:
        reg.reset_to_anchor()
        reg.strength = s
        torch.manual_seed(seed)
        t = time.perf_counter()
        losses = train_lora(model, train_batches, int(steps), lr, reg=reg if s > 0 else None, progress=progress,
                            desc=f"strength {s:g}")
        seconds = time.perf_counter() - t
        src, tgt = measure()
        gain = tgt - base_target if higher_better else base_target - tgt
        points.append(SweepPoint(s, reg.raw_strength, src, src - base_source, tgt, gain, losses[-1], seconds))
    reg.reset_to_anchor()
    return _report(points, base_source, base_target, higher_better, max_source_increase, reg,
                   {"steps": int(steps), "lr": lr, "seed": seed, "form": reg.form})


def _report(points, base_source, base_target, higher_better, tol, reg, settings) -> dict:
    front = [p.strength for p in points
             if not any(q.target_gain >= p.target_gain and q.source_increase <= p.source_increase
                        and (q.target_gain > p.target_gain or q.source_increase < p.source_increase) for q in points)]
    ok = [p for p in points if p.source_increase <= tol]
    best = max(ok, key=lambda p: (p.target_gain, -p.source_increase)) if ok else None
    return {"base": {"source_loss": base_source, "target": base_target},
            "target": "target_metric (higher is better)" if higher_better else "held-out target loss (lower is better)",
            "points": [asdict(p) for p in points], "front": front, "max_source_increase": tol,
            "best": None if best is None else asdict(best), "normalize": reg.normalize, "scale": reg.scale,
            **settings}


def format_sweep(report: dict) -> str:
    """A Markdown table of ``sweep_strengths``' report and the choice it leads to."""
    b, tol = report["base"], report["max_source_increase"]
    lines = ["| strength | raw lambda | source loss | source increase | target | target gain | on the front |",
             "|---:|---:|---:|---:|---:|---:|:---:|",
             f"| theta0 | - | {b['source_loss']:.4f} | - | {b['target']:.4f} | - | |"]
    for p in report["points"]:
        lines.append(f"| {p['strength']:g} | {p['raw_strength']:.4g} | {p['source_loss']:.4f} | "
                     f"{p['source_increase']:+.4f} | {p['target']:.4f} | {p['target_gain']:+.4f} | "
                     f"{'x' if p['strength'] in report['front'] else ''} |")
    best = report["best"]
    if best is None:
        lines.append(f"\nno strength kept the source loss within +{tol:g} nats: add larger strengths")
    else:
        flag = " --normalize mean-diagonal" if report["normalize"] else ""
        lines.append(f"\nlargest target gain within a source-loss increase of {tol:g} nats: strength {best['strength']:g}"
                     f" (target gain {best['target_gain']:+.4f}, source {best['source_increase']:+.4f}); train with "
                     f"--strength {best['strength']:g}{flag}")
    return "\n".join(lines)


def save_sweep(report: dict, path) -> None:
    """The report as JSON (written atomically)."""
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def plot_sweep(report: dict, path) -> None:
    """A PNG (matplotlib, Agg): source-loss increase (x) vs target gain (y) per strength, the tolerance as a
    vertical line and the chosen strength circled; upper left is better."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pts = report["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot([p["source_increase"] for p in pts], [p["target_gain"] for p in pts], marker="o", label="strengths")
    for p in pts:
        ax.annotate(f"{p['strength']:g}", (p["source_increase"], p["target_gain"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.scatter([0], [0], marker="*", s=140, color="k", label="theta0", zorder=3)
    ax.axvline(report["max_source_increase"], color="tab:red", ls="--", lw=1, label="max source increase")
    if report["best"] is not None:
        b = report["best"]
        ax.scatter([b["source_increase"]], [b["target_gain"]], s=220, facecolors="none", edgecolors="tab:green",
                   lw=2, label=f"chosen: strength {b['strength']:g}", zorder=4)
    ax.set_xlabel("held-out source loss increase (nats per token; lower is better)")
    ax.set_ylabel("target gain over theta0 (higher is better)")
    ax.set_title("Choosing the strength (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
