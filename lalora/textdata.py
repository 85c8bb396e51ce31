"""Text into causal-LM batches: right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` where a
token is not labelled). Used by the command line (``lalora fit``, ``finetune``, ``compare`` read records) and
the benchmark; ``tokenizer`` is any Hugging Face tokenizer with a ``pad_token_id``."""
from __future__ import annotations

import torch


def _pad(seqs: list[list[int]], pad_id: int, label_seqs: list[list[int]] | None = None):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(s)] = torch.tensor(label_seqs[i] if label_seqs else s)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Right-padded causal-LM batches; every real token is labelled, padding is ``-100``."""
    enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    enc = [e for e in enc if len(e) >= 2]
    return [_pad(enc[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(enc), batch_size)]


def completion_batches(tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int) -> list[dict]:
    """Right-padded batches of ``prompt + completion``; only completion tokens are labelled."""
    seqs, labs = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        s = (p + c)[:max_length]
        lab = ([-100] * len(p) + c)[:max_length]
        seqs.append(s)
        labs.append(lab)
    return [_pad(seqs[i:i + batch_size], tokenizer.pad_token_id, labs[i:i + batch_size]) for i in range(0, len(seqs), batch_size)]
