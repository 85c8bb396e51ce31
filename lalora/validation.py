"""Check a precision against a model: parameter names, shapes, base model config."""
from __future__ import annotations

import hashlib
import json
import warnings

from .adapters import base_model_of, find_lora_adapters, lora_param_shapes
from .errors import ModelMismatchError

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                         "_attn_implementation", "_attn_implementation_autoset", "use_cache", "output_hidden_states",
                         "output_attentions", "return_dict", "quantization_config", "_commit_hash"}


def config_hash(model) -> str | None:
    """SHA-256 (16 hex) of the base model's config without run-time-only fields; None if no config."""
    cfg = getattr(base_model_of(model), "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def match_to_model(precision, model, *, strict: bool = True, adapter_name=None):
    """Return ``precision`` checked against ``model`` (strict) or restricted to what matches."""
    from .precision import Precision

    shapes = lora_param_shapes(find_lora_adapters(model, adapter_name))
    problems: list[str] = []
    want_hash, have_hash = precision.metadata.get("config_hash"), config_hash(model)
    if want_hash and have_hash and want_hash != have_hash:
        problems.append(f"base model config hash {have_hash} != the precision's {want_hash} "
                        f"(fitted on {precision.metadata.get('base_model', 'another model')!r})")
    bad = []
    for name, shape in precision.shapes.items():
        if name not in shapes:
            bad.append(name)
            problems.append(f"parameter {name!r} is not a LoRA weight of the model")
        elif tuple(shapes[name]) != tuple(shape):
            bad.append(name)
            problems.append(f"parameter {name!r}: model shape {tuple(shapes[name])} != precision shape {tuple(shape)}")
    extra = [n for n in shapes if n not in precision.shapes]
    for n in extra:
        problems.append(f"model LoRA weight {n!r} is not in the precision")
    if not problems:
        return precision
    if strict:
        raise ModelMismatchError(f"precision does not match the model: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                 + "; pass strict=False to keep what matches")
    keep = [n for n in precision.param_names if n not in bad]
    blocks = [b for b in precision.blocks if all(p in keep for p in b.params)]
    dropped = sorted({p for b in precision.blocks if b not in blocks for p in b.params} | set(bad))
    meta = dict(precision.metadata, skipped_params=dropped, unconstrained_params=extra)
    warnings.warn(f"lalora: precision applied partially: {len(dropped)} precision parameters skipped, "
                  f"{len(extra)} model LoRA weights unconstrained ({problems[0]})", stacklevel=3)
    anchor = {n: precision.anchor[n] for n in keep if n not in dropped}
    return Precision(blocks, anchor, metadata=meta, prior_precision=precision.prior_precision)
