"""Bytes of the curvature tensors a precision stores (``CurvatureBackend.stored_bytes``), from the LoRA shapes
alone: the formulas the built-in backends share (float32 values, the anchor not counted)."""
from __future__ import annotations


def factor_floats(n: int, max_rank: int | None = None) -> int:
    """Floats stored for one ``n x n`` Kronecker factor (dense, or low-rank k + diagonal when ``n > k``)."""
    return n * n if max_rank is None or n <= max_rank else n * max_rank + max_rank + n


def diagonal_bytes(adapters) -> int:
    """One float32 per LoRA weight and DoRA magnitude (``lalora.estimate`` adds the other tensors' diagonals)."""
    return 4 * sum(a.A.numel() + a.B.numel() + (a.magnitude.numel() if a.magnitude is not None else 0)
                   for a in adapters)


def kronecker_bytes(adapters, max_rank: int | None = None) -> int:
    """Per adapter the layer factors X (d_in x d_in) and G (d_out x d_out) in float32, dense or (``max_rank``
    k < side n) as k eigenpairs + diagonal: ``n k + k + n`` floats. LoRA on an embedding: X is diagonal (one-hot
    inputs: token frequencies), ``d_in`` floats."""
    return 4 * sum((a.A.shape[1] if a.embedding else factor_floats(a.A.shape[1], max_rank))
                   + factor_floats(a.B.shape[0], max_rank) for a in adapters)
