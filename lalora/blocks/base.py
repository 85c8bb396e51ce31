"""The block interface: one term of a precision, acting on a subset of the LoRA weights.

A ``Precision`` is a *sum* of blocks. Each block names the canonical parameters it acts
on (``block.params``) and implements the quadratic form, the matrix-vector product and
a dense view in the flatten order of its parameters (row-major ``M.flatten()``, params
concatenated in ``block.params`` order). Blocks may overlap: the sum is still a valid
precision (this is what ``precision_a + precision_b`` does). Block-diagonal structures
are the special case of non-overlapping blocks.

Every block kind registers itself with ``@register_block("kind")`` so the file format
can rebuild it from its tensors and JSON config; no pickle is involved.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import Tensor

_BLOCK_KINDS: dict[str, type["Block"]] = {}


def register_block(kind: str):
    """Class decorator: make a block kind loadable from precision files."""

    def deco(cls):
        cls.kind = kind
        _BLOCK_KINDS[kind] = cls
        return cls

    return deco


def block_class(kind: str) -> type["Block"]:
    """The class registered for ``kind`` (the built-in kinds register when ``lalora.blocks`` is imported)."""
    try:
        return _BLOCK_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown block kind {kind!r}; known: {sorted(_BLOCK_KINDS)}") from None


def all_finite(t: Tensor) -> bool:
    """True if every entry of ``t`` (floating point) is finite: min and max propagate NaN and are
    +-inf if any entry is. One vectorised pass, no temporaries (factors of LLM layers are validated
    at every load): 0.3 ms for a (1536, 1536) float32 factor, where a float64 sum took 13 ms and
    ``isfinite(t).all()`` 13 ms."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class Block:
    """One curvature term over ``params`` (canonical names). Subclasses are immutable."""

    kind: ClassVar[str] = "abstract"
    params: tuple[str, ...]

    # --- algebra -----------------------------------------------------------------
    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        """``d^T F d`` for this block (a 0-dim tensor, differentiable in ``delta``)."""
        raise NotImplementedError

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``F d`` restricted to this block's params, as name -> tensor shaped like the param."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """Dense ``(n, n)`` matrix, ``n`` = total numel of ``params`` (small blocks only)."""
        raise NotImplementedError

    def diagonal(self) -> dict[str, Tensor]:
        """The diagonal of ``F`` as name -> tensor shaped like the param."""
        raise NotImplementedError

    #: blocks that can evaluate the effective-weight form set this and implement ``effective_quadratic``
    #: (Kronecker blocks: ``tr(Delta^T G Delta X)``, ``Delta = s(BA - B0A0)`` around the bound anchor).
    supports_effective_weight: ClassVar[bool] = False

    def effective_quadratic(self, theta: Mapping[str, Tensor]) -> Tensor:
        """The effective-weight form from the *current* weights ``theta`` (name -> tensor)."""
        raise NotImplementedError(f"block kind {self.kind!r} has no effective-weight form")

    def scaled(self, factor: float) -> "Block":
        """``factor * F`` as a new block."""
        raise NotImplementedError

    def bind(self, anchor: Mapping[str, Tensor]) -> "Block":
        """This block around ``anchor`` (name -> theta0), called by ``Precision`` with its own anchor.
        Blocks whose forms depend on theta0 (the Kronecker kinds) return a bound copy; the rest, self."""
        return self

    def compressed(self, max_rank: int, *, seed: int = 0) -> "Block":
        """This block with its factors stored in at most ``max_rank`` eigenpairs (``lalora.compress``);
        blocks without such factors return self."""
        return self

    # --- storage -----------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Role -> tensor: everything needed to rebuild the block (saved to safetensors)."""
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able settings that are not tensors (e.g. the LoRA scaling)."""
        return {}

    @classmethod
    def from_state(cls, params: tuple[str, ...], tensors: dict[str, Tensor], config: dict) -> "Block":
        raise NotImplementedError

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ``ValueError`` naming the tensor at fault if the block does not fit ``shapes``."""
        for p in self.params:
            if p not in shapes:
                raise ValueError(f"block {self.kind!r} names unknown parameter {p!r}")
        for role, t in self.tensors().items():
            if not torch.is_floating_point(t):
                raise ValueError(f"block {self.kind!r} tensor {role!r} has non-float dtype {t.dtype}")
            if not all_finite(t):
                raise ValueError(f"block {self.kind!r} tensor {role!r} has NaN or Inf entries")

    # --- generic helpers ---------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Block":
        tensors = {k: v.to(device=device, dtype=dtype if torch.is_floating_point(v) else None) for k, v in self.tensors().items()}
        return type(self).from_state(self.params, tensors, self.config())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def describe(self) -> str:
        """One-line human description used by ``Precision.summary()``."""
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.tensors().items())
        return f"{self.kind}: {shapes}"


def flat_concat(delta: Mapping[str, Tensor], params: tuple[str, ...]) -> Tensor:
    return torch.cat([delta[p].reshape(-1) for p in params])


def split_like(vec: Tensor, params: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    out, i = {}, 0
    for p in params:
        n = 1
        for s in shapes[p]:
            n *= s
        out[p] = vec[i:i + n].reshape(shapes[p])
        i += n
    return out
