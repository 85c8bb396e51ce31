"""Gram products of the ``kfac``/``tri-kfac`` factor sums (backends/kfac_factors.py), in upper panels.

Layout: only the upper 256-wide panels of each ``(d, d)`` product are computed and summed
(``add_gram``; torch has no symmetric rank-k update), completed once per fit (``finish_factor``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lalora.blocks.symmetry import mark_symmetric

PANEL = 256


def panel_starts(d: int, panel: int = PANEL) -> list[int]:
    """Row starts of the upper panels of a (d, d) matrix: panel ``i`` holds rows ``[a_i, a_i + panel)``
    from column ``a_i`` on. Narrow matrices (d < 1.5 panels): one panel, the whole matrix."""
    return [0] if d < panel + panel // 2 else list(range(0, d, panel))


def panel_views(m: Tensor, panel: int = PANEL) -> list[Tensor]:
    """Views of the upper panels of ``m`` (d, d) (see ``panel_starts``)."""
    d = m.shape[0]
    starts = panel_starts(d, panel)
    if len(starts) == 1:
        return [m]
    return [m[a0:a0 + panel, a0:] for a0 in starts]


def add_gram(acc: Tensor, z: Tensor, alpha: float = 1.0, panel: int = PANEL) -> Tensor:
    """``acc += alpha z^T z`` on the upper panels of ``acc`` (d, d) for ``z`` (m, d), in place (one GEMM
    with beta = 1 per panel); ``mirror_panels`` completes a sum once per fit. torch has no symmetric
    rank-k update (BLAS syrk); computing ``(k+1)/(2k)`` of the products (``k`` panels) cut them to
    0.6-0.85x of ``z.T @ z`` for d = 512-1536 (benchmarks/README.md)."""
    d = z.shape[1]
    starts = panel_starts(d, panel)
    if len(starts) == 1:
        return acc.addmm_(z.T, z, alpha=alpha)
    for a0 in starts:
        acc[a0:a0 + panel, a0:].addmm_(z[:, a0:a0 + panel].T, z[:, a0:], alpha=alpha)
    return acc


def mirror_panels(m: Tensor, panel: int = PANEL) -> Tensor:
    """Complete a sum of upper panels (``add_gram``) in place: the blocks below the diagonal panels are
    copied from above. Full (already symmetric) matrices are left unchanged."""
    d = m.shape[0]
    if len(panel_starts(d, panel)) == 1:
        return m
    for a0 in range(0, d - panel, panel):
        m[a0 + panel:, a0:a0 + panel] = m[a0:a0 + panel, a0 + panel:].T
    return m


def finish_factor(upper: Tensor, scale: float) -> Tensor:
    """The symmetric float32 factor ``scale * S`` from the upper panels of a sum ``S`` (``add_gram``):
    mirrored, and the diagonal tiles (whose GEMM need not be bitwise symmetric) symmetrised, so it is exactly
    symmetric (marked: validation need not read it again, ``lalora.blocks.symmetry``). A float32
    ``upper`` is overwritten (the window sum handed over by ``FactorHooks.take``: no second (d, d)
    allocation per factor); a float64 one is converted into a new tensor."""
    if upper.dtype == torch.float32:
        out = upper.mul_(scale)
    else:
        out = torch.mul(upper, scale, out=torch.empty(upper.shape, dtype=torch.float32, device=upper.device))
    starts = panel_starts(out.shape[0])
    if len(starts) == 1:
        return mark_symmetric((out + out.T).mul_(0.5))
    mirror_panels(out)
    for a0 in starts:
        tile = out[a0:a0 + PANEL, a0:a0 + PANEL]
        tile.copy_((tile + tile.T).mul_(0.5))
    return mark_symmetric(out)
