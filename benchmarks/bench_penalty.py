"""The penalty alone, with cold caches: ``LaLoRARegularizer`` forward+backward per form and factor dtype.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
        python benchmarks/bench_penalty.py [--config smollm2] [--layers 30] [--repeats 11] [--label after]

A training step evicts the factors from the caches (the activations of one step are larger than the
L3), so every call here first writes a 512 MB buffer; ``bench_all.py`` item 3 calls the penalty ten
times in a row instead, where part of the factors can stay cached (L3 is 300 MB on the Xeon of
record). Prints the median time per call, the bytes of the regularizer's buffers and the bytes read per
second. For a before/after comparison run it once per checkout with ``PYTHONPATH=<checkout>`` and
alternate the runs (benchmarks/README.md, "Issue 21, second round").
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
from bench_all import LLM_CONFIGS, batches, build  # noqa: E402

import lalora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mid", choices=["mid", "smollm2"])
    ap.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the config's)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--label", default="", help="printed in front of the result line")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cfg = dict(LLM_CONFIGS[args.config])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    model = build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    prec = lalora.fit_precision(model, batches(cfg["vocab_size"], n_batches=1, bs=8, seq=128), backend="kfac",
                                progress=False)
    regs = {f"{form} {dt}": lalora.LaLoRARegularizer(model, prec, strength=1.0, form=form, factor_dtype=dt)
            for form in ("linearized", "effective-weight") for dt in ("float32", "bfloat16")}
    with torch.no_grad():  # away from the anchor
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    flush = torch.zeros(128 * 2**20)
    times = {k: [] for k in regs}
    for _ in range(args.repeats):
        for k, reg in regs.items():
            flush.add_(1.0)
            t = time.perf_counter()
            torch.autograd.grad(reg(), params)
            times[k].append(time.perf_counter() - t)
    print(f"# {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), load {os.getloadavg()}")
    parts = []
    for k, reg in regs.items():
        m, nbytes = statistics.median(times[k]), sum(t.numel() * t.element_size() for t in reg.buffers())
        parts.append(f"{k} {1e3 * m:.1f} ms ({nbytes / 1e6:.0f} MB, {nbytes / m / 1e9:.1f} GB/s)")
    print(f"{args.label} {args.config} {cfg['num_hidden_layers']} layers: " + "; ".join(parts))


if __name__ == "__main__":
    main()
