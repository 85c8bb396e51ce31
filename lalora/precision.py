"""``Precision``: the Laplace precision over the LoRA weights, a sum of blocks plus an anchor.

Conventions (docs/concepts.md): ``F`` is the mean over examples of the curvature of each
example's summed loss; weights are flattened row-major; ``to_dense()`` orders parameters
as ``param_names``. The penalty a regularizer derives from it is
``(strength/2) * [d^T F d + prior_precision * |d|^2]`` with ``d = theta - anchor``.

Where it sits: ``Precision`` builds on ``lalora.blocks`` (the terms), ``lalora.fileformat`` (the
file layout: ``save``/``load``) and ``lalora.validation`` (``load(model=...)`` matches the file to a
model); none of them imports this module. Data is validated where it enters: ``Precision(...)``
built by a backend (``fit_precision``), a user or ``load`` checks every block once; precisions
derived from a valid one (``+``, ``*``, ``with_anchor``, ``to``, a restriction to the parameters a
model has) skip the repeated check (``validate=False``).
"""
from __future__ import annotations

import copy
import warnings
from typing import Mapping

import torch
from torch import Tensor

from .blocks import Block
from .blocks.base import all_finite
from .errors import PrecisionFileError
from .fileformat import read_precision, save_precision
from .shards import is_sharded, read_sharded, save_sharded, shard_of
from .validation import match_to_model


class Precision:
    """Sum of ``blocks`` over the LoRA weights named in ``anchor`` (canonical name -> theta0).

    The anchor lives here only: blocks whose forms depend on theta0 (the Kronecker kinds) are
    bound to it (``Block.bind``), so moving it (``with_anchor``) moves every form with it.
    ``validate`` checks every block against the anchor's shapes (names, shapes, finite, PSD-looking
    factors); derived precisions (``with_anchor``, ``+``, ``*``, ``to``) skip the repeated check.
    """

    def __init__(self, blocks: list[Block], anchor: Mapping[str, Tensor], *, metadata: dict | None = None,
                 prior_precision: float = 0.0, validate: bool = True):
        self.anchor = dict(anchor)
        self.blocks = [b.bind(self.anchor) for b in blocks]
        self.metadata = dict(metadata or {})
        self.prior_precision = float(prior_precision)
        if validate:
            shapes = self.shapes
            for n, t in self.anchor.items():
                if torch.is_floating_point(t) and not all_finite(t):
                    raise ValueError(f"anchor of {n!r} has NaN or Inf entries")
            for b in self.blocks:
                b.validate(shapes)

    # --- structure ---------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.anchor)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.anchor.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.anchor.values())

    @property
    def num_bytes(self) -> int:
        """Bytes held by the curvature tensors (the anchor, one float per weight, not counted)."""
        return sum(b.num_bytes for b in self.blocks)

    @property
    def structure(self) -> str:
        kinds = sorted({b.kind for b in self.blocks})
        return "+".join(kinds) if kinds else "empty"

    # --- algebra -----------------------------------------------------------------
    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        """``d^T F d`` (without the prior term); ``delta`` maps every param name to a tensor."""
        self._check_delta(delta)
        terms = [b.quadratic(delta) for b in self.blocks]
        if not terms:
            return next(iter(delta.values())).new_zeros(())
        return torch.stack([t.reshape(()) for t in terms]).sum()

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``F d`` as name -> tensor (zeros for params no block touches)."""
        self._check_delta(delta)
        out = {n: torch.zeros_like(delta[n], dtype=torch.float32) for n in self.param_names}
        for b in self.blocks:
            for n, v in b.matvec(delta).items():
                out[n] = out[n] + v
        return out

    def diagonal(self) -> dict[str, Tensor]:
        out = {n: torch.zeros(s) for n, s in self.shapes.items()}
        for b in self.blocks:
            for n, v in b.diagonal().items():
                out[n] = out[n] + v.detach().float().cpu()
        return out

    def to_dense(self) -> Tensor:
        """Dense ``(n, n)`` matrix over all LoRA weights in ``param_names`` order (small models only)."""
        offsets, i = {}, 0
        for n, t in self.anchor.items():
            offsets[n] = (i, i + t.numel())
            i += t.numel()
        dense = torch.zeros(i, i, dtype=torch.float64)
        for b in self.blocks:
            m = b.to_dense().detach().double().cpu()
            idx = torch.cat([torch.arange(*offsets[p]) for p in b.params])
            dense[idx[:, None], idx[None, :]] += m
        return dense

    def __add__(self, other: "Precision") -> "Precision":
        if not isinstance(other, Precision):
            return NotImplemented
        if self.param_names != other.param_names:
            missing = sorted(set(self.param_names) ^ set(other.param_names))
            raise ValueError(f"cannot add precisions over different parameters (first difference: {missing[:1] or 'order'})")
        for n in self.param_names:
            if not torch.equal(self.anchor[n].cpu().double(), other.anchor[n].cpu().double()):  # any dtypes
                raise ValueError(f"cannot add precisions with different anchors (parameter {n!r} differs); "
                                 "move one with .with_anchor() first")
        meta = {"combined_from": [self.metadata, other.metadata]}
        return Precision(self.blocks + other.blocks, self.anchor, metadata=meta,
                         prior_precision=self.prior_precision + other.prior_precision, validate=False)

    def __mul__(self, factor: float) -> "Precision":
        if isinstance(factor, torch.Tensor):
            factor = float(factor)
        if not isinstance(factor, (int, float)):
            return NotImplemented
        if factor < 0:
            raise ValueError(f"a precision can only be scaled by a non-negative factor, got {factor}")
        meta = dict(self.metadata, scale=float(factor) * float(self.metadata.get("scale", 1.0)))
        return Precision([b.scaled(float(factor)) for b in self.blocks], self.anchor, metadata=meta,
                         prior_precision=self.prior_precision * factor, validate=False)

    __rmul__ = __mul__

    def with_anchor(self, anchor: Mapping[str, Tensor]) -> "Precision":
        """The same curvature around another point ``theta1`` (continual learning: the end of the last
        task); ``anchor`` maps every name in ``param_names`` to a tensor (extra names are ignored). Each
        anchor tensor keeps the device and dtype of the one it replaces.

        Blocks whose curvature does not depend on the fit point (diag, dense, factored) are reused
        as they are. Kronecker blocks (``kfac``, ``tri-kfac``, dense or low-rank factors) keep their
        factors ``G``, ``X`` and are bound to ``theta1``: the linearized forms are the pull-back
        ``J1^T kron(G, X) J1`` through the Jacobian at ``theta1`` (``kfac``: its diagonal blocks), the
        effective-weight form uses ``Delta = s (B A - B1 A1)``; every form is 0 at ``theta1``.
        """
        missing = [n for n in self.param_names if n not in anchor]
        if missing:
            raise KeyError(f"with_anchor: the new anchor has no entry for parameter {missing[0]!r}")
        new = {}
        for n, old in self.anchor.items():
            t = anchor[n].detach()
            if tuple(t.shape) != tuple(old.shape):
                raise ValueError(f"with_anchor: parameter {n!r} has shape {tuple(t.shape)}, the precision's anchor "
                                 f"{tuple(old.shape)}")
            new[n] = t.to(device=old.device, dtype=old.dtype).clone()
        return Precision(self.blocks, new, metadata=copy.deepcopy(self.metadata), prior_precision=self.prior_precision,
                         validate=False)

    def to(self, device=None, dtype=None) -> "Precision":
        """A copy on ``device`` (default: where it is); floating tensors are cast only when ``dtype`` is given."""
        return Precision([b.to(device, dtype) for b in self.blocks],
                         {n: t.to(device=device, dtype=dtype if torch.is_floating_point(t) else None)
                          for n, t in self.anchor.items()},
                         metadata=self.metadata, prior_precision=self.prior_precision, validate=False)

    def zero_params(self) -> list[str]:
        """Parameters whose whole curvature is zero (their diagonal is 0; F is PSD)."""
        return [n for n, d in self.diagonal().items() if not bool((d != 0).any())]

    # --- I/O ---------------------------------------------------------------------
    def save(self, path) -> None:
        """Write one safetensors file (atomic: temp file + rename). See docs/file-format.md. A rank's shard of a
        ``shard_factors`` fit (``metadata["factor_shard"]``) writes its shard file and, on rank 0, the index
        ``<path>.index.json``: call it on every rank (docs/scale.md)."""
        if shard_of(self) is not None:
            save_sharded(self, path)
        else:
            save_precision(self, path)

    @classmethod
    def load(cls, path, model=None, strict: bool = True, *, adapter_name=None) -> "Precision":
        """Read a precision file, or a sharded precision (its index ``<path>.index.json``, docs/scale.md) whole;
        with ``model``, validate names/shapes/base model against it.

        ``strict=False`` keeps the blocks whose parameters match and records the rest in
        ``metadata["skipped_params"]`` instead of raising. Any defect of the file, including a block
        that does not fit the anchor, raises ``PrecisionFileError`` naming the file.
        """
        blocks, anchor, metadata, prior = read_sharded(path) if is_sharded(path) else read_precision(path)
        try:
            precision = cls(blocks, anchor, metadata=metadata, prior_precision=prior)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise PrecisionFileError(f"{path}: {e}") from None
        except Exception as e:  # defence in depth: a malformed file never escapes as another error type
            raise PrecisionFileError(f"{path}: invalid precision file ({type(e).__name__}: {e})") from None
        if model is not None:
            precision = match_to_model(precision, model, strict=strict, adapter_name=adapter_name)
        return precision

    # --- laplace-torch interop: deprecated, the conversions live in the laplace backend ----
    @classmethod
    def from_laplace(cls, la, model, *, adapter_name=None) -> "Precision":
        """Deprecated: use ``lalora.backends.laplace_torch.precision_from_laplace(la, model)``.

        From a fitted laplace-torch object over ``model``'s LoRA weights (its sum ``H`` / ``n_data``)."""
        return _laplace_backend("from_laplace", "precision_from_laplace(la, model)").from_laplace(
            la, model, adapter_name=adapter_name)

    def to_laplace(self, model, likelihood: str = "classification", *, prior_precision=None, num_examples=None,
                   adapter_name=None):
        """Deprecated: use ``lalora.backends.laplace_torch.precision_to_laplace(precision, model)``.

        A fitted laplace-torch object (``H = N F``) for predictive uncertainty; see docs/block-backpack-laplace.md."""
        return _laplace_backend("to_laplace", "precision_to_laplace(precision, model)").to_laplace(
            self, model, likelihood, prior_precision=prior_precision, num_examples=num_examples,
            adapter_name=adapter_name)

    # --- reporting ---------------------------------------------------------------
    def summary(self) -> str:
        m = self.metadata
        lines = [
            f"Precision over {len(self.anchor)} LoRA matrices ({self.num_params:,} weights), structure {self.structure}",
            f"  backend={m.get('backend', '?')} curvature={m.get('curvature', '?')} examples={m.get('num_examples', '?')} "
            f"tokens={m.get('num_tokens', '?')} stored={self.num_bytes / 2**20:.2f} MiB prior_precision={self.prior_precision:g}",
        ]
        diag = self.diagonal()
        for b in self.blocks:
            vals = torch.cat([diag[p].reshape(-1) for p in b.params])
            lines.append(f"  [{', '.join(b.params)}] {b.describe()}  diag mean={vals.mean():.3g} max={vals.max():.3g}")
        zeros = self.zero_params()
        if zeros:
            lines.append(f"  ZERO curvature on {len(zeros)} matrices (e.g. {zeros[0]}): see docs/concepts.md#zero-curvature")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Precision(structure={self.structure!r}, params={len(self.anchor)}, blocks={len(self.blocks)}, "
                f"bytes={self.num_bytes})")

    def _check_delta(self, delta: Mapping[str, Tensor]) -> None:
        for n in self.param_names:
            if n not in delta:
                raise KeyError(f"delta has no entry for parameter {n!r}")


def _laplace_backend(method: str, replacement: str):
    """The ``laplace`` backend's class, reached through the registry (the core imports no backend), after a
    ``DeprecationWarning`` that ``Precision.<method>`` moved there."""
    from .backend import get_backend

    warnings.warn(f"Precision.{method} is deprecated: use lalora.backends.laplace_torch.{replacement}",
                  DeprecationWarning, stacklevel=3)
    return get_backend("laplace")
