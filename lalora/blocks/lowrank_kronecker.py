"""Kronecker blocks with low-rank-plus-diagonal factors: ``kfac-lowrank`` and ``tri-kfac-lowrank``.

For 7-8B models one input factor of a 14336-wide layer is 14336^2 floats (822 MB). A factor
``M (n, n)`` (PSD) wider than ``max_rank`` is stored as

    M ~= U diag(s) U^T + diag(d),   U (n, k) orthonormal columns, s (k) >= 0, d (n) >= 0,

``(U, s)`` the top-k eigenpairs (randomized subspace iteration, seeded, see ``lowrank_plus_diag``)
and ``d = diag(M) - diag(U diag(s) U^T)`` clipped at 0: the diagonal of ``M`` is kept exactly (the
clip only acts on rounding noise), the approximation stays PSD, and it is exact at ``k = n``.
Storage ``n k + k + n`` floats instead of ``n^2``. Factors not wider than ``max_rank`` stay dense.

Same math as ``lalora.blocks.kronecker`` (``kfac``: ``F_A = (s^2 B0^T G B0) (x) X``,
``F_B = (s^2 G) (x) (A0 X A0^T)``; ``tri-kfac``: ``J^T (G (x) X) J``; effective weight
``tr(Delta^T G Delta X)``), with every product by ``X`` or ``G`` done as ``U (s * (U^T V)) + d * V``:
an ``(n, m)`` product costs ``O(n k m)`` and no ``n x n`` matrix is formed (``to_dense`` aside).

Tensor roles: ``A0``, ``B0`` and per factor ``F`` in ``X, G`` either ``F`` (dense) or
``F_U``, ``F_s``, ``F_d``; config: ``scaling``, ``max_rank``, ``seed``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Block, register_block
from .kronecker import (KFACBlock, TriKFACBlock, _KroneckerAdapterBlock, anchor_pair, cached_anchor_products, kfac_matvec,
                        trikfac_matvec)

OVERSAMPLE = 10  # extra random columns of the subspace iteration
POWER_ITERS = 4  # subspace (power) iterations


def check_max_rank(max_rank, where: str = "max_rank") -> int:
    """``max_rank`` as a positive int, else ``ValueError`` naming it."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"{where} must be a positive integer (the number of eigenpairs kept per Kronecker factor), "
                         f"got {max_rank!r}")
    return max_rank


class LowRankDiag:
    """``U diag(s) U^T + diag(d)``: U (n, k), s (k,), d (n,). Products never form the ``n x n`` matrix."""

    def __init__(self, U: Tensor, s: Tensor, d: Tensor):
        self.U, self.s, self.d = U, s, d

    @property
    def n(self) -> int:
        return int(self.U.shape[0])

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    def mm(self, V: Tensor) -> Tensor:
        """``M @ V`` for V (n, m), O(n k m)."""
        return self.U @ (self.s[:, None] * (self.U.T @ V)) + self.d[:, None] * V

    def diag(self) -> Tensor:
        return self.U.square() @ self.s + self.d

    def dense(self) -> Tensor:
        return (self.U * self.s) @ self.U.T + torch.diag(self.d)

    def scaled(self, factor: float) -> "LowRankDiag":
        return LowRankDiag(self.U, self.s * factor, self.d * factor)

    def truncated(self, k: int) -> "LowRankDiag":
        """Keep the ``k`` largest pairs; the diagonal of the dropped ones moves into ``d`` (diagonal kept)."""
        order = torch.argsort(self.s, descending=True)
        keep, drop = order[:k], order[k:]
        d = self.d + self.U[:, drop].square() @ self.s[drop]
        return LowRankDiag(self.U[:, keep].contiguous(), self.s[keep].contiguous(), d)


def lowrank_plus_diag(M: Tensor, k: int, *, seed: int = 0, oversample: int = OVERSAMPLE,
                      power_iters: int = POWER_ITERS) -> LowRankDiag:
    """Top-``k`` eigenpairs of the PSD ``M (n, n)`` plus the diagonal remainder, on ``M``'s device.

    Randomized subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4): a seeded Gaussian
    ``(n, k + oversample)`` start (CPU generator: deterministic given ``seed``), ``power_iters``
    re-orthonormalised products with ``M`` (QR in ``M``'s dtype, float32 or float64), then the
    small projected matrix is diagonalised in float64. ``k >= n`` uses a full ``eigh`` (exact).
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
    return LowRankDiag(U.contiguous(), s.contiguous(), d.contiguous())


def _mm(F, V: Tensor) -> Tensor:
    return F.mm(V) if isinstance(F, LowRankDiag) else F @ V


def _diag(F) -> Tensor:
    return F.diag() if isinstance(F, LowRankDiag) else torch.diagonal(F)


def _dense(F) -> Tensor:
    return F.dense() if isinstance(F, LowRankDiag) else F


def _trace(U: Tensor, V: Tensor, G, X) -> Tensor:
    """``tr(D^T G D X)`` for ``D = U V^T`` (U: (d_out, m), V: (d_in, m))."""
    return ((U.T @ _mm(G, U)) * (V.T @ _mm(X, V))).sum()


class _LowRankKroneckerBlock(Block):
    """Shared storage, diagonal and effective-weight form; ``X``/``G`` are dense tensors or ``LowRankDiag``."""

    supports_effective_weight = True
    dense_kind: type[_KroneckerAdapterBlock]

    def __init__(self, params: tuple[str, str], X, G, A0: Tensor, B0: Tensor, scaling: float, *,
                 max_rank: int | None = None, seed: int = 0):
        if len(params) != 2:
            raise ValueError(f"{self.kind} block needs params (lora_A name, lora_B name), got {params!r}")
        self.params = tuple(params)
        self.X, self.G, self.A0, self.B0 = X, G, A0, B0
        self.scaling = float(scaling)
        self.max_rank, self.seed = max_rank, int(seed)

    @property
    def dtype(self):
        return self.A0.dtype

    def _dA_dB(self, delta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        a, b = self.params
        return delta[a].to(self.dtype), delta[b].to(self.dtype)

    def _apply_G(self, V: Tensor) -> Tensor:
        """``G @ V`` for V (d_out, m), never forming ``G``."""
        return _mm(self.G, V)

    def _apply_X(self, V: Tensor) -> Tensor:
        """``X @ V`` for V (d_in, m), never forming ``X``."""
        return _mm(self.X, V)

    def _anchor_products(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(G B0, X A0^T, B0^T G B0, A0 X A0^T)``, cached (see ``cached_anchor_products``)."""
        return cached_anchor_products(self)

    def _small_factors(self) -> tuple[Tensor, Tensor]:
        """``(G_A, X_B) = (s^2 B0^T G B0, A0 X A0^T)``, both (r, r) (cached projections)."""
        _, _, BGB, AXA = self._anchor_products()
        return self.scaling ** 2 * BGB, AXA

    def uncompressed(self) -> _KroneckerAdapterBlock:
        """The ``kfac``/``tri-kfac`` block with the dense factors ``U diag(s) U^T + diag(d)`` (small blocks only)."""
        return self.dense_kind(self.params, _dense(self.X), _dense(self.G), self.A0, self.B0, self.scaling)

    def _dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(F_AA, F_BB, F_AB)`` in flatten order: ``s^2 (B0^T G B0) (x) X``, ``s^2 G (x) (A0 X A0^T)``,
        ``s^2 (B0^T G) (x) (X A0^T)`` (small blocks only; no ``(d_out d_in)^2`` intermediate)."""
        X, G = _dense(self.X), _dense(self.G)
        s2 = self.scaling ** 2
        GB0 = G @ self.B0
        kron = lambda a, b: torch.kron(a.contiguous(), b.contiguous())  # noqa: E731 (kron fails on some strided views)
        return (s2 * kron(self.B0.T @ GB0, X), s2 * kron(G, self.A0 @ X @ self.A0.T), s2 * kron(GB0.T, X @ self.A0.T))

    def diagonal(self):
        GA, XB = self._small_factors()
        a, b = self.params
        return {a: torch.outer(torch.diagonal(GA), _diag(self.X)),
                b: torch.outer(self.scaling ** 2 * _diag(self.G), torch.diagonal(XB))}

    def effective_quadratic(self, theta):
        a, b = self.params
        A, B = theta[a].to(self.dtype), theta[b].to(self.dtype)
        U = self.scaling * torch.cat([B - self.B0, self.B0], 1)
        V = torch.cat([A.T, (A - self.A0).T], 1)
        return _trace(U, V, self.G, self.X)

    def scaled(self, factor):
        G = self.G.scaled(factor) if isinstance(self.G, LowRankDiag) else self.G * factor
        return type(self)(self.params, self.X, G, self.A0, self.B0, self.scaling, max_rank=self.max_rank, seed=self.seed)

    def with_anchor(self, anchor):
        """Rebuilt at ``anchor`` (same factors): see ``lalora.blocks.kronecker``."""
        A0, B0 = anchor_pair(self, anchor)
        if A0 is self.A0 and B0 is self.B0:
            return self
        return type(self)(self.params, self.X, self.G, A0, B0, self.scaling, max_rank=self.max_rank, seed=self.seed)

    # --- storage -------------------------------------------------------------------
    def tensors(self):
        out = {}
        for name, F in (("X", self.X), ("G", self.G)):
            if isinstance(F, LowRankDiag):
                out.update({f"{name}_U": F.U, f"{name}_s": F.s, f"{name}_d": F.d})
            else:
                out[name] = F
        out.update(A0=self.A0, B0=self.B0)
        return out

    def config(self):
        return {"scaling": self.scaling, "max_rank": self.max_rank, "seed": self.seed}

    @classmethod
    def from_state(cls, params, tensors, config):
        def factor(name):
            if name in tensors:
                return tensors[name]
            return LowRankDiag(tensors[f"{name}_U"], tensors[f"{name}_s"], tensors[f"{name}_d"])

        max_rank = config.get("max_rank")
        return cls(tuple(params), factor("X"), factor("G"), tensors["A0"], tensors["B0"], float(config["scaling"]),
                   max_rank=None if max_rank is None else int(max_rank), seed=int(config.get("seed", 0)))

    def validate(self, shapes):
        Block.validate(self, shapes)
        a, b = self.params
        for p, t, role in ((a, self.A0, "A0"), (b, self.B0, "B0")):
            if t.dim() != 2 or tuple(shapes[p]) != tuple(t.shape):
                raise ValueError(f"{self.kind} block: tensor {role!r} has shape {tuple(t.shape)}, parameter {p!r} has "
                                 f"{tuple(shapes[p])}")
        r, d_in = self.A0.shape
        if self.B0.shape[1] != r:
            raise ValueError(f"{self.kind} block: B0 {tuple(self.B0.shape)} does not match A0 {tuple(self.A0.shape)} (rank)")
        for name, F, n in (("X", self.X, d_in), ("G", self.G, self.B0.shape[0])):
            if isinstance(F, LowRankDiag):
                if F.U.dim() != 2 or F.U.shape[0] != n or tuple(F.s.shape) != (F.k,) or tuple(F.d.shape) != (n,):
                    raise ValueError(f"{self.kind} block [{a}, {b}]: low-rank factor {name!r} has U{tuple(F.U.shape)}, "
                                     f"s{tuple(F.s.shape)}, d{tuple(F.d.shape)}; expected U({n}, k), s(k,), d({n},)")
                if bool((F.s < 0).any()) or bool((F.d < 0).any()):
                    raise ValueError(f"{self.kind} block [{a}, {b}]: factor {name!r} has negative eigen/diagonal "
                                     "values (not PSD)")
            elif tuple(F.shape) != (n, n):
                raise ValueError(f"{self.kind} block [{a}, {b}]: tensor {name!r} has shape {tuple(F.shape)}, "
                                 f"expected ({n}, {n})")
            elif bool((torch.diagonal(F) < 0).any()):
                raise ValueError(f"{self.kind} block [{a}, {b}]: factor {name!r} has a negative diagonal (not PSD)")

    def describe(self):
        r, d_in = self.A0.shape

        def f(name, F):
            if isinstance(F, LowRankDiag):
                return f"{name}({F.n}x{F.n}: low-rank k={F.k} + diag)"
            return f"{name}({F.shape[0]}x{F.shape[0]})"

        return f"{self.kind}: {f('X', self.X)} {f('G', self.G)} r={r} s={self.scaling:g}"


@register_block("kfac-lowrank")
class LowRankKFACBlock(_LowRankKroneckerBlock):
    """``kfac`` with low-rank-plus-diagonal factors (no A-B cross terms)."""

    dense_kind = KFACBlock

    def to_dense(self):
        FAA, FBB, _ = self._dense_blocks()
        return torch.block_diag(FAA, FBB)

    def quadratic(self, delta):
        dA, dB = self._dA_dB(delta)
        GA, XB = self._small_factors()
        qA = ((GA @ dA) * _mm(self.X, dA.T).T).sum()
        qB = ((_mm(self.G, dB)) * (dB @ XB)).sum()
        return qA + self.scaling ** 2 * qB

    def matvec(self, delta):
        return kfac_matvec(self, *self._dA_dB(delta))


@register_block("tri-kfac-lowrank")
class LowRankTriKFACBlock(_LowRankKroneckerBlock):
    """``tri-kfac`` with low-rank-plus-diagonal factors (A-B cross terms included, PSD)."""

    dense_kind = TriKFACBlock

    def to_dense(self):
        FAA, FBB, FAB = self._dense_blocks()
        return torch.cat([torch.cat([FAA, FAB], 1), torch.cat([FAB.T, FBB], 1)], 0)

    def _UV(self, dA, dB):
        return torch.cat([self.B0, dB], 1), torch.cat([dA.T, self.A0.T], 1)

    def quadratic(self, delta):
        U, V = self._UV(*self._dA_dB(delta))
        return self.scaling ** 2 * _trace(U, V, self.G, self.X)

    def matvec(self, delta):
        return trikfac_matvec(self, *self._dA_dB(delta))


_LOWRANK_OF = {"kfac": LowRankKFACBlock, "tri-kfac": LowRankTriKFACBlock}


def compress_block(block: Block, max_rank: int, *, seed: int = 0) -> Block:
    """``block`` with every Kronecker factor wider than ``max_rank`` stored low-rank-plus-diagonal.

    ``kfac``/``tri-kfac`` blocks become ``kfac-lowrank``/``tri-kfac-lowrank`` (on the factors'
    device and dtype) when at least one factor is wider than ``max_rank``; low-rank blocks with more
    than ``max_rank`` pairs are truncated (the dropped pairs' diagonal moves into ``d``). Every other
    block is returned unchanged.
    """
    max_rank = check_max_rank(max_rank)

    def squeeze(F):
        if isinstance(F, LowRankDiag):
            return F.truncated(max_rank) if F.k > max_rank else F
        return lowrank_plus_diag(F, max_rank, seed=seed) if F.shape[0] > max_rank else F

    if isinstance(block, _LowRankKroneckerBlock):
        cls = type(block)
    elif isinstance(block, _KroneckerAdapterBlock) and block.kind in _LOWRANK_OF:
        if block.X.shape[0] <= max_rank and block.G.shape[0] <= max_rank:
            return block
        cls = _LOWRANK_OF[block.kind]
    else:
        return block
    return cls(block.params, squeeze(block.X), squeeze(block.G), block.A0, block.B0, block.scaling,
               max_rank=max_rank, seed=seed)
