"""Kronecker blocks of one LoRA adapter: ``kfac`` (B-KFAC) and ``tri-kfac`` (B-Tri-KFAC).

Both store the adapted layer's factors and the fit point, nothing else (DESIGN.md section 3):

- ``X`` (d_in, d_in): input factor of the adapted layer (input of ``lora_A``);
- ``G`` (d_out, d_out): factor of the gradient of the adapted layer's *output*;
- ``A0`` (r, d_in), ``B0`` (d_out, r): the LoRA weights the factors were fitted at;
- ``scaling`` s (config).

``kron(G, X)`` is the (K-FAC) curvature of the layer's effective weight, mean over examples.
With ``J: (dA, dB) -> vec(s (B0 dA + dB A0))`` the forms are

- ``kfac``: the diagonal blocks of ``J^T kron(G, X) J``:
  ``F_A = (s^2 B0^T G B0) (x) X``, ``F_B = (s^2 G) (x) (A0 X A0^T)``, no cross terms;
- ``tri-kfac``: the whole ``J^T kron(G, X) J`` (cross terms included, PSD by construction),
  quadratic ``s^2 tr(D^T G D X)``, ``D = B0 dA + dB A0``;
- effective weight (both kinds): ``tr(Delta^T G Delta X)``, ``Delta = s (B A - B0 A0)``.

Every form is evaluated through rank-2r factors (``D = U V^T``: ``tr((U^T G U)(V^T X V))``),
never as a Kronecker product or a dense ``d_out x d_in`` matrix. ``params`` = ``(A, B)``.
The forms are centred at the block's own ``A0, B0``. A ``Precision`` keeps them equal to its
anchor: moving the anchor (``Precision.with_anchor``) rebuilds the block at the new point
(``with_anchor`` below), so the linearized forms become the pull-back of ``kron(G, X)`` through
the Jacobian at the new anchor and the effective-weight form is centred there.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Block, register_block


def _kron(a: Tensor, b: Tensor) -> Tensor:
    """``torch.kron`` on contiguous copies: torch 2.14's kron raises "view size is not compatible"
    for many shapes when an input is non-contiguous (e.g. anchors made by ``.t()``)."""
    return torch.kron(a.contiguous(), b.contiguous())


def _lowrank_trace(U: Tensor, V: Tensor, G: Tensor, X: Tensor) -> Tensor:
    """``tr(D^T G D X)`` for ``D = U V^T`` (U: (d_out, k), V: (d_in, k))."""
    return ((U.T @ (G @ U)) * (V.T @ (X @ V))).sum()


def cached_anchor_products(block) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(G B0 (d_out, r), X A0^T (d_in, r), B0^T G B0 (r, r), A0 X A0^T (r, r))`` of a Kronecker block.

    Computed once without autograd through the block's ``_apply_G``/``_apply_X`` and cached on the
    block: the penalty is evaluated every training step and these products (``r d_out^2 + r d_in^2``
    multiply-adds for dense factors) would otherwise be half of its cost. The cache holds the
    block's tensors and their version counters and is rebuilt when any of them changes.
    """
    key = [(t, t._version) for t in block.tensors().values()]
    cached = block.__dict__.get("_anchor_cache")
    if (cached is None or len(cached[0]) != len(key)
            or any(t is not u or v != w for (t, v), (u, w) in zip(cached[0], key))):
        with torch.no_grad():
            GB0 = block._apply_G(block.B0)
            XA0t = block._apply_X(block.A0.T.contiguous())
            cached = (key, (GB0, XA0t, block.B0.T @ GB0, block.A0 @ XA0t))
        block._anchor_cache = cached
    return cached[1]


def kfac_matvec(block, dA: Tensor, dB: Tensor) -> dict[str, Tensor]:
    """``(F_A dA, F_B dB)`` of a ``kfac`` block: ``s^2 (B0^T G B0) dA X`` and ``s^2 G dB (A0 X A0^T)``.

    One product with each factor (``X dA^T``: r d_in^2, ``G dB``: r d_out^2); the (r, r) projections
    come from the cache."""
    _, _, BGB, AXA = block._anchor_products()
    s2 = block.scaling ** 2
    a, b = block.params
    return {a: s2 * BGB @ block._apply_X(dA.T).T, b: s2 * block._apply_G(dB) @ AXA}


def trikfac_matvec(block, dA: Tensor, dB: Tensor) -> dict[str, Tensor]:
    """``J^T vec(s^2 G D X)`` of a ``tri-kfac`` block, ``D = B0 dA + dB A0 = U V^T``, ``U = [B0, dB]``,
    ``V = [dA^T, A0^T]``: A-part ``s^2 B0^T (G U)(X V)^T``, B-part ``s^2 (G U)((X V)^T A0^T)``.

    ``G B0`` and ``X A0^T`` come from the cache, so one product with each factor remains
    (``G dB``, ``X dA^T``); no ``d_out x d_in`` matrix is formed."""
    GB0, XA0t, _, _ = block._anchor_products()
    s2 = block.scaling ** 2
    GU = torch.cat([GB0, block._apply_G(dB)], 1)  # (d_out, 2r)
    XV = torch.cat([block._apply_X(dA.T), XA0t], 1)  # (d_in, 2r)
    a, b = block.params
    return {a: s2 * (block.B0.T @ GU) @ XV.T, b: s2 * GU @ (XV.T @ block.A0.T)}


def anchor_pair(block, anchor: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(A0, B0)`` of a Kronecker block taken from ``anchor`` (on the block's device and dtype); the
    block's own tensors when they already hold these values."""
    out = []
    for name, own in zip(block.params, (block.A0, block.B0)):
        t = anchor[name].detach().to(device=own.device, dtype=own.dtype)
        if tuple(t.shape) != tuple(own.shape):
            raise ValueError(f"{block.kind} block: anchor of {name!r} has shape {tuple(t.shape)}, the block's "
                             f"{'A0' if own is block.A0 else 'B0'} has {tuple(own.shape)}")
        out.append(own if torch.equal(t, own) else t)
    return out[0], out[1]


class _KroneckerAdapterBlock(Block):
    """Shared storage and effective-weight form of the per-adapter Kronecker blocks."""

    supports_effective_weight = True

    def __init__(self, params: tuple[str, str], X: Tensor, G: Tensor, A0: Tensor, B0: Tensor, scaling: float):
        if len(params) != 2:
            raise ValueError(f"{self.kind} block needs params (lora_A name, lora_B name), got {params!r}")
        self.params = tuple(params)
        self.X, self.G, self.A0, self.B0 = X, G, A0, B0
        self.scaling = float(scaling)

    # --- helpers -------------------------------------------------------------------
    def _dA_dB(self, delta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        a, b = self.params
        return delta[a].to(self.X.dtype), delta[b].to(self.X.dtype)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.params[0]: tuple(self.A0.shape), self.params[1]: tuple(self.B0.shape)}

    # ``(V^T F)^T`` (F symmetric) instead of ``F @ V``: with MKL on CPU the thin product in this
    # layout is 1-3x faster for m = r columns (``F @ V`` with a contiguous (n, m) V is the slow case)
    def _apply_G(self, V: Tensor) -> Tensor:
        """``G @ V`` for V (d_out, m) (G is symmetric)."""
        return (V.T @ self.G).T

    def _apply_X(self, V: Tensor) -> Tensor:
        """``X @ V`` for V (d_in, m) (X is symmetric)."""
        return (V.T @ self.X).T

    def _anchor_products(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(G B0, X A0^T, B0^T G B0, A0 X A0^T)``, cached (see ``cached_anchor_products``)."""
        return cached_anchor_products(self)

    def _projected(self) -> tuple[Tensor, Tensor]:
        """``(B0^T G B0, A0 X A0^T)``, both (r, r), cached: the penalty is evaluated every training
        step and these two products (``r d_out^2 + r d_in^2`` multiply-adds) would otherwise be
        half of its cost."""
        return self._anchor_products()[2:]

    def _kfac_factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(G_A, X_A, G_B, X_B)`` of the kfac diagonal blocks."""
        s2 = self.scaling ** 2
        return s2 * self.B0.T @ self.G @ self.B0, self.X, s2 * self.G, self.A0 @ self.X @ self.A0.T

    def _jacobian(self) -> Tensor:
        """Dense ``J`` ((d_out*d_in), (r*d_in + d_out*r)), row-major flatten order (small blocks only)."""
        A0, B0, s = self.A0, self.B0, self.scaling
        r, d_in = A0.shape
        d_out = B0.shape[0]
        JA = _kron(B0, torch.eye(d_in, dtype=A0.dtype, device=A0.device))  # vec(B0 dA)
        JB = _kron(torch.eye(d_out, dtype=A0.dtype, device=A0.device), A0.T)  # vec(dB A0)
        return s * torch.cat([JA, JB], 1)

    # --- effective-weight form ---------------------------------------------------------
    def effective_quadratic(self, theta: Mapping[str, Tensor]) -> Tensor:
        a, b = self.params
        A, B = theta[a].to(self.X.dtype), theta[b].to(self.X.dtype)
        # Delta = s (dB A + B0 dA) = U V^T (rank <= 2r): exactly 0 at theta0, no cancellation of B A - B0 A0
        U = self.scaling * torch.cat([B - self.B0, self.B0], 1)
        V = torch.cat([A.T, (A - self.A0).T], 1)
        return _lowrank_trace(U, V, self.G, self.X)

    def effective_dense(self) -> Tensor:
        """``kron(G, X)``: the effective-weight form is ``vec(Delta)^T kron(G, X) vec(Delta)`` (tests)."""
        return _kron(self.G, self.X)

    # --- storage -------------------------------------------------------------------
    def tensors(self):
        return {"X": self.X, "G": self.G, "A0": self.A0, "B0": self.B0}

    def config(self):
        return {"scaling": self.scaling}

    @classmethod
    def from_state(cls, params, tensors, config):
        return cls(tuple(params), tensors["X"], tensors["G"], tensors["A0"], tensors["B0"], float(config["scaling"]))

    def scaled(self, factor):
        return type(self)(self.params, self.X, self.G * factor, self.A0, self.B0, self.scaling)

    def with_anchor(self, anchor):
        A0, B0 = anchor_pair(self, anchor)
        if A0 is self.A0 and B0 is self.B0:
            return self
        return type(self)(self.params, self.X, self.G, A0, B0, self.scaling)

    def diagonal(self):
        # the diagonal blocks of tri-kfac are the kfac blocks, so both kinds share the diagonal
        # diag(B0^T G B0) and diag(A0 X A0^T) from (d, r) products: no (d, d) temporaries
        s2 = self.scaling ** 2
        gA = s2 * (self.B0 * (self.G @ self.B0)).sum(0)
        xB = (self.A0.T * (self.X @ self.A0.T)).sum(0)
        a, b = self.params
        return {a: torch.outer(gA, torch.diagonal(self.X)), b: torch.outer(s2 * torch.diagonal(self.G), xB)}

    def validate(self, shapes):
        super().validate(shapes)
        a, b = self.params
        if self.A0.dim() != 2 or self.B0.dim() != 2:
            raise ValueError(f"{self.kind} block [{a}, {b}]: A0/B0 must be matrices")
        for p, t, role in ((a, self.A0, "A0"), (b, self.B0, "B0")):
            if tuple(shapes[p]) != tuple(t.shape):
                raise ValueError(f"{self.kind} block: tensor {role!r} has shape {tuple(t.shape)}, parameter {p!r} has "
                                 f"{tuple(shapes[p])}")
        r, d_in = self.A0.shape
        d_out = self.B0.shape[0]
        if self.B0.shape[1] != r:
            raise ValueError(f"{self.kind} block: B0 {tuple(self.B0.shape)} does not match A0 {tuple(self.A0.shape)} (rank)")
        if tuple(self.X.shape) != (d_in, d_in):
            raise ValueError(f"{self.kind} block of {a!r}: tensor 'X' has shape {tuple(self.X.shape)}, expected ({d_in}, {d_in})")
        if tuple(self.G.shape) != (d_out, d_out):
            raise ValueError(f"{self.kind} block of {b!r}: tensor 'G' has shape {tuple(self.G.shape)}, expected ({d_out}, {d_out})")
        for role, t in (("X", self.X), ("G", self.G)):
            if bool((torch.diagonal(t) < 0).any()):
                raise ValueError(f"{self.kind} block [{a}, {b}]: factor {role!r} has a negative diagonal (not PSD)")
            if _asymmetric(t):
                raise ValueError(f"{self.kind} block [{a}, {b}]: factor {role!r} is not symmetric")

    def describe(self):
        r, d_in = self.A0.shape
        return f"{self.kind}: X({d_in}x{d_in}) G({self.B0.shape[0]}x{self.B0.shape[0]}) r={r} s={self.scaling:g}"


def _asymmetric(t: Tensor, tile: int = 256) -> bool:
    """``max |t - t^T| > 1e-4 max |diag t|`` (the largest diagonal entry is the largest entry of a PSD
    factor), compared tile by tile: no (d, d) temporary and the transposed reads stay in cache
    (3x faster than ``t - t.T`` at d = 1536; factors of LLM layers are validated at every load)."""
    d = t.shape[0]
    pairs = [(i, j) for i in range(0, d, tile) for j in range(i, d, tile)]
    if all(torch.equal(t[i:i + tile, j:j + tile], t[j:j + tile, i:i + tile].T) for i, j in pairs):
        return False  # exactly symmetric (every fitted factor): half the time of the difference below
    worst = torch.stack([torch.linalg.vector_norm(t[i:i + tile, j:j + tile] - t[j:j + tile, i:i + tile].T, float("inf"))
                         for i, j in pairs]).max()
    return bool(worst > 1e-4 * torch.diagonal(t).abs().max() + 1e-30)


@register_block("kfac")
class KFACBlock(_KroneckerAdapterBlock):
    """B-KFAC: the ``F_A`` and ``F_B`` blocks of one adapter, no A-B cross terms."""

    def quadratic(self, delta):
        dA, dB = self._dA_dB(delta)
        s2 = self.scaling ** 2
        BGB, XB = self._projected()  # (r, r) each: dB A0 is never formed
        qA = ((BGB @ dA) * (dA @ self.X)).sum()
        qB = ((self.G @ dB) * (dB @ XB)).sum()
        return s2 * (qA + qB)

    def matvec(self, delta):
        return kfac_matvec(self, *self._dA_dB(delta))

    def to_dense(self):
        GA, XA, GB, XB = self._kfac_factors()
        return torch.block_diag(_kron(GA, XA), _kron(GB, XB))


@register_block("tri-kfac")
class TriKFACBlock(_KroneckerAdapterBlock):
    """B-Tri-KFAC: ``J^T kron(G, X) J`` over ``(A, B)`` of one adapter, cross terms included."""

    def _UV(self, dA: Tensor, dB: Tensor) -> tuple[Tensor, Tensor]:
        # D = B0 dA + dB A0 = [B0, dB] [dA; A0]
        return torch.cat([self.B0, dB], 1), torch.cat([dA.T, self.A0.T], 1)

    def quadratic(self, delta):
        dA, dB = self._dA_dB(delta)
        U, V = self._UV(dA, dB)
        return self.scaling ** 2 * _lowrank_trace(U, V, self.G, self.X)

    def matvec(self, delta):
        return trikfac_matvec(self, *self._dA_dB(delta))

    def to_dense(self):
        J = self._jacobian()  # includes s
        return J.T @ _kron(self.G, self.X) @ J
