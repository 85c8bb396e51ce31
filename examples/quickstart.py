"""End to end on a tiny Llama built from a config (no download): fit, save, load, fine-tune
with and without the LaLoRA penalty, and print what each run kept of the source domain.

    python examples/quickstart.py [--backend diag] [--steps 60] [--strength 3 10 30 100] [--quick]

Source domain: sequences that count up (t, t+1, t+2, ...); target: sequences that count down.
The model is first trained a little on the source so it knows something to forget.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora

VOCAB, SEQ = 32, 16


def sequences(n, step, seed, noise=0.2):
    """Counting sequences; a fraction ``noise`` of tokens is random, so the loss never reaches 0."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % VOCAB
    flip = torch.rand(ids.shape, generator=g) < noise
    return torch.where(flip, torch.randint(0, VOCAB, ids.shape, generator=g), ids)


def loss_on(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def pretrain(model, steps=150):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(steps):
        ids = sequences(32, +1, seed=i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def finetune(model, strength, precision, steps):
    reg = lalora.LaLoRARegularizer(model, precision, strength=strength) if strength else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        ids = sequences(16, -1, seed=10_000 + i)
        loss = model(input_ids=ids, labels=ids).loss
        if reg is not None:
            loss = loss + reg()
        loss.backward()
        opt.step()
        opt.zero_grad()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="diag", help="curvature backend (see `lalora backends`)")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps on the target")
    ap.add_argument("--strength", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0], help="LaLoRA strengths lambda")
    ap.add_argument("--quick", action="store_true", help="a few steps and one strength, for the test suite")
    args = ap.parse_args(argv)
    pretrain_steps = 150
    if args.quick:
        args.steps, args.strength, pretrain_steps = 3, args.strength[-1:], 5
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      attn_implementation="eager")
    base = LlamaForCausalLM(cfg)
    t0 = time.time()
    pretrain(base, pretrain_steps)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    source_eval, target_eval = sequences(64, +1, seed=-1 % 997), sequences(64, -1, seed=-2 % 997)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      init_lora_weights="orthogonal")

    def fresh():
        b = LlamaForCausalLM(cfg)
        b.load_state_dict(state)
        torch.manual_seed(1)
        return get_peft_model(b, lora)

    model = fresh()
    source_fit = [{"input_ids": sequences(16, +1, seed=500 + i)} for i in range(8)]
    precision = lalora.fit_precision(model, source_fit, backend=args.backend)
    print(precision.summary())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "source.lalora"
        precision.save(path)
        print(f"saved {path.stat().st_size / 1024:.1f} KiB; reloading and validating against the model")
        precision = lalora.Precision.load(path, model=model)
    print(f"\nbefore fine-tuning: source loss {loss_on(model, source_eval):.3f}, target loss {loss_on(model, target_eval):.3f}")
    print(f"{'run':<32}{'source loss':>12}{'target loss':>12}")
    runs = [("plain LoRA", 0.0)] + [(f"LaLoRA {args.backend} lambda={s:g}", s) for s in args.strength]
    results = {}
    for label, strength in runs:
        m = fresh()
        finetune(m, strength, precision, args.steps)
        results[strength] = (loss_on(m, source_eval), loss_on(m, target_eval))
        print(f"{label:<32}{results[strength][0]:>12.3f}{results[strength][1]:>12.3f}")
    print(f"\ndone in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
