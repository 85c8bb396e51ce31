"""Compare curvature approximations against the exact curvature on a small model.

    python examples/compare_structures.py [--reference ef] [--out-dir compare-out] [--quick]

A tiny Llama built from a config (nothing downloaded) with LoRA r=2 on q_proj/v_proj (orthogonal
init, so A and B are non-zero): 224 LoRA weights, small enough for the exact dense reference.
Every backend is fitted on the same padded source batches; the table gives time, storage and
the errors of each approximation against the exact EF (or GGN), including along a real
fine-tuning displacement theta_T - theta0 (a few steps of plain LoRA on a target task).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora

VOCAB = 37


def make_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      attn_implementation="eager")  # eager: the exact GGN reference uses torch.func
    torch.manual_seed(1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def batches(n_batches, seed, batch_size=4, seq_len=10):
    """Right-padded batches (attention_mask 0, labels -100) of random-length sequences."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
        mask = (torch.arange(seq_len) < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def displacement(model, steps):
    """theta_T after ``steps`` Adam steps of plain LoRA on other data; the model is put back at theta0."""
    lora = lalora.adapters.lora_parameters(lalora.find_lora_adapters(model))
    theta0 = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.Adam(list(lora.values()), lr=3e-3)
    target = batches(4, seed=1)
    for step in range(steps):
        loss = model(**target[step % len(target)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    theta_T = {n: p.detach().clone() for n, p in lora.items()}
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(theta0[n])
    return theta_T


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", choices=["ef", "ggn"], default="ef", help="exact curvature to compare against")
    ap.add_argument("--out-dir", type=Path, help="write compare.json, compare.md and the plots here")
    ap.add_argument("--quick", action="store_true", help="fewer backends, directions and steps (test suite)")
    a = ap.parse_args(argv)
    model = make_model()
    source = batches(2 if a.quick else 4, seed=0)
    theta_T = displacement(model, 3 if a.quick else 30)
    backends = ["diag", ("kfac-ef", "kfac", {"curvature": "ef"}),
                ("tri-kfac-ef", "tri-kfac", {"curvature": "ef"}), "block"]
    if not a.quick:
        backends += [("kfac-mc", "kfac", {"mc_samples": 4}), ("block-ggn", "block", {"curvature": "ggn"})]
    result = lalora.compare(model, source, backends=backends, reference=a.reference,
                            directions=8 if a.quick else 32, top_k=4 if a.quick else 8, displacement=theta_T)
    print(result.table())
    if a.out_dir is not None:
        from lalora.comparison.plot import plot_result

        a.out_dir.mkdir(parents=True, exist_ok=True)
        result.to_json(a.out_dir / "compare.json")
        (a.out_dir / "compare.md").write_text(result.to_markdown())
        print("wrote", ", ".join(str(p) for p in plot_result(result, a.out_dir / "compare.png")))
    return result


if __name__ == "__main__":
    main()
