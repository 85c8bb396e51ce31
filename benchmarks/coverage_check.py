"""Check from outside the test suite that every trainable tensor of a peft model is covered or reported.

    python benchmarks/coverage_check.py [--backends diag,block,kfac,tri-kfac]

For each peft variant (tiny Llama / GPT-2 / Mixtral built from configs, nothing downloaded) and backend, fit
a precision and then, for every parameter with ``requires_grad``, perturb it alone and evaluate the penalty
of a ``LaLoRARegularizer`` with ``prior_precision=1`` (so a covered tensor always moves the penalty, even
with zero curvature). A tensor counts as covered when the penalty moves; otherwise it must be named in an
``UncoveredParameterWarning`` of the fit. A backend that refuses a variant must raise an error naming the
layer. Exits 1 (listing the failures) when any tensor is neither covered nor reported.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import lalora

V = 37
COMMON = dict(vocab_size=V, max_position_embeddings=64, attn_implementation="eager", tie_word_embeddings=False)


def llama(**kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, **COMMON, **kw)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=V - 1, eos_token_id=V - 1,
                                      **{k: v for k, v in COMMON.items() if k != "max_position_embeddings"})).eval()


def mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
                                            **COMMON)).eval()


def peft(base, init="orthogonal", **cfg):
    torch.manual_seed(1)
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=init, **cfg))


VARIANTS = {
    "modules_to_save": lambda: peft(llama(), modules_to_save=["lm_head"]),
    "trainable_token_indices": lambda: peft(llama(), trainable_token_indices=[1, 2, 3]),
    "dora": lambda: peft(llama(), use_dora=True),
    "lora_bias": lambda: peft(gpt2(), init=True, lora_bias=True, target_modules=["c_attn"], fan_in_fan_out=True),
    "bias=all": lambda: peft(gpt2(), bias="all", target_modules=["c_attn"], fan_in_fan_out=True),
    "target_parameters (MoE)": lambda: peft(mixtral(), init=True, target_parameters=["mlp.experts.gate_up_proj"]),
    "unfrozen base weight": lambda: _unfreeze(peft(llama()), "model.norm.weight"),
    "embedding LoRA (reported)": lambda: peft(llama(), target_modules=["q_proj", "embed_tokens"]),
}


def _unfreeze(model, suffix):
    for n, p in model.named_parameters():
        if n.endswith(suffix):
            p.requires_grad_(True)
    return model


def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def check(variant: str, backend: str) -> tuple[str, list[str]]:
    """("ok" | "refused: ..." , names neither covered nor reported)."""
    model = VARIANTS[variant]()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            precision = lalora.fit_precision(model, data(), backend, progress=False)
        except lalora.BackendError as e:
            named = any(n.split(".lora_")[0].removeprefix("base_model.model.") in str(e) for n, _ in trainable)
            return (f"refused: {str(e)[:90]}...", [] if named else [f"refusal names no layer: {e}"])
    reported = " ".join(str(w.message) for w in caught if issubclass(w.category, lalora.UncoveredParameterWarning))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = lalora.LaLoRARegularizer(model, precision, 1.0, prior_precision=1.0, uncovered="ignore")
    missing = []
    for n, p in trainable:
        with torch.no_grad():
            saved = p.detach().clone()
            p.add_(0.1)
            moved = float(reg().detach()) > 0
            p.copy_(saved)
        if not moved and repr(n) not in reported:
            missing.append(n)
    return ("ok" if not reported else "ok (some reported)"), missing


def main(argv=None) -> int:
    import logging

    logging.getLogger("lalora").setLevel(logging.ERROR)  # zero-curvature notes of B=0 inits are expected here
    warnings.simplefilter("ignore", FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="diag,block,kfac,tri-kfac")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    failures = []
    for variant in args.variants.split(","):
        for backend in args.backends.split(","):
            status, missing = check(variant, backend)
            print(f"{variant:28s} {backend:9s} {status}" + (f"  UNCOVERED AND UNREPORTED: {missing}" if missing else ""))
            failures += [(variant, backend, m) for m in missing]
    if failures:
        print(f"FAIL: {len(failures)} trainable tensors neither covered nor reported", file=sys.stderr)
        return 1
    print("every trainable tensor is covered, reported by name, or its variant refused naming the layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
