"""Fit a precision once, then fine-tune at three strengths from the saved file.

    python examples/precision_reuse.py fit --out source.lalora            # once (e.g. on machine A)
    python examples/precision_reuse.py finetune --precision source.lalora  # any run, any machine
    python examples/precision_reuse.py [--quick]                           # both, in a temp folder

The fit is the expensive part (a pass over source data); the file holds everything the
regularizer needs: the curvature blocks, the anchor theta0 (the LoRA weights it was fitted at),
and metadata identifying the base model (config hash, vocabulary size) and the LoRA layout.
``finetune`` builds its model with a *different* LoRA seed, as another machine or run would,
loads the file validated against that model (names, shapes, base-model config), moves the LoRA
weights to the stored theta0 with ``reg.reset_to_anchor()`` and trains at each strength.

Tiny Llama from a config (nothing downloaded); source: counting up, target: counting down.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora

VOCAB, SEQ = 32, 12


def sequences(n, step, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def make_model(lora_seed: int):
    """The same base weights everywhere (a fixed checkpoint); the LoRA init depends on ``lora_seed``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    torch.manual_seed(lora_seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights="orthogonal")  # A and B both non-zero at theta0: A gets curvature
    return get_peft_model(base, lora)


def loss_on(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def fit(out: Path, backend: str, n_source: int) -> None:
    model = make_model(lora_seed=1)
    source = sequences(n_source, +1, seed=0)
    batches = [{"input_ids": b, "labels": b} for b in source.split(16)]
    precision = lalora.fit_precision(model, batches, backend=backend, progress=False)
    precision.save(out)
    print(precision.summary())
    print(f"saved {out} ({out.stat().st_size / 1024:.1f} KiB)")


def finetune(path: Path, strengths, steps: int, lora_seed: int) -> list[dict]:
    results = []
    source_eval, target_eval = sequences(64, +1, seed=2), sequences(64, -1, seed=3)
    for strength in [0.0, *strengths]:
        model = make_model(lora_seed)  # another run / machine: its own LoRA init
        # validated against the model: canonical names, shapes, base-model config hash, vocabulary
        precision = lalora.Precision.load(path, model=model)
        reg = lalora.LaLoRARegularizer(model, precision, strength=strength, check_anchor=False)
        reg.reset_to_anchor()  # start from the theta0 the precision was fitted at
        reg.check_anchor()     # (raises AnchorMismatchError if the weights are elsewhere)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for batch in sequences(8 * steps, -1, seed=1).split(8):
            loss = model(input_ids=batch, labels=batch).loss + reg()
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        row = {"strength": strength, "source_loss": loss_on(model, source_eval),
               "target_loss": loss_on(model, target_eval), "penalty": float(reg().detach())}
        results.append(row)
        print(f"strength {strength:8g}: source loss {row['source_loss']:.3f}  target loss {row['target_loss']:.3f}  "
              f"penalty {row['penalty']:.4f}")
    return results


def main(argv=None) -> list[dict] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["fit", "finetune", "both"], default="both")
    ap.add_argument("--out", type=Path, help="fit: where to write the precision file")
    ap.add_argument("--precision", type=Path, help="finetune: the precision file to reuse")
    ap.add_argument("--backend", default="diag", help="curvature backend (see `lalora backends`)")
    ap.add_argument("--strength", type=float, nargs=3, default=[10.0, 100.0, 1000.0], help="three strengths lambda")
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps per strength")
    ap.add_argument("--lora-seed", type=int, default=7, help="finetune: LoRA init seed (differs from the fit's on purpose)")
    ap.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
    a = ap.parse_args(argv)
    steps, n_source = (3, 32) if a.quick else (a.steps, 64)
    if a.command == "fit":
        if a.out is None:
            ap.error("fit needs --out FILE")
        fit(a.out, a.backend, n_source)
        return None
    if a.command == "finetune":
        if a.precision is None:
            ap.error("finetune needs --precision FILE")
        if not a.precision.is_file():
            ap.error(f"--precision {a.precision}: no such file")
        return finetune(a.precision, a.strength, steps, a.lora_seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "source.lalora"
        fit(path, a.backend, n_source)
        return finetune(path, a.strength, steps, a.lora_seed)


if __name__ == "__main__":
    main()
