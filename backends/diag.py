"""Backend ``diag``: the diagonal of the per-example empirical Fisher.

``F_ii = (1/N) sum_n (d l_n / d theta_i)^2`` with ``l_n`` example n's summed loss and the
true labels (per *example*: the square of a mini-batch gradient is not the EF). Exact
per-example gradients of the LoRA matrices come from lalora's own hooks
(``lalora.capture``), one forward+backward pass per batch; those of the other trainable tensors
(``ctx.others``: DoRA magnitudes, ``modules_to_save`` copies, biases, ...) from ``lalora.pergrad``
on the same forward. DoRA's ``lora_B(lora_A(eye))`` call does not disturb the hooks: peft detaches
that weight norm, so no gradient reaches those calls and their hooks never record.

Supports ``skip_nonfinite`` and the checkpoint protocol (``state_dict``: the float64 sums of
squared per-example gradients, one tensor ``sum.<param>`` per LoRA matrix and other tensor).
"""
from __future__ import annotations

import torch

from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks import DiagBlock
from lalora.capture import PerExampleGrads
from lalora.errors import BackendError
from lalora.options import Curvature
from lalora.pergrad import first_nonfinite, squared_grad_sums

from .stored_sizes import diagonal_bytes


@register_backend("diag")
class DiagEFBackend(CurvatureBackend):
    curvature = Curvature.EF  # no options
    supports_skip_nonfinite = True
    supports_embedding_lora = True  # exact per-example gradients: lalora.capture_embedding
    supports_dora = True  # exact per-example gradients of A, B (hooks) and the magnitude (ctx.others)
    covers_others = True

    def __init__(self, options=None, /, **kwargs):
        super().__init__(options, **kwargs)
        self._sums: dict[str, torch.Tensor] | None = None
        self._loaded: dict[str, torch.Tensor] | None = None

    # --- checkpoint protocol -------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._sums is None:
            return {} if self._loaded is None else dict(self._loaded)
        return {f"sum.{n}": t for n, t in self._sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, t in state.items():
            if not k.startswith("sum.") or t.dtype != torch.float64:
                raise BackendError(f"diag backend state: unexpected entry {k!r} ({t.dtype})")
        self._loaded = dict(state)

    def _initial_sums(self, params) -> dict[str, torch.Tensor]:
        """Zeros, or the sums of a state loaded for this fit (consumed: a later fit starts from zero)."""
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            if set(loaded) != {f"sum.{n}" for n in params}:
                raise BackendError("diag backend state covers other LoRA matrices than the model's: "
                                   f"{sorted(set(loaded) ^ {f'sum.{n}' for n in params})[:3]}")
            for n, t in sums.items():
                saved = loaded[f"sum.{n}"]
                if saved.shape != t.shape:
                    raise BackendError(f"diag backend state for {n!r} has shape {tuple(saved.shape)}, "
                                       f"the model's is {tuple(t.shape)}")
                t.copy_(saved)
        return sums

    @classmethod
    def stored_bytes(cls, adapters, options) -> int:
        return diagonal_bytes(adapters)

    def fit(self, ctx: FitContext):
        params = ctx.params()
        others = dict(ctx.others)
        self._sums = sums = self._initial_sums({**params, **others})
        names, tensors = list(params), list(params.values())
        with PerExampleGrads(ctx.adapters) as capture:
            for batch in ctx.stream:
                capture.clear()
                losses = ctx.per_example_loss(batch)
                if losses is None:  # non-finite loss, skipped
                    continue
                squares = {}
                if others:  # their per-example backward first (graph kept), with the LoRA hooks paused
                    with capture.paused():
                        squares = squared_grad_sums(losses, others)
                torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                # this batch's sum of squares in float32 (a non-finite gradient makes it non-finite),
                # added to the float64 running sums: no float64 copy of the per-example gradients
                squares.update(capture.squared_sums())
                bad = first_nonfinite({n: squares[n] for n in [*names, *others] if n in squares})
                if bad is not None:
                    ctx.nonfinite(batch, "gradient", f"of {bad!r}")
                    continue
                for n, sq in squares.items():
                    sums[n] += sq
                ctx.batch_done(self)
        n_examples = ctx.global_num_examples()
        return [DiagBlock(n, (ctx.all_reduce(sums[n]) / n_examples).float()) for n in [*names, *others]]
