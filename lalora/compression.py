"""``compress``: store the Kronecker factors of a precision as low-rank plus diagonal (for scale).

    small = lalora.compress(precision, max_rank=256)

Every ``kfac``/``tri-kfac`` factor wider than ``max_rank`` becomes its top-``max_rank``
eigenpairs plus a diagonal remainder that keeps the factor's diagonal exactly
(``lalora.blocks.factors.lowrank_plus_diag``); narrower factors and other block kinds are
unchanged (``Block.compressed``). The same happens inside a fit with the backends' ``max_rank=`` option.
"""
from __future__ import annotations

from .blocks.factors import check_max_rank
from .precision import Precision


def compress(precision: Precision, max_rank: int, *, seed: int = 0) -> Precision:
    """A new ``Precision`` whose Kronecker factors wider than ``max_rank`` are low-rank + diagonal.

    ``seed`` fixes the random start of the subspace iteration (the result is deterministic).
    ``metadata["compression"]`` records ``max_rank``, ``seed`` and the bytes before and after.
    """
    if not isinstance(precision, Precision):
        raise TypeError(f"compress expects a lalora.Precision, got {type(precision).__name__}")
    max_rank = check_max_rank(max_rank)
    blocks = [b.compressed(max_rank, seed=seed) for b in precision.blocks]
    meta = dict(precision.metadata)
    meta["compression"] = {"max_rank": max_rank, "seed": int(seed), "bytes_before": precision.num_bytes,
                           "bytes_after": sum(b.num_bytes for b in blocks)}
    return Precision(blocks, precision.anchor, metadata=meta, prior_precision=precision.prior_precision,
                     validate=False)
