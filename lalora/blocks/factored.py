"""Factored block: ``F = U^T U`` from k stored rows ``U (k, n)`` (rank <= k), never densified.

For the per-example empirical Fisher of a large block, ``U = G / sqrt(N)`` with ``G (N, n)``
the N per-example gradients (flatten order of ``params``), so ``F = (1/N) sum_n g_n g_n^T``.
Quadratic form ``|U v|^2`` and ``F v = U^T (U v)`` cost O(k n) time and memory instead of O(n^2).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Block, flat_concat, register_block, split_like


@register_block("factored")
class FactoredBlock(Block):
    """``F = factor^T @ factor`` over ``params``; ``factor`` is ``(k, n)``, ``n`` = total numel."""

    def __init__(self, params: tuple[str, ...], factor: Tensor, shapes: Mapping[str, tuple[int, ...]]):
        self.params = tuple(params)
        if factor.dim() != 2:
            raise ValueError(f"factored block over {list(self.params)}: factor must be 2-D (k, n), got {tuple(factor.shape)}")
        self.factor = factor
        self.shapes = {p: tuple(shapes[p]) for p in self.params}

    @property
    def rank_bound(self) -> int:
        return int(self.factor.shape[0])

    def quadratic(self, delta):
        v = flat_concat(delta, self.params).to(self.factor.dtype)
        return (self.factor @ v).square().sum()

    def matvec(self, delta):
        v = flat_concat(delta, self.params).to(self.factor.dtype)
        return split_like(self.factor.T @ (self.factor @ v), self.params, self.shapes)

    def to_dense(self):
        return self.factor.T @ self.factor

    def diagonal(self):
        return split_like(self.factor.square().sum(0), self.params, self.shapes)

    def scaled(self, factor):
        if factor < 0:
            raise ValueError(f"a factored block can only be scaled by a non-negative factor, got {factor}")
        return FactoredBlock(self.params, self.factor * float(factor) ** 0.5, self.shapes)

    def tensors(self):
        return {"factor": self.factor}

    def config(self):
        return {"shapes": {p: list(s) for p, s in self.shapes.items()}}

    @classmethod
    def from_state(cls, params, tensors, config):
        return cls(params, tensors["factor"], {p: tuple(s) for p, s in config["shapes"].items()})

    def validate(self, shapes):
        super().validate(shapes)
        n = 0
        for p in self.params:
            if tuple(shapes[p]) != self.shapes[p]:
                raise ValueError(f"factored block: parameter {p!r} has shape {tuple(shapes[p])}, block expects {self.shapes[p]}")
            n += torch.Size(self.shapes[p]).numel()
        if self.factor.shape[1] != n:
            raise ValueError(f"factored block over {list(self.params)}: factor has {self.factor.shape[1]} columns, params have {n} weights")

    def describe(self):
        k, n = self.factor.shape
        return f"factored (EF rows): factor({k}, {n}), rank <= {min(k, n)}, {self.num_bytes / 2**20:.2f} MiB vs dense {4 * n * n / 2**20:.2f} MiB"
