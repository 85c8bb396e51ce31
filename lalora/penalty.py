"""Closed-form gradients of the Laplace penalty's curvature term (what ``LaLoRARegularizer`` calls).

Autograd through ``Precision.quadratic`` reads every curvature factor twice per training step
(forward, then backward), and the penalty is memory-bound. Both forms here read each factor
once, in the forward, and keep only small products for the backward:

- ``linearized_quadratic``: ``q = sum_n <d_n, (P d)_n>``, gradient ``2 (P d)_n`` (``P`` is
  symmetric PSD for every block kind);
- ``effective_weight``: per Kronecker adapter ``f = tr(Delta^T G Delta X)`` with the gradient of
  ``KroneckerTerm.effective_grads``.

``GroupedPrecision`` stacks equal-shaped Kronecker blocks (e.g. the 30 ``q_proj`` adapters of a
model) into one ``KroneckerTerm`` with a leading dimension, so a group costs a handful of batched
products instead of ~20 small operators per adapter (which dominated the penalty on CPU,
benchmarks/README.md item 3); single blocks and groups go through the same forms
(``lalora.blocks.kronecker_algebra``). Both functions are first-order only (``once_differentiable``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocks.kronecker import KroneckerBlock
from .blocks.kronecker_algebra import KroneckerTerm
from .penalty_groups import KroneckerGroup, plan_groups
from .precision import Precision


class _Linearized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, precision, names: tuple[str, ...], *deltas: Tensor) -> Tensor:
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


class _EffectiveWeight(torch.autograd.Function):
    """``KroneckerTerm.effective`` of one adapter (2-D A, B) or a stacked group (``(L, ., .)``)."""

    @staticmethod
    def forward(ctx, term: KroneckerTerm, A: Tensor, B: Tensor) -> Tensor:
        f, saved = term.effective(A, B)
        ctx.term = term
        ctx.save_for_backward(A, B, *saved)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        A, B, *saved = ctx.saved_tensors
        return (None, *ctx.term.effective_grads(2 * ctx.term.scaling * grad_f, A, B, *saved))


class _GroupLinearized(torch.autograd.Function):
    """``sum_j <dA_j, (F d)_A> + <dB_j, (F d)_B>`` over a group's slots (``KroneckerTerm.matvec`` on the shared
    input products), gradient ``2 F d``: one call per group, no per-tensor products, sums or gradient scalings
    (~10% of the penalty at 30 layers, 4,200 small ops per step)."""

    @staticmethod
    def forward(ctx, group: KroneckerGroup, *dAdB: Tensor) -> Tensor:
        dAs, dBs = dAdB[0::2], dAdB[1::2]
        q, saved = 0.0, []
        for s, dA, dB, XdA in zip(group.slots, dAs, dBs, group.input_products(list(dAs))):
            PA, PB = s.term.matvec(dA, dB, XdA=XdA)
            q = q + (dA * PA).sum() + (dB * PB).sum()
            saved += [PA, PB]
        ctx.save_for_backward(*saved)
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor):
        return (None, *(2 * grad_q * P for P in ctx.saved_tensors))


class _GroupEffective(torch.autograd.Function):
    """``KroneckerTerm.effective`` summed over a group's slots, on the shared input products."""

    @staticmethod
    def forward(ctx, group: KroneckerGroup, *AB: Tensor) -> Tensor:
        As, Bs = AB[0::2], AB[1::2]
        XdAs = group.input_products([A - s.term.A0 for s, A in zip(group.slots, As)])
        f, saved = 0.0, []
        for s, A, B, XdA in zip(group.slots, As, Bs, XdAs):
            fj, parts = s.term.effective(A, B, XdA=XdA)
            f = f + fj
            saved += [A, B, *parts]
        ctx.terms = [s.term for s in group.slots]
        ctx.save_for_backward(*saved)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        t, grads = ctx.saved_tensors, []
        n = len(t) // len(ctx.terms)  # A, B and the term's saved products, per slot
        for j, term in enumerate(ctx.terms):
            grads += term.effective_grads(2 * term.scaling * grad_f, *t[n * j:n * (j + 1)])
        return (None, *grads)


def has_closed_form_effective(block) -> bool:
    """Whether ``block``'s effective-weight form has the closed-form gradient (the Kronecker kinds)."""
    return isinstance(block, KroneckerBlock)


def effective_weight_quadratic(block, theta: Mapping[str, Tensor]) -> Tensor:
    """``block.effective_quadratic(theta)`` with the closed-form gradient (Kronecker blocks); other blocks
    fall back to their own (autograd) ``effective_quadratic``."""
    if not has_closed_form_effective(block):
        return block.effective_quadratic(theta)
    return _EffectiveWeight.apply(block.term, *block._dA_dB(theta))


class GroupedPrecision:
    """``matvec`` of a ``Precision`` with its Kronecker blocks evaluated as ``KroneckerGroup``s (stacked, each shared
    input factor once: ``lalora.penalty_groups``; ``precision`` is the rebuilt precision on views of the stacks); every other block goes through its
    own ``matvec``. Same results as ``Precision.matvec``.

    ``tensors()`` names every tensor it holds (stacked factors, other blocks' tensors, the anchor) with
    names that are valid buffer names; ``rebuilt(tensors)`` is the same layout on other tensors of the
    same shapes (moved, cast or loaded): how ``LaLoRARegularizer`` keeps them as buffers."""

    def __init__(self, precision: Precision, factor_dtype: torch.dtype | None = None):
        """``factor_dtype``: store the Kronecker factors in this dtype (e.g. ``torch.bfloat16``; every Kronecker
        block is then in a group, also a single one); None keeps the precision's."""
        rest = [b for b in precision.blocks if not isinstance(b, KroneckerBlock)]
        planned = plan_groups([b for b in precision.blocks if isinstance(b, KroneckerBlock)])
        single = 0 if factor_dtype is not None else 1  # a lone block stays a block (unless it is cast)
        rest += [readers[0][0] for readers in planned if sum(map(len, readers)) <= single]
        self._assemble([KroneckerGroup(readers, precision.anchor, factor_dtype) for readers in planned
                        if sum(map(len, readers)) > single], rest, precision.anchor, precision)

    def _assemble(self, groups: list[KroneckerGroup], rest: list, anchor: Mapping[str, Tensor], like: Precision) -> None:
        self.groups = groups
        self.precision = Precision(rest + [b for g in groups for b in g.blocks()], anchor, metadata=like.metadata,
                                   prior_precision=like.prior_precision, validate=False)
        self.rest = self.precision.blocks[:len(rest)]  # bound to the anchor; blocks may overlap (P1 + P2)
        self.param_names = self.precision.param_names
        rest_names = dict.fromkeys(n for b in self.rest for n in b.params)
        self._rest = Precision(self.rest, {n: anchor[n] for n in rest_names}, validate=False)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor: ``group{i}_{role}``, ``block{j}_{role}`` (``self.rest`` order), ``anchor{k}``."""
        out = {}
        for i, g in enumerate(self.groups):
            out.update({f"group{i}_{role}": t for role, t in g.tensors().items()})
        for j, b in enumerate(self.rest):
            out.update({f"block{j}_{role}": t for role, t in b.tensors().items()})
        out.update({f"anchor{k}": self.precision.anchor[n] for k, n in enumerate(self.param_names)})
        return out

    def rebuilt(self, tensors: Mapping[str, Tensor]) -> "GroupedPrecision":
        """The same groups and blocks on ``tensors`` (names as in ``tensors()``, same shapes)."""
        anchor = {n: tensors[f"anchor{k}"] for k, n in enumerate(self.param_names)}
        groups = [g.rebuilt({role: tensors[f"group{i}_{role}"] for role in g.tensors()}, anchor)
                  for i, g in enumerate(self.groups)]
        rest = [type(b).from_state(b.params, {role: tensors[f"block{j}_{role}"] for role in b.tensors()}, b.config())
                for j, b in enumerate(self.rest)]
        new = GroupedPrecision.__new__(GroupedPrecision)
        new._assemble(groups, rest, anchor, self.precision)
        return new

    def _check_delta(self, delta) -> None:
        self.precision._check_delta(delta)

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in [g.matvec(delta) for g in self.groups] + [b.matvec(delta) for b in self.rest]:
            for n, v in part.items():
                out[n] = out[n] + v if n in out else v
        for n in self.param_names:
            if n not in out:
                out[n] = torch.zeros_like(delta[n], dtype=torch.float32)
        return out

    def linearized(self, theta: Mapping[str, Tensor]) -> Tensor:
        """``d^T P d`` at ``d = theta - theta0`` with the closed-form gradient ``2 P d`` (``theta``: name -> the
        full LoRA weights); equals ``linearized_quadratic(self, delta)``. A group subtracts its stacked anchor
        and evaluates its quadratic in one call; the other blocks go through ``linearized_quadratic``."""
        terms = [_GroupLinearized.apply(g, *(d for s in g.slots for d in s.deltas(theta))) for g in self.groups]
        if self.rest:
            anchor = self._rest.anchor
            terms.append(linearized_quadratic(self._rest, {n: theta[n] - anchor[n] for n in anchor}))
        return torch.stack([t.reshape(()) for t in terms]).sum()

    def effective_weight(self, theta: Mapping[str, Tensor]) -> Tensor:
        """Sum of the effective-weight forms of every block (groups batched), with closed-form gradients
        for the Kronecker kinds; other blocks use their own (autograd) ``effective_quadratic``."""
        terms = [_GroupEffective.apply(g, *(t for s in g.slots for t in s.stacked(theta))) for g in self.groups]
        terms += [effective_weight_quadratic(b, theta) for b in self.rest]
        return torch.stack([t.reshape(()) for t in terms]).sum()
