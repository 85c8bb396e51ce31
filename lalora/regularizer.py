"""``LaLoRARegularizer``: the Laplace penalty ``(strength/2) [d^T P d + delta |d|^2]``.

It consumes a ``Precision`` and never calls a backend. Evaluation goes through each
block's own matrix-vector product (no Kronecker product or dense matrix is formed that the
structure avoids) in float32, whatever the LoRA weights' dtype; the gradient is computed in
closed form (``lalora.penalty``), so each curvature factor is read once per step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapters import find_lora_adapters, lora_parameters
from .errors import AnchorMismatchError, BackendError
from .penalty import GroupedPrecision, linearized_quadratic
from .precision import Precision
from .validation import match_to_model

FORMS = ("linearized", "effective-weight")


class LaLoRARegularizer(nn.Module):
    """Penalty module: ``reg()`` returns a differentiable 0-dim float32 tensor.

    ``strength`` is lambda; ``prior_precision`` (delta) overrides the one stored in the
    precision. ``form="linearized"`` uses ``d = theta - theta0``; ``form="effective-weight"``
    (Kronecker precisions) uses the exact ``Delta = s (B A - B0 A0)``. The model's LoRA weights
    must be at the precision's anchor when the regularizer is built (``check_anchor``), since
    a precision is only meaningful around the point it was fitted at; ``reset_to_anchor()``
    moves them there.
    """

    def __init__(self, model: nn.Module, precision: Precision, strength: float, *, prior_precision: float | None = None,
                 form: str = "linearized", adapter_name=None, check_anchor: bool = True):
        super().__init__()
        if not isinstance(precision, Precision):
            raise TypeError(f"precision must be a lalora.Precision, got {type(precision).__name__}")
        if form not in FORMS:
            raise ValueError(f"form={form!r} is unknown; use one of {FORMS}")
        strength = float(strength)
        if not strength >= 0 or strength == float("inf"):
            raise ValueError(f"strength must be a finite number >= 0, got {strength}")
        precision = match_to_model(precision, model, strict=True, adapter_name=adapter_name)
        params = lora_parameters(find_lora_adapters(model, adapter_name))
        self._params = {n: params[n] for n in precision.param_names}
        device = next(iter(self._params.values())).device
        # equal-shaped Kronecker blocks are stacked for batched products (lalora.penalty.GroupedPrecision);
        # self.precision holds the blocks on views of the stacks. While the caller keeps the original
        # float32 precision on this device, its factors exist twice (the stacks are copies).
        self._grouped = GroupedPrecision(precision.to(device, torch.float32))
        self.precision = self._grouped.precision
        self.strength = strength
        self.prior_precision = float(precision.prior_precision if prior_precision is None else prior_precision)
        if self.prior_precision < 0:
            raise ValueError(f"prior_precision must be >= 0, got {self.prior_precision}")
        self.form = form
        if form == "effective-weight":
            bad = [b.kind for b in self.precision.blocks if not b.supports_effective_weight]
            if bad:
                raise BackendError(f"form='effective-weight' needs Kronecker blocks (backend 'kfac' or 'tri-kfac'); "
                                   f"this precision has {sorted(set(bad))} blocks")
        if self.prior_precision == 0 and len(self.precision.zero_params()) == len(self.precision.param_names):
            raise ValueError("the precision is zero everywhere, so the penalty would do nothing; "
                             "set prior_precision > 0 or refit (see docs/concepts.md#zero-curvature)")
        if check_anchor:
            self.check_anchor()

    @torch.no_grad()
    def check_anchor(self) -> None:
        """Raise ``AnchorMismatchError`` naming the first LoRA weight not at theta0."""
        for n, p in self._params.items():
            a = self.precision.anchor[n]
            if not torch.equal(p.detach().float(), a):
                diff = (p.detach().float() - a).abs().max().item()
                raise AnchorMismatchError(
                    f"LoRA weight {n!r} differs from the precision's anchor theta0 (max abs diff {diff:.3g}): the "
                    "precision was fitted at another starting point. Call reg.reset_to_anchor() to start from theta0, "
                    "or pass check_anchor=False if you know what you are doing")

    @torch.no_grad()
    def reset_to_anchor(self) -> None:
        """Copy theta0 into the model's LoRA weights."""
        for n, p in self._params.items():
            p.copy_(self.precision.anchor[n].to(p.dtype))

    def delta(self) -> dict[str, Tensor]:
        return {n: p.float() - self.precision.anchor[n] for n, p in self._params.items()}

    def curvature_term(self, delta: dict[str, Tensor] | None = None) -> Tensor:
        """``d^T P d`` (linearized) or the effective-weight form, without prior and strength.

        The gradient is computed in closed form (``lalora.penalty``: ``2 P d``, one read of each
        curvature factor per step); ``delta`` (from ``self.delta()``) saves recomputing it."""
        if self.form == "effective-weight":
            theta = {n: p.float() for n, p in self._params.items()}
            return self._grouped.effective_weight(theta)
        return linearized_quadratic(self._grouped, self.delta() if delta is None else delta)

    def forward(self) -> Tensor:
        delta = self.delta()
        q = self.curvature_term(delta)
        if self.prior_precision:
            q = q + self.prior_precision * sum(d.square().sum() for d in delta.values())
        return 0.5 * self.strength * q

    def extra_repr(self) -> str:
        return f"strength={self.strength:g}, form={self.form!r}, prior_precision={self.prior_precision:g}, {self.precision!r}"
