"""Profile a fit against a plain forward+backward pass (torch.profiler operator table).

    python benchmarks/profile_fit.py [--config mid] [--what fwdbwd,diag,kfac-mc,kfac-empirical] [--rows 15]

Prints, per run, the wall time and the operators with the largest self CPU time, so the
extra time of a fit over the physical floor (one forward+backward pass) can be attributed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_diag import CONFIGS, batches, build, fwd_bwd  # noqa: E402

import lalora  # noqa: E402


def runs(model, data):
    fit = lambda backend, **o: (lambda: lalora.fit_precision(model, data, backend=backend, progress=False, options=o))  # noqa: E731
    return {"fwdbwd": lambda: fwd_bwd(model, data), "diag": fit("diag"),
            "kfac-mc": fit("kfac", curvature="mc"), "kfac-empirical": fit("kfac", curvature="ef")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mid")
    ap.add_argument("--what", default="fwdbwd,diag,kfac-mc,kfac-empirical")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
    name = next(n for n in CONFIGS if n.startswith(args.config))
    model = build(CONFIGS[name])
    data = batches(CONFIGS[name]["vocab_size"])
    fns = runs(model, data)
    for what in args.what.split(","):
        fns[what]()  # warm-up
        t = time.perf_counter()
        fns[what]()
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[what]()
        print(f"\n=== {name}: {what}: {wall:.3f}s unprofiled")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
