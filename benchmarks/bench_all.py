"""All performance figures of lalora issue 8, as ratios measured side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
        python benchmarks/bench_all.py [--configs mid,smollm2] [--smol-layers 30] [--repeats 3] \
        [--batches 4] [--batch-size 8] [--seq 128] [--no-laplace]

1. ``fit_precision`` time / one plain forward+backward pass over the same data, per backend
   (diag, kfac mc, kfac empirical);
2. lalora ``kfac``/``diag`` vs laplace-torch fitting the same structure on the same LoRA-only model
   and data (kron: ``CurvlinopsGGN(stochastic=True)``; diag: ``CurvlinopsEF``, the per-example EF
   lalora's ``diag`` computes) and vs curvlinops' ``KFACLinearOperator`` called directly. laplace-torch
   refuses causal LMs for kron (tokens as data points), so this part uses a LoRA MLP classifier;
3. regularizer forward+backward per training step / the step's forward+backward, per structure
   and form (diag; kfac, tri-kfac linearized; effective-weight);
4. peak memory of each fit (RSS sampled every 2 ms, above the RSS before the call; the plain
   forward+backward pass for reference) and stored bytes per structure, against the LoRA weights.

Configs: ``mid`` (Llama hidden 512, 4 layers, vocab 8000) and ``smollm2`` (SmolLM2-135M's shape:
hidden 576, intermediate 1536, 9 heads / 3 kv heads, vocab 49152, ``--smol-layers`` of its 30
layers; random weights from a ``LlamaConfig``, nothing downloaded). LoRA r=8 on all linear layers
of the blocks (orthogonal init: A and B non-zero). Times are medians of interleaved repeats.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from bench_diag import CONFIGS, batches, build, fwd_bwd, timed  # noqa: E402

import lalora  # noqa: E402

LLM_CONFIGS = {
    "tiny": CONFIGS["tiny (h=16, 2 layers)"],
    "mid": CONFIGS["mid (h=512, 4 layers)"],
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
FITS = {"diag": ("diag", {}), "kfac mc": ("kfac", {"curvature": "mc"}),
        "kfac empirical": ("kfac", {"curvature": "ef"})}


def median(xs):
    return statistics.median(xs)


class PeakRSS:
    """Context manager: peak resident set size above the value at entry (bytes), sampled every 2 ms."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.start)
            time.sleep(0.002)

    def __enter__(self):
        self.start, self.peak = self._rss(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.start)


def mib(n):
    return f"{n / 2**20:.1f} MiB"


# --- 1, 3, 4: causal LMs --------------------------------------------------------------------------
def bench_llm(name, cfg, args):
    model = build(cfg)
    data = batches(cfg["vocab_size"], n_batches=args.batches, bs=args.batch_size, seq=args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()):,} weights, LoRA {n_lora:,} "
          f"({len(data)} batches x {args.batch_size} x {args.seq} tokens)")
    model.eval()
    fwd_bwd(model, data[:1])  # warm-up
    fit = {k: (lambda b=b, o=o: lalora.fit_precision(model, data, backend=b, progress=False, options=o)) for k, (b, o) in FITS.items()}
    if "1" in args.items:
        fb_t, fit_t = [], {k: [] for k in fit}
        for _ in range(args.repeats):
            fb_t.append(timed(lambda: fwd_bwd(model, data)))
            for k, f in fit.items():
                fit_t[k].append(timed(f))
        fb = median(fb_t)
        print(f"1. fit / fwd+bwd (fwd+bwd {fb:.2f}s): "
              + "; ".join(f"{k} {median(t) / fb:.2f}x ({median(t):.2f}s)" for k, t in fit_t.items()))

    # 4. memory and stored bytes (the precisions are needed by item 3 either way)
    mem = {}
    with PeakRSS() as m:
        fwd_bwd(model, data)
    mem["fwd+bwd"] = m.peak
    precisions = {}
    for k, f in fit.items():
        if k == "kfac empirical" and "4" not in args.items:
            continue
        with PeakRSS() as m:
            precisions[k] = f()
        mem[k] = m.peak
    precisions["tri-kfac"] = lalora.fit_precision(model, data, backend="tri-kfac", progress=False)
    lora_bytes = 4 * n_lora
    if "4" in args.items:
        print("4. peak RSS above start: " + "; ".join(f"{k} {mib(v)}" for k, v in mem.items()))
        print(f"4. stored bytes (LoRA weights {mib(lora_bytes)} in float32): "
              + "; ".join(f"{k} {mib(precisions[k].num_bytes)} ({precisions[k].num_bytes / lora_bytes:.2f}x)"
                          for k in ("diag", "kfac mc", "tri-kfac")))
    if "3" not in args.items:
        return

    # 3. regularizer cost per training step
    regs = {"diag": lalora.LaLoRARegularizer(model, precisions["diag"], strength=1.0),
            "kfac": lalora.LaLoRARegularizer(model, precisions["kfac mc"], strength=1.0),
            "tri-kfac": lalora.LaLoRARegularizer(model, precisions["tri-kfac"], strength=1.0),
            "effective-weight": lalora.LaLoRARegularizer(model, precisions["tri-kfac"], strength=1.0,
                                                         form="effective-weight"),
            # the same with the factors stored in bfloat16 (factor_dtype, docs/training.md#factor-dtype)
            "kfac bf16": lalora.LaLoRARegularizer(model, precisions["kfac mc"], strength=1.0, factor_dtype="bfloat16"),
            "tri-kfac bf16": lalora.LaLoRARegularizer(model, precisions["tri-kfac"], strength=1.0,
                                                      factor_dtype="bfloat16"),
            "effective-weight bf16": lalora.LaLoRARegularizer(model, precisions["tri-kfac"], strength=1.0,
                                                              form="effective-weight", factor_dtype="bfloat16")}
    with torch.no_grad():  # move away from the anchor so no form is trivially zero
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    model.train()
    step_t, reg_t = [], {k: [] for k in regs}
    for _ in range(args.repeats):
        step_t.append(timed(lambda: fwd_bwd(model, data[:1])))
        for k, reg in regs.items():
            reg_t[k].append(timed(lambda reg=reg: [torch.autograd.grad(reg(), params) for _ in range(10)]) / 10)
    step = median(step_t)
    print(f"3. regularizer fwd+bwd / training step (step {step:.3f}s): "
          + "; ".join(f"{k} {100 * median(t) / step:.2f}% ({1e3 * median(t):.1f} ms)" for k, t in reg_t.items()))


# --- 2: against laplace-torch and curvlinops ------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, n_classes, depth):
        super().__init__()
        dims = [d_in] + [d_hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(d_hidden, n_classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def bench_vs_laplace(args):
    from curvlinops import KFACLinearOperator
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    d, depth, classes, n, nb = 512, 4, 10, 256, args.batches
    torch.manual_seed(0)
    base = MLP(d, d, classes, depth).eval()
    targets = [f"layers.{i}" for i in range(depth)] + ["head"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="orthogonal")).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(nb)]
    params = [p for p in model.parameters() if p.requires_grad]
    inner = model.base_model.model  # the MLP with LoRA layers; only LoRA weights require grad
    print(f"\n## LoRA MLP classifier (d={d}, {depth}+1 layers, {classes} classes, {nb} batches x {n} rows, "
          f"LoRA {sum(p.numel() for p in params):,})")

    class Loader:  # what Laplace.fit expects: iterable of (x, y) with .dataset of length N
        dataset = range(n * nb)

        def __iter__(self):
            return iter(data)

        def __len__(self):
            return nb

    def plain():
        for x, y in data:
            torch.autograd.grad(nn.functional.cross_entropy(inner(x), y, reduction="sum"), params)

    def laplace_fit(structure, backend, kwargs):
        def run():
            torch.manual_seed(0)
            Laplace(inner, "classification", subset_of_weights="all", hessian_structure=structure,
                    backend=backend, backend_kwargs=kwargs).fit(Loader(), progress_bar=False)
        return run

    def curvlinops_kfac():
        KFACLinearOperator(inner, nn.CrossEntropyLoss(reduction="sum"), params, data, fisher_type="mc",
                           check_deterministic=False).compute_kronecker_factors()

    runs = {
        "fwd+bwd": plain,
        "lalora diag (EF)": lambda: lalora.fit_precision(model, data, backend="diag", progress=False),
        "laplace-torch diag (CurvlinopsEF)": laplace_fit("diag", CurvlinopsEF, None),
        "lalora kfac (mc)": lambda: lalora.fit_precision(model, data, backend="kfac", progress=False),
        "laplace-torch kron (CurvlinopsGGN stochastic)": laplace_fit("kron", CurvlinopsGGN, {"stochastic": True}),
        "curvlinops KFACLinearOperator (mc)": curvlinops_kfac,
    }
    for f in runs.values():
        f()  # warm-up (and: every path runs)
    t = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t[k].append(timed(f))
    fb = median(t["fwd+bwd"])
    print(f"2. time / fwd+bwd ({fb:.3f}s): " + "; ".join(f"{k} {median(v) / fb:.2f}x" for k, v in t.items() if k != "fwd+bwd"))
    print(f"2. laplace-torch / lalora: diag {median(t['laplace-torch diag (CurvlinopsEF)']) / median(t['lalora diag (EF)']):.2f}x; "
          f"kron {median(t['laplace-torch kron (CurvlinopsGGN stochastic)']) / median(t['lalora kfac (mc)']):.2f}x; "
          f"curvlinops / lalora kfac {median(t['curvlinops KFACLinearOperator (mc)']) / median(t['lalora kfac (mc)']):.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="mid,smollm2")
    ap.add_argument("--smol-layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-laplace", action="store_true")
    ap.add_argument("--items", default="1,2,3,4", help="which of the items 1-4 to run (e.g. 3: the regularizer only)")
    args = ap.parse_args()
    args.items = set(args.items.split(","))
    warnings.simplefilter("ignore")
    jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    from importlib.metadata import version

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()}, "
          f"jemalloc {'yes' if jemalloc else 'NO (timings inflated, DESIGN.md section 5)'}")
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), "
          + ", ".join(f"{p} {version(p)}" for p in ("transformers", "peft", "curvlinops-for-pytorch", "laplace-torch", "lalora")))
    for name in args.configs.split(","):
        cfg = dict(LLM_CONFIGS[name])
        if name == "smollm2":
            cfg["num_hidden_layers"] = args.smol_layers
            name = f"smollm2-size ({args.smol_layers} of 30 layers)"
        bench_llm(name, cfg, args)
        print(f"# load {os.getloadavg()}")
    if not args.no_laplace and "2" in args.items:
        bench_vs_laplace(args)
        print(f"# load {os.getloadavg()}")


if __name__ == "__main__":
    main()
