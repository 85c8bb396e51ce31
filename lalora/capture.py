"""Per-example gradients of the LoRA matrices from forward/backward hooks (pure torch).

Why own code: the LoRA factors are tiny, so the exact per-example gradient of a LoRA
matrix ``W`` (out x in) is cheap from what its ``nn.Linear`` sees per token: input ``x``
and output gradient ``g``: ``grad_n = sum_t g_{n,t} x_{n,t}^T``. This avoids per-sample
materialisation of the whole model (functorch vmap) and BackPACK's module restrictions.
Padding needs no special care: positions without a labelled token downstream have
``g = 0``. Calls of one module several times per forward are summed per example.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapters import LoraAdapter
from .capture_embedding import EmbeddingGrads


class PerExampleGrads:
    """Context manager: after ``backward``, ``grads[name]`` is ``(N, out, in)`` in float32 and
    ``squared_sums()[name]`` is ``sum_n grads[name][n]**2``, ``(out, in)``. The hooks only record
    each call's ``(g, x)``; per-example gradients are formed on first access. Embedding LoRA adapters
    are captured by ``lalora.capture_embedding.EmbeddingGrads`` (no lora_A/lora_B modules to hook)."""

    def __init__(self, adapters: list[LoraAdapter]):
        self.modules: dict[str, nn.Linear] = {}
        self.embedding = EmbeddingGrads(adapters)
        for a in adapters:
            if a.embedding:
                continue
            self.modules[a.a_name] = a.lora_A
            self.modules[a.b_name] = a.lora_B
        self._factors: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._grads: dict[str, Tensor] | None = None
        self._grads_version = 0
        self._handles = []

    def _hook(self, name):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def grad_hook(g):
                n = g.shape[0]
                gg = g.detach().float().reshape(n, -1, g.shape[-1])
                xx = x.float().reshape(n, -1, x.shape[-1])
                self._factors.setdefault(name, []).append((gg, xx))
                self._grads = None

            output.register_hook(grad_hook)

        return forward_hook

    @property
    def grads(self) -> dict[str, Tensor]:
        """``{name: (N, out, in)}`` per-example gradients (calls of one module summed per example)."""
        if self._grads is None or self._grads_version != self.embedding.version:
            self._grads, self._grads_version = {}, self.embedding.version
            for name, factors in self._factors.items():
                per_example = [torch.einsum("nto,nti->noi", gg, xx) for gg, xx in factors]
                self._grads[name] = per_example[0] if len(per_example) == 1 else torch.stack(per_example).sum(0)
            self._grads.update(self.embedding.grads())
        return self._grads

    def squared_sums(self) -> dict[str, Tensor]:
        """``{name: (out, in)}`` sum over the batch's examples of the squared per-example gradient
        (float32). With one call of one position per example (classifiers, MLPs) this is the
        GEMM ``(g^2)^T (x^2)``, without forming the ``(N, out, in)`` per-example gradients."""
        out = {}
        for name, factors in self._factors.items():
            if len(factors) == 1 and factors[0][0].shape[1] == 1:
                gg, xx = factors[0]
                out[name] = gg[:, 0].square().T @ xx[:, 0].square()
            else:
                pe = self.grads[name]
                out[name] = torch.einsum("noi,noi->oi", pe, pe)
        out.update(self.embedding.squared_sums())
        return out

    @contextmanager
    def paused(self):
        """Backward passes inside do not record (e.g. ``lalora.pergrad``'s per-example passes over the same graph)."""
        saved, saved_grads = self._factors, self._grads
        self._factors = {}
        try:
            yield
        finally:
            self._factors, self._grads = saved, saved_grads

    def clear(self) -> None:
        self._factors = {}
        self._grads = None
        self.embedding.clear()

    def __enter__(self):
        self.clear()
        self.embedding.__enter__()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.embedding.__exit__(*exc)


@contextmanager
def no_param_grads(params):
    """Backward without touching ``.grad`` is done with ``torch.autograd.grad``; this helper
    is for code that must call ``.backward()``: it restores the previous ``.grad`` values."""
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g
