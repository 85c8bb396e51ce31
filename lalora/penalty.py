"""Closed-form gradients of the Laplace penalty's curvature term (what ``LaLoRARegularizer`` calls).

Autograd through ``Precision.quadratic`` reads every curvature factor twice per training step
(forward, then backward), and the penalty is memory-bound. Both functions here read each
factor once, in the forward, and keep only small products for the backward:

- ``linearized_quadratic``: ``q = sum_n <d_n, (P d)_n>``, gradient ``2 (P d)_n`` (``P`` is
  symmetric PSD for every block kind), ``P d`` from ``Precision.matvec``;
- ``effective_weight_quadratic``: per Kronecker block ``f = tr(Delta^T G Delta X)``,
  ``Delta = s (B A - B0 A0) = U V^T`` with ``U = s [B - B0, B0]`` (d_out, 2r),
  ``V = [A^T, (A - A0)^T]`` (d_in, 2r); with ``GU = G U``, ``XV = X V`` saved,
  ``df/dA = 2 s (B^T GU) XV^T`` and ``df/dB = 2 s GU (XV^T A^T)`` (no ``d_out x d_in`` matrix).

Both are first-order only (``once_differentiable``): no double backward through the penalty.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocks import Block
from .precision import Precision


class _Linearized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, precision: Precision, names: tuple[str, ...], *deltas: Tensor) -> Tensor:
        d = dict(zip(names, deltas))
        Pd = precision.matvec(d)
        q = torch.stack([(d[n].to(Pd[n].dtype) * Pd[n]).sum() for n in names]).sum()
        ctx.dtypes = [t.dtype for t in deltas]
        ctx.save_for_backward(*(Pd[n] for n in names))
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor):
        return (None, None, *((2 * grad_q * Pd).to(dt) for Pd, dt in zip(ctx.saved_tensors, ctx.dtypes)))


def linearized_quadratic(precision: "Precision | GroupedPrecision", delta: Mapping[str, Tensor]) -> Tensor:
    """``d^T P d`` (0-dim, float32 for float32 blocks) with gradient ``2 P d``; ``delta``: name -> tensor
    shaped like the parameter, one entry per ``precision.param_names``. Equals ``precision.quadratic``."""
    precision._check_delta(delta)
    names = tuple(precision.param_names)
    return _Linearized.apply(precision, names, *(delta[n] for n in names))


def _ew_forward(s: float, A, B, A0, B0, GdB, XdA, GB0, XA0t):
    """``(f, GU, XV)`` of the effective-weight form from ``G dB`` and ``X dA^T``; every tensor is 2-D
    (one block) or batched ``(L, ., .)`` (a ``StackedKronecker`` group): ``@`` and ``.mT`` serve both."""
    GU = s * torch.cat([GdB, GB0], -1)  # G U, U = s [B - B0, B0]
    XV = torch.cat([XdA + XA0t, XdA], -1)  # X V, V = [A^T, (A - A0)^T]
    U = s * torch.cat([B - B0, B0], -1)
    V = torch.cat([A.mT, (A - A0).mT], -1)
    return ((U.mT @ GU) * (V.mT @ XV)).sum(), GU, XV


def _ew_backward(c: Tensor, A, B, GU, XV) -> tuple[Tensor, Tensor]:
    """``(c (B^T GU) XV^T, c GU (XV^T A^T))``: ``(df/dA, df/dB)`` for ``c = 2 s df``."""
    return c * (B.mT @ GU) @ XV.mT, c * GU @ (XV.mT @ A.mT)


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, A: Tensor, B: Tensor) -> Tensor:
        GB0, XA0t, _, _ = block._anchor_products()
        f, GU, XV = _ew_forward(block.scaling, A, B, block.A0, block.B0, block._apply_G(B - block.B0),
                                block._apply_X((A - block.A0).T), GB0, XA0t)
        ctx.scaling = block.scaling
        ctx.save_for_backward(A, B, GU, XV)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        A, B, GU, XV = ctx.saved_tensors
        return (None, *_ew_backward(2 * ctx.scaling * grad_f, A, B, GU, XV))


def has_closed_form_effective(block: Block) -> bool:
    """Whether ``block`` exposes ``_apply_G``, ``_apply_X`` and ``_anchor_products`` (the Kronecker kinds)."""
    return block.supports_effective_weight and all(
        hasattr(block, m) for m in ("_apply_G", "_apply_X", "_anchor_products"))


def effective_weight_quadratic(block: Block, theta: Mapping[str, Tensor]) -> Tensor:
    """``block.effective_quadratic(theta)`` with the closed-form gradient above (Kronecker blocks);
    other blocks fall back to their own (autograd) ``effective_quadratic``."""
    if not has_closed_form_effective(block):
        return block.effective_quadratic(theta)
    a, b = block.params
    dtype = block.A0.dtype
    return _EffectiveWeight.apply(block, theta[a].to(dtype), theta[b].to(dtype))


class StackedKronecker:
    """Equal-shaped ``kfac`` or ``tri-kfac`` blocks (e.g. the 30 ``q_proj`` adapters of a model) with
    their factors stacked into ``(L, d, d)`` tensors: the matvec is a handful of ``bmm`` calls for the
    whole group instead of ~20 small operators per adapter, which dominated the penalty's cost on
    CPU (benchmarks/README.md, item 3). ``blocks()`` returns the blocks rebuilt on views of the
    stacks, so the caller can drop the originals (no second copy of the factors)."""

    ROLES = ("X", "G", "A0", "B0")  # the stacked tensors; everything else derives from them

    def __init__(self, blocks: list):
        first = blocks[0]
        self._setup(type(first), [b.params for b in blocks], first.scaling,
                    *(torch.stack([getattr(b, role) for b in blocks]) for role in self.ROLES))

    @classmethod
    def from_stacks(cls, block_cls, params: list, scaling: float, X: Tensor, G: Tensor, A0: Tensor, B0: Tensor):
        """The group rebuilt from its stacked tensors (e.g. after ``LaLoRARegularizer.to``): no new stack."""
        self = cls.__new__(cls)
        self._setup(block_cls, params, scaling, X, G, A0, B0)
        return self

    def _setup(self, block_cls, params, scaling, X, G, A0, B0) -> None:
        from .blocks.kronecker import TriKFACBlock

        self.tri = issubclass(block_cls, TriKFACBlock)
        self.cls, self.params, self.scaling = block_cls, list(params), float(scaling)
        self.X, self.G = X, G  # (L, d_in, d_in), (L, d_out, d_out)
        self.A0, self.B0 = A0, B0  # (L, r, d_in), (L, d_out, r)
        products = [b._anchor_products() for b in self.blocks()]
        self.GB0, self.XA0t, self.BGB, self.AXA = (torch.stack([p[i] for p in products]) for i in range(4))

    def tensors(self) -> dict[str, Tensor]:
        """Role -> stacked tensor (``ROLES``)."""
        return {role: getattr(self, role) for role in self.ROLES}

    def blocks(self) -> list:
        return [self.cls(p, self.X[i], self.G[i], self.A0[i], self.B0[i], self.scaling) for i, p in enumerate(self.params)]

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dA = torch.stack([delta[a] for a, _ in self.params]).to(self.X.dtype)  # (L, r, d_in)
        dB = torch.stack([delta[b] for _, b in self.params]).to(self.X.dtype)  # (L, d_out, r)
        XdA = torch.bmm(dA, self.X)  # (L, r, d_in) = (X dA^T)^T, X symmetric
        GdB = torch.bmm(dB.transpose(1, 2), self.G).transpose(1, 2)  # (L, d_out, r) = G dB
        s2 = self.scaling ** 2
        if self.tri:  # see kronecker.trikfac_matvec: U = [B0, dB], V = [dA^T, A0^T]
            GU = torch.cat([self.GB0, GdB], 2)  # (L, d_out, 2r)
            XVt = torch.cat([XdA, self.XA0t.transpose(1, 2)], 1)  # (L, 2r, d_in) = (X V)^T
            PA = s2 * torch.bmm(torch.bmm(self.B0.transpose(1, 2), GU), XVt)
            PB = s2 * torch.bmm(GU, torch.bmm(XVt, self.A0.transpose(1, 2)))
        else:  # see kronecker.kfac_matvec
            PA = s2 * torch.bmm(self.BGB, XdA)
            PB = s2 * torch.bmm(GdB, self.AXA)
        out: dict[str, Tensor] = {}
        for i, (a, b) in enumerate(self.params):  # blocks may overlap (P + Q, consolidate): sum, never overwrite
            out[a] = out[a] + PA[i] if a in out else PA[i]
            out[b] = out[b] + PB[i] if b in out else PB[i]
        return out


class GroupedPrecision:
    """``matvec`` of a ``Precision`` with its equal-shaped dense Kronecker blocks evaluated as
    ``StackedKronecker`` groups (``precision`` is the rebuilt precision on views of the stacks);
    every other block goes through its own ``matvec``. Same results as ``Precision.matvec``.

    ``tensors()`` names every tensor it holds (stacks, other blocks' tensors, the anchor) with
    names that are valid buffer names; ``rebuilt(tensors)`` is the same layout on other tensors
    of the same shapes (moved, cast or loaded): how ``LaLoRARegularizer`` keeps them as buffers."""

    def __init__(self, precision: Precision):
        from .blocks.kronecker import KFACBlock, TriKFACBlock

        groups: dict[tuple, list] = {}
        rest = []
        for b in precision.blocks:
            if type(b) in (KFACBlock, TriKFACBlock):
                key = (type(b), tuple(b.X.shape), tuple(b.G.shape), tuple(b.A0.shape), b.scaling, b.X.dtype, b.X.device)
                groups.setdefault(key, []).append(b)
            else:
                rest.append(b)
        stacks = [StackedKronecker(bs) for bs in groups.values() if len(bs) > 1]
        rest = rest + [bs[0] for bs in groups.values() if len(bs) == 1]
        self._assemble(stacks, rest, precision)

    def _assemble(self, stacks: list, rest: list, precision: Precision) -> None:
        self.stacks, self.rest = stacks, rest
        views = [b for st in self.stacks for b in st.blocks()]
        self.precision = Precision(self.rest + views, precision.anchor, metadata=precision.metadata,
                                   prior_precision=precision.prior_precision)
        if any(b is not v for b, v in zip(self.precision.blocks[len(rest):], views)):
            # Precision re-centred a block on the anchor: its stacked A0/B0 would be stale
            raise ValueError("stacked Kronecker blocks are not centred at the precision's anchor (A0/B0 differ)")
        self.param_names = self.precision.param_names

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the grouped precision: ``stack{i}_{role}``, ``block{j}_{role}`` (the other
        blocks, in ``self.rest`` order) and ``anchor{k}`` (``param_names`` order)."""
        out = {}
        for i, st in enumerate(self.stacks):
            out.update({f"stack{i}_{role}": t for role, t in st.tensors().items()})
        for j, b in enumerate(self.rest):
            out.update({f"block{j}_{role}": t for role, t in b.tensors().items()})
        out.update({f"anchor{k}": self.precision.anchor[n] for k, n in enumerate(self.param_names)})
        return out

    def rebuilt(self, tensors: Mapping[str, Tensor]) -> "GroupedPrecision":
        """The same groups and blocks on ``tensors`` (names as in ``tensors()``, same shapes)."""
        new = GroupedPrecision.__new__(GroupedPrecision)
        stacks = [StackedKronecker.from_stacks(st.cls, st.params, st.scaling,
                                               *(tensors[f"stack{i}_{role}"] for role in StackedKronecker.ROLES))
                  for i, st in enumerate(self.stacks)]
        rest = [type(b).from_state(b.params, {role: tensors[f"block{j}_{role}"] for role in b.tensors()}, b.config())
                for j, b in enumerate(self.rest)]
        anchor = {n: tensors[f"anchor{k}"] for k, n in enumerate(self.param_names)}
        p = self.precision
        new._assemble(stacks, rest, Precision([], anchor, metadata=p.metadata, prior_precision=p.prior_precision))
        return new

    def _check_delta(self, delta) -> None:
        self.precision._check_delta(delta)

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        parts = [st.matvec(delta) for st in self.stacks] + [b.matvec(delta) for b in self.rest]
        for part in parts:
            for n, v in part.items():
                out[n] = out[n] + v if n in out else v
        for n in self.param_names:
            if n not in out:
                out[n] = torch.zeros_like(delta[n], dtype=torch.float32)
        return out


class _EffectiveWeightStacked(torch.autograd.Function):
    """``_EffectiveWeight`` for a ``StackedKronecker`` group (batched ``(L, ., .)`` tensors)."""

    @staticmethod
    def forward(ctx, stack: StackedKronecker, *tensors: Tensor) -> Tensor:
        L = len(stack.params)
        A, B = torch.stack(tensors[:L]), torch.stack(tensors[L:])  # (L, r, d_in), (L, d_out, r)
        GdB = torch.bmm((B - stack.B0).mT, stack.G).mT  # (L, d_out, r) = G dB, G symmetric
        XdA = torch.bmm(A - stack.A0, stack.X).mT  # (L, d_in, r) = X dA^T
        f, GU, XV = _ew_forward(stack.scaling, A, B, stack.A0, stack.B0, GdB, XdA, stack.GB0, stack.XA0t)
        ctx.scaling = stack.scaling
        ctx.save_for_backward(A, B, GU, XV)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        A, B, GU, XV = ctx.saved_tensors
        gA, gB = _ew_backward(2 * ctx.scaling * grad_f, A, B, GU, XV)
        return (None, *gA.unbind(0), *gB.unbind(0))


def grouped_effective_weight(grouped: GroupedPrecision, theta: Mapping[str, Tensor]) -> Tensor:
    """Sum of the effective-weight forms of every block of ``grouped.precision`` (stacked groups via
    ``bmm``, the rest block by block), with closed-form gradients."""
    terms = []
    for st in grouped.stacks:
        dtype = st.X.dtype
        tensors = [theta[a].to(dtype) for a, _ in st.params] + [theta[b].to(dtype) for _, b in st.params]
        terms.append(_EffectiveWeightStacked.apply(st, *tensors))
    terms += [effective_weight_quadratic(b, theta) for b in grouped.rest]
    return torch.stack([t.reshape(()) for t in terms]).sum()
