"""What ``fit_precision`` records about a fit (``Precision.metadata``): counts summed over ranks, the data's
fingerprint, the model's limits and tokenizer, provenance. Split out of ``lalora/fit.py`` to keep it readable."""
from __future__ import annotations

import datetime
import hashlib

import torch

from .adapters import lora_config_summary
from .backend import FitContext, _distributed
from .data import BatchStream
from .errors import DataError
from .options import curvature_name
from .validation import config_hash


def fit_metadata(instance, ctx: FitContext, sharded, base, started, vocab_size, tokenizer_info, checkpointer,
                 source) -> dict:
    """A precision's metadata right after its fit, with docs/robustness.md's (non-finite batches of all ranks...)."""
    from .version import __version__

    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    model, adapters, stream = ctx.model, ctx.adapters, ctx.stream
    counts = reduce_counts(ctx, stream, sharded)
    n_nonfinite = len(stream.skipped_nonfinite)
    if _distributed():
        n_nonfinite = int(ctx.all_reduce(torch.tensor([float(n_nonfinite)], dtype=torch.float64)).item())
    robustness = {"skipped_nonfinite": n_nonfinite, "vocab_size": vocab_size}
    if n_nonfinite:
        robustness["skipped_nonfinite_batches"] = list(stream.skipped_nonfinite)
    if tokenizer_info is not None:
        robustness["tokenizer"] = tokenizer_info
    if checkpointer is not None:
        robustness["resumed_from_batch"] = checkpointer.resumed_from
    return {
        "backend": instance.name,
        "backend_options": instance.options.to_dict(),
        "curvature": curvature_name(instance.curvature_kind()),
        "loss": stream.loss.name if stream.loss is not None else None,
        "num_examples": counts["num_examples"],
        "num_tokens": counts["num_tokens"],
        "num_batches": counts["num_batches"],
        "skipped_examples": counts["skipped_examples"],
        "data_fingerprint": counts["data_fingerprint"],
        "base_model": getattr(getattr(base, "config", None), "_name_or_path", None) or type(base).__name__,
        "config_hash": config_hash(model),
        "lora_config": lora_config_summary(model, adapters),
        "adapters": {a.key:
                     {"adapter_name": a.adapter_name, "scaling": a.scaling, "rank": a.rank} for a in adapters},
        "dtype": str(adapters[0].A.dtype).replace("torch.", ""),
        "lalora_version": __version__,
        "created": started.isoformat(timespec="seconds"),
        "fit_seconds": round(elapsed, 3),
        **robustness,
        **ctx.metadata,
        **({"source": source} if source is not None else {}),
    }


def reduce_counts(ctx: FitContext, stream: BatchStream, sharded) -> dict:
    """The stream's counts summed over ranks, and the data fingerprint of all ranks' data."""
    keys = ("num_examples", "num_tokens", "num_batches", "skipped_examples")
    counts = {k: getattr(stream, k) for k in keys}
    counts["data_fingerprint"] = stream.fingerprint
    if not _distributed():
        return counts
    t = ctx.all_reduce(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64))
    counts.update({k: int(v) for k, v in zip(keys, t.tolist())})
    if sharded is not None:
        counts["data_fingerprint"] = sharded.fingerprint
    else:
        prints = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(prints, stream.fingerprint)
        counts["data_fingerprint"] = hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]
    return counts


def model_limits(base) -> tuple[int | None, int | None]:
    """(vocabulary size of the input embeddings, max_position_embeddings) when the model has them."""
    vocab = None
    get_emb = getattr(base, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
            vocab = int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None
        except (NotImplementedError, AttributeError):
            vocab = None
    pos = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    return vocab, (int(pos) if isinstance(pos, int) and pos > 0 else None)


def tokenizer_info(tokenizer, vocab_size: int | None) -> dict | None:
    """{"name", "size"} of a HF tokenizer; refuses one with more tokens than the model embeds."""
    if tokenizer is None:
        return None
    size = len(tokenizer)
    if vocab_size is not None and size > vocab_size:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has {size} tokens but the model embeds "
                        f"only {vocab_size}: they do not belong together")
    return {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__, "size": size}
