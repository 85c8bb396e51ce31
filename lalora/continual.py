"""Continual learning with online Laplace accumulation (as in online EWC).

After task t ends at weights theta_t, fit the curvature of task t's loss there and fold it
into the running precision, anchored at theta_t:

    P_t = decay * P_{t-1}.with_anchor(theta_t) + F_t(theta_t)

Training task t+1 then uses ``LaLoRARegularizer(model, P_t, strength)``, which pulls towards
the end of task t with the curvature of everything learnt so far (``P_0`` = the source
precision). ``decay`` in [0, 1] forgets old tasks geometrically (1 = keep all, 0 = only the
last task). The old curvature is reused at the new anchor: an approximation, exact only
while the weights move little. Kronecker blocks keep their factors ``G``, ``X`` and are
rebuilt around theta_t (``Precision.with_anchor``): their linearized forms use the Jacobian at
theta_t and the effective-weight form ``Delta = s (B A - B_t A_t)``, so every form is 0 at the
new anchor. See docs/training.md#continual-learning.
"""
from __future__ import annotations

from torch import nn

from .precision import Precision


def consolidate(old: Precision | None, task: Precision, *, decay: float = 1.0) -> Precision:
    """``decay * old + task``, anchored at ``task``'s anchor (the end of the last task); ``old``'s
    Kronecker blocks are re-centred there (``Precision.with_anchor``).

    ``old`` may be None (first task). Both must cover the same LoRA weights, in the same order.
    """
    if not isinstance(task, Precision):
        raise TypeError(f"task must be a lalora.Precision, got {type(task).__name__}")
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if old is None:
        return task
    if not isinstance(old, Precision):
        raise TypeError(f"old must be a lalora.Precision or None, got {type(old).__name__}")
    if old.param_names != task.param_names:
        diff = sorted(set(old.param_names) ^ set(task.param_names))
        raise ValueError(f"old and task precisions cover different LoRA weights (first difference: "
                         f"{diff[:1] or 'order'}); fit both on the same adapters")
    combined = decay * old.with_anchor(task.anchor) + task
    history = list(old.metadata.get("continual", {}).get("tasks", [old.metadata.get("backend", "?")]))
    combined.metadata["continual"] = {"decay": decay, "tasks": history + [task.metadata.get("backend", "?")],
                                      "num_tasks": len(history) + 1}
    return combined


def end_of_task(model: nn.Module, task_data, old: Precision | None = None, *, decay: float = 1.0,
                backend="diag", adapter_name=None, **fit_kwargs) -> Precision:
    """At the end of a task: fit on ``task_data`` at the model's current LoRA weights and
    ``consolidate`` with ``old``. ``fit_kwargs`` go to ``fit_precision``."""
    from .fit import fit_precision

    task = fit_precision(model, task_data, backend, adapter_name=adapter_name, **fit_kwargs)
    return consolidate(old, task, decay=decay)
