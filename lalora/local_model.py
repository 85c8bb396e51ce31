"""Loading a local causal LM + tokenizer directory (``save_pretrained`` layout) with clear errors."""
from __future__ import annotations

from pathlib import Path

from .errors import LaloraError


def load_model(path, dtype: str = "float32"):
    """``(model, tokenizer)`` from a local directory; the tokenizer is None when the directory has none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise LaloraError(f"--model {path}: no such directory")
    if not (p / "config.json").is_file():
        raise LaloraError(f"--model {path}: not a model directory (no config.json); save one with save_pretrained")
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise LaloraError(f"--dtype {dtype!r} is not a torch dtype") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise LaloraError(f"--model {path}: could not load the model ({e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok
