"""MC label sampling: the one seeded sampler of the MC-Fisher backends.

Convention (docs/concepts.md, "MC labels"): an MC Fisher replaces the true labels by labels drawn
from the model's predictive distribution at every labelled output row (DESIGN.md section 2), once per
MC sample and batch.

- **Generator**: one CPU ``torch.Generator`` per fit, seeded with the backend's ``seed`` option
  (``mc_generator``) and consumed in batch order. Every draw is made on the CPU and then moved to the
  outputs' device, so a seed gives the same labels on every device (a CUDA generator would not), and
  the generator's state is the whole sampling state (the ``kfac`` checkpoints store it).
- **What is drawn, per MC sample**: for a categorical likelihood one float64 uniform per output row of
  ``LossFunction.output_rows`` (every row, also the rows without a target: their draws are discarded,
  so the draws of a row do not depend on which other rows are labelled), turned into a class by an
  inverse CDF over the row's probabilities (``sample_categorical``); for a Gaussian likelihood
  (lalora's ``mse`` loss ``|f - y|^2``, the NLL of ``N(f, I/2)`` up to constants) one standard normal
  per output entry, ``y = f + sqrt(1/2) eps`` (``sample_gaussian``).
- **Libraries that draw themselves** (BackPACK's ``DiagGGNMC``/``KFAC``, laplace-torch's stochastic
  GGN) cannot take a generator: they draw from torch's global generators. ``library_rng`` seeds those
  (the CPU one and the model device's) with the backend's seed inside a forked RNG state, so such a
  fit is reproducible too and leaves the caller's RNG state as it was; their draws are not the ones
  above (another seed stream, another sampling method).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

#: variance of the Gaussian whose NLL is lalora's ``mse`` loss ``|f - y|^2`` (up to constants)
MSE_VARIANCE = 0.5


def mc_generator(seed: int) -> torch.Generator:
    """The CPU generator of one fit's MC labels, seeded with the backend's ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def sample_categorical(p: Tensor, gen: torch.Generator, block: int = 256, uniforms: Tensor | None = None) -> Tensor:
    """One draw per row of ``p`` (R, C) (non-negative, unnormalised) by inverse CDF, in two levels: the
    block of ``block`` classes from the CDF of the block masses, then the class from the CDF inside
    that block. One float64 uniform per row from the CPU generator ``gen`` (the same draws on every device).
    ``torch.multinomial`` draws C exponentials per row and a full-width cumsum writes an (R, C) CDF;
    this reads ``p`` once (the block sums) and works on (R, C / block) and (R, block) tensors.
    Classes of zero mass are never drawn: each level searches a value strictly below its total.
    ``uniforms``: the ``(R,)`` float64 uniforms, drawn from ``gen`` before (rows sampled in chunks)."""
    R, C = p.shape
    u = (torch.rand(R, generator=gen, dtype=torch.float64) if uniforms is None else uniforms).to(p.device)
    full = C // block
    masses = [p[:, :full * block].reshape(R, full, block).sum(-1)] if full else []
    if full * block < C:
        masses.append(p[:, full * block:].sum(-1, keepdim=True))
    coarse = torch.cat(masses, 1).double().cumsum(-1)  # (R, ceil(C / block))
    v = _strictly_below(u * coarse[:, -1], coarse[:, -1])
    blk = torch.searchsorted(coarse, v.unsqueeze(1), right=True).squeeze(1)
    v = v - torch.where(blk > 0, coarse.gather(1, (blk - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
    cols = blk.unsqueeze(1) * block + torch.arange(block, device=p.device)  # (R, block)
    fine = (p.gather(1, cols.clamp_max(C - 1)) * (cols < C)).double().cumsum(-1)
    v = _strictly_below(v, fine[:, -1])
    return blk * block + torch.searchsorted(fine, v.unsqueeze(1), right=True).squeeze(1)


def _strictly_below(v: Tensor, total: Tensor) -> Tensor:
    """``v`` clamped to the largest float below ``total`` (u * total can round up to total)."""
    return torch.minimum(v, torch.nextafter(total, torch.zeros_like(total)))


def sample_gaussian(mean: Tensor, gen: torch.Generator, variance: float = MSE_VARIANCE) -> Tensor:
    """``mean + sqrt(variance) eps``, ``eps`` standard normal of ``mean``'s shape drawn on the CPU from ``gen``
    (float32), detached from ``mean``'s graph."""
    eps = torch.randn(mean.shape, generator=gen).to(mean.device)
    return mean.detach() + eps * math.sqrt(variance)


def sample_row_targets(likelihood: str, rows: Tensor, gen: torch.Generator, probs: Tensor | None = None) -> Tensor:
    """MC targets of output rows ``rows`` (R, C) for a ``likelihood``: class indices ``(R,)`` (categorical;
    ``probs`` = ``softmax(rows)`` if already computed) or Gaussian targets ``(R, C)``."""
    if likelihood == "categorical":
        return sample_categorical(torch.softmax(rows.detach().float(), -1) if probs is None else probs, gen)
    if likelihood == "gaussian":
        return sample_gaussian(rows.float(), gen)
    raise ValueError(f"no MC label sampler for likelihood {likelihood!r} (categorical or gaussian only)")


@contextmanager
def library_rng(seed: int, device=None):
    """For libraries that draw MC labels from torch's global generators: the CPU generator and, for a CUDA
    ``device``, that device's generator are seeded with ``seed`` and restored on exit (no other generator
    is touched)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield
