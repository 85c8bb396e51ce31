"""The Kronecker forms of LoRA adapters, written once (DESIGN.md section 3).

``KroneckerTerm`` holds an adapted layer's factors ``X (d_in)`` and ``G (d_out)`` (any
``lalora.blocks.factors`` representation), the anchor ``A0 (r, d_in)``, ``B0 (d_out, r)`` and the
scaling ``s``. Every tensor may carry a leading batch dimension ``L``: the same code evaluates one
adapter (a ``kfac``/``tri-kfac`` block) and a stacked group of equal-shaped adapters (the
penalty's batched products); ``@``, ``.mT`` and ``cat(..., -1)`` serve both.

With ``J: (dA, dB) -> vec(s (B0 dA + dB A0))`` and ``kron(G, X)`` the curvature of the layer's
effective weight (row-major flattening, ``kron(G, X)`` in that order):

- uncoupled (``kfac``, B-KFAC): the diagonal blocks of ``J^T kron(G, X) J``,
  ``F_A = s^2 (B0^T G B0) (x) X`` and ``F_B = s^2 G (x) (A0 X A0^T)``;
- coupled (``tri-kfac``, B-Tri-KFAC): the whole ``J^T kron(G, X) J`` (cross block
  ``s^2 (B0^T G) (x) (X A0^T)``), PSD by construction;
- effective weight (both): ``f = tr(Delta^T G Delta X)``, ``Delta = s (B A - B0 A0)``.

Every form goes through rank-``2r`` products (``D = U V^T``: ``tr((U^T G U)(V^T X V))``), never a
Kronecker product or a ``d_out x d_in`` matrix (``dense`` aside, for small blocks). The anchor
products ``G B0``, ``X A0^T``, ``B0^T G B0``, ``A0 X A0^T`` are computed once per term: the penalty
is evaluated every training step and they would otherwise be half of its cost.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .factors import Factor


class KroneckerTerm:
    """The forms of one adapter or of a stacked group (see the module docstring)."""

    def __init__(self, X: Factor, G: Factor, A0: Tensor, B0: Tensor, scaling: float, coupled: bool):
        self.X, self.G, self.A0, self.B0 = X, G, A0, B0
        self.scaling, self.coupled = float(scaling), bool(coupled)
        with torch.no_grad():
            # in the anchor's dtype: factors stored in a lower precision (``factor_dtype``) are upcast for these
            # once-per-term products, so they are exact products of the stored (rounded) factors
            Gw, Xw = (F if F.dtype == A0.dtype else F.to(dtype=A0.dtype) for F in (G, X))
            self.GB0 = Gw.mm(B0)  # (.., d_out, r)
            self.XA0t = Xw.mm(A0.mT)  # (.., d_in, r)
            self.A0X = self.XA0t.mT.contiguous()  # (.., r, d_in): the layout the coupled matvec concatenates in
            self.BGB = B0.mT @ self.GB0  # (.., r, r)
            self.AXA = A0 @ self.XA0t  # (.., r, r)

    # --- linearized forms -----------------------------------------------------------------
    def matvec(self, dA: Tensor, dB: Tensor, XdA: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(F_A-part, F_B-part)`` of ``F (dA, dB)``: one product with each factor (``X dA^T``,
        ``G dB``), the rest with the cached ``(r, r)`` and ``(d, r)`` anchor products. ``XdA``: ``X dA^T``
        if the caller computed it (an input factor shared by several terms, lalora.penalty_groups)."""
        s2 = self.scaling ** 2
        XdA = self.X.mm(dA.mT) if XdA is None else XdA  # (.., d_in, r)
        GdB = self.G.mm(dB)  # (.., d_out, r)
        if not self.coupled:
            return s2 * self.BGB @ XdA.mT, s2 * GdB @ self.AXA
        # D = B0 dA + dB A0 = U V^T, U = [B0, dB], V = [dA^T, A0^T]: G D X = (G U)(X V)^T
        GU = torch.cat([self.GB0, GdB], -1)  # (.., d_out, 2r)
        XVt = torch.cat([XdA.mT, self.A0X], -2)  # (.., 2r, d_in); XdA.mT is the contiguous dA X for dense X
        return s2 * (self.B0.mT @ GU) @ XVt, s2 * GU @ (XVt @ self.A0.mT)

    def quadratic(self, dA: Tensor, dB: Tensor) -> Tensor:
        """``d^T F d`` summed over the batch: ``<dA, (F d)_A> + <dB, (F d)_B>``."""
        PA, PB = self.matvec(dA, dB)
        return (dA * PA).sum() + (dB * PB).sum()

    def diagonal(self) -> tuple[Tensor, Tensor]:
        """The diagonal of ``F`` shaped like ``(A, B)``; the coupled form has the same diagonal blocks."""
        s2 = self.scaling ** 2
        gA = s2 * torch.diagonal(self.BGB, dim1=-2, dim2=-1)
        xB = torch.diagonal(self.AXA, dim1=-2, dim2=-1)
        return gA[..., :, None] * self.X.diag()[..., None, :], (s2 * self.G.diag())[..., :, None] * xB[..., None, :]

    def matrix_factors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((G_A, X_A), (G_B, X_B))`` dense, with ``F_A = G_A (x) X_A`` and ``F_B = G_B (x) X_B`` the
        uncoupled (kfac) blocks: ``(s^2 B0^T G B0, X)`` and ``(s^2 G, A0 X A0^T)`` (one adapter)."""
        s2 = self.scaling ** 2
        return (s2 * self.BGB, self.X.dense()), (s2 * self.G.dense(), self.AXA)

    def dense(self) -> Tensor:
        """Dense ``F`` over ``(A, B)`` in flatten order (one adapter, small blocks only)."""
        X, G, A0, B0 = self.X.dense(), self.G.dense(), self.A0, self.B0
        s2 = self.scaling ** 2
        GB0 = G @ B0
        FAA = s2 * _kron(B0.T @ GB0, X)
        FBB = s2 * _kron(G, A0 @ X @ A0.T)
        if not self.coupled:
            return torch.block_diag(FAA, FBB)
        FAB = s2 * _kron(GB0.T, X @ A0.T)
        return torch.cat([torch.cat([FAA, FAB], 1), torch.cat([FAB.T, FBB], 1)], 0)

    # --- effective-weight form ------------------------------------------------------------
    def effective(self, A: Tensor, B: Tensor, XdA: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(f, saved)``: ``f = tr(Delta^T G Delta X)`` summed over the batch, ``Delta = s (B A - B0 A0) = U V^T``
        with ``U = s [dB, B0]``, ``V = [A^T, dA^T]`` (``dA = A - A0``, ``dB = B - B0``: exactly 0 at the anchor,
        no cancellation of ``B A - B0 A0``); ``saved`` for ``effective_grads``; ``XdA`` as in ``matvec``.

        ``tr((U^T G U)(V^T X V))`` is summed block by block of the ``(2r, 2r)`` products,
        ``s^2 [<dB^T G dB, A X A^T> + 2 <dB^T G B0, A X dA^T> + <B0^T G B0, dA X dA^T>]``, on the products
        ``G dB``, ``X dA^T`` and the cached ``G B0``, ``X A0^T``: no concatenated ``(d, 2r)`` copies of
        ``G U``, ``X V``, ``U``, ``V`` (they cost ~10% of this form at 30 layers, benchmarks/README.md)."""
        dA, dB = A - self.A0, B - self.B0
        XdA = self.X.mm(dA.mT) if XdA is None else XdA  # (.., d_in, r)
        GdB = self.G.mm(dB)  # (.., d_out, r)
        XA = XdA + self.XA0t  # X A^T
        AXA, AXdA, dBGB0 = A @ XA, A @ XdA, dB.mT @ self.GB0  # (.., r, r)
        f = ((dB.mT @ GdB) * AXA).sum() + 2 * (dBGB0 * AXdA).sum() + (self.BGB * (dA @ XdA)).sum()
        return self.scaling ** 2 * f, (GdB, XA, XdA, AXA, AXdA, dBGB0)

    def effective_grads(self, c: Tensor, A: Tensor, B: Tensor, GdB: Tensor, XA: Tensor, XdA: Tensor, AXA: Tensor,
                        AXdA: Tensor, dBGB0: Tensor) -> tuple[Tensor, Tensor]:
        """``(df/dA, df/dB)`` for ``c = 2 s`` times the incoming gradient: ``df/dDelta = 2 G Delta X`` and
        ``G Delta X = s (G dB (X A^T)^T + G B0 (X dA^T)^T)``, so ``df/dA = c s (B^T G dB XA^T + B^T G B0 XdA^T)``
        and ``df/dB = c s (G dB (A X A^T)^T + G B0 (A X dA^T)^T)`` (no ``d_out x d_in`` matrix)."""
        cs = c * self.scaling
        BtGB0 = self.BGB + dBGB0  # B^T G B0 (r, r), from the forward's dB^T G B0
        dA = (B.mT @ GdB) @ XA.mT + BtGB0 @ XdA.mT
        dB = GdB @ AXA.mT + self.GB0 @ AXdA.mT
        return cs * dA, cs * dB


def _kron(a: Tensor, b: Tensor) -> Tensor:
    """``torch.kron`` on contiguous copies: torch 2.14's kron raises "view size is not compatible"
    for many shapes when an input is non-contiguous (e.g. anchors made by ``.t()``)."""
    return torch.kron(a.contiguous(), b.contiguous())
