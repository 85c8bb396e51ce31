"""The fit of the ``kfac``/``tri-kfac`` backends (backends/kfac.py): one pass over the data per group of
adapters (``max_memory``, planned in backends/kfac_passes.py), each group's factors finished before the
next pass; all-reduced, or reduced to each adapter's owning rank (``shard_factors``). The factor sums live
on each layer's own device (a model spread over devices, ``device_map="auto"``) until the finished
block moves to the CPU."""
from __future__ import annotations

import torch

from lalora.backend import FitContext, _distributed
from lalora.errors import BackendError
from lalora.sampling import mc_generator

from .kfac_embedding import AllFactorHooks, finish_input_factor, input_sum_shape
from .kfac_factors import FactorHooks
from .kfac_gram import finish_factor
from .kfac_passes import (SUM_DTYPES, HeldBytes, check_passes, check_replay, plan_groups, plan_owners, reduce_to,
                          replay_stream)


def fit_kfac(backend, ctx: FitContext, flush_every: int):
    """``KFACBackend.fit``: the factor blocks, in one or (``max_memory``) several passes over the data, all-reduced
    or (``shard_factors``) reduced to their owning ranks."""
    for a in ctx.adapters:
        if a.scaling == 0:
            raise BackendError(f"adapter {a.key!r} has LoRA scaling 0: its output gradient cannot be recovered")
    groups = plan_groups(backend, ctx.adapters)  # max_memory: one pass over the data per group
    check_passes(backend, ctx, len(groups))
    sharded = bool(backend.options["shard_factors"]) and _distributed()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if sharded else (0, 1)
    owners = plan_owners(ctx.adapters, world) if sharded else None
    held, blocks, n_examples = HeldBytes(), {}, 0
    for i, group in enumerate(groups):
        stream = ctx.stream if i == 0 else replay_stream(ctx.stream, i, len(groups))
        hooks, sums = _accumulate(backend, ctx, group, stream, held, len(groups) == 1, flush_every)
        if i == 0:
            n_examples = ctx.global_num_examples()
        else:
            check_replay(ctx.stream, stream, i)
        for a in group:  # each group's sums are freed before the next pass
            owner = None if owners is None else owners[a.key]
            block = _finish(backend, ctx, a, hooks, sums, n_examples, held, owner, rank)
            if block is not None:
                blocks[a.key] = block
    ctx.metadata.update({"kfac_approx": backend.options["kfac_approx"], "kfac_passes": len(groups),
                         "accumulator_peak_bytes": held.peak})
    if owners is not None:
        by_param = {n: owners[a.key] for a in ctx.adapters for n in (a.a_name, a.b_name)}
        ctx.metadata["factor_shard"] = {"rank": rank, "world_size": world, "owners": by_param}
    return [blocks[a.key] for a in ctx.adapters if a.key in blocks]


def _accumulate(backend, ctx: FitContext, group, stream, held: HeldBytes, restore: bool, flush_every: int):
    """One pass over ``stream`` summing the factors of the adapters in ``group``; the MC generator starts
    from ``seed`` in every pass (the same labels each time)."""
    sums = {a.key: {} for a in group}  # per adapter (several adapters on one layer: one entry each)
    gen = mc_generator(backend.options["seed"])  # the fit's MC labels (lalora.sampling)
    if restore:
        backend._restore(group, sums, gen, ctx.device)
    backend._sums, backend._gen = sums, gen  # read by state_dict() at each checkpoint
    window = 1 if ctx.skip_nonfinite else flush_every
    sum_dtype = SUM_DTYPES[backend.options["sum_dtype"]]
    backend._hooks = hooks = AllFactorHooks(group, backend.options["kfac_approx"], sums, sum_dtype, window, ctx.device)
    tensors = list(ctx.params().values())
    try:
        with hooks:
            for batch in stream:
                backend._one_batch(ctx, hooks, batch, tensors, gen)
                held.sample(hooks, sums)
    finally:
        backend._hooks = None
    return hooks, sums


def _finish(backend, ctx: FitContext, a, hooks: FactorHooks, sums: dict, n_examples: int, held: HeldBytes,
            owner: int | None, rank: int):
    """Adapter ``a``'s block from its sums: all-reduced, or (``owner``) reduced to the owning rank only
    (None on the other ranks). The accumulators stay on the layer's own device until the block moves
    to the CPU."""
    d_out, device = a.B.shape[0], a.A.device
    sum_dtype = SUM_DTYPES[backend.options["sum_dtype"]]
    X, G = hooks.take(a.key, "X"), hooks.take(a.key, "G")
    X = torch.zeros(input_sum_shape(a), device=device) if X is None else X
    G = torch.zeros(d_out, d_out, device=device) if G is None else G
    T = sums.pop(a.key, {}).get("T")  # free each adapter's running sums once its factors are built
    T = float(ctx.all_reduce(torch.zeros((), dtype=sum_dtype, device=device) if T is None else T).reshape(1))
    if owner is None:
        X, G = ctx.all_reduce(X), ctx.all_reduce(G)
    else:
        X, G = reduce_to(X, owner, rank), reduce_to(G, owner, rank)
    if T == 0:
        raise BackendError(f"adapter {a.key!r} saw no token of a counted example during the fit "
                           "(is the adapted layer used in the forward pass?)")
    if X is None:  # another rank owns this adapter's factors
        return None
    held.sample(hooks, sums, X, G)
    X, G = finish_input_factor(a, X, T), finish_factor(G, 1.0 / (n_examples * backend._samples_per_batch()))
    block = backend.block_class((a.a_name, a.b_name), X, G, a.scaling)  # theta0: the Precision's anchor
    if backend.options["max_rank"] is not None:  # on the layer's device, before the copy to CPU
        block = block.compressed(backend.options["max_rank"], seed=int(backend.options["seed"]))
    return block.to("cpu")
