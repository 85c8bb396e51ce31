"""The GPU check: one script, run once on a lent GPU (under 8 minutes on one H200), prepared on CPU.

    python benchmarks/gpu_check.py                 # on a CUDA machine: the ~1.1B config in bf16
    python benchmarks/gpu_check.py --cpu           # dry mode on CPU: a tiny config, same code path
    python benchmarks/gpu_check.py --out DIR       # also write DIR/gpu_check.json

What it does, in order (each step is timed and failures are reported, not fatal):

1. the CUDA-marked tests (``pytest -k cuda`` with ``LALORA_TEST_DEVICE=cuda``: every test taking the ``device``
   fixture of tests/conftest.py, and the tests named cuda; in ``--cpu`` mode they run on the CPU);
2. a random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers,
   32 heads / 4 kv heads, vocab 32000; nothing downloaded) in bf16, LoRA r=16 on all linear layers
   (orthogonal init, so A and B are non-zero), 4 batches of 8 x 512 random tokens;
3. ``fit_precision`` diag and kfac (mc) time / one forward+backward pass over the same batches, and
   the peak GPU memory of each against the pass's;
4. the regularizer's forward+backward (kfac linearized, tri-kfac, effective weight) / one training
   step's forward+backward;
5. the same K-FAC work done by curvlinops' ``KFACLinearOperator`` (and kronfluence, when installed),
   time and peak memory side by side with lalora's kfac.

The figures go to benchmarks/README.md with the GPU model and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

CONFIGS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Clock:
    """Wall time of a callable with the device synchronised before and after; peak memory of the call."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) - base if self.device.type == "cuda" else None
        return out, seconds, peak


def build(cfg: dict, device, dtype, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(device=device, dtype=dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights="orthogonal")
    return get_peft_model(base, lora, autocast_adapter_dtype=False).eval()


def batches(vocab: int, n: int, bs: int, seq: int, device):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.to(device)})
    return out


def fwd_bwd(model, data):
    params = [p for p in model.parameters() if p.requires_grad]
    for b in data:
        loss = model(**b).loss
        torch.autograd.grad(loss, params)


def step(name, results, fn):
    """Run one step; record its result or its error (the check goes on)."""
    print(f"-- {name}", flush=True)
    try:
        results[name] = fn()
        print(f"   {results[name]}", flush=True)
    except Exception as e:  # report and continue: one failing step must not hide the others
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc(limit=3)


def cuda_tests(cpu: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow",
           "-k", "cuda", "tests"]
    env = dict(os.environ)
    if not cpu:
        env["LALORA_TEST_DEVICE"] = "cuda"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [proc.stderr[-300:]]
    return {"returncode": proc.returncode, "summary": last[0], "seconds": round(time.perf_counter() - t0, 1)}


def lalora_fits(model, data, clock) -> tuple[dict, dict]:
    import lalora

    fwd_bwd(model, data[:1])  # warm-up (kernels, allocator)
    _, fb, fb_mem = clock(lambda: fwd_bwd(model, data))
    out = {"fwd+bwd s": round(fb, 3), "fwd+bwd peak MiB": _mib(fb_mem)}
    precisions = {}
    for name, backend, opts in (("diag", "diag", None), ("kfac mc", "kfac", {"curvature": lalora.Curvature.MC})):
        P, sec, mem = clock(lambda: lalora.fit_precision(model, data, backend=backend, progress=False, options=opts))
        precisions[name] = P
        out[f"{name} s"] = round(sec, 3)
        out[f"{name} / fwd+bwd"] = round(sec / fb, 2)
        out[f"{name} peak MiB"] = _mib(mem)
        out[f"{name} stored MiB"] = round(P.num_bytes / 2**20, 1)
    return out, precisions


def regularizer_ratios(model, data, precisions, clock) -> dict:
    import lalora
    from lalora.bench.precisions import as_tri_kfac

    params = [p for p in model.parameters() if p.requires_grad]
    b = data[0]

    def train_step():
        loss = model(**b).loss
        torch.autograd.grad(loss, params)

    train_step()
    steps = [clock(train_step)[1] for _ in range(3)]
    t_step = sorted(steps)[1]
    out = {"train step s": round(t_step, 3)}
    forms = {"diag": (precisions["diag"], "linearized"), "kfac": (precisions["kfac mc"], "linearized"),
             "tri-kfac": (as_tri_kfac(precisions["kfac mc"]), "linearized"),
             "effective-weight": (precisions["kfac mc"], "effective-weight")}
    for name, (P, form) in forms.items():
        reg = lalora.LaLoRARegularizer(model, P, strength=1.0, form=form, uncovered="ignore")

        def pen():
            torch.autograd.grad(reg(), params, allow_unused=True)

        pen()
        times = [clock(pen)[1] for _ in range(5)]
        out[f"{name} / step"] = f"{100 * sorted(times)[2] / t_step:.2f}%"
        del reg
    return out


def curvlinops_kfac(model, data, clock) -> dict:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]

    class Flat(torch.nn.Module):  # curvlinops needs (rows, classes) outputs: next-token logits, flattened
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(**x).logits[:, :-1].flatten(0, 1).float()

    pairs = [({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"][:, 1:].flatten())
             for b in data]
    loss = torch.nn.CrossEntropyLoss(reduction="sum")

    def run():
        op = KFACLinearOperator(Flat(), loss, params, pairs, fisher_type="mc", check_deterministic=False,
                                batch_size_fn=lambda x: x["input_ids"].shape[0])
        op.compute_kronecker_factors()
        return op

    _, sec, mem = clock(run)
    return {"curvlinops KFACLinearOperator s": round(sec, 3), "peak MiB": _mib(mem),
            "note": "no padding in these batches, so its factors need no masking"}


def kronfluence_status() -> dict:
    try:
        import kronfluence  # noqa: F401
    except ImportError as e:
        return {"status": f"not installed ({e})"}
    return {"status": "installed; covariance fitting is compared in benchmarks/bench_kronfluence.py when present"}


def _mib(n):
    return None if n is None else round(n / 2**20, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry mode: the tiny config on CPU (float32)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args(argv)
    cpu = a.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    config = a.config or ("tiny" if cpu else "1b")
    dtype = torch.float32 if cpu else torch.bfloat16
    n, bs, seq = a.batches or (2 if cpu else 4), a.batch_size or (2 if cpu else 8), a.seq or (32 if cpu else 512)
    results = {"device": torch.cuda.get_device_name(0) if not cpu else "cpu (dry mode)",
               "torch": torch.__version__, "config": config, "dtype": str(dtype), "data": f"{n} x {bs} x {seq}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(results), flush=True)
    clock = Clock(device)
    if not a.skip_tests:
        step("1. CUDA-marked tests", results, lambda: cuda_tests(cpu))
    model = build(CONFIGS[config], device, dtype, a.rank)
    data = batches(CONFIGS[config]["vocab_size"], n, bs, seq, device)
    results["weights"] = sum(p.numel() for p in model.parameters())
    results["lora weights"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precisions = {}

    def fits():
        out, ps = lalora_fits(model, data, clock)
        precisions.update(ps)
        return out

    step("3. fit / forward+backward", results, fits)
    if precisions:
        step("4. regularizer / training step", results, lambda: regularizer_ratios(model, data, precisions, clock))
    step("5a. curvlinops KFAC", results, lambda: curvlinops_kfac(model, data, clock))
    step("5b. kronfluence", results, kronfluence_status)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
