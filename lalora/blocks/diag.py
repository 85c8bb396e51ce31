"""Diagonal block: one precision value per weight."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Block, register_block


@register_block("diag")
class DiagBlock(Block):
    """``F = diag(values)`` over one parameter; ``values`` has the parameter's shape."""

    def __init__(self, param: str, values: Tensor):
        self.params = (param,)
        self.values = values

    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        d = delta[self.params[0]]
        return (self.values * d.to(self.values.dtype).square()).sum()

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        p = self.params[0]
        return {p: self.values * delta[p].to(self.values.dtype)}

    def to_dense(self) -> Tensor:
        return torch.diag(self.values.reshape(-1))

    def diagonal(self) -> dict[str, Tensor]:
        return {self.params[0]: self.values}

    def scaled(self, factor: float) -> "DiagBlock":
        return DiagBlock(self.params[0], self.values * factor)

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values}

    @classmethod
    def from_state(cls, params, tensors, config):
        return cls(params[0], tensors["values"])

    def validate(self, shapes) -> None:
        super().validate(shapes)
        want = tuple(shapes[self.params[0]])
        if tuple(self.values.shape) != want:
            raise ValueError(f"diag block of {self.params[0]!r}: values have shape {tuple(self.values.shape)}, parameter has {want}")
        if bool((self.values < 0).any()):
            raise ValueError(f"diag block of {self.params[0]!r} has negative entries (a precision must be PSD)")
