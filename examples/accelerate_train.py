"""Multi-process LoRA fine-tuning with the LaLoRA penalty in a plain ``accelerate`` loop (tiny Llama built from a
config, nothing downloaded).

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu [--quick]  # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 examples/accelerate_train.py                  # 8 GPUs, DDP
    accelerate launch --config_file fsdp2.yaml examples/accelerate_train.py          # FSDP2 or DeepSpeed ZeRO-3

On CPU, ``--multi_gpu`` is accelerate's torchrun launcher (its ``--cpu`` flag starts several processes only
through mpirun); ``--cpu`` here makes the processes use the CPU and gloo.

Each process fits its share of the source batches (``fit_precision`` all-reduces the sums, so every rank holds the
same precision), then trains. ``accelerator.backward(loss + reg())`` inside ``accelerator.accumulate`` divides
both by the accumulation steps, so over one optimizer step the penalty's gradient adds up to exactly
``grad(reg)``; every rank adds the same penalty gradient, which the averaging over ranks leaves unchanged. Under
FSDP2 ``reg()`` gathers the sharded LoRA weights differentiably; under DeepSpeed ZeRO-3 it gathers them for the
forward and its gradient arrives in the same ``engine.backward``. ``reg.rebind(model)`` after ``prepare`` picks
up the Parameters a sharding wrapper put in place of the originals.
"""
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora

VOCAB, SEQ = 32, 12


def sequences(n, step, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def make_model():
    torch.manual_seed(0)  # the same base model and theta0 on every rank
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights="orthogonal"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strength", type=float, default=1e3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--backend", default="kfac")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    ap.add_argument("--quick", action="store_true", help="4 steps, for the test suite")
    a = ap.parse_args(argv)
    steps = 4 if a.quick else a.steps
    accelerator = Accelerator(gradient_accumulation_steps=a.accumulation, cpu=a.cpu)

    model = make_model()
    source = sequences(32, +1, seed=0)  # the same batches on every rank: each fits its share
    source_batches = [{"input_ids": b, "labels": b} for b in source.split(8)]
    precision = lalora.fit_precision(model, source_batches, a.backend, progress=False)
    reg = lalora.LaLoRARegularizer(model, precision, strength=a.strength)

    target = sequences(steps * a.accumulation * accelerator.num_processes * 4, -1, seed=1)
    loader = torch.utils.data.DataLoader([{"input_ids": t, "labels": t} for t in target], batch_size=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)  # each rank gets its part of the target data
    reg.rebind(accelerator.unwrap_model(model))
    reg.to(accelerator.device)

    model.train()
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            penalty = reg()
            accelerator.backward(loss + penalty)
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            task = accelerator.reduce(loss.detach(), reduction="mean")
            accelerator.print(f"step {(i + 1) // a.accumulation:3d}  task loss {float(task):.4f}  "
                              f"penalty {float(penalty.detach()):.5f}")
    # every rank holds the same LoRA weights (and the same penalty) after the run
    theta = torch.cat([t.detach().flatten().float() for t in reg._theta().values()])
    spread = float((accelerator.gather(theta[None]) - theta).abs().max())
    accelerator.print(f"processes {accelerator.num_processes}; LoRA weights equal on every rank: max diff {spread:.3g}")
    # destroy the process group before the interpreter exits: left to teardown, gloo's threads can abort a
    # rank after all the work is done ("terminate called without an active exception", exit code -6)
    accelerator.end_training()
    return spread


if __name__ == "__main__":
    main()
