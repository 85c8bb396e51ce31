"""Several benchmark runs on one loaded model, over seeds and over the data the precisions are fitted on
(``lalora bench --seeds 0,1,2``, ``--fit-on source,generated,unrelated``, ``--n-source-fit 8,32,128``), and their
summary: mean and spread over seeds per (fit data, examples, method, strength), and paired differences between
methods. Within a seed every run shares theta0, the target data and the order of the batches, so the difference
of two methods is measured within a seed and its spread over seeds is the noise it is judged against.

Plain LoRA and ``l2`` (``P = I``) do not depend on the fit data: they run once per seed, in the seed's first cell,
and their summary rows have no fit data (``fit_on`` and ``n_source_fit`` are None).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from .run import BenchConfig, run_benchmark

FIT_FREE = ("lora", "l2")       # methods whose runs do not depend on the fit data
METRICS = ("target_em", "source_ppl", "source_nats", "source_acc")
# two-sided 95% Student t quantiles by degrees of freedom (n seeds - 1); scipy is not a dependency
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Grid:
    seeds: tuple = (0,)
    fit_on: tuple = ("source",)
    n_source_fit: tuple = (32,)

    def is_single(self) -> bool:
        return len(self.seeds) == len(self.fit_on) == len(self.n_source_fit) == 1


def run_grid(cfg: BenchConfig, grid: Grid, model=None, tokenizer=None, on_cell=None) -> dict:
    """One ``run_benchmark`` per (seed, fit_on, n_source_fit) on one model; ``on_cell(partial_report)`` after each.
    Returns ``{"config", "grid", "cells", "summary", "paired", "notes"}``."""
    from .run import _check_config, _default_model

    _check_config(cfg)
    notes: list[str] = []
    if model is None:
        model, tokenizer = _default_model(cfg, notes)
    cells: list[dict] = []
    for seed in grid.seeds:
        baseline = None
        for i, (fit_on, n) in enumerate((f, n) for f in grid.fit_on for n in grid.n_source_fit):
            methods = tuple(m for m in cfg.methods if i == 0 or m not in FIT_FREE)
            if not methods:
                continue
            c = dataclasses.replace(cfg, seed=seed, fit_on=fit_on, n_source_fit=n, methods=methods)
            rep = run_benchmark(c, model, tokenizer, baseline=baseline)
            baseline = rep["baseline"]
            cells.append({"seed": seed, "fit_on": fit_on, "n_source_fit": n, **rep})
            if on_cell is not None:
                on_cell(grid_report(cfg, grid, cells, notes))
    return grid_report(cfg, grid, cells, notes)


def grid_report(cfg: BenchConfig, grid: Grid, cells: list[dict], notes: list[str]) -> dict:
    return {"config": dataclasses.asdict(cfg), "grid": dataclasses.asdict(grid), "cells": cells,
            "summary": summarize(cells), "paired": paired(cells), "notes": notes + _cell_notes(cells)}


def _cell_notes(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(n for c in cells for n in c.get("notes", [])))


def _rows(cells: list[dict]):
    """``(key, seed, row)`` per training run; key = (fit_on, n_source_fit, method, strength). Each row gains
    ``source_nats``, the source-loss increase over the base model on the same seed's evaluation texts,
    ``ln(ppl / base ppl)``: the seeds evaluate different texts (base perplexity 88-104), so the increase
    varies much less over seeds than the perplexity itself."""
    for c in cells:
        base = c["baseline"]["source_ppl"]
        for r in c["results"]:
            r = dict(r, source_nats=math.log(r["source_ppl"] / base))
            free = r["method"] in FIT_FREE
            yield (None if free else c["fit_on"], None if free else c["n_source_fit"], r["method"], r["strength"]), \
                c["seed"], r


def _stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the half-width of the 95% t interval of the mean."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "ci95": half, "n": n}


def summarize(cells: list[dict]) -> dict:
    """``{"baseline": {metric: stats}, "rows": [{fit_on, n_source_fit, method, strength, seeds, metric: stats}]}``
    (metrics that were not measured, e.g. token accuracy under lm-eval, are left out)."""
    groups: dict[tuple, list[dict]] = {}
    for key, _seed, r in _rows(cells):
        groups.setdefault(key, []).append(r)
    baselines = [dict(b, source_nats=0.0) for b in {c["seed"]: c["baseline"] for c in cells}.values()]
    out = {"baseline": _metric_stats(baselines), "rows": []}
    for (fit_on, n, method, strength), rs in groups.items():
        out["rows"].append({"fit_on": fit_on, "n_source_fit": n, "method": method, "strength": strength,
                            "seeds": len(rs), **_metric_stats(rs)})
    return out


def _metric_stats(rows: list[dict]) -> dict:
    return {m: _stats([r[m] for r in rows]) for m in METRICS if rows and all(r.get(m) is not None for r in rows)}


def paired(cells: list[dict]) -> list[dict]:
    """Per pair of methods at one (fit data, strength) run in >= 2 seeds: the within-seed difference
    ``a - b`` of source perplexity and of target EM, its mean, spread, 95% interval and whether the interval
    excludes 0 (``beyond_noise``). Fit-free methods (lora, l2) pair with every fitted cell of their seed."""
    by: dict[tuple, dict[int, dict]] = {}
    for key, seed, r in _rows(cells):
        by.setdefault(key, {})[seed] = r
    out = []
    keys = list(by)
    for i, ka in enumerate(keys):
        for kb in keys[i + 1:]:
            if not _comparable(ka, kb):
                continue
            seeds = sorted(set(by[ka]) & set(by[kb]))
            if len(seeds) < 2:
                continue
            row = {"a": _label(ka), "b": _label(kb), "seeds": len(seeds)}
            for m in ("source_ppl", "source_nats", "target_em"):
                s = _stats([by[ka][sd][m] - by[kb][sd][m] for sd in seeds])
                row[m] = s | {"beyond_noise": bool(s["sd"] > 0 and abs(s["mean"]) > s["ci95"])}
            out.append(row)
    return out


def _comparable(ka: tuple, kb: tuple) -> bool:
    """The same strength (unless one side is plain LoRA), and the same fit data, or one side fit-free, or the
    same method on other fit data (what the fit data changes)."""
    same_fit = ka[0] is None or kb[0] is None or ka[:2] == kb[:2] or ka[2] == kb[2]
    same_strength = ka[3] == kb[3] or "lora" in (ka[2], kb[2])
    return same_fit and same_strength and ka != kb


def _label(key: tuple) -> str:
    fit_on, n, method, strength = key
    s = method if method == "lora" else f"{method} {strength:g}"
    return s if fit_on is None else f"{s} ({fit_on}, {n})"
