"""Kronecker blocks of one LoRA adapter: ``kfac`` (B-KFAC) and ``tri-kfac`` (B-Tri-KFAC).

A block stores the adapted layer's factors and the scaling, nothing else (DESIGN.md section 3):

- ``X`` (d_in, d_in): input factor of the adapted layer (input of ``lora_A``);
- ``G`` (d_out, d_out): factor of the gradient of the adapted layer's *output*;
- ``scaling`` s (config).

Each factor is any ``lalora.blocks.factors`` representation (dense, or low-rank + diagonal after
``compressed``). The forms (linearized ``kfac``/``tri-kfac`` and effective weight) are those of
``lalora.blocks.kronecker_algebra.KroneckerTerm``; they need the anchor ``theta0 = (A0, B0)``,
which lives in one place, the ``Precision``: a ``Precision`` binds its blocks to its anchor
(``bind``), so ``with_anchor``, ``consolidate``, ``+``, ``*`` and every form agree by construction.
Moving the anchor moves the point the factors are pulled back through (``J`` at the new anchor)
and the centre of the effective-weight form.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

from torch import Tensor

from .base import Block, register_block
from .factors import Factor, as_factor, compress_factor, factor_from_tensors
from .kronecker_algebra import KroneckerTerm


class KroneckerBlock(Block):
    """The ``kfac``/``tri-kfac`` block of one adapter; ``params`` = ``(lora_A name, lora_B name)``."""

    coupled: ClassVar[bool] = False
    supports_effective_weight = True

    def __init__(self, params: tuple[str, str], X: Factor | Tensor, G: Factor | Tensor, scaling: float, *,
                 A0: Tensor | None = None, B0: Tensor | None = None):
        if len(params) != 2:
            raise ValueError(f"{self.kind} block needs params (lora_A name, lora_B name), got {params!r}")
        self.params = tuple(params)
        self.X, self.G = as_factor(X), as_factor(G)
        self.scaling = float(scaling)
        self.A0, self.B0 = A0, B0
        self._term: tuple | None = None

    # --- the anchor -------------------------------------------------------------------------
    def bind(self, anchor: Mapping[str, Tensor]) -> "KroneckerBlock":
        """This block evaluated around ``anchor`` (what ``Precision`` does with its own anchor)."""
        a, b = self.params
        if a not in anchor or b not in anchor:
            return self  # Precision's validation names the unknown parameter
        if self.A0 is anchor[a] and self.B0 is anchor[b]:
            return self
        return type(self)(self.params, self.X, self.G, self.scaling, A0=anchor[a], B0=anchor[b])

    @property
    def term(self) -> KroneckerTerm:
        """The forms around the bound anchor, rebuilt if a tensor was changed in place."""
        if self.A0 is None or self.B0 is None:
            raise ValueError(f"{self.kind} block [{', '.join(self.params)}] has no anchor: Kronecker blocks read "
                             "theta0 from the Precision they belong to (Precision(blocks, anchor))")
        tensors = [self.A0, self.B0, *self.tensors().values()]
        key = [(t, t._version) for t in tensors]
        if self._term is None or any(t is not u or v != w for (t, v), (u, w) in zip(self._term[0], key)):
            self._term = (key, KroneckerTerm(self.X, self.G, self.A0.to(self.dtype), self.B0.to(self.dtype),
                                             self.scaling, self.coupled))
        return self._term[1]

    @property
    def dtype(self):
        return self.X.dtype

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        r = None if self.A0 is None else self.A0.shape[0]
        return {self.params[0]: (r, self.X.n), self.params[1]: (self.G.n, r)}

    def _dA_dB(self, delta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        a, b = self.params
        return delta[a].to(self.dtype), delta[b].to(self.dtype)

    # --- algebra ----------------------------------------------------------------------------
    def quadratic(self, delta):
        return self.term.quadratic(*self._dA_dB(delta))

    def matvec(self, delta):
        PA, PB = self.term.matvec(*self._dA_dB(delta))
        return dict(zip(self.params, (PA, PB)))

    def diagonal(self):
        return dict(zip(self.params, self.term.diagonal()))

    def to_dense(self):
        return self.term.dense()

    def effective_quadratic(self, theta):
        return self.term.effective(*self._dA_dB(theta))[0]

    def scaled(self, factor):
        return type(self)(self.params, self.X, self.G.scaled(factor), self.scaling, A0=self.A0, B0=self.B0)

    def compressed(self, max_rank: int, *, seed: int = 0) -> "KroneckerBlock":
        X, G = compress_factor(self.X, max_rank, seed=seed), compress_factor(self.G, max_rank, seed=seed)
        if X is self.X and G is self.G:
            return self
        return type(self)(self.params, X, G, self.scaling, A0=self.A0, B0=self.B0)

    # --- storage ----------------------------------------------------------------------------
    def tensors(self):
        return {**self.X.tensors("X"), **self.G.tensors("G")}

    def config(self):
        return {"scaling": self.scaling}

    @classmethod
    def from_state(cls, params, tensors, config):
        return cls(tuple(params), factor_from_tensors("X", tensors), factor_from_tensors("G", tensors),
                   float(config["scaling"]))

    def validate(self, shapes):
        super().validate(shapes)
        a, b = self.params
        sa, sb = tuple(shapes[a]), tuple(shapes[b])
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise ValueError(f"{self.kind} block [{a}, {b}]: parameters of shapes {sa} and {sb} are not a LoRA pair "
                             "(lora_A (r, d_in), lora_B (d_out, r))")
        self.X.validate(f"{self.kind} block of {a!r}: factor 'X'", sa[1])
        self.G.validate(f"{self.kind} block of {b!r}: factor 'G'", sb[0])

    def describe(self):
        r = "?" if self.A0 is None else self.A0.shape[0]
        return f"{self.kind}: {self.X.describe('X')} {self.G.describe('G')} r={r} s={self.scaling:g}"


@register_block("kfac")
class KFACBlock(KroneckerBlock):
    """B-KFAC: the ``F_A`` and ``F_B`` blocks of one adapter, no A-B cross terms."""

    coupled = False


@register_block("tri-kfac")
class TriKFACBlock(KroneckerBlock):
    """B-Tri-KFAC: ``J^T kron(G, X) J`` over ``(A, B)`` of one adapter, cross terms included."""

    coupled = True
