"""Kronecker blocks stacked for the penalty's batched products, each input factor read once per step.

The penalty is bound by reading the factors (benchmarks/README.md, item 3), and adapters that read the
same layer input (q/k/v, gate/up, several adapters on one layer) have the same input factor ``X``. A
``KroneckerGroup`` holds ``U`` distinct input factors of one shape, stacked, and ``k`` *slots*: slot ``j``
is the ``j``-th adapter reading each of them (its ``G``, ``A0``, ``B0``, scaling and kind, stacked over the
``U`` inputs). The 30 q/k/v triples of a model are one group (``U = 30``, ``k = 3``): one product
``X [dA_q, dA_k, dA_v]^T`` with ``3 r`` columns reads each ``X`` once, where three groups by shape read it
three times, and the regularizer holds it once (as the precision file does, lalora.fileformat).

Blocks share an ``X`` when their factors are equal bit for bit (``factors_equal``; the fit computes one
per input, a file stores one), so the shared products are exactly those of separate copies. Each slot is a
``KroneckerTerm`` on the shared stacked ``X``; the groups' forms take the input products from
``input_products`` (lalora.penalty).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .blocks.equality import factors_equal, fingerprint
from .blocks.factors import factor_from_tensors, stack_factors, stack_key, unstack_factor
from .blocks.kronecker import KroneckerBlock
from .blocks.kronecker_algebra import KroneckerTerm


class Slot:
    """The ``j``-th reader of a group's inputs: kind ``cls``, ``params[u]`` = (a, b) of the reader of input ``u``,
    its stacked ``G``, and the ``KroneckerTerm`` on the group's stacked ``X``."""

    def __init__(self, cls, params, scaling: float, X, G, anchor: Mapping[str, Tensor]):
        self.cls, self.params, self.scaling, self.G = cls, list(params), float(scaling), G
        # the anchor (and so theta - theta0, and every product's result) keeps its own dtype, also when the
        # factors are stored in a lower one (factor_dtype): a bfloat16 theta0 would round away small steps
        A0 = torch.stack([anchor[a] for a, _ in self.params])  # (U, r, d_in)
        B0 = torch.stack([anchor[b] for _, b in self.params])  # (U, d_out, r)
        self.term = KroneckerTerm(X, G, A0, B0, self.scaling, cls.coupled)

    def stacked(self, values: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        dtype = self.term.A0.dtype
        return (torch.stack([values[a] for a, _ in self.params]).to(dtype),
                torch.stack([values[b] for _, b in self.params]).to(dtype))

    def deltas(self, theta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(A - A0, B - B0)`` stacked: one subtraction of the stacked anchor."""
        A, B = self.stacked(theta)
        return A - self.term.A0, B - self.term.B0


class KroneckerGroup:
    """``U`` distinct input factors of one shape and the ``k`` slots reading them (see the module docstring).
    ``blocks()`` returns the blocks rebuilt on views of the stacks, so the caller can drop the originals."""

    def __init__(self, readers: list[list[KroneckerBlock]], anchor: Mapping[str, Tensor], factor_dtype=None):
        """``readers[u]``: the blocks reading input ``u``, in slot order (equal ``reader_key`` for every ``u``)."""
        X = stack_factors([bs[0].X for bs in readers])
        Gs = [stack_factors([bs[j].G for bs in readers]) for j in range(len(readers[0]))]
        if factor_dtype is not None:
            X, Gs = X.to(dtype=factor_dtype), [G.to(dtype=factor_dtype) for G in Gs]
        specs = [(type(b), [bs[j].params for bs in readers], b.scaling) for j, b in enumerate(readers[0])]
        self._setup(X, specs, Gs, anchor)

    def _setup(self, X, specs, Gs, anchor) -> None:
        self.X, self.specs = X, specs
        self.slots = [Slot(cls, params, scaling, X, G, anchor) for (cls, params, scaling), G in zip(specs, Gs)]

    @property
    def params(self) -> list[tuple[str, str]]:
        return [p for s in self.slots for p in s.params]

    def tensors(self) -> dict[str, Tensor]:
        """Role -> stacked factor tensor (``X``, ``slot{j}_G``, or their low-rank parts); the anchor is not a role."""
        out = dict(self.X.tensors("X"))
        for j, s in enumerate(self.slots):
            out.update(s.G.tensors(f"slot{j}_G"))
        return out

    def rebuilt(self, tensors: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> "KroneckerGroup":
        """The same group on other stacked tensors (moved, cast or loaded) and anchor."""
        new = KroneckerGroup.__new__(KroneckerGroup)
        new._setup(factor_from_tensors("X", tensors), self.specs,
                   [factor_from_tensors(f"slot{j}_G", tensors) for j in range(len(self.specs))], anchor)
        return new

    def blocks(self) -> list[KroneckerBlock]:
        return [s.cls(p, unstack_factor(self.X, u), unstack_factor(s.G, u), s.scaling)
                for s in self.slots for u, p in enumerate(s.params)]

    def input_products(self, dAs: list[Tensor]) -> list[Tensor]:
        """``X dA_j^T`` (U, d_in, r_j) for every slot, from one product of ``X`` with all slots' columns."""
        if len(dAs) == 1:
            return [self.X.mm(dAs[0].mT)]
        XV = self.X.mm(torch.cat([dA.mT for dA in dAs], -1))
        return list(torch.split(XV, [dA.shape[-2] for dA in dAs], -1))

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        stacked = [s.stacked(delta) for s in self.slots]
        out: dict[str, Tensor] = {}
        for s, (dA, dB), XdA in zip(self.slots, stacked, self.input_products([dA for dA, _ in stacked])):
            PA, PB = s.term.matvec(dA, dB, XdA=XdA)
            for u, (a, b) in enumerate(s.params):  # blocks may overlap (P + Q, consolidate): sum, never overwrite
                out[a] = out[a] + PA[u] if a in out else PA[u]
                out[b] = out[b] + PB[u] if b in out else PB[u]
        return out


def reader_key(b: KroneckerBlock) -> tuple:
    """What the readers in one slot have in common (they are stacked)."""
    return (type(b), stack_key(b.G), tuple(b.A0.shape), b.scaling)


def plan_groups(blocks: list[KroneckerBlock]) -> list[list[list[KroneckerBlock]]]:
    """The Kronecker ``blocks`` as groups, each a list over its distinct inputs of that input's readers:
    blocks with bitwise equal ``X`` read one input; inputs with equal ``X`` layout and equal reader keys (in
    block order) form one group."""
    inputs: list[list[KroneckerBlock]] = []
    seen: dict[tuple, list[int]] = {}
    for b in blocks:
        key = (stack_key(b.X), fingerprint(b.X))
        for i in seen.get(key, []):
            if factors_equal(inputs[i][0].X, b.X):
                inputs[i].append(b)
                break
        else:
            seen.setdefault(key, []).append(len(inputs))
            inputs.append([b])
    groups: dict[tuple, list[list[KroneckerBlock]]] = {}
    for readers in inputs:
        groups.setdefault((stack_key(readers[0].X), tuple(reader_key(b) for b in readers)), []).append(readers)
    return list(groups.values())
