"""Benchmark of the `diag` backend and its penalty, as ratios measured side by side in one run.

    python benchmarks/bench_diag.py [--repeats 3]

1. fit_precision(backend="diag") time / one plain forward+backward pass over the same data;
2. regularizer forward+backward time per training step / the step's forward+backward time.
Configs: the tests' tiny Llama and a mid-size Llama (hidden 512, 4 layers), LoRA r=8 on all
linear layers, batch 8 x 128 tokens. Median of interleaved repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora

CONFIGS = {
    "tiny (h=16, 2 layers)": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=37),
    "mid (h=512, 4 layers)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=4, vocab_size=8000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(cfg):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, attn_implementation="sdpa", **cfg)).eval()
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="orthogonal"))


def batches(vocab, n_batches=4, bs=8, seq=128):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (bs, seq), generator=g)} for _ in range(n_batches)]


def fwd_bwd(model, data):
    params = [p for p in model.parameters() if p.requires_grad]
    for b in data:
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        torch.autograd.grad(loss, params)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, cfg in CONFIGS.items():
        model = build(cfg)
        data = batches(cfg["vocab_size"])
        fwd_bwd(model, data[:1])  # warm-up
        fit_t, fb_t = [], []
        for _ in range(args.repeats):
            fb_t.append(timed(lambda: fwd_bwd(model, data)))
            fit_t.append(timed(lambda: lalora.fit_precision(model, data, backend="diag", progress=False)))
        P = lalora.fit_precision(model, data, backend="diag", progress=False)
        reg = lalora.LaLoRARegularizer(model, P, strength=1.0)
        params = [p for p in model.parameters() if p.requires_grad]
        step_t, reg_t = [], []
        model.train()
        for _ in range(args.repeats):
            step_t.append(timed(lambda: fwd_bwd(model, data[:1])))
            reg_t.append(timed(lambda: [torch.autograd.grad(reg(), params) for _ in range(10)]) / 10)
        n_lora = sum(p.numel() for p in params)
        fit_ratio = statistics.median(fit_t) / statistics.median(fb_t)
        reg_ratio = statistics.median(reg_t) / statistics.median(step_t)
        print(f"{name}: LoRA weights {n_lora:,}; diag fit / fwd+bwd = {fit_ratio:.2f}x "
              f"({statistics.median(fit_t):.2f}s vs {statistics.median(fb_t):.2f}s); "
              f"regularizer / step = {100 * reg_ratio:.2f}%; stored {P.num_bytes / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
