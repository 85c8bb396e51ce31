"""Plain PyTorch loops: ``loss = task_loss + reg()``, or wrap a loss function once.

    reg = lalora.LaLoRARegularizer(model, precision, strength=1e3)
    loss_fn = lalora.regularized(loss_fn, reg)            # loss_fn(...) + reg()
    for batch in loader:
        loss = loss_fn(model(**batch), batch)
        loss.backward(); opt.step(); opt.zero_grad()

With gradient accumulation over k micro-batches (each micro-batch loss backpropagated as it
is, typically already divided by k), pass ``accumulation_steps=k``: every call then adds
``reg() / k``, so the k backward passes of one optimizer step add the gradient of ``reg()``
exactly once.
"""
from __future__ import annotations

from torch import nn


def regularized(loss_fn, reg: nn.Module, *, accumulation_steps: int = 1):
    """Return ``f(*args, **kwargs) = loss_fn(*args, **kwargs) + reg() / accumulation_steps``.

    ``loss_fn`` returns a 0-dim tensor; ``reg`` is a ``LaLoRARegularizer`` (any module whose
    call returns a 0-dim penalty). The sum is computed in the task loss's dtype promotion with
    the float32 penalty (bf16 + fp32 -> fp32). The wrapped function exposes ``.regularizer``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not callable(reg):
        raise TypeError(f"reg must be a LaLoRARegularizer (callable), got {type(reg).__name__}")
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")

    def wrapped(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        penalty = reg()
        if accumulation_steps != 1:
            penalty = penalty / accumulation_steps
        return loss + penalty

    wrapped.regularizer = reg
    return wrapped
