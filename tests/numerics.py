"""Tolerances for comparing two evaluations of the same quantity in the tests.

Bitwise equality (``torch.equal``) is asserted only for pure copies: a tensor saved and loaded,
cloned, moved, or placed into a matrix without arithmetic, and for exact arithmetic (0 at the
anchor, products of exactly representable values). Two *separate* evaluations of the same
floating-point expression may differ in the last bits even on the same inputs: BLAS libraries
pick their kernels by CPU model, thread count, memory layout (strides) and alignment (MKL
without conditional numerical reproducibility), and a sum over ranks or batches in another order
rounds differently. Such results are compared with ``rel_close`` at the round-off of the dtype
they were computed in: a real defect (a batch counted twice or dropped, a wrong factor) moves
the result by far more than these bounds.
"""
from __future__ import annotations

import torch

#: float32 unit round-off is 6e-8; a result of a few dozen rounded operations carries ~1e-6
F32 = 1e-6
#: float64 unit round-off is 1.1e-16; results of small dense products: ~1e-12
F64 = 1e-12


def rel_diff(a, b) -> float:
    """``|a - b| / |b|`` (Frobenius, float64); 0 when both are 0."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    if not bool(b.any()) and not bool(a.any()):
        return 0.0
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def rel_close(a, b, tol: float = F32) -> bool:
    """Same shape and ``rel_diff(a, b) <= tol`` (see the module docstring for the choice of ``tol``)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return tuple(a.shape) == tuple(b.shape) and rel_diff(a, b) <= tol


def assert_same_precision(p, q, tol: float = F32) -> None:
    """Two fits of the same data that must agree (the same options spelled two ways, or one computation run
    twice): same recorded options and curvature, dense matrices equal to round-off, compared norm-wise."""
    assert p.metadata["backend_options"] == q.metadata["backend_options"]
    assert p.metadata["curvature"] == q.metadata["curvature"]
    a, b = p.to_dense(), q.to_dense()
    assert a.abs().max() > 0 and rel_close(a, b, tol), rel_diff(a, b)
