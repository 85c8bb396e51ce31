"""Check a precision against a model: parameter names, shapes, base model config; and
``clip_negative_eigenvalues`` for backends whose dense curvature carries round-off.

Works on any precision-like object (``anchor``, ``blocks``, ``shapes``, ``metadata``): ``lalora.precision``
imports this module (``Precision.load(path, model)``), never the other way."""
from __future__ import annotations

import hashlib
import json
import warnings

from .adapters import base_model_of, find_lora_adapters, lora_param_shapes
from .errors import ModelMismatchError
from .others import resolve_others

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


def _vocab_size(model) -> int | None:
    get_emb = getattr(base_model_of(model), "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except (NotImplementedError, AttributeError):
        return None
    return int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None


def _shape_problem(name: str, have: tuple, want: tuple) -> str:
    msg = f"parameter {name!r}: model shape {have} != precision shape {want}"
    rank_dim = 0 if ".lora_A" in name else 1 if ".lora_B" in name else None
    if rank_dim is not None and len(have) == len(want) == 2 and have[1 - rank_dim] == want[1 - rank_dim]:
        msg += f" (LoRA rank {have[rank_dim]} in the model, {want[rank_dim]} in the precision)"
    return msg


def match_to_model(precision, model, *, strict: bool = True, adapter_name=None, tokenizer=None):
    """Return ``precision`` checked against ``model`` (strict) or restricted to what matches.

    Checks the base-model config hash, the vocabulary size (and ``tokenizer``'s name and size
    when given and recorded at fit time), and every LoRA matrix's name and shape (rank,
    target set, adapter selection). ``strict=True`` raises ``ModelMismatchError`` naming the
    first problem; ``strict=False`` keeps the blocks whose parameters all match, warns, and
    records ``skipped_params``, ``unconstrained_params`` and ``mismatch_problems`` in the metadata.
    """
    adapters = find_lora_adapters(model, adapter_name)
    shapes = lora_param_shapes(adapters)
    # tensors beside the LoRA matrices (fit_precision(others="diag")) are found by canonical name
    others = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in resolve_others(model, adapters, precision.param_names).items()}
    model_level = _model_problems(precision.metadata, model, tokenizer)
    problems = list(model_level)
    bad = _param_problems(precision, adapters, shapes, problems, others)
    if not problems:
        return precision
    if strict:
        # strict=False drops mismatched parameters; it cannot make a precision of another base model or
        # tokenizer fit (the regularizer refuses it again), so it is suggested only for parameter problems
        hint = ("; pass strict=False to keep what matches" if not model_level
                else "; refit the precision on this model (strict=False cannot make a precision fitted on another "
                     "base model or tokenizer fit it)")
        raise ModelMismatchError(f"precision does not match the model: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + hint)
    restricted = _without(precision, bad)
    unconstrained = [n for n in shapes if n not in restricted.anchor]
    skipped = sorted(set(precision.param_names) - set(restricted.param_names))
    restricted.metadata.update(skipped_params=skipped, unconstrained_params=unconstrained, mismatch_problems=problems)
    warnings.warn(f"lalora: precision applied partially: {len(skipped)} precision parameters skipped, "
                  f"{len(unconstrained)} model LoRA weights unconstrained ({problems[0]})", stacklevel=3)
    return restricted


def _model_problems(meta: dict, model, tokenizer) -> list[str]:
    """What differs between the model (and ``tokenizer``) and the one the precision was fitted on."""
    problems = []
    want_vocab, have_vocab = meta.get("vocab_size"), _vocab_size(model)
    if isinstance(want_vocab, int) and have_vocab is not None and want_vocab != have_vocab:
        problems.append(f"the model embeds {have_vocab} tokens, the precision was fitted with {want_vocab} "
                        "(another tokenizer or resized embeddings)")
    want_hash, have_hash = meta.get("config_hash"), config_hash(model)
    if want_hash and have_hash and want_hash != have_hash:
        problems.append(f"base model config hash {have_hash} != the precision's {want_hash} "
                        f"(fitted on {meta.get('base_model', 'another model')!r})")
    fitted_tok = meta.get("tokenizer")
    if tokenizer is not None and isinstance(fitted_tok, dict):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if fitted_tok.get("size") != len(tokenizer) or fitted_tok.get("name") != name:
            problems.append(f"tokenizer {name!r} ({len(tokenizer)} tokens) differs from the one the precision was "
                            f"fitted with ({fitted_tok.get('name')!r}, {fitted_tok.get('size')} tokens)")
    return problems


def _param_problems(precision, adapters, shapes: dict, problems: list[str], others: dict | None = None) -> list[str]:
    """Append to ``problems`` every precision parameter the model lacks or has in another shape, and every model
    LoRA weight the precision leaves out; return the precision's parameters at fault."""
    meta = precision.metadata
    bad = []
    known = {**(others or {}), **shapes}
    for name, shape in precision.shapes.items():
        if name not in known:
            bad.append(name)
            problems.append(f"parameter {name!r} is not a LoRA weight of the model")
        elif tuple(known[name]) != tuple(shape):
            bad.append(name)
            problems.append(_shape_problem(name, tuple(known[name]), tuple(shape)))
    if bad and any(n not in shapes for n in bad):
        fitted = sorted({v.get("adapter_name") for v in (meta.get("adapters") or {}).values()
                         if isinstance(v, dict) and v.get("adapter_name")})
        model_names = sorted({a.adapter_name for a in adapters})
        if fitted and fitted != model_names:
            problems[problems.index(next(p for p in problems if "is not a LoRA weight" in p))] += (
                f" (precision fitted on adapter(s) {fitted}, the model's selected adapter(s) are {model_names}; "
                "choose one with adapter_name=...)")
    # weights a strict=False mapping already declared unconstrained are not a mismatch again
    accepted = set(meta.get("unconstrained_params") or []) if isinstance(meta.get("unconstrained_params"), list) else set()
    # LoRA on embeddings left out by a backend that does not model it is uncovered (lalora.coverage), not a mismatch
    accepted |= {n for a in adapters if a.embedding for n in (a.a_name, a.b_name)}
    for n in shapes:
        if n not in precision.shapes and n not in accepted:
            problems.append(f"model LoRA weight {n!r} is not in the precision")
    return bad


def _without(precision, bad: list[str]):
    """``precision`` without the parameters ``bad`` and every block touching one of them; a parameter of a
    dropped block goes too (its curvature would be incomplete), which may drop further (overlapping) blocks.
    A restriction of a valid precision: built without validating the blocks again."""
    dropped = set(bad)
    while True:
        gone = {p for b in precision.blocks if dropped.intersection(b.params) for p in b.params} | dropped
        if gone == dropped:
            break
        dropped = gone
    blocks = [b for b in precision.blocks if not dropped.intersection(b.params)]
    anchor = {n: t for n, t in precision.anchor.items() if n not in dropped}
    return type(precision)(blocks, anchor, metadata=dict(precision.metadata), prior_precision=precision.prior_precision,
                           validate=False)


def clip_negative_eigenvalues(matrix, name: str, *, rtol: float = 1e-5):
    """Symmetric PSD version of ``matrix`` (n, n): negative eigenvalues from round-off set to 0.

    Returns ``(clipped, report)``; ``clipped`` has ``matrix``'s dtype (computed in float64),
    ``report`` is ``{"name", "num_clipped", "min_eigenvalue", "max_eigenvalue"}`` for a
    backend's ``ctx.metadata["clipped_eigenvalues"]``. A negative eigenvalue larger than
    ``rtol * max|eigenvalue|`` is not round-off and raises ``ValueError`` naming ``name``.
    """
    import torch

    m = matrix.detach().double()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name}: matrix has NaN or Inf entries")
    m = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(m)
    scale = float(evals.abs().max()) if evals.numel() else 0.0
    lo = float(evals.min()) if evals.numel() else 0.0
    report = {"name": name, "num_clipped": int((evals < 0).sum()), "min_eigenvalue": lo,
              "max_eigenvalue": float(evals.max()) if evals.numel() else 0.0}
    if lo < -rtol * scale:
        raise ValueError(f"{name}: eigenvalue {lo:.3g} is negative beyond round-off (largest |eigenvalue| {scale:.3g}); "
                         "the curvature is not PSD, which points to a bug in the backend")
    if report["num_clipped"] == 0:
        return matrix, report
    clipped = (evecs * evals.clamp_min(0)) @ evecs.T
    return (0.5 * (clipped + clipped.T)).to(matrix.dtype), report
