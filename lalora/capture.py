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


class PerExampleGrads:
    """Context manager: after ``backward``, ``grads[name]`` is ``(N, out, in)`` in float32."""

    def __init__(self, adapters: list[LoraAdapter]):
        self.modules: dict[str, nn.Linear] = {}
        for a in adapters:
            self.modules[a.a_name] = a.lora_A
            self.modules[a.b_name] = a.lora_B
        self.grads: dict[str, Tensor] = {}
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
                per_example = torch.einsum("nto,nti->noi", gg, xx)
                prev = self.grads.get(name)
                self.grads[name] = per_example if prev is None else prev + per_example

            output.register_hook(grad_hook)

        return forward_hook

    def clear(self) -> None:
        self.grads = {}

    def __enter__(self):
        self.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


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
