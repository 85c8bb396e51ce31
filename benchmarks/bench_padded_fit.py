"""kfac fits on padded batches: the Gram products over the real tokens only vs over every row, side by side.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
        python benchmarks/bench_padded_fit.py [--config mid] [--layers N] [--pad 0,0.25,0.5] [--repeats 3]

Batches: 4 x 8 x 128 tokens, right-padded; example ``n`` of a batch keeps ``128 - pad_n`` real tokens, the
``pad_n`` spread evenly around the mean fraction ``--pad`` (so the batch is as long as its longest
example, as a dynamic-padding collator makes it). Timed, interleaved in one process in a rotating order (medians): one
forward+backward pass of the LoRA loss over the padded batches, the ``kfac`` (MC) fit, and the same fit
with ``FactorHooks.kept_rows`` patched to keep every row (the layout before issue 21's third round: pads
zero-weighted in X, every row in G). Prints the fit / fwd+bwd ratios and checks that both fits give
the same factors (largest relative difference).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_all import LLM_CONFIGS  # noqa: E402
from bench_diag import build, timed  # noqa: E402

import lalora  # noqa: E402
from lalora.backends import kfac_factors  # noqa: E402


def padded(vocab, pad: float, n=4, bs=8, seq=128):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        mask = torch.ones(bs, seq, dtype=torch.long)
        for i in range(1, bs):  # example 0 is full length; the others spread around the mean padding
            mask[i, seq - min(seq - 8, round(2 * pad * seq * i / bs)):] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def every_row(self, n, m):
    return None, self._token_weights(n, m).reshape(-1).sqrt()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mid", choices=["mid", "smollm2"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--pad", default="0,0.25,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cfg = dict(LLM_CONFIGS[args.config])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    model = build(cfg).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t") if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {cpu}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load {os.getloadavg()}; {args.config}, "
          f"{cfg['num_hidden_layers']} layers")
    kept_rows = kfac_factors.FactorHooks.kept_rows

    def fit(rows):
        kfac_factors.FactorHooks.kept_rows = rows
        try:
            return lalora.fit_precision(model, data, backend="kfac", progress=False, options={"curvature": "mc"})
        finally:
            kfac_factors.FactorHooks.kept_rows = kept_rows

    def fwd_bwd():
        for b in data:
            torch.autograd.grad(model(**b).loss, params)

    for pad in (float(p) for p in args.pad.split(",")):
        data = padded(cfg["vocab_size"], pad)
        real = sum(int(b["attention_mask"].sum()) for b in data) / sum(b["attention_mask"].numel() for b in data)
        fwd_bwd()
        runs = {"fwd+bwd": fwd_bwd, "kept rows": lambda: fit(kept_rows), "every row": lambda: fit(every_row)}
        times = {k: [] for k in runs}
        order = list(runs)
        for i in range(args.repeats):  # the order rotates: no run always follows the same one
            for k in order[i % 3:] + order[:i % 3]:
                times[k].append(timed(runs[k]))
        t = {k: statistics.median(v) for k, v in times.items()}
        a, b = fit(kept_rows), fit(every_row)
        err = max(float((x.X.dense() - y.X.dense()).norm() / y.X.dense().norm()) for x, y in zip(a.blocks, b.blocks))
        err = max(err, *(float((x.G.dense() - y.G.dense()).norm() / y.G.dense().norm()) for x, y in zip(a.blocks, b.blocks)))
        print(f"padding {1 - real:.2f}: fwd+bwd {t['fwd+bwd']:.2f}s; kfac mc, real tokens {t['kept rows'] / t['fwd+bwd']:.2f}x "
              f"({t['kept rows']:.2f}s), every row {t['every row'] / t['fwd+bwd']:.2f}x ({t['every row']:.2f}s); "
              f"fit time ratio {t['kept rows'] / t['every row']:.2f}; factors differ by {err:.1e} (rel.)", flush=True)
    print(f"# load {os.getloadavg()}")


if __name__ == "__main__":
    main()
