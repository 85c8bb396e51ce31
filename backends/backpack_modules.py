"""BackPACK plumbing of the ``backpack`` backend (backends/backpack.py): the check that BackPACK's second-order
extensions can traverse a model, the Parallel/Sum rebuild of each peft ``lora.Linear`` for them (one adapter per
layer), the branching ``KFLR``, and the clean-up of BackPACK's hooks, flags and stored tensors after a fit."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from lalora.backend import FitContext
from lalora.errors import BackendError
from lalora.quantized import quantized_base


def branching_kflr():
    """BackPACK's ``KFLR`` on graphs with branches (the Parallel form of a LoRA layer): BackPACK 1.7
    defines no accumulation for it; the backpropagated sqrt-GGN columns of two branches add, as
    ``KFAC`` (same backprop strategy) already does."""
    from backpack.extensions import KFLR

    class BranchingKFLR(KFLR):
        def accumulate_backpropagated_quantities(self, existing, other):
            return existing + other

    return BranchingKFLR()


_SAFE_LEAVES = (nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.SELU, nn.Identity, nn.Dropout,
                nn.Flatten, nn.Conv1d, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm1d, nn.LogSigmoid)


def second_order_blocker(base: nn.Module) -> str | None:
    """None if BackPACK's second-order route can run on ``base``, else the offending module."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(base, nn.Sequential):
        return f"the model class {type(base).__name__} (not an nn.Sequential)"

    def walk(mod, path):
        for name, child in mod.named_children():
            p = f"{path}.{name}" if path else name
            if isinstance(child, LoraLinear):
                if not isinstance(child.base_layer, nn.Linear) or quantized_base(child):  # bnb Linear4bit is an nn.Linear
                    return f"{p} ({type(child.base_layer).__name__} under LoRA)"
                continue
            if isinstance(child, nn.Sequential):
                bad = walk(child, p)
                if bad:
                    return bad
            elif not isinstance(child, _SAFE_LEAVES):
                return f"module {p!r} of type {type(child).__name__}"
        return None

    return walk(base, "")


@contextmanager
def rebuilt_lora(ctx: FitContext, base: nn.Module):
    """Swap each peft ``lora.Linear`` for BackPACK's Parallel/Sum form (same Parameters); restore on exit."""
    from backpack.custom_module.branching import Parallel, SumModule
    from backpack.custom_module.scale_module import ScaleModule

    by_layer: dict[int, list] = {}
    for a in ctx.adapters:
        by_layer.setdefault(id(a.layer), []).append(a)
    swaps = []
    for parent in base.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for name, child in list(parent.named_children()):
            group = by_layer.get(id(child))
            if group is None:
                continue
            several = sorted({*child.active_adapters, *(a.adapter_name for a in group)})
            if len(several) != 1:
                raise BackendError(
                    f"backpack backend: layer {group[0].name!r} carries {len(several)} adapters (active or fitted: "
                    f"{', '.join(map(repr, several))}); BackPACK's second-order route rebuilds a LoRA layer as one "
                    "Parallel branch, for one adapter. Activate and fit one (model.set_adapter(name), "
                    "adapter_name=name), or use the 'kfac', 'tri-kfac', 'block' or 'diag' backend (several adapters "
                    "per layer), or curvature='mc' with structure='diag' on a model that is not an nn.Sequential")
            swaps.append((parent, name, child, group[0]))
    for parent, name, child, a in swaps:  # every layer checked first: nothing to undo after an error
        branch = nn.Sequential(a.lora_A, a.lora_B, ScaleModule(weight=a.scaling))
        parent._modules[name] = Parallel(child.base_layer, branch, merge_module=SumModule())
    try:
        yield
    finally:
        for parent, name, child, _ in swaps:
            parent._modules[name] = child


@contextmanager
def quiet():
    """Silence torch's 'full backward hook is firing ... no inputs require gradients' notice
    (inputs of the first layer never require grad here; BackPACK handles it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextmanager
def backpack_cleanup(roots, params):
    """Remove BackPACK's hooks, extension flags, stored I/O and per-parameter results on exit;
    leave ``.grad`` as it was."""
    from backpack import memory_cleanup
    from backpack.context import CTX

    roots = [roots] if isinstance(roots, nn.Module) else list(roots)
    params = list(params)
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        CTX.remove_hooks()
        for root in roots:
            for m in root.modules():
                if hasattr(m, "_backpack_extend"):
                    delattr(m, "_backpack_extend")
                memory_cleanup(m)
        for p, g in zip(params, saved):
            p.grad = g
            for attr in ("diag_ggn_exact", "diag_ggn_mc", "sum_grad_squared", "kflr", "kfac"):
                if hasattr(p, attr):
                    delattr(p, attr)
