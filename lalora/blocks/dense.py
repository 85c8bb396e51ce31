"""Dense block: an explicit symmetric PSD matrix over one or more parameters."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Block, flat_concat, register_block, split_like


@register_block("dense")
class DenseBlock(Block):
    """``F = matrix`` (n, n) over ``params`` in flatten order; ``shapes`` gives each param's shape."""

    def __init__(self, params: tuple[str, ...], matrix: Tensor, shapes: Mapping[str, tuple[int, ...]]):
        self.params = tuple(params)
        self.matrix = matrix
        self.shapes = {p: tuple(shapes[p]) for p in self.params}

    def quadratic(self, delta):
        v = flat_concat(delta, self.params).to(self.matrix.dtype)
        return v @ (self.matrix @ v)

    def matvec(self, delta):
        v = flat_concat(delta, self.params).to(self.matrix.dtype)
        return split_like(self.matrix @ v, self.params, self.shapes)

    def to_dense(self):
        return self.matrix

    def diagonal(self):
        return split_like(torch.diagonal(self.matrix), self.params, self.shapes)

    def scaled(self, factor):
        return DenseBlock(self.params, self.matrix * factor, self.shapes)

    def tensors(self):
        return {"matrix": self.matrix}

    def config(self):
        return {"shapes": {p: list(s) for p, s in self.shapes.items()}}

    @classmethod
    def from_state(cls, params, tensors, config):
        return cls(params, tensors["matrix"], {p: tuple(s) for p, s in config["shapes"].items()})

    def validate(self, shapes):
        super().validate(shapes)
        n = 0
        for p in self.params:
            if tuple(shapes[p]) != self.shapes[p]:
                raise ValueError(f"dense block: parameter {p!r} has shape {tuple(shapes[p])}, block expects {self.shapes[p]}")
            n += torch.Size(self.shapes[p]).numel()
        if tuple(self.matrix.shape) != (n, n):
            raise ValueError(f"dense block over {list(self.params)}: matrix shape {tuple(self.matrix.shape)} != ({n}, {n})")
