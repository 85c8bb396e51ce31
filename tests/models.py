"""Tiny models built from configs (nothing is downloaded) shared by the tests."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 37


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, attn_implementation="eager", tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def tiny_lora_llama(seed: int = 0, targets=("q_proj", "v_proj"), r: int = 2, init="orthogonal", dtype=torch.float32,
                    adapter_name: str = "default", lora_dropout: float = 0.0, **overrides):
    base = tiny_llama(seed, dtype=dtype, **overrides)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init, lora_dropout=lora_dropout)
    return get_peft_model(base, cfg, adapter_name=adapter_name)


def randomize_lora_B(model, seed: int = 3, scale: float = 0.3) -> None:
    """Make every lora_B non-zero (a 'B != 0' starting point)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def token_batches(n_batches: int = 2, batch_size: int = 3, seq_len: int = 7, seed: int = 0, pad: bool = True,
                  mask_prompt: bool = True):
    """HF-style dict batches with right padding (attention_mask 0, labels -100) and masked prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for i in range(batch_size):
            if pad and i % 2 == 1:
                L = seq_len - 1 - (i % 3)
                mask[i, L:] = 0
                ids[i, L:] = 0
                labels[i, L:] = -100
            if mask_prompt:
                labels[i, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


class MLP(nn.Module):
    def __init__(self, d_in=5, d_hidden=6, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def lora_mlp(seed: int = 0, r: int = 2, init="orthogonal", targets=("fc1", "fc2")):
    torch.manual_seed(seed)
    base = MLP()
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init))


def byte_tokenizer():
    """One token per byte, id = byte value, plus <eos> (id 256).

    Not ``enumerate(pre_tokenizers.ByteLevel.alphabet())``: that list comes from a Rust hash set
    whose order changes in every process, so the byte -> id map (and with it the tiny model's
    data and every metric of the benchmark test) changed from run to run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    vocab = {chars[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
