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

from .blocks.factors import factor_from_tensors, stack_factors, stack_key, unstack_factor
from .blocks.kronecker import KroneckerBlock
from .blocks.kronecker_algebra import KroneckerTerm
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
        f, GU, XV = term.effective(A, B)
        ctx.scaling = term.scaling
        ctx.save_for_backward(A, B, GU, XV)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):
        A, B, GU, XV = ctx.saved_tensors
        return (None, *KroneckerTerm.effective_grads(2 * ctx.scaling * grad_f, A, B, GU, XV))


class _GroupLinearized(torch.autograd.Function):
    """``<dA, (F d)_A> + <dB, (F d)_B>`` of a stacked group (``KroneckerTerm.matvec``), gradient ``2 F d``:
    one call per group, no per-tensor products, sums or gradient scalings (which were ~10% of the penalty
    at 30 layers, 4,200 small ops per step)."""

    @staticmethod
    def forward(ctx, term: KroneckerTerm, dA: Tensor, dB: Tensor) -> Tensor:
        PA, PB = term.matvec(dA, dB)
        ctx.save_for_backward(PA, PB)
        return (dA * PA).sum() + (dB * PB).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor):
        PA, PB = ctx.saved_tensors
        return None, 2 * grad_q * PA, 2 * grad_q * PB


def has_closed_form_effective(block) -> bool:
    """Whether ``block``'s effective-weight form has the closed-form gradient (the Kronecker kinds)."""
    return isinstance(block, KroneckerBlock)


def effective_weight_quadratic(block, theta: Mapping[str, Tensor]) -> Tensor:
    """``block.effective_quadratic(theta)`` with the closed-form gradient (Kronecker blocks); other blocks
    fall back to their own (autograd) ``effective_quadratic``."""
    if not has_closed_form_effective(block):
        return block.effective_quadratic(theta)
    return _EffectiveWeight.apply(block.term, *block._dA_dB(theta))


class KroneckerGroup:
    """Equal-shaped Kronecker blocks of one kind as one stacked ``KroneckerTerm`` (leading dim L).
    ``blocks()`` returns the blocks rebuilt on views of the stacks, so the caller can drop the
    originals (no second copy of the factors)."""

    def __init__(self, blocks: list[KroneckerBlock], anchor: Mapping[str, Tensor], factor_dtype=None):
        first = blocks[0]
        X, G = stack_factors([b.X for b in blocks]), stack_factors([b.G for b in blocks])
        if factor_dtype is not None:
            X, G = X.to(dtype=factor_dtype), G.to(dtype=factor_dtype)
        self._setup(type(first), [b.params for b in blocks], first.scaling, X, G, anchor)

    def _setup(self, cls, params, scaling, X, G, anchor) -> None:
        self.cls, self.params, self.scaling, self.X, self.G = cls, list(params), float(scaling), X, G
        # the anchor (and so theta - theta0, and every product's result) keeps its own dtype, also when the
        # factors are stored in a lower one (factor_dtype): a bfloat16 theta0 would round away small steps
        A0 = torch.stack([anchor[a] for a, _ in self.params])  # (L, r, d_in)
        B0 = torch.stack([anchor[b] for _, b in self.params])  # (L, d_out, r)
        self.term = KroneckerTerm(X, G, A0, B0, self.scaling, cls.coupled)

    def tensors(self) -> dict[str, Tensor]:
        """Role -> stacked factor tensor (``X``/``G``, or their low-rank parts); the anchor is not a role."""
        return {**self.X.tensors("X"), **self.G.tensors("G")}

    def rebuilt(self, tensors: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> "KroneckerGroup":
        """The same group on other stacked tensors (moved, cast or loaded) and anchor."""
        new = KroneckerGroup.__new__(KroneckerGroup)
        new._setup(self.cls, self.params, self.scaling, factor_from_tensors("X", tensors),
                   factor_from_tensors("G", tensors), anchor)
        return new

    @staticmethod
    def key(b: KroneckerBlock) -> tuple:
        return (type(b), stack_key(b.X), stack_key(b.G), tuple(b.A0.shape), b.scaling)

    def blocks(self) -> list[KroneckerBlock]:
        return [self.cls(p, unstack_factor(self.X, i), unstack_factor(self.G, i), self.scaling)
                for i, p in enumerate(self.params)]

    def stacked(self, values: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        dtype = self.term.A0.dtype
        return (torch.stack([values[a] for a, _ in self.params]).to(dtype),
                torch.stack([values[b] for _, b in self.params]).to(dtype))

    def deltas(self, theta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(A - A0, B - B0)`` stacked: one subtraction of the stacked anchor per group."""
        A, B = self.stacked(theta)
        return A - self.term.A0, B - self.term.B0

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        PA, PB = self.term.matvec(*self.stacked(delta))
        out: dict[str, Tensor] = {}
        for i, (a, b) in enumerate(self.params):  # blocks may overlap (P + Q, consolidate): sum, never overwrite
            out[a] = out[a] + PA[i] if a in out else PA[i]
            out[b] = out[b] + PB[i] if b in out else PB[i]
        return out


class GroupedPrecision:
    """``matvec`` of a ``Precision`` with its equal-shaped Kronecker blocks evaluated as ``KroneckerGroup``s
    (``precision`` is the rebuilt precision on views of the stacks); every other block goes through its
    own ``matvec``. Same results as ``Precision.matvec``.

    ``tensors()`` names every tensor it holds (stacked factors, other blocks' tensors, the anchor) with
    names that are valid buffer names; ``rebuilt(tensors)`` is the same layout on other tensors of the
    same shapes (moved, cast or loaded): how ``LaLoRARegularizer`` keeps them as buffers."""

    def __init__(self, precision: Precision, factor_dtype: torch.dtype | None = None):
        """``factor_dtype``: store the Kronecker factors in this dtype (e.g. ``torch.bfloat16``; every Kronecker
        block is then in a group, also a single one); None keeps the precision's."""
        groups: dict[tuple, list] = {}
        rest = []
        for b in precision.blocks:
            if isinstance(b, KroneckerBlock):
                groups.setdefault(KroneckerGroup.key(b), []).append(b)
            else:
                rest.append(b)
        single = 0 if factor_dtype is not None else 1
        rest += [bs[0] for bs in groups.values() if len(bs) <= single]
        self._assemble([KroneckerGroup(bs, precision.anchor, factor_dtype) for bs in groups.values()
                        if len(bs) > single], rest, precision.anchor, precision)

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
        terms = [_GroupLinearized.apply(g.term, *g.deltas(theta)) for g in self.groups]
        if self.rest:
            anchor = self._rest.anchor
            terms.append(linearized_quadratic(self._rest, {n: theta[n] - anchor[n] for n in anchor}))
        return torch.stack([t.reshape(()) for t in terms]).sum()

    def effective_weight(self, theta: Mapping[str, Tensor]) -> Tensor:
        """Sum of the effective-weight forms of every block (groups batched), with closed-form gradients
        for the Kronecker kinds; other blocks use their own (autograd) ``effective_quadratic``."""
        terms = [_EffectiveWeight.apply(g.term, *g.stacked(theta)) for g in self.groups]
        terms += [effective_weight_quadratic(b, theta) for b in self.rest]
        return torch.stack([t.reshape(()) for t in terms]).sum()
