"""Surrogate source data: text the base model generates itself, for when its pretraining data is not
available (docs/evaluation.md#surrogate-source-data).

``generate_source(model, tokenizer, n)`` samples ``n`` continuations (of ``prompts``, or of the BOS token)
from the *base* model: eval mode, no gradients, and a peft model's adapters disabled
(``PeftModel.disable_adapter()``), so the adapter being fitted never shapes its own source data. Sampling
is plain ancestral sampling at ``temperature`` (no top-k, top-p or repetition penalty of the model's
generation config), seeded per batch and run inside ``torch.random.fork_rng`` (the caller's random state
is left as it was): the same arguments on the same machine give the same texts. The result keeps the
generated token ids, so the fitting batches hold exactly the tokens that were sampled (no decode ->
re-encode round trip), and a ``provenance`` dict for the precision's metadata (``metadata["source"]``).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..errors import DataError

_MAX_STORED_PROMPTS = 64  # provenance keeps the prompts themselves up to this many (always their fingerprint)


@dataclass
class SurrogateSource:
    """Generated source data: per example the prompt tokens, the sampled tokens, and the text."""

    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    prompts: list[str | None]
    completions: list[str]
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.generated_ids)

    @property
    def texts(self) -> list[str]:
        """Prompt + completion per example."""
        return [(p or "") + c for p, c in zip(self.prompts, self.completions)]

    def records(self) -> list[dict]:
        """Records for ``lalora fit --data`` (JSON lines): ``{"text"}`` when generated from the start token,
        else ``{"prompt", "completion"}`` (only the completion is labelled). Re-tokenizing text may give
        other tokens than were sampled; ``batches()`` keeps the sampled ones."""
        return [{"text": c} if p is None else {"prompt": p, "completion": c}
                for p, c in zip(self.prompts, self.completions)]

    def batches(self, batch_size: int = 8, max_length: int | None = None, label_prompt: bool = False) -> list[dict]:
        """Right-padded causal-LM batches of prompt + sampled tokens (cut to ``max_length`` tokens): the
        sampled tokens are labelled, the prompt (or start token) is input only unless ``label_prompt``;
        padding is masked and ``-100``. Examples with no sampled token left are dropped."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        pad = int(self.provenance.get("pad_token_id") or 0)
        rows = []
        for p, g in zip(self.prompt_ids, self.generated_ids):
            if max_length is not None:
                g = g[:max(0, max_length - len(p))]
            if g:
                rows.append((p, g))
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            T = max(len(p) + len(g) for p, g in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            labels = torch.full((len(chunk), T), -100, dtype=torch.long)
            for r, (p, g) in enumerate(chunk):
                seq = torch.tensor(p + g, dtype=torch.long)
                ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
                labels[r, :len(seq)] = seq
                if not label_prompt:
                    labels[r, :len(p)] = -100
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return out


def text_fingerprint(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = (t or "").encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def _batch_seed(seed: int, index: int) -> int:
    """A seed per generation batch derived from (seed, batch index): distinct pairs give distinct streams."""
    return int.from_bytes(hashlib.sha256(f"lalora-surrogate:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@contextmanager
def base_model_mode(model, base_only: bool = True):
    """Eval mode, no gradients, and (``base_only``) every adapter of a ``PeftModel`` disabled; restored on exit."""
    was = model.training
    disable = nullcontext()
    if base_only:
        if callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config"):
            disable = model.disable_adapter()  # peft.PeftModel
        elif getattr(model, "_hf_peft_config_loaded", False):
            raise DataError("generate_source: the model carries adapters through transformers' PEFT integration; "
                            "wrap it with peft (get_peft_model / PeftModel.from_pretrained) or pass base_only=False")
        elif any(type(m).__module__.startswith("peft.tuners") for m in model.modules()):
            raise DataError("generate_source: the model has peft adapter layers but is not a PeftModel, so they "
                            "cannot be disabled; pass the PeftModel or base_only=False")
    try:
        model.eval()
        with torch.no_grad(), disable:
            yield
    finally:
        model.train(was)


def _start_ids(tokenizer, prompts, n):
    if prompts is None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError("generate_source: the tokenizer has neither a BOS nor an EOS token to start from; "
                            "pass prompts=")
        return [[int(start)] for _ in range(n)], [None] * n, ("bos" if tokenizer.bos_token_id is not None else "eos")
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise DataError("generate_source: prompts is empty (pass None to start from the BOS token)")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    ids = [list(tokenizer(p)["input_ids"]) for p in chosen]
    for i, (p, x) in enumerate(zip(chosen, ids)):
        if not x:
            raise DataError(f"generate_source: prompt {i % len(prompts)} ({p!r}) tokenizes to no tokens")
    return ids, chosen, "prompts"


def _check(n, temperature, max_new_tokens, batch_size, prompts):
    if not (isinstance(n, int) and n >= 1):
        raise DataError(f"generate_source: n must be an integer >= 1, got {n!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise DataError(f"generate_source: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DataError(f"generate_source: batch_size must be an integer >= 1, got {batch_size!r}")
    if not (temperature >= 0) or temperature == float("inf"):
        raise DataError(f"generate_source: temperature must be a finite number >= 0, got {temperature!r}")
    if temperature == 0 and (prompts is None or n > len(prompts)):
        raise DataError("generate_source: temperature 0 (greedy) repeats one text per prompt; use temperature > 0 "
                        "or at least n distinct prompts")


def generate_source(model, tokenizer, n: int, prompts=None, *, temperature: float = 1.0, max_new_tokens: int = 64,
                    seed: int = 0, batch_size: int = 8, base_only: bool = True) -> SurrogateSource:
    """Sample ``n`` texts from the base model (see the module docstring).

    ``prompts``: strings cycled over the ``n`` examples (example i continues ``prompts[i % len(prompts)]``),
    or None: every example starts from the tokenizer's BOS token (its EOS token when it has none).
    ``temperature``: > 0 samples; 0 is greedy (needs at least ``n`` prompts). Generation stops at the
    EOS token (kept as the last sampled token) or after ``max_new_tokens``. ``batch_size`` examples are
    sampled together (the texts depend on it: it is recorded). ``base_only=False`` generates with the
    adapters as they are.
    """
    _check(n, temperature, max_new_tokens, batch_size, prompts)
    from transformers import GenerationConfig

    prompt_ids, chosen, start = _start_ids(tokenizer, prompts, n)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    gen_cfg = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                               top_k=0 if temperature > 0 else None, top_p=1.0 if temperature > 0 else None,
                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                               bos_token_id=tokenizer.bos_token_id)
    device = next(model.parameters()).device
    generated: list[list[int]] = []
    forked = [device] if device.type == "cuda" else []
    with base_model_mode(model, base_only), torch.random.fork_rng(devices=forked):
        for b, i in enumerate(range(0, n, batch_size)):
            rows = prompt_ids[i:i + batch_size]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, x in enumerate(rows):  # left padding: every row's new tokens start at column T
                ids[r, T - len(x):], mask[r, T - len(x):] = torch.tensor(x), 1
            torch.manual_seed(_batch_seed(seed, b))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            for row in out[:, T:].tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos) + 1]
                generated.append(row)
    completions = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    src = SurrogateSource(prompt_ids, generated, chosen, completions)
    distinct = list(dict.fromkeys(prompts)) if prompts is not None else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    src.provenance = {
        "kind": "model-generated", "n": n, "start": start,
        "prompts": distinct if distinct is None or len(distinct) <= _MAX_STORED_PROMPTS else None,
        "num_prompts": len(distinct) if distinct is not None else 0,
        "prompts_fingerprint": text_fingerprint(distinct) if distinct is not None else None,
        "temperature": float(temperature), "sampling": "ancestral (top_k off, top_p 1)" if temperature > 0 else "greedy",
        "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size, "base_only": bool(base_only),
        "model": getattr(getattr(base, "config", None), "_name_or_path", None) or type(base).__name__,
        "pad_token_id": pad, "eos_token_id": eos,
        "num_generated_tokens": sum(len(g) for g in generated),
        "num_ended_with_eos": sum(bool(g) and g[-1] == eos for g in generated),
        "text_fingerprint": text_fingerprint(src.texts),
        "token_fingerprint": hashlib.sha256(repr((prompt_ids, generated)).encode()).hexdigest()[:16],
    }
    return src
