"""``LaLoRARegularizer``: the Laplace penalty ``(strength/2) [d^T P d + delta |d|^2]``.

It consumes a ``Precision`` and never calls a backend. Evaluation goes through each
block's own matrix-vector product (no Kronecker product or dense matrix is formed that the
structure avoids) in float32, whatever the LoRA weights' dtype; the gradient is computed in
closed form (``lalora.penalty``), so each curvature factor is read once per step.

State: the curvature tensors (stacked Kronecker groups, the other blocks' tensors, the anchor)
are the module's buffers, so ``reg.to(device / dtype)`` moves or casts them (the grouped
precision is rebuilt on the moved tensors) and ``reg.state_dict()`` holds them; loading a
state dict rebuilds it too. The regularizer has no parameters of its own: it acts on the
model's LoRA parameters, which it references, never copies.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapters import find_lora_adapters, lora_parameters
from .anchor_check import anchor_mismatch_message, fitted_adapters
from .coverage import check_coverage, check_trainable, check_uncovered_mode
from .errors import AnchorMismatchError, BackendError, ModelMismatchError
from .others import resolve_others
from .penalty import GroupedPrecision, linearized_quadratic
from .precision import Precision
from .sharding import FSDP1_REFUSAL, copy_full_, full_value, gathered, sharding_of
from .validation import match_to_model

FORMS = ("auto", "linearized", "effective-weight")
#: ``normalize=``: None (``strength`` is lambda itself) or "mean-diagonal" (lambda = strength / mean diag(P + delta I))
NORMALIZATIONS = (None, "mean-diagonal")
#: ``factor_dtype=``: the dtype the Kronecker factors are stored and multiplied in (docs/training.md#factor-dtype)
FACTOR_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _rebuild_after_load(module: "LaLoRARegularizer", incompatible_keys) -> None:
    module._set_grouped(module._grouped.rebuilt(module._buffers))
    module._curvature_mean = module.precision.mean_diagonal()


class LaLoRARegularizer(nn.Module):
    """Penalty module: ``reg()`` returns a differentiable 0-dim float32 tensor (the dtype of its
    buffers after ``reg.to(dtype)``).

    ``strength`` is lambda; ``prior_precision`` (delta) overrides the one stored in the
    precision. ``form="auto"`` (the default) is ``"effective-weight"`` when every block of the precision has
    that form (``kfac``, ``tri-kfac``) and ``"linearized"`` otherwise (``reg.form`` says which; the evidence
    for this default: docs/benchmark.md#the-default-form). ``form="linearized"`` (the paper's) uses
    ``d = theta - theta0``; ``form="effective-weight"``
    (Kronecker precisions) uses the exact ``Delta = s (B A - B0 A0)``. The model's LoRA weights
    must be at the precision's anchor when the regularizer is built (``check_anchor``), since
    a precision is only meaningful around the point it was fitted at; ``reset_to_anchor()``
    moves them there.

    Normalization (docs/strength.md): with ``normalize="mean-diagonal"`` the strength is in multiples of the
    average curvature: the penalty uses ``lambda = strength / scale``, ``scale`` = the mean diagonal of
    ``P + delta I`` over the LoRA weights the precision covers (``Precision.mean_diagonal``), so the normalized
    matrix has mean diagonal 1, as ``P = I`` has, and precisions that differ only by a factor (EF vs MC Fisher,
    sum vs mean, another backend's convention) give the same penalty for the same strength. ``normalize=None``
    (the default): ``strength`` is lambda. ``reg.scale`` and ``reg.raw_strength`` (lambda) tell the values.

    ``factor_dtype="bfloat16"`` (or ``torch.bfloat16``/``"float16"``) stores the Kronecker factors X, G in that
    dtype: the penalty reads each factor once per step and is memory-bound, so this halves its time where
    the hardware multiplies bfloat16 natively (GPUs; CPUs with AMX/AVX512-BF16), at a relative error of the
    penalty and its gradient of ~2e-3-1e-2 (the factors' rounding; docs/training.md#factor-dtype). theta0,
    ``theta - theta0`` and the anchor products stay float32. ``"auto"`` (the default): the LoRA weights'
    dtype when they are bfloat16 or float16 (their gradient is rounded to it anyway), else float32;
    None or ``"float32"``: float32.

    Coverage (docs/concepts.md#coverage): the LoRA weights the precision covers must be trainable
    (all frozen: ``ModelMismatchError``; some frozen: a warning naming them), and every other
    parameter that requires grad is reported by ``uncovered=`` (``"warn"``: an
    ``UncoveredParameterWarning`` naming them; ``"error"``: ``UncoveredParameterError``;
    ``"ignore"``).

    Devices: the curvature is moved to the LoRA weights' device when the regularizer is built;
    after ``model.to(device)``, call ``reg.to(device)`` too (it is not a submodule of the model).

    Sharded LoRA weights (``lalora.sharding``, docs/training.md#sharded-training): under FSDP2 the weights
    are DTensors and ``reg()`` gathers them differentiably (every rank must call it); under DeepSpeed
    ZeRO-3 ``reg()`` gathers them with ``GatheredParameters`` and must be added to the loss that
    ``engine.backward`` receives. FSDP1 is refused. After a wrapper replaces the Parameter objects
    (``fully_shard``, ``deepspeed.initialize``), call ``reg.rebind(model)``.
    """

    def __init__(self, model: nn.Module, precision: Precision, strength: float, *, prior_precision: float | None = None,
                 form: str = "auto", adapter_name=None, check_anchor: bool = True, uncovered: str = "warn",
                 normalize: str | None = None, factor_dtype: str | torch.dtype | None = "auto",
                 _caller: str = "LaLoRARegularizer"):
        super().__init__()
        if not isinstance(precision, Precision):
            raise TypeError(f"precision must be a lalora.Precision, got {type(precision).__name__}")
        if form not in FORMS:
            raise ValueError(f"form={form!r} is unknown; use one of {FORMS}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r} is unknown; use None or 'mean-diagonal'")
        factor_dtype = _factor_dtype(factor_dtype)
        strength = float(strength)
        if not strength >= 0 or strength == float("inf"):
            raise ValueError(f"strength must be a finite number >= 0, got {strength}")
        check_uncovered_mode(uncovered, _caller)
        self._caller = _caller
        self._adapter_name = adapter_name
        adapters = find_lora_adapters(model, adapter_name)
        params = lora_parameters(adapters)
        self._params = params
        self._check_sharding()  # before the shapes are compared: FSDP1 flattens them
        precision = match_to_model(precision, model, strict=True, adapter_name=adapter_name)
        covered = {**params, **resolve_others(model, adapters, precision.param_names)}  # fit_precision(others="diag")
        self._params = {n: covered[n] for n in precision.param_names}
        self._adapters_in_use = sorted({a.adapter_name for a in adapters})
        self._active_adapters = _active_adapters(model)
        check_trainable(self._params, _caller)
        # embedding LoRA outside the precision is reported as such (its backend does not model it), not as partial
        selected = [p for a in adapters for n, p in a.params().items() if not a.embedding or n in self._params]
        check_coverage(model, self._params.values(), uncovered, caller=_caller, selected=selected)
        device = next(iter(self._params.values())).device
        # equal-shaped Kronecker blocks are stacked for batched products (lalora.penalty.GroupedPrecision);
        # self.precision holds the blocks on views of the stacks. While the caller keeps the original
        # float32 precision on this device, its factors exist twice (the stacks are copies).
        if factor_dtype == "auto":  # the LoRA weights' dtype where it is a 16-bit float (the gradient's rounding)
            low = {p.dtype for p in params.values()} & {torch.bfloat16, torch.float16}
            factor_dtype = low.pop() if len(low) == 1 and len({p.dtype for p in params.values()}) == 1 else None
        self._set_grouped(GroupedPrecision(precision.to(device, torch.float32), factor_dtype))
        self.factor_dtype = factor_dtype
        self.register_load_state_dict_post_hook(_rebuild_after_load)
        self.strength = strength
        self.prior_precision = float(precision.prior_precision if prior_precision is None else prior_precision)
        if self.prior_precision < 0:
            raise ValueError(f"prior_precision must be >= 0, got {self.prior_precision}")
        if form == "auto":  # docs/benchmark.md#the-default-form: effective-weight wherever every block has it
            form = "effective-weight" if all(b.supports_effective_weight for b in self.precision.blocks) else "linearized"
        self.form = form
        self.normalize = normalize
        self._curvature_mean = self.precision.mean_diagonal()
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

    # --- state: the curvature tensors are buffers -------------------------------------
    def _set_grouped(self, grouped: GroupedPrecision) -> None:
        self._grouped, self.precision = grouped, grouped.precision
        for name, t in grouped.tensors().items():
            self.register_buffer(name, t)

    def _apply(self, fn, recurse=True):
        # nn.Module.to / .cuda / .double / ... replace the buffers: rebuild the grouped precision on them
        super()._apply(fn, recurse)
        self._set_grouped(self._grouped.rebuilt(self._buffers))
        return self

    # --- sharded parameters --------------------------------------------------------------
    def _check_sharding(self) -> None:
        self.sharding = sharding_of(self._params.values())
        if self.sharding == "fsdp1":
            raise NotImplementedError(f"{self._caller}: {FSDP1_REFUSAL}")

    def rebind(self, model: nn.Module) -> None:
        """Resolve the LoRA Parameters again on ``model`` (same names and shapes), after a wrapper such as
        FSDP2's ``fully_shard`` or ``deepspeed.initialize`` replaced them; the curvature is kept."""
        adapters = find_lora_adapters(model, self._adapter_name)
        params = {**lora_parameters(adapters), **resolve_others(model, adapters, self._params)}
        missing = [n for n in self._params if n not in params]
        if missing:
            raise ModelMismatchError(f"{self._caller}: the model has no LoRA weight {missing[0]!r} any more")
        self._params = {n: params[n] for n in self._params}
        self._check_sharding()

    # --- anchor ------------------------------------------------------------------------
    @torch.no_grad()
    def check_anchor(self, *, context: str | None = None) -> None:
        """Raise ``AnchorMismatchError`` naming the first LoRA weight not at theta0, the adapters
        involved, and what to do (in the caller's vocabulary: regularizer or Trainer arguments).
        ``context``: why the weights may differ, for the advice (``lalora.anchor_check.CONTEXTS``)."""
        anchor = self.precision.anchor
        with gathered(self._params.values()):
            current = {n: full_value(p.detach(), anchor[n].dtype).to(anchor[n].device) for n, p in self._params.items()}
        if all(torch.equal(current[n], anchor[n]) for n in current):
            return
        raise AnchorMismatchError(anchor_mismatch_message(
            current, anchor, caller=self._caller, fitted=fitted_adapters(self.precision.metadata),
            in_use=self._adapters_in_use, active=self._active_adapters, context=context))

    @torch.no_grad()
    def reset_to_anchor(self) -> None:
        """Copy theta0 into the model's LoRA weights (on every rank when they are sharded)."""
        with gathered(self._params.values(), modify=True):
            for n, p in self._params.items():
                copy_full_(p, self.precision.anchor[n].to(p.device))

    # --- penalty -----------------------------------------------------------------------
    def _check_device(self) -> None:
        name, p = next(iter(self._params.items()))
        here = self.precision.anchor[name].device
        if p.device != here:
            raise RuntimeError(f"the model's LoRA weights are on {p.device}, the regularizer's curvature on {here}: "
                               f"call reg.to({str(p.device)!r}) after moving the model (the regularizer is not a "
                               "submodule of the model, so model.to() does not move it)")

    def _theta(self) -> dict[str, Tensor]:
        """The full LoRA weights in the curvature's dtype (float32 unless ``reg.to(dtype)`` changed it),
        differentiable w.r.t. the model's (possibly sharded) parameters."""
        anchor = self.precision.anchor
        with gathered(self._params.values()):
            return {n: full_value(p, anchor[n].dtype) for n, p in self._params.items()}

    def delta(self) -> dict[str, Tensor]:
        anchor = self.precision.anchor
        return {n: t - anchor[n] for n, t in self._theta().items()}

    def curvature_term(self, delta: dict[str, Tensor] | None = None, *,
                       theta: dict[str, Tensor] | None = None) -> Tensor:
        """``d^T P d`` (linearized) or the effective-weight form, without prior and strength.

        The gradient is computed in closed form (``lalora.penalty``: ``2 P d``, one read of each
        curvature factor per step); ``delta`` (from ``self.delta()``) or ``theta`` (from ``self._theta()``)
        saves recomputing (and, for sharded weights, re-gathering) them."""
        if self.form == "effective-weight":
            return self._grouped.effective_weight(self._theta() if theta is None else theta)
        if delta is not None:
            return linearized_quadratic(self._grouped, delta)
        return self._grouped.linearized(self._theta() if theta is None else theta)

    def forward(self) -> Tensor:
        if self.raw_strength == 0 and self.sharding is None:  # nothing to compute (a 0 with a gradient path)
            return sum(p.sum() * 0.0 for p in self._params.values())
        self._check_device()
        anchor = self.precision.anchor
        theta = self._theta()  # gathered once when the weights are sharded
        q = self.curvature_term(theta=theta)
        if self.prior_precision:
            q = q + self.prior_precision * sum((t - anchor[n]).square().sum() for n, t in theta.items())
        return 0.5 * self.raw_strength * q

    @property
    def scale(self) -> float:
        """What the strength is divided by: the mean diagonal of ``P + delta I`` with ``normalize="mean-diagonal"``,
        else 1."""
        return self._curvature_mean + self.prior_precision if self.normalize == "mean-diagonal" else 1.0

    @property
    def raw_strength(self) -> float:
        """lambda, the factor of ``(1/2) [d^T P d + delta |d|^2]`` in the penalty: ``strength / scale``."""
        return self.strength / self.scale

    def extra_repr(self) -> str:
        norm = f", normalize={self.normalize!r} (lambda={self.raw_strength:.4g})" if self.normalize else ""
        return (f"strength={self.strength:g}{norm}, form={self.form!r}, prior_precision={self.prior_precision:g}, "
                f"{self.precision!r}")


def _factor_dtype(value) -> torch.dtype | None:
    """``factor_dtype=`` as a torch dtype (None: float32, the precision's own)."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype={value!r} is unknown; use one of {[k for k in FACTOR_DTYPES if k]} or None")
    return FACTOR_DTYPES[value]


def _active_adapters(model: nn.Module) -> list[str] | None:
    try:
        active = getattr(model, "active_adapters", None)
    except (AttributeError, ValueError):  # peft raises for some wrappers without an active adapter
        return None
    if active is None or callable(active):
        return None
    return [active] if isinstance(active, str) else sorted(active)
