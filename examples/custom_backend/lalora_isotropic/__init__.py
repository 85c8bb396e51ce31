"""``isotropic``: a lalora curvature backend in its own package (a worked plugin example).

For every LoRA matrix ``m`` with ``n_m`` weights it stores one number, the mean diagonal of the
per-example empirical Fisher of that matrix, plus an optional Tikhonov ``damping``::

    tau_m = tr(F_m) / n_m + damping,   F_m = (1/N) sum_n g_{n,m} g_{n,m}^T,   P_m = tau_m * I

``g_{n,m}`` is the gradient of example n's loss (summed over its labelled tokens) w.r.t. matrix
``m``: lalora's conventions (mean over examples), so ``strength`` means the same as for the
built-in backends. ``granularity="model"`` uses one ``tau`` for all LoRA weights instead. It is
a data-scaled L2 penalty: cheap (one number per matrix), blind to directions.

The result is stored as ``DiagBlock``s (a block kind every lalora installation can read back),
so precision files written with this plugin load without the plugin installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import lalora
from lalora.blocks import DiagBlock
from lalora.capture import PerExampleGrads

__all__ = ["IsotropicBackend", "IsotropicOptions"]


@dataclass(frozen=True)
class IsotropicOptions(lalora.BackendOptions):
    """The options, declared once: type, default, doc, allowed values or range. lalora checks them (a wrong
    value raises BackendError naming the option, a misspelt name gets a "did you mean"), reads
    ``--option damping=1e-3`` by the declared type and lists them in ``lalora backends``."""

    damping: float = lalora.option(0.0, "Tikhonov term added to every tau", ge=0)
    granularity: Literal["matrix", "model"] = lalora.option("matrix", "matrix: one tau per LoRA matrix; model: one "
                                                            "tau for all")


class IsotropicBackend(lalora.CurvatureBackend):
    """Scalar-per-matrix empirical Fisher. Registered as ``isotropic`` by the entry point."""

    curvature = lalora.Curvature.EF  # what it estimates: shown by `lalora backends`, stored in the metadata
    Options = IsotropicOptions
    requires = ()  # import names of extra libraries; `lalora backends` reports missing ones

    @classmethod
    def stored_bytes(cls, adapters, options) -> int:
        """What `lalora fit --dry-run` reports: one float32 per LoRA weight (DiagBlocks)."""
        return 4 * sum(a.A.numel() + a.B.numel() for a in adapters)

    def fit(self, ctx: lalora.FitContext) -> list[lalora.Block]:
        params = ctx.params()  # canonical name -> LoRA parameter
        names, tensors = list(params), list(params.values())
        # accumulate SUMS over examples (float64), never means: the mean is taken once at the end
        sums = {n: torch.zeros((), dtype=torch.float64, device=p.device) for n, p in params.items()}
        with PerExampleGrads(ctx.adapters) as capture:  # exact per-example gradients of the LoRA matrices
            for batch in ctx.stream:  # prepared batches; the stream can be iterated once
                capture.clear()
                losses = ctx.per_example_loss(batch)  # (N_batch,) summed loss per example
                torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                for n in names:
                    g = capture.grads.get(n)  # (N_batch, out, in); None if the matrix got no gradient
                    if g is not None:
                        sums[n] += g.double().square().sum()
        num_examples = ctx.global_num_examples()  # examples with >= 1 labelled token, over all ranks (a collective)
        # sum over ranks (identity in one process), then divide by N: the trace of F_m
        traces = {n: ctx.all_reduce(sums[n]) / num_examples for n in names}
        damping = self.options.damping  # validated: a float >= 0
        if self.options.granularity == "model":
            total = sum(p.numel() for p in tensors)
            tau = float(sum(traces.values()) / total) + damping
            taus = {n: tau for n in names}
        else:
            taus = {n: float(traces[n] / params[n].numel()) + damping for n in names}
        ctx.metadata["isotropic_tau"] = taus  # lands in the precision file's metadata
        return [DiagBlock(n, torch.full(params[n].shape, taus[n], dtype=torch.float32)) for n in names]
