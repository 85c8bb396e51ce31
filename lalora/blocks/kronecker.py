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
The effective-weight form uses the block's own ``A0, B0`` (the fit point).
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

    def _projected(self) -> tuple[Tensor, Tensor]:
        """``(B0^T G B0, A0 X A0^T)``, both (r, r), cached: the penalty is evaluated every training
        step and these two products (``r d_out^2 + r d_in^2`` multiply-adds) would otherwise be
        half of its cost. The cache is keyed on the tensors' identity and version counters."""
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (self.X, self.G, self.A0, self.B0))
        cached = getattr(self, "_projected_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, (self.B0.T @ self.G @ self.B0, self.A0 @ self.X @ self.A0.T))
            self._projected_cache = cached
        return cached[1]

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

    def diagonal(self):
        # the diagonal blocks of tri-kfac are the kfac blocks, so both kinds share the diagonal
        GA, XA, GB, XB = self._kfac_factors()
        a, b = self.params
        return {a: torch.outer(torch.diagonal(GA), torch.diagonal(XA)), b: torch.outer(torch.diagonal(GB), torch.diagonal(XB))}

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
            if not torch.allclose(t, t.T, rtol=1e-4, atol=1e-6 * float(t.abs().max().clamp_min(1e-30))):
                raise ValueError(f"{self.kind} block [{a}, {b}]: factor {role!r} is not symmetric")

    def describe(self):
        r, d_in = self.A0.shape
        return f"{self.kind}: X({d_in}x{d_in}) G({self.B0.shape[0]}x{self.B0.shape[0]}) r={r} s={self.scaling:g}"


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
        dA, dB = self._dA_dB(delta)
        GA, XA, GB, XB = self._kfac_factors()
        a, b = self.params
        return {a: GA @ dA @ XA, b: GB @ dB @ XB}

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
        # J^T vec(s^2 G D X): A-part B0^T (G D X), B-part (G D X) A0^T, through D = U V^T
        dA, dB = self._dA_dB(delta)
        U, V = self._UV(dA, dB)
        s2 = self.scaling ** 2
        GU, XV = self.G @ U, self.X @ V  # (d_out, 2r), (d_in, 2r)
        a, b = self.params
        return {a: s2 * (self.B0.T @ GU) @ XV.T, b: s2 * GU @ (XV.T @ self.A0.T)}

    def to_dense(self):
        J = self._jacobian()  # includes s
        return J.T @ _kron(self.G, self.X) @ J
