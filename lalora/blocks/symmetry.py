"""Symmetry of dense factors: the check every validation runs (``asymmetric``), and the mark that skips it for a
tensor built exactly symmetric (``mark_symmetric``: the fitted Kronecker factors, mirrored from their upper
panels), until it is modified in place (its ``_version`` changes) or freed."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

_MARKED: dict[int, tuple[weakref.ref, int]] = {}  # id -> (the tensor, its version when marked)


def mark_symmetric(t: Tensor) -> Tensor:
    """Record that ``t`` is exactly symmetric as it is now (``asymmetric`` then returns False without reading it:
    ~2% of a 30-layer kfac fit, benchmarks/README.md); returns ``t``."""
    key = id(t)
    _MARKED[key] = (weakref.ref(t, lambda _, key=key: _MARKED.pop(key, None)), t._version)
    return t


def known_symmetric(t: Tensor) -> bool:
    """Whether ``t`` was marked by ``mark_symmetric`` and not modified in place since."""
    entry = _MARKED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version


def asymmetric(t: Tensor, tile: int = 256) -> bool:
    """``max |t - t^T| > 1e-4 max |diag t|`` (the largest diagonal entry is the largest entry of a PSD
    factor), compared tile by tile: no (d, d) temporary and the transposed reads stay in cache
    (3x faster than ``t - t.T`` at d = 1536; factors of LLM layers are validated at every load)."""
    if known_symmetric(t):
        return False
    d = t.shape[0]
    pairs = [(i, j) for i in range(0, d, tile) for j in range(i, d, tile)]
    if all(torch.equal(t[i:i + tile, j:j + tile], t[j:j + tile, i:i + tile].T) for i, j in pairs):
        return False  # exactly symmetric (every fitted factor): half the time of the difference below
    worst = torch.stack([torch.linalg.vector_norm(t[i:i + tile, j:j + tile] - t[j:j + tile, i:i + tile].T, float("inf"))
                         for i, j in pairs]).max()
    return bool(worst > 1e-4 * torch.diagonal(t).abs().max() + 1e-30)
