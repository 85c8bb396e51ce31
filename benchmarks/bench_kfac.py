"""Benchmark of the `kfac` / `tri-kfac` backends and their penalties, ratios measured side by side.

    python benchmarks/bench_kfac.py [--repeats 3] [--configs tiny,mid]

1. fit_precision(backend="kfac") time (curvature mc with 1 sample, and ef) / one plain
   forward+backward pass over the same data;
2. regularizer forward+backward time per training step / the step's forward+backward time, for
   each form: kfac (linearized), tri-kfac (linearized), effective-weight.
Configs: the tests' tiny Llama and a mid-size Llama (hidden 512, 4 layers), LoRA r=8 on all
linear layers, batch 8 x 128 tokens, 4 batches. Median of interleaved repeats. Run long jobs
under jemalloc (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2, DESIGN.md section 5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_diag import CONFIGS, batches, build, fwd_bwd, timed  # noqa: E402

import lalora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="tiny,mid")
    args = ap.parse_args()
    if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
        print("note: not running under jemalloc (see DESIGN.md section 5); CPU timings may be inflated")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
    wanted = args.configs.split(",")
    for name, cfg in CONFIGS.items():
        if not any(name.startswith(w) for w in wanted):
            continue
        model = build(cfg)
        data = batches(cfg["vocab_size"])
        fwd_bwd(model, data[:1])  # warm-up
        fb_t, fit_t = [], {"mc": [], "ef": []}
        for _ in range(args.repeats):
            fb_t.append(timed(lambda: fwd_bwd(model, data)))
            for ft in fit_t:
                fit_t[ft].append(timed(lambda: lalora.fit_precision(model, data, backend="kfac", progress=False,
                                                                     options={"curvature": ft})))
        fb = statistics.median(fb_t)
        fits = ", ".join(f"{ft} {statistics.median(t) / fb:.2f}x ({statistics.median(t):.2f}s)" for ft, t in fit_t.items())
        print(f"{name}: kfac fit / fwd+bwd ({fb:.2f}s): {fits}")
        P_kfac = lalora.fit_precision(model, data, backend="kfac", progress=False)
        P_tri = lalora.fit_precision(model, data, backend="tri-kfac", progress=False)
        regs = {"kfac": lalora.LaLoRARegularizer(model, P_kfac, strength=1.0),
                "tri-kfac": lalora.LaLoRARegularizer(model, P_tri, strength=1.0),
                "effective-weight": lalora.LaLoRARegularizer(model, P_tri, strength=1.0, form="effective-weight")}
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # move away from the anchor so the forms are not trivially zero
            for p in params:
                p.add_(1e-3 * torch.randn_like(p))
        step_t, reg_t = [], {k: [] for k in regs}
        for _ in range(args.repeats):
            step_t.append(timed(lambda: fwd_bwd(model, data[:1])))
            for k, reg in regs.items():
                reg_t[k].append(timed(lambda: [torch.autograd.grad(reg(), params) for _ in range(10)]) / 10)
        step = statistics.median(step_t)
        forms = ", ".join(f"{k} {100 * statistics.median(t) / step:.2f}%" for k, t in reg_t.items())
        print(f"{name}: LoRA weights {sum(p.numel() for p in params):,}; regularizer / step ({step:.3f}s): {forms}; "
              f"stored {P_tri.num_bytes / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
