"""How a ``kfac``/``tri-kfac`` fit (backends/kfac.py) is laid out in memory and over ranks (docs/scale.md).

- **Bounded memory** (``max_memory``): the factor sums of every adapter are planned with the backend's own
  ``accumulator_bytes`` (running sums in ``sum_dtype`` + float32 window sums); when they exceed the budget,
  the adapters are split into consecutive groups that each fit, and the data is walked once per group
  (``plan_groups``). Every pass starts the MC generator from the same ``seed`` and sees the same batches
  in the same order, so it draws the same labels (``lalora.sampling``: one CPU generator, consumed per
  output row and batch, whatever factors are being summed); a pass whose data differ (a shuffled loader)
  is refused (``replay_stream``). Each group's factors are finished (and moved to the CPU) before the next
  pass, so the device holds one group's sums at a time.
- **Sharded factors** (``shard_factors``): under ``torch.distributed`` each adapter's sums are reduced to
  one owning rank (``plan_owners``: largest first to the least loaded rank) instead of all-reduced;
  only the owner finishes (and compresses) the factors and keeps the block.
- **Measured peak** (``HeldBytes``): the bytes of the factor tensors alive (window sums, running sums, the
  factor being finished), sampled after every batch and every finished adapter; recorded in the
  precision's metadata as ``accumulator_peak_bytes``.
"""
from __future__ import annotations

import torch

from lalora.data import BatchStream
from lalora.errors import BackendError, DataError
from lalora.option_types import parse_bytes, plan_groups as consecutive_groups

SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
def check_max_memory(value, where: str) -> None:
    """The ``check`` of the ``max_memory`` option (``None``: unbounded)."""
    if value is not None:
        parse_bytes(value, where)


def plan_groups(backend, adapters) -> list[list]:
    """Consecutive groups of ``adapters`` whose factor sums (``accumulator_bytes``) each fit ``max_memory``;
    one group when unbounded or when everything fits (``lalora.estimate_memory.plan_groups``, which the
    ``--dry-run`` estimate uses too)."""
    text = backend.options["max_memory"]
    if text is None:
        return [list(adapters)]
    budget = parse_bytes(text)
    cls, opts = type(backend), backend.options
    need = lambda a: cls.accumulator_bytes([a], opts)  # noqa: E731
    for a in adapters:
        if need(a) > budget:
            raise BackendError(f"max_memory={text!r} ({budget:,} bytes) is below the factor sums of adapter {a.key!r} "
                               f"alone ({need(a):,} bytes, sum_dtype={opts['sum_dtype']}): raise max_memory to at least "
                               f"{need(a):,} bytes, or use sum_dtype='float32'")
    return consecutive_groups(adapters, need, budget)


def _one_shot(data) -> bool:
    """Whether iterating ``data`` consumes it (an iterator or generator; a rank's share of one)."""
    inner = getattr(data, "data", None) if type(data).__name__ == "_RankShard" else None
    return _one_shot(inner) if inner is not None else iter(data) is data


def check_passes(backend, ctx, n_groups: int) -> None:
    """Refuse what several passes cannot do, naming the option, before any batch is read."""
    if n_groups == 1:
        return
    text = backend.options["max_memory"]
    head = f"max_memory={text!r} needs {n_groups} passes over the source data"
    if _one_shot(ctx.stream.data):
        raise BackendError(f"{head}, but the data is a one-shot iterator: pass a re-iterable source (a list of "
                           "batches or a DataLoader without shuffling), or raise max_memory")
    if ctx.skip_nonfinite:
        raise BackendError(f"{head}; skip_nonfinite=True is not supported with several passes (a batch skipped in "
                           "one pass must be skipped in all): drop skip_nonfinite or raise max_memory")
    if ctx.checkpointer is not None:
        raise BackendError(f"{head}; checkpoint_dir= is not supported with several passes: drop checkpoint_dir or "
                           "raise max_memory")


def replay_stream(stream: BatchStream, index: int, total: int) -> BatchStream:
    """A new stream over the same data for pass ``index`` (0-based, > 0) of ``total``."""
    return BatchStream(stream.data, stream.loss, stream.device, progress=stream.progress,
                       desc=f"{stream.desc} pass {index + 1}/{total}", max_batches=stream.max_batches,
                       max_positions=stream.max_positions, vocab_size=stream.vocab_size)


def check_replay(first: BatchStream, again: BatchStream, index: int) -> None:
    """A later pass must have seen exactly the batches of the first (same fingerprint and counts)."""
    if again.fingerprint != first.fingerprint or again.num_examples != first.num_examples:
        raise DataError(f"the source data changed between passes 1 and {index + 1} of a max_memory fit "
                        f"(fingerprint {first.fingerprint} -> {again.fingerprint}): pass data that yields the same "
                        "batches in the same order every time it is iterated (no shuffling), or raise max_memory")


def plan_owners(adapters, world: int) -> dict[str, int]:
    """Owning rank of each adapter's factors, balanced by size: largest first (``d_in^2 + d_out^2``, ties
    in adapter order) to the rank with the fewest entries so far (ties: the lowest rank)."""
    load = [0] * world
    owners = {}
    sizes = [(a.A.shape[1] ** 2 + a.B.shape[0] ** 2, i, a.key) for i, a in enumerate(adapters)]
    for size, _, key in sorted(sizes, key=lambda s: (-s[0], s[1])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += size
    return owners


def _collective_device():
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_to(tensor: torch.Tensor, owner: int, rank: int):
    """Sum of ``tensor`` over ranks on rank ``owner`` (a collective: every rank calls it); None elsewhere."""
    t = tensor.to(_collective_device())
    torch.distributed.reduce(t, dst=owner)
    return t.to(tensor.device) if rank == owner else None


class HeldBytes:
    """The peak bytes of the factor tensors alive during a fit (see the module docstring)."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def _bytes(tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def sample(self, hooks, sums, *extra) -> None:
        tensors = [*hooks.acc_G.values(), *hooks.acc_X.values(), *(t for s in sums.values() for t in s.values()),
                   *(t for t in extra if t is not None)]
        self.peak = max(self.peak, self._bytes(tensors))
