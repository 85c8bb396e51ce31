"""Kronecker factors: the symmetric PSD matrices ``X`` (inputs) and ``G`` (output gradients) a
Kronecker block is made of, in every representation the forms need (``lalora.blocks.kronecker_algebra``).

A factor ``F`` of side ``n`` exposes only what the forms use:

- ``mm(V)``: ``F @ V`` for ``V (..., n, m)``;
- ``diag()``, ``dense()`` (small factors only), ``scaled(c)``, ``to(device, dtype)``;
- storage: ``tensors(name)`` -> role -> tensor and ``factor_from_tensors(name, tensors)``;
- ``validate(where, n)``.

Representations:

- ``DenseFactor(M)``: ``M (n, n)``.
- ``LowRankDiagFactor(U, s, d)``: ``U diag(s) U^T + diag(d)`` (``U (n, k)`` orthonormal columns,
  ``s, d >= 0``; ``lowrank_plus_diag`` computes it from a dense factor): for 7-8B models, where one
  input factor of a 14336-wide layer is 822 MB dense. Products cost ``O(n k m)``. With ``k = 0``
  (``diagonal_factor``) it is ``diag(d)``: the input factor of LoRA on embeddings (one-hot inputs).

Every representation may carry leading batch dimensions (``stack_factors``): the penalty evaluates
equal-shaped adapters (the 30 ``q_proj`` adapters of a model) with batched products through the
very same forms. A new representation (a sharded or eigenbasis factor) is one more class here.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .symmetry import asymmetric as _asymmetric

OVERSAMPLE = 10  # extra random columns of the subspace iteration
POWER_ITERS = 4  # subspace (power) iterations
_WIDE = 1024  # dense factors from this side on are multiplied as ``M @ V`` (``DenseFactor.mm``)


class Factor:
    """Interface of a symmetric PSD Kronecker factor (see the module docstring)."""

    kind: ClassVar[str] = "abstract"

    @property
    def n(self) -> int:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors("F").values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors("F").values())).device

    def mm(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def diag(self) -> Tensor:
        raise NotImplementedError

    def dense(self) -> Tensor:
        raise NotImplementedError

    def scaled(self, c: float) -> "Factor":
        raise NotImplementedError

    def tensors(self, name: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def to(self, device=None, dtype=None) -> "Factor":
        return factor_from_tensors("F", {k: v.to(device=device, dtype=dtype) for k, v in self.tensors("F").items()})

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors("F").values())

    def describe(self, name: str) -> str:
        return f"{name}({self.n}x{self.n})"

    def validate(self, where: str, n: int) -> None:
        """Raise ``ValueError`` naming ``where`` if the factor is not ``(n, n)`` and PSD-looking."""
        raise NotImplementedError


class DenseFactor(Factor):
    """An explicit ``(..., n, n)`` symmetric PSD matrix."""

    kind = "dense"

    def __init__(self, M: Tensor):
        self.M = M

    @property
    def n(self) -> int:
        return int(self.M.shape[-1])

    def mm(self, V: Tensor) -> Tensor:
        # The penalty's thin products (m = r columns) are bound by reading M; MKL reads it fastest (2 threads,
        # cold caches, benchmarks/README.md "Issue 21, second round") as ``(V^T M)^T`` (M symmetric) for n < 1024
        # (1.25-1.35x faster at n = 512, 576) and as ``M @ V`` from n = 1024 (1.05-1.15x at n = 1376, 1536)
        W = _as(V, self.M)
        return _in_dtype_of(V, self.M @ W if self.n >= _WIDE else (W.mT @ self.M).mT)

    def diag(self) -> Tensor:
        return torch.diagonal(self.M, dim1=-2, dim2=-1)

    def dense(self) -> Tensor:
        return self.M

    def scaled(self, c: float) -> "DenseFactor":
        return DenseFactor(self.M * c)

    def tensors(self, name: str) -> dict[str, Tensor]:
        return {name: self.M}

    def validate(self, where: str, n: int) -> None:
        if tuple(self.M.shape) != (n, n):
            raise ValueError(f"{where} has shape {tuple(self.M.shape)}, expected ({n}, {n})")
        if bool((torch.diagonal(self.M) < 0).any()):
            raise ValueError(f"{where} has a negative diagonal (not PSD)")
        if _asymmetric(self.M):
            raise ValueError(f"{where} is not symmetric")


class LowRankDiagFactor(Factor):
    """``U diag(s) U^T + diag(d)``: ``U (..., n, k)``, ``s (..., k)``, ``d (..., n)``; never forms the ``n x n`` matrix."""

    kind = "lowrank"

    def __init__(self, U: Tensor, s: Tensor, d: Tensor):
        self.U, self.s, self.d = U, s, d

    @property
    def n(self) -> int:
        return int(self.U.shape[-2])

    @property
    def k(self) -> int:
        return int(self.U.shape[-1])

    def mm(self, V: Tensor) -> Tensor:
        W = _as(V, self.U)
        return _in_dtype_of(V, self.U @ (self.s[..., :, None] * (self.U.mT @ W)) + self.d[..., :, None] * W)

    def diag(self) -> Tensor:
        return (self.U.square() * self.s[..., None, :]).sum(-1) + self.d

    def dense(self) -> Tensor:
        return (self.U * self.s[..., None, :]) @ self.U.mT + torch.diag_embed(self.d)

    def scaled(self, c: float) -> "LowRankDiagFactor":
        return LowRankDiagFactor(self.U, self.s * c, self.d * c)

    def truncated(self, k: int) -> "LowRankDiagFactor":
        """Keep the ``k`` largest pairs; the diagonal of the dropped ones moves into ``d`` (diagonal kept)."""
        order = torch.argsort(self.s, descending=True)
        keep, drop = order[:k], order[k:]
        d = self.d + self.U[:, drop].square() @ self.s[drop]
        return LowRankDiagFactor(self.U[:, keep].contiguous(), self.s[keep].contiguous(), d)

    def tensors(self, name: str) -> dict[str, Tensor]:
        return {f"{name}_U": self.U, f"{name}_s": self.s, f"{name}_d": self.d}

    def describe(self, name: str) -> str:
        return f"{name}({self.n}x{self.n}: " + (f"low-rank k={self.k} + diag)" if self.k else "diagonal)")

    def validate(self, where: str, n: int) -> None:
        U, s, d = self.U, self.s, self.d
        if U.dim() != 2 or U.shape[0] != n or tuple(s.shape) != (U.shape[1],) or tuple(d.shape) != (n,):
            raise ValueError(f"{where} is low-rank with U{tuple(U.shape)}, s{tuple(s.shape)}, d{tuple(d.shape)}; "
                             f"expected U({n}, k), s(k,), d({n},)")
        if bool((s < 0).any()) or bool((d < 0).any()):
            raise ValueError(f"{where} has negative eigen/diagonal values (not PSD)")


def _as(V: Tensor, like: Tensor) -> Tensor:
    """``V`` in the factor's dtype: a factor stored in a lower precision (``LaLoRARegularizer(factor_dtype=)``)
    is multiplied in its own dtype (float32 accumulation in the GEMM), the result returned in ``V``'s."""
    return V if V.dtype == like.dtype else V.to(like.dtype)


def _in_dtype_of(V: Tensor, out: Tensor) -> Tensor:
    return out if out.dtype == V.dtype else out.to(V.dtype)


def diagonal_factor(d: Tensor) -> LowRankDiagFactor:
    """``diag(d)`` (``d (n,) >= 0``) as a low-rank + diagonal factor with ``k = 0``: ``X = E[x x^T]`` of one-hot
    inputs (token frequencies of LoRA on embeddings); products cost ``O(n m)``."""
    return LowRankDiagFactor(d.new_zeros(d.shape[-1], 0), d.new_zeros(0), d)


def as_factor(F) -> Factor:
    """``F`` itself if it is a ``Factor``, a ``DenseFactor`` for a tensor."""
    if isinstance(F, Factor):
        return F
    if isinstance(F, Tensor):
        return DenseFactor(F)
    raise TypeError(f"a Kronecker factor must be a tensor or a lalora Factor, got {type(F).__name__}")


def factor_from_tensors(name: str, tensors: dict[str, Tensor]) -> Factor:
    """The factor stored under ``name``: role ``name`` (dense) or ``name_U``, ``name_s``, ``name_d`` (low-rank)."""
    if name in tensors:
        return DenseFactor(tensors[name])
    roles = [f"{name}_U", f"{name}_s", f"{name}_d"]
    missing = [r for r in roles if r not in tensors]
    if missing:
        raise KeyError(f"factor {name!r}: no tensor {name!r} (dense) and no {missing} (low-rank)")
    return LowRankDiagFactor(*(tensors[r] for r in roles))


def stack_key(F: Factor) -> tuple:
    """Factors with equal keys can be stacked (same representation, shapes, dtype and device)."""
    return (type(F), tuple(tuple(t.shape) for t in F.tensors("F").values()), F.dtype, F.device)


def stack_factors(factors: list[Factor]) -> Factor:
    """One factor with a leading dimension ``L`` over ``factors`` (equal ``stack_key``)."""
    roles = [f.tensors("F") for f in factors]
    return factor_from_tensors("F", {r: torch.stack([t[r] for t in roles]) for r in roles[0]})


def unstack_factor(F: Factor, i: int) -> Factor:
    """Entry ``i`` of a stacked factor, on views of the stacked tensors (no copy)."""
    return factor_from_tensors("F", {r: t[i] for r, t in F.tensors("F").items()})


def check_max_rank(max_rank, where: str = "max_rank") -> int:
    """``max_rank`` as a positive int, else ``ValueError`` naming it."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"{where} must be a positive integer (the number of eigenpairs kept per Kronecker factor), "
                         f"got {max_rank!r}")
    return max_rank


def lowrank_plus_diag(M: Tensor, k: int, *, seed: int = 0, oversample: int = OVERSAMPLE,
                      power_iters: int = POWER_ITERS) -> LowRankDiagFactor:
    """Top-``k`` eigenpairs of the PSD ``M (n, n)`` plus the diagonal remainder, on ``M``'s device.

    ``d = diag(M) - diag(U diag(s) U^T)`` clipped at 0: the diagonal of ``M`` is kept exactly (the clip
    only acts on rounding noise), the result stays PSD, and it is exact at ``k = n``. Randomized
    subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4): a seeded Gaussian ``(n, k +
    oversample)`` start (CPU generator: deterministic given ``seed``), ``power_iters``
    re-orthonormalised products with ``M`` (QR in ``M``'s dtype, float32 or float64), then the small
    projected matrix is diagonalised in float64. ``k >= n`` uses a full ``eigh`` (exact).
    """
    check_max_rank(k, "k")
    n = M.shape[0]
    dtype = M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32
    M = M.to(dtype)
    if k >= n:
        evals, evecs = torch.linalg.eigh(M.double())
        order = torch.argsort(evals, descending=True)
        U, s = evecs[:, order].to(dtype), evals[order].clamp_min(0).to(dtype)
    else:
        ell = min(n, k + oversample)
        g = torch.Generator().manual_seed(int(seed))
        Q = torch.linalg.qr(M @ torch.randn(n, ell, generator=g, dtype=dtype).to(M.device)).Q
        for _ in range(power_iters):
            Q = torch.linalg.qr(M @ Q).Q
        small = (Q.T @ (M @ Q)).double()
        evals, W = torch.linalg.eigh(0.5 * (small + small.T))
        order = torch.argsort(evals, descending=True)[:k]
        U = Q @ W[:, order].to(dtype)
        s = evals[order].clamp_min(0).to(dtype)
    d = (torch.diagonal(M) - U.square() @ s).clamp_min(0)
    return LowRankDiagFactor(U.contiguous(), s.contiguous(), d.contiguous())


def compress_factor(F: Factor, max_rank: int, *, seed: int = 0) -> Factor:
    """``F`` with at most ``max_rank`` eigenpairs: dense factors wider than ``max_rank`` become
    low-rank + diagonal, low-rank ones with more pairs are truncated, others are returned as they are."""
    if isinstance(F, LowRankDiagFactor):
        return F.truncated(max_rank) if F.k > max_rank else F
    if isinstance(F, DenseFactor) and F.n > max_rank:
        return lowrank_plus_diag(F.M, max_rank, seed=seed)
    return F
