"""Backend ``diag``: the diagonal of the per-example empirical Fisher.

``F_ii = (1/N) sum_n (d l_n / d theta_i)^2`` with ``l_n`` example n's summed loss and the
true labels (per *example*: the square of a mini-batch gradient is not the EF). Exact
per-example gradients of the LoRA matrices come from lalora's own hooks
(``lalora.capture``), one forward+backward pass per batch.
"""
from __future__ import annotations

import torch

from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks import DiagBlock
from lalora.capture import PerExampleGrads


@register_backend("diag")
class DiagEFBackend(CurvatureBackend):
    curvature = "empirical_fisher"
    default_options = {}

    def fit(self, ctx: FitContext):
        params = ctx.params()
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        names, tensors = list(params), list(params.values())
        with PerExampleGrads(ctx.adapters) as capture:
            for batch in ctx.stream:
                capture.clear()
                losses = ctx.per_example_loss(batch)
                torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                for n in names:
                    g = capture.grads.get(n)
                    if g is not None:
                        sums[n] += g.double().square().sum(0)
        n_examples = ctx.num_examples
        return [DiagBlock(n, (ctx.all_reduce(sums[n]) / n_examples).float()) for n in names]
