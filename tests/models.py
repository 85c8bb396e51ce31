"""Tiny models built from configs (nothing is downloaded) shared by the tests."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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


def tiny_gpt2(seed: int = 0, dtype=torch.float32, **overrides) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D layers, learned absolute position embeddings: position_ids matter)."""
    cfg = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, attn_implementation="eager",
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    cfg.update(overrides)
    cfg.setdefault("bos_token_id", cfg["vocab_size"] - 1)  # GPT-2's default 50256 is outside a tiny vocabulary
    cfg.setdefault("eos_token_id", cfg["vocab_size"] - 1)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).to(dtype)
    model.eval()
    return model


def tiny_lora_gpt2(seed: int = 0, targets=("c_attn", "c_fc"), r: int = 2, init="orthogonal", dtype=torch.float32,
                   **overrides):
    """LoRA on GPT-2's Conv1D layers (``fan_in_fan_out=True``: only the base weight is transposed)."""
    base = tiny_gpt2(seed, dtype=dtype, **overrides)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init, lora_dropout=0.0,
                     fan_in_fan_out=True)
    return get_peft_model(base, cfg)


def add_active_adapter(model, targets, name: str = "second", r: int = 4, alpha: float = 3.0, init="orthogonal",
                       seed: int = 5):
    """Add a second peft adapter (own rank and alpha, so its scaling differs from "default"'s) and make both
    active at once; on layers in both target lists two adapters read the same input."""
    torch.manual_seed(seed)
    fan_in_fan_out = bool(getattr(model.peft_config["default"], "fan_in_fan_out", False))
    model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init,
                                       lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out))
    model.base_model.set_adapter(["default", name])
    return model


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


def labelled_sequences(lengths=(7, 4, 5, 3, 6), seed: int = 0, vocab: int = VOCAB):
    """Unpadded examples ``(ids, labels)`` (1-D) of the given lengths, with every labelling case: the first
    token labelled (it is never a target: nothing precedes it), prompt tokens masked (-100), a masked
    token inside the sequence, and one example whose only labelled token is its first (no loss at all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, L in enumerate(lengths):
        ids = torch.randint(1, vocab, (L,), generator=g)
        labels = ids.clone()
        if i % 3 == 1:
            labels[:2] = -100  # masked prompt
        if i % 3 == 2 and L > 3:
            labels[L // 2] = -100  # a masked label inside the sequence
        out.append((ids, labels))  # i % 3 == 0: every token labelled, the first included
    ids = torch.randint(1, vocab, (3,), generator=g)
    out.append((ids, torch.tensor([int(ids[0]), -100, -100])))  # only the first token labelled: no target
    return out


def pad_batch(examples, side: str = "left", position_ids: bool = False, pad_id: int = 0, pad_label=-100,
              position_offset: int = 0):
    """One HF-style batch of ``examples`` (``labelled_sequences``), padded on ``side`` ("left" or "right"):
    pad tokens ``pad_id``, attention mask 0, labels ``pad_label`` at pads. ``position_ids=True`` adds
    position ids that count from each example's first real token, starting at ``position_offset`` (0: what
    generation-style left padding needs on absolute-position models such as GPT-2); pads get position 0."""
    T = max(len(ids) for ids, _ in examples)
    n = len(examples)
    ids_out = torch.full((n, T), pad_id, dtype=torch.long)
    labels_out = torch.full((n, T), pad_label, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        L = len(ids)
        sl = slice(T - L, T) if side == "left" else slice(0, L)
        ids_out[i, sl], labels_out[i, sl], mask[i, sl] = ids, labels, 1
    batch = {"input_ids": ids_out, "attention_mask": mask, "labels": labels_out}
    if position_ids:
        batch["position_ids"] = ((mask.cumsum(1) - 1).clamp_min(0) + position_offset) * mask
    return batch


def singleton_batches(examples):
    """Each example alone, unpadded: the reference layout (no padding code is involved)."""
    return [{"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long), "labels": labels[None]}
            for ids, labels in examples]


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


def fit_quiet(model, data, backend, **kw):
    """``lalora.fit_precision`` without a progress bar and without the zero-curvature warning (for tests that
    compare two fits of the same model, not its initialization)."""
    import warnings

    import lalora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, progress=False, **kw)
