"""Peak memory of a fit vs one forward+backward pass, on a small Llama with a large vocabulary (CPU).

What is measured: the process's resident-set high-water mark (``resource.getrusage(...).ru_maxrss``) above
its RSS just before the measured call (``/proc/self/statm``), one fresh process per case, after a warm-up
on a 2-token batch (lazy imports and allocator set-up are not counted). Cases, all on the same batch of
``N x T`` tokens (every position labelled):

- ``fwd+bwd``: one forward and one backward of the summed next-token cross-entropy w.r.t. the LoRA weights
  (lalora's training loss, ``CausalLMLoss.per_example``) - what a training step costs; the factors are
  relative to the chunked one; ``fwd+bwd hf``: the same with transformers' own loss (``model(**batch).loss``);
- ``fit <backend> <curvature>``: ``fit_precision`` on that one batch, with the logit rows in chunks of
  ``lalora.logit_rows.CHUNK_ROWS`` (default) or in one chunk (``unchunked``: the float32 copy of all rows
  the loss paths made before chunking).

    python benchmarks/bench_memory.py                 # float32, vocab 32768, 8 x 256 tokens
    python benchmarks/bench_memory.py --dtype bfloat16 --vocab 65536

Numbers: benchmarks/README.md ("Peak memory of a fit").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CASES = [("fwd+bwd", None, None), ("fwd+bwd hf", None, None), ("fit", "kfac", "ef"), ("fit", "kfac", "mc"), ("fit", "diag", None)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(model, lora)


def _batch(args, n, t):
    import torch

    ids = torch.randint(0, args.vocab, (n, t), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _work(case, model, batch):
    import torch

    from lalora import fit_precision
    from lalora.losses import CausalLMLoss, call_model

    kind, backend, curvature = case
    if kind == "fwd+bwd hf":  # transformers' own loss (model(**batch).loss), for comparison
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(model(**batch).loss, params)
        return
    if kind == "fwd+bwd":
        loss = CausalLMLoss()
        b = loss.prepare(batch)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss.per_example(call_model(model, b), b).sum(), params)
        return
    fit_precision(model, [batch], backend=backend, options={"curvature": curvature} if backend == "kfac" else None, progress=False,
                  uncovered="ignore")


def child(args) -> None:
    import torch

    import lalora.logit_rows as logit_rows

    torch.set_num_threads(1)
    if args.unchunked:
        logit_rows.CHUNK_ROWS = 10**12
    case = CASES[args.case]
    model = _model(args)
    _work(case, model, _batch(args, 1, 2))  # warm-up: imports, allocator
    batch = _batch(args, args.batch, args.seq)
    before = _rss()
    _work(case, model, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_above_start": peak - before}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--unchunked", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case is not None:
        return child(args)
    logits = args.batch * args.seq * args.vocab
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, {args.dtype}: logits {logits * 4 / 2**20:.0f} MiB "
          f"as float32; peak RSS above the start of the call (MiB), one process per case")
    base = None
    for i, case in enumerate(CASES):
        for unchunked in ((False,) if case[0] == "fwd+bwd hf" else (False, True)):
            cmd = [sys.executable, __file__, "--case", str(i), "--vocab", str(args.vocab), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--dtype", args.dtype] + (["--unchunked"] if unchunked else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peak = json.loads(out)["peak_above_start"] / 2**20
            base = peak if base is None else base
            name = case[0] if case[1] is None else f"fit {case[1]}" + (f" {case[2]}" if case[2] else "")
            name += " unchunked" if unchunked else ""
            print(f"  {name:28s} {peak:8.0f} MiB   {peak / base:5.2f} x fwd+bwd")


if __name__ == "__main__":
    main()
