"""Accuracy cost of low-rank-plus-diagonal Kronecker factors (``lalora.compress``), via the compare tool.

    python benchmarks/lowrank_accuracy.py [--out table.md]

A tiny Llama (hidden 64, intermediate 128, 1 layer, vocab 37, random init), LoRA r=2
(orthogonal init, B made non-zero) on q_proj, v_proj, down_proj (factor sides 32, 64, 128;
832 LoRA weights), 8 batches of 4 random-token sequences of length 16 (padded, prompt masked).
``kfac`` and ``tri-kfac`` (``curvature="ef"``) are fitted once and compressed at several
``max_rank``; ``lalora.compare_precisions`` measures each against (1) the uncompressed precision
(the compression's own cost) and (2) the exact per-example EF (to set it against K-FAC's own error).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import randomize_lora_B, tiny_lora_llama, token_batches  # noqa: E402

import lalora  # noqa: E402
from lalora.comparison import dense_reference  # noqa: E402

RANKS = (4, 8, 16, 32, 64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"), r=2, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    randomize_lora_B(model)
    data = token_batches(8, batch_size=4, seq_len=16)
    ef = dense_reference(model, data, "ef")
    lines = ["| structure | max_rank | stored KiB | err rand (vs uncompressed) | err eig | frob | "
             "err rand (vs exact EF) | frob (vs EF) |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("kfac", "tri-kfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = lalora.fit_precision(model, data, backend=kind, options={"curvature": "ef"}, progress=False)
        variants = [P] + [lalora.compress(P, k) for k in RANKS]
        labels = ["dense"] + [f"k={k}" for k in RANKS]
        own = lalora.compare_precisions(variants, reference=P, directions=16, labels=labels)
        vs_ef = lalora.compare_precisions(variants, reference=ef, directions=16, labels=labels)
        for lab, v in zip(labels, variants):
            r, e = own.row(lab), vs_ef.row(lab)
            lines.append(f"| {kind} | {lab.replace('k=', '') if lab != 'dense' else '-'} | {v.num_bytes / 1024:.1f} | "
                         f"{r['rel_err_random_mean']:.2e} | {r['rel_err_eigen_mean']:.2e} | {r['frobenius_all']:.2e} | "
                         f"{e['rel_err_random_mean']:.3f} | {e['frobenius_all']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
