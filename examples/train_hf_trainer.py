"""Fine-tune a tiny Llama (built from a config, nothing downloaded) with ``lalora.LaLoRATrainer``.

    python examples/train_hf_trainer.py [--strength 1e3] [--steps 20] [--accumulation 2] [--quick]

Source domain: sequences counting up; target: sequences counting down. Prints the logged task
loss and penalty, saves checkpoints with the precision in them and resumes from the first one.
Data parallel: ``torchrun --nproc-per-node 2 examples/train_hf_trainer.py --ddp`` (CPU, gloo).
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, default_data_collator

import lalora

VOCAB, SEQ = 32, 12


def sequences(n, step, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def make_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    torch.manual_seed(1)  # same seed -> same theta0 on every rank and on every rerun
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights="orthogonal")  # A and B both non-zero at theta0
    return get_peft_model(base, lora)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strength", type=float, default=1e3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--ddp", action="store_true", help="under torchrun: gloo backend on CPU")
    ap.add_argument("--quick", action="store_true", help="4 steps, for the test suite")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps = 4

    model = make_model()
    source = sequences(64, +1, seed=0)
    source_batches = [{"input_ids": b, "labels": b} for b in source.split(16)]
    # Under torchrun, each rank fits its shard of the same batches; the result is the same everywhere.
    precision = lalora.fit_precision(model, source_batches, backend="diag", progress=False)
    print(precision.summary())

    target = sequences(128, -1, seed=1)
    train_ds = [{"input_ids": t, "labels": t} for t in target]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=a.accumulation, max_steps=a.steps, learning_rate=1e-2,
                                 logging_steps=max(1, a.steps // 4), save_strategy="steps", save_steps=a.steps // 2, report_to=[],
                                 use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                                 ddp_backend="gloo" if a.ddp else None)
        trainer = lalora.LaLoRATrainer(model=model, args=args, train_dataset=train_ds,
                                       data_collator=default_data_collator, precision=precision, strength=a.strength)
        trainer.train()
        for h in trainer.state.log_history:
            if "lalora_penalty" in h:
                print(f"step {h['step']:3d}  task loss {h['task_loss']:.4f}  penalty {h['lalora_penalty']:.5f}")

        # Resume from the first checkpoint with a fresh model: the precision comes from the checkpoint.
        resumed = lalora.LaLoRATrainer(model=make_model(), args=args, train_dataset=train_ds,
                                       data_collator=default_data_collator)
        resumed.train(resume_from_checkpoint=f"{out}/checkpoint-{a.steps // 2}")
        print("resumed with strength", resumed.regularizer.strength, "and the checkpoint's anchor")
        return trainer, resumed


if __name__ == "__main__":
    main()
