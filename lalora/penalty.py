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


def linearized_quadratic(precision: Precision, delta: Mapping[str, Tensor]) -> Tensor:
    """``d^T P d`` (0-dim, float32 for float32 blocks) with gradient ``2 P d``; ``delta``: name -> tensor
    shaped like the parameter, one entry per ``precision.param_names``. Equals ``precision.quadratic``."""
    precision._check_delta(delta)
    names = tuple(precision.param_names)
    return _Linearized.apply(precision, names, *(delta[n] for n in names))


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, A: Tensor, B: Tensor) -> Tensor:
        s = block.scaling
        GB0, XA0t, _, _ = block._anchor_products()
        dA, dB = A - block.A0, B - block.B0
        GU = s * torch.cat([block._apply_G(dB), GB0], 1)  # G U, U = s [B - B0, B0]
        XdA = block._apply_X(dA.T)
        XV = torch.cat([XdA + XA0t, XdA], 1)  # X V, V = [A^T, (A - A0)^T]
        U = s * torch.cat([dB, block.B0], 1)
        V = torch.cat([A.T, dA.T], 1)
        f = ((U.T @ GU) * (V.T @ XV)).sum()
        ctx.scaling = s
        ctx.save_for_backward(A, B, GU, XV)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        A, B, GU, XV = ctx.saved_tensors
        c = 2 * ctx.scaling * grad_f
        return None, c * (B.T @ GU) @ XV.T, c * GU @ (XV.T @ A.T)


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
