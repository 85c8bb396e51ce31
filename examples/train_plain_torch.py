"""A plain PyTorch loop with the LaLoRA penalty, with gradient accumulation.

    python examples/train_plain_torch.py [--strength 1e3] [--steps 30] [--accumulation 2] [--quick]

Tiny Llama from a config (nothing downloaded); source: counting up, target: counting down.
Prints the source loss (what is forgotten) with and without the penalty.
"""
from __future__ import annotations

import argparse

import torch

import lalora
from train_hf_trainer import make_model, sequences


def source_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def train(strength, steps, k):
    model = make_model()
    source = sequences(64, +1, seed=0)
    precision = lalora.fit_precision(model, [{"input_ids": b, "labels": b} for b in source.split(16)],
                                     backend="diag", progress=False)
    reg = lalora.LaLoRARegularizer(model, precision, strength=strength)  # raises if not at theta0
    # Each micro-batch loss is divided by k; regularized adds reg()/k to each: reg once per step.
    loss_fn = lalora.regularized(lambda ids: model(input_ids=ids, labels=ids).loss / k, reg, accumulation_steps=k)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = sequences(steps * 8 * k, -1, seed=1)
    model.train()
    for step, batch in enumerate(target.split(8)):
        loss_fn(batch).backward()
        if (step + 1) % k == 0:
            opt.step()
            opt.zero_grad()
    model.eval()
    return source_loss(model, source), source_loss(model, sequences(64, -1, seed=2)), float(reg().detach())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strength", type=float, default=1e3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 steps, for the test suite")
    a = ap.parse_args(argv)
    results = {}
    for strength in (0.0, a.strength):
        src, tgt, pen = train(strength, 3 if a.quick else a.steps, a.accumulation)
        results[strength] = (src, tgt, pen)
        print(f"strength {strength:8g}: source loss {src:.3f}  target loss {tgt:.3f}  final penalty {pen:.4f}")
    return results


if __name__ == "__main__":
    main()
