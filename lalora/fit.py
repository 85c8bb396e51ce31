"""``fit_precision``: run a curvature backend over source data and build a ``Precision``."""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import base_model_of, find_lora_adapters, lora_parameters, lora_state
from .backend import CurvatureBackend, FitContext, _distributed, make_backend
from .coverage import check_coverage, check_uncovered_mode
from .data import BatchStream, _hash_update, _is_single_batch, source_metadata
from .errors import BackendError, DataError
from .fit_metadata import fit_metadata, model_limits, tokenizer_info
from .losses import resolve_loss
from .others import check_others_mode, check_variants, named_others
from .pergrad import tap_others
from .precision import Precision
from .quantized import cpu_training_path
from .validation import config_hash

logger = logging.getLogger("lalora")


class ZeroCurvatureWarning(UserWarning):
    """Some LoRA matrices got exactly zero curvature (see docs/concepts.md#zero-curvature)."""


@contextmanager
def fitting_mode(model: nn.Module, adapters, others=()):
    """Eval mode (dropout off), no gradient checkpointing, only LoRA weights (and ``others``) require grad;
    everything is restored on exit.

    Gradient checkpointing is switched off through the per-module ``gradient_checkpointing``
    flags that transformers' checkpointing API sets (and its layers read), not through
    ``gradient_checkpointing_disable/enable``: those are deprecated aliases in transformers 5
    (FutureWarning) and re-enabling would lose what the user chose (the checkpoint function
    with its ``gradient_checkpointing_kwargs`` such as ``use_reentrant``, ``every_n_layers``,
    offloading, the input-grad hooks). Flipping the flags and putting them back leaves all
    of that untouched."""
    was_training = model.training
    lora = {id(p) for p in lora_parameters(adapters).values()} | {id(p) for p in others}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    # vars(): the instance attribute itself (peft wrappers forward unknown attributes to the model)
    checkpointing = [(m, m.gradient_checkpointing) for m in base_model_of(model).modules()
                     if isinstance(vars(m).get("gradient_checkpointing"), bool)]
    try:
        model.eval()
        for m, _ in checkpointing:
            m.gradient_checkpointing = False
        for p, _ in saved_flags:
            p.requires_grad_(id(p) in lora)
        with cpu_training_path(model):  # QLoRA on CPU: bitsandbytes' differentiable path (lalora.quantized)
            yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for m, flag in checkpointing:
            m.gradient_checkpointing = flag
        model.train(was_training)


def _warn_if_zero(precision: Precision, adapters) -> None:
    """Log and warn (``ZeroCurvatureWarning``, at fit_precision's caller) about LoRA matrices of zero curvature."""
    zeros = precision.zero_params()
    if not zeros:
        return
    a_names = {a.a_name: a for a in adapters}
    zero_a_with_b0 = [n for n in zeros if n in a_names and not bool(a_names[n].B.detach().any())]
    msg = f"{len(zeros)} of {len(precision.param_names)} LoRA matrices have exactly zero curvature (e.g. {zeros[0]!r})."
    if zero_a_with_b0:
        msg += (" Their lora_B is all zero (peft's default init), so every gradient w.r.t. lora_A vanishes at theta0 "
                "and the penalty leaves lora_A unconstrained. Use LoraConfig(init_lora_weights='orthogonal') "
                "(even rank; model function unchanged), or the effective-weight form of a Kronecker precision, "
                "or a prior_precision > 0.")
    logger.warning("lalora: %s", msg)
    warnings.warn(msg, ZeroCurvatureWarning, stacklevel=4)


class _RankShard:
    """This rank's share of ``data`` (batches ``rank::world_size``) under torch.distributed.
    Every rank walks all batches, so ``fingerprint`` covers the whole data set exactly as a
    single-process ``BatchStream`` would."""

    def __init__(self, data, rank: int, world: int, max_batches: int | None):
        self.data, self.rank, self.world, self.max_batches = data, rank, world, max_batches
        self.fingerprint = None

    @classmethod
    def wrap(cls, data, shard, max_batches):
        if shard not in ("auto", True, False):
            raise ValueError(f"shard={shard!r} is unknown; use 'auto', True or False")
        if not _distributed() or shard is False:
            return None
        if shard == "auto" and isinstance(getattr(data, "sampler", None), torch.utils.data.DistributedSampler):
            return None
        data = [data] if _is_single_batch(data) else data
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        try:
            n = len(data) if max_batches is None else min(len(data), max_batches)
        except TypeError:
            n = None
        if n is not None and n < world:
            raise DataError(f"fit_precision(shard={shard!r}) on {world} ranks needs at least {world} source batches, "
                            f"got {n}: use smaller batches or shard=False")
        return cls(data, rank, world, max_batches)

    def __len__(self):
        n = len(self.data) if self.max_batches is None else min(len(self.data), self.max_batches)
        return max(0, (n - self.rank + self.world - 1) // self.world)

    def __iter__(self):
        h = hashlib.sha256()
        for i, raw in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                break
            _hash_update(h, raw)
            if i % self.world == self.rank:
                yield raw
        self.fingerprint = h.hexdigest()[:16]


def _arguments(fn) -> list[str]:
    import inspect

    return [p for p, v in inspect.signature(fn).parameters.items() if v.kind == v.KEYWORD_ONLY and not p.startswith("_")]


def fit_precision(model: nn.Module, data, backend: str | CurvatureBackend = "diag", *, options=None, loss="auto",
                  progress: bool = True, adapter_name=None, prior_precision: float = 0.0, max_batches: int | None = None,
                  shard: str | bool = "auto", skip_nonfinite: bool = False, checkpoint_dir=None,
                  checkpoint_every: int = 100, tokenizer=None, uncovered: str = "warn", source: dict | None = None,
                  others: str = "diag", _caller: str = "fit_precision", **backend_options) -> Precision:
    """Estimate the source-loss curvature w.r.t. the LoRA weights at their current values (theta0).

    ``data``: DataLoader / iterable of batches, or one batch (HF dict, tensor, ``(x, y)``). ``loss``: "auto",
    "causal_lm", "classification", "mse" or ``fn(output, batch) -> (N,)``. ``backend``: a registered name
    (``lalora.list_backends()``) or a backend instance. ``options``: the backend's options, as its ``Options``
    dataclass (``KFACOptions(curvature="mc")``; ``lalora.get_backend(name).Options``) or a dict
    (``{"curvature": "mc"}``); ``lalora backends`` lists them. (Backend options as keyword arguments of
    ``fit_precision`` still work, with a deprecation warning.) Returns the mean over examples of the per-example
    curvature of each example's summed loss, anchored at the current LoRA weights.

    Under ``torch.distributed`` (``shard``): ``"auto"``/``True`` means every rank passes the same ``data`` and takes
    batches ``rank, rank + world_size, ...`` (``"auto"`` leaves a DataLoader with a ``DistributedSampler`` alone);
    ``False`` means each rank passes its own part. Sums and counts are all-reduced; with sharding the result (tensors
    and metadata, timing aside) is identical to a single-process run on the same data.

    Robustness (docs/robustness.md): a batch with a non-finite loss or gradient raises a ``DataError`` naming it, or
    with ``skip_nonfinite=True`` is left out (``metadata["skipped_nonfinite"]``). ``checkpoint_dir``: save the
    backend's partial sums every ``checkpoint_every`` batches and resume from them when called again after an
    interruption (backends implementing ``state_dict``/``load_state_dict``: ``diag``, ``kfac``, ``tri-kfac``); the
    file is deleted when the fit completes. ``tokenizer``: its name and size are stored in the metadata and checked
    against the model's vocabulary. Sequences longer than the model's ``max_position_embeddings`` and token ids
    outside its vocabulary raise ``DataError``.

    Coverage (docs/concepts.md#coverage): the precision covers the LoRA weights of the selected adapters (LoRA on
    embeddings only with backends that model it: ``diag``, ``kfac``, ``tri-kfac``). Every other parameter that
    requires grad when ``fit_precision`` is called (LoRA on embeddings with other backends, ``modules_to_save``
    copies, other adapters, unfrozen base weights) would train without the penalty: ``uncovered="warn"`` (default)
    warns with an ``UncoveredParameterWarning`` naming them, ``"error"`` raises ``UncoveredParameterError``,
    ``"ignore"`` says nothing. ``others="diag"`` (default; ``"none"``: left out) covers the other trainable tensors
    (``modules_to_save``, DoRA magnitudes, biases, ...) with their per-example EF diagonal (docs/variants.md).

    ``source``: where the source data came from (a JSON-able dict, e.g. ``SurrogateSource.provenance`` of
    ``lalora.surrogate.generate_source``), stored as ``metadata["source"]``.
    """
    instance, source = _checked_args(backend, options, backend_options, prior_precision, skip_nonfinite, uncovered,
                                     others, source, _caller)
    adapters = instance.select_adapters(find_lora_adapters(model, adapter_name))
    extra, anchor = _covered(model, instance, adapters, others, uncovered, _caller)
    base = base_model_of(model)
    sharded, stream, vocab_size = _open_stream(data, shard, max_batches, loss, adapters, progress, instance, base)
    tok_info = tokenizer_info(tokenizer, vocab_size)
    ctx = FitContext(model=model, adapters=adapters, stream=stream, device=adapters[0].A.device,
                     skip_nonfinite=bool(skip_nonfinite), others=extra)
    tap = tap_others(ctx, instance, checkpoint_dir, _caller)
    checkpointer = None if checkpoint_dir is None else _checkpointer(
        checkpoint_dir, checkpoint_every, instance, ctx, anchor, loss, max_batches, skip_nonfinite)
    started = datetime.datetime.now(datetime.timezone.utc)
    with fitting_mode(model, adapters, extra.values()):
        blocks = [*instance.fit(ctx), *(tap.blocks(ctx) if tap is not None else [])]  # the tap's after the fit's
    blocks, anchor = _owned(blocks, anchor, ctx)  # shard_factors: this rank's part (before the metadata is read)
    metadata = fit_metadata(instance, ctx, sharded, base, started, vocab_size, tok_info, checkpointer, source)
    precision = Precision(blocks, anchor, metadata=metadata, prior_precision=prior_precision)
    _finish(checkpointer, precision, adapters)
    return precision


def _covered(model, instance, adapters, others: str, uncovered: str, caller: str) -> tuple[dict, dict]:
    """The other trainable tensors the fit covers (``others="diag"``) and the anchor (theta0) of everything covered,
    after the variant and coverage checks; read before ``fitting_mode`` sets requires_grad, so that what the user
    trains is what is checked."""
    check_variants(instance, adapters, caller)
    extra = named_others(model, adapters) if others == "diag" else {}
    check_coverage(model, [*lora_parameters(adapters).values(), *extra.values()], uncovered, caller=caller)
    return extra, {**lora_state(adapters), **{n: p.detach().float().clone() for n, p in extra.items()}}


def _finish(checkpointer, precision: Precision, adapters) -> None:
    """After a fit: its checkpoint file is deleted, and zero curvature is reported."""
    if checkpointer is not None:
        checkpointer.finish()
    _warn_if_zero(precision, adapters)


def _open_stream(data, shard, max_batches, loss, adapters, progress, instance, base):
    """(this rank's part of ``data`` or None, the ``BatchStream`` the backend reads, the model's vocabulary size)."""
    vocab_size, max_positions = model_limits(base)
    sharded = _RankShard.wrap(data, shard, max_batches)
    stream = BatchStream(data if sharded is None else sharded, resolve_loss(loss), adapters[0].A.device,
                         progress=progress, desc=f"lalora fit [{instance.name}]", max_positions=max_positions,
                         max_batches=None if sharded else max_batches, vocab_size=vocab_size)
    return sharded, stream, vocab_size


def _owned(blocks: list, anchor: dict, ctx: FitContext) -> tuple[list, dict]:
    """The blocks this rank returns and their anchor: all of them, or with ``shard_factors`` the LoRA blocks it owns,
    plus (on rank 0 only) the other tensors' diagonals, which every rank computes alike; the owners map (the
    sharded file's index) then names every covered tensor."""
    shard = ctx.metadata.get("factor_shard")
    if shard is None:
        return blocks, anchor
    owners = shard["owners"]
    owners.update({n: 0 for n in anchor if n not in owners})  # the other tensors: rank 0
    mine = {n for n in anchor if owners[n] == shard["rank"]}
    return ([b for b in blocks if set(b.params) <= mine], {n: t for n, t in anchor.items() if n in mine})


def _checked_args(backend, options, backend_options, prior_precision, skip_nonfinite, uncovered, others, source,
                  caller):
    """``fit_precision``'s backend instance and source provenance, after the checks of its arguments that need no
    model."""
    instance = make_backend(backend, options, backend_options, caller="fit_precision", caller_args=_arguments(fit_precision))
    if prior_precision < 0:
        raise ValueError(f"prior_precision must be >= 0, got {prior_precision}")
    check_uncovered_mode(uncovered, caller)
    check_others_mode(others, caller)
    if skip_nonfinite and not instance.supports_skip_nonfinite:
        raise BackendError(f"backend {instance.name!r} does not support skip_nonfinite=True "
                           "(it does not handle skipped batches); drop the option")
    return instance, source_metadata(source, caller)


def _checkpointer(checkpoint_dir, checkpoint_every, instance, ctx: FitContext, anchor, loss, max_batches, skip_nonfinite):
    """The fit's ``Checkpointer`` on ``ctx``, resumed from ``checkpoint_dir`` if it holds this fit's partial sums."""
    from .checkpoint import Checkpointer, _anchor_hash

    identity = {"backend": instance.name, "backend_options": json.loads(json.dumps(instance.options.to_dict(), default=str)),
                "config_hash": config_hash(ctx.model), "anchor": _anchor_hash(anchor),
                "loss": loss if isinstance(loss, str) else getattr(loss, "__qualname__", type(loss).__name__),
                "max_batches": max_batches, "skip_nonfinite": bool(skip_nonfinite)}
    rank = torch.distributed.get_rank() if _distributed() else None
    checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, instance, ctx.stream, identity=identity, rank=rank)
    if checkpointer.resume(instance):
        logger.info("lalora: resuming the fit from %s after %d batches", checkpointer.path, checkpointer.resumed_from)
    ctx.checkpointer = checkpointer
    return checkpointer

