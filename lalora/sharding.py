"""LoRA parameters that a data-parallel engine shards: FSDP2 (``fully_shard``: DTensors), DeepSpeed ZeRO-3
(empty outside forward) and FSDP1 (flattened into ``FlatParameter`` shards, refused).

The regularizer needs the full LoRA weights. ``full_value(p)`` returns them differentiably for a DTensor
(``full_tensor()``: an all-gather whose backward hands each rank the shard of the gradient; every rank
computes the same penalty, so each shard gets the penalty gradient); for ZeRO-3 the weights are
gathered with ``deepspeed.zero.GatheredParameters`` (``gathered``) and copied, so the penalty's graph
keeps no reference to a buffer ZeRO-3 releases. Nothing here imports torch.distributed or deepspeed
unless a parameter is sharded by them.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable

import torch
from torch import Tensor


def _dtensor_class():
    """DTensor, if torch.distributed.tensor is loaded (a DTensor exists only then: nothing is imported here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_zero3(p) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or a stage-3 engine)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def is_fsdp1(p) -> bool:
    """A parameter flattened by FSDP1 (``FullyShardedDataParallel``, original or flat parameter)."""
    return bool(getattr(p, "_fsdp_flattened", False))


def sharding_of(params: Iterable[Tensor]) -> str | None:
    """``"fsdp2"``, ``"zero3"``, ``"fsdp1"`` or None (plain tensors, also under DDP)."""
    for p in params:
        if is_dtensor(p):
            return "fsdp2"
        if is_zero3(p):
            return "zero3"
        if is_fsdp1(p):
            return "fsdp1"
    return None


FSDP1_REFUSAL = ("FSDP1 (FullyShardedDataParallel, accelerate fsdp_version=1) flattens the LoRA weights into "
                 "FlatParameter shards, which the penalty cannot read or differentiate per weight; use FSDP2 "
                 "(torch.distributed.fsdp.fully_shard, or accelerate / TrainingArguments fsdp_config "
                 "{'version': 2}), DeepSpeed ZeRO-3, or DDP")


@contextlib.contextmanager
def gathered(params: Iterable[Tensor], *, modify: bool = False):
    """The full values of ZeRO-3 partitioned ``params`` inside the block (all ranks must enter it
    together); with ``modify=True`` what rank 0 writes is kept (every rank writes the same here).
    A no-op for any other parameters."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def full_value(p: Tensor, dtype: torch.dtype) -> Tensor:
    """``p`` unsharded, in ``dtype``, differentiable w.r.t. ``p``. ZeRO-3 parameters: call inside
    ``gathered`` (the value is copied, so it outlives the gathered buffer)."""
    if is_dtensor(p):
        return p.full_tensor().to(dtype)
    if is_zero3(p):
        return p.to(dtype, copy=True)
    return p.to(dtype)


@torch.no_grad()
def copy_full_(p: Tensor, value: Tensor) -> None:
    """Write the full tensor ``value`` (the same on every rank) into ``p``; ZeRO-3: inside
    ``gathered(..., modify=True)``."""
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None))
    else:
        p.copy_(value.to(p.dtype))
