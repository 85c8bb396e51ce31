"""Backend ``backpack``: diagonal GGN / MC Fisher of the LoRA weights via BackPACK.

Options:
- ``curvature``: ``"ggn"`` (``DiagGGNExact``: exact ``diag((1/N) sum_n J_n^T H_n J_n)``) or
  ``"mc_fisher"`` (labels sampled from the model, ``mc_samples`` of them per labelled output;
  an unbiased estimate of the same diagonal).
- ``mc_samples``: number of MC samples (default 1).

Routes:
- **second order** (``DiagGGNExact``/``DiagGGNMC``): models whose base is an ``nn.Sequential``
  of modules BackPACK knows, with ``classification`` or ``mse`` losses. Each peft ``lora.Linear``
  is rebuilt for the fit as ``Parallel(base_layer, Sequential(lora_A, lora_B, ScaleModule(s)),
  merge_module=SumModule())`` sharing the same Parameters, and put back afterwards.
- **first order** (``SumGradSquared``, ``curvature="mc_fisher"`` only): any model, e.g.
  transformers. Only the ``lora_A``/``lora_B`` ``nn.Linear`` modules are extended; for every
  MC sample, labels are drawn from the model at every labelled position, and BackPACK returns
  ``sum_n ghat_n^2`` with ``ghat_n`` the gradient of example n's summed loss (per-sequence:
  BackPACK's sample axis is the batch axis). ``curvature="ggn"`` on such models raises
  ``BackendError`` naming the module BackPACK cannot traverse.
Afterwards BackPACK's hooks are removed (``CTX.remove_hooks()``) and the ``_backpack_extend``
flags and stored tensors deleted, so other backends keep working in the same process.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lalora.adapters import base_model_of
from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks import DiagBlock
from lalora.errors import BackendError


@register_backend("backpack")
class BackPACKBackend(CurvatureBackend):
    requires = ("backpack",)
    default_options = {"curvature": "ggn", "mc_samples": 1, "seed": 0}
    option_help = {
        "curvature": "'ggn' (DiagGGNExact, nn.Sequential models) or 'mc_fisher' (DiagGGNMC, or SumGradSquared on any model)",
        "mc_samples": "MC samples per labelled output (curvature='mc_fisher')",
        "seed": "seed of the label sampling (curvature='mc_fisher')",
    }

    def check_options(self):
        o = self.options
        if o["curvature"] not in ("ggn", "mc_fisher"):
            raise BackendError(f"backpack backend: option curvature={o['curvature']!r} is unknown; use 'ggn' or 'mc_fisher'")
        if not (isinstance(o["mc_samples"], int) and o["mc_samples"] >= 1):
            raise BackendError(f"backpack backend: option mc_samples must be an integer >= 1, got {o['mc_samples']!r}")

    def curvature_kind(self):
        return self.options["curvature"]

    def fit(self, ctx: FitContext):
        base = base_model_of(ctx.model)
        blocker = _second_order_blocker(base)
        if blocker is None:
            sums = self._second_order(ctx, base)
            ctx.metadata["backpack_route"] = "DiagGGNExact" if self.options["curvature"] == "ggn" else "DiagGGNMC"
        elif self.options["curvature"] == "mc_fisher":
            sums = self._sum_grad_squared(ctx)
            ctx.metadata["backpack_route"] = "SumGradSquared"
        else:
            raise BackendError(
                f"backpack backend: BackPACK's second-order extensions cannot traverse {blocker} "
                "(they need an nn.Sequential of supported modules). Use curvature='mc_fisher' (MC-Fisher diagonal via "
                "BackPACK's first-order SumGradSquared), or the backends 'block' (curvature='ggn'), 'kfac' or 'diag'.")
        N = ctx.num_examples
        return [DiagBlock(n, (ctx.all_reduce(s) / N).float()) for n, s in sums.items()]

    # --- second order on nn.Sequential -------------------------------------------------
    def _second_order(self, ctx, base):
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        params = ctx.params()
        sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        ggn = self.options["curvature"] == "ggn"
        attr = "diag_ggn_exact" if ggn else "diag_ggn_mc"
        with torch.random.fork_rng(devices=[]), _rebuilt_lora(ctx, base), _backpack_cleanup(base, params.values()):
            torch.manual_seed(self.options["seed"])  # DiagGGNMC samples from the global RNG; fork_rng restores it
            extend(base)
            for batch in ctx.stream:
                loss = ctx.loss
                if loss.name not in ("classification", "mse"):
                    raise BackendError(f"backpack backend: the nn.Sequential route supports loss='classification' or 'mse', not {loss.name!r}")
                if isinstance(batch.inputs, dict) or len(batch.inputs) != 1:
                    raise BackendError("backpack backend: nn.Sequential models take one input tensor: pass (x, y) batches")
                x, y = batch.inputs[0], batch.labels
                if loss.name == "classification":
                    keep = y != -100
                    x, y = x[keep], y[keep]
                    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
                else:
                    y = y.reshape(x.shape[0], -1)
                    lossfunc = extend(nn.MSELoss(reduction="sum"))
                out = base(x)
                value = lossfunc(out.float().reshape(x.shape[0], -1) if loss.name == "mse" else out.float(), y.to(out.device))
                ext = DiagGGNExact() if ggn else DiagGGNMC(mc_samples=self.options["mc_samples"])
                with backpack(ext), _quiet():
                    value.backward()
                for n, p in params.items():
                    sums[n] += getattr(p, attr).detach().double().cpu()
                ctx.batch_done(self)
        return sums

    # --- first order (any model) --------------------------------------------------------
    def _sum_grad_squared(self, ctx):
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        params = ctx.params()
        modules = [m for a in ctx.adapters for m in (a.lora_A, a.lora_B)]
        sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        S = self.options["mc_samples"]
        gen = torch.Generator(device=ctx.device).manual_seed(self.options["seed"])
        with _backpack_cleanup(modules, params.values()):
            for m in modules:
                extend(m)
            for batch in ctx.stream:
                loss = ctx.loss
                if loss.likelihood not in ("categorical", "gaussian"):
                    raise BackendError(f"backpack backend: curvature='mc_fisher' needs a categorical or gaussian likelihood; "
                                       f"loss {loss.name!r} has none")
                for _ in range(S):
                    z, _, idx = loss.outputs_and_targets(ctx.forward(batch), batch)
                    z = z.float()
                    with torch.no_grad():
                        if loss.likelihood == "categorical":
                            y = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
                        else:  # l = |f - y|^2  <=>  y ~ N(f, I/2)
                            y = z + torch.randn(z.shape, generator=gen, device=z.device) / 2 ** 0.5
                    value = (torch.nn.functional.cross_entropy(z, y, reduction="sum") if loss.likelihood == "categorical"
                             else (z - y).square().sum())
                    with backpack(SumGradSquared()), _quiet():
                        value.backward()
                    for n, p in params.items():
                        sums[n] += p.sum_grad_squared.detach().double().cpu() / S
                ctx.batch_done(self)
        return sums


_SAFE_LEAVES = (nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.SELU, nn.Identity, nn.Dropout,
                nn.Flatten, nn.Conv1d, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm1d, nn.LogSigmoid)


def _second_order_blocker(base: nn.Module) -> str | None:
    """None if BackPACK's second-order route can run on ``base``, else the offending module."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(base, nn.Sequential):
        return f"the model class {type(base).__name__} (not an nn.Sequential)"

    def walk(mod, path):
        for name, child in mod.named_children():
            p = f"{path}.{name}" if path else name
            if isinstance(child, LoraLinear):
                if not isinstance(child.base_layer, nn.Linear):
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
def _rebuilt_lora(ctx: FitContext, base: nn.Module):
    """Swap each peft ``lora.Linear`` for BackPACK's Parallel/Sum form (same Parameters); restore on exit."""
    from backpack.custom_module.branching import Parallel, SumModule
    from backpack.custom_module.scale_module import ScaleModule

    by_layer = {id(a.layer): a for a in ctx.adapters}
    swaps = []
    for parent in base.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for name, child in list(parent.named_children()):
            a = by_layer.get(id(child))
            if a is None:
                continue
            if len(child.active_adapters) != 1:
                raise BackendError(f"backpack backend: layer {a.name!r} has several active adapters; activate one (set_adapter)")
            branch = nn.Sequential(a.lora_A, a.lora_B, ScaleModule(weight=a.scaling))
            swaps.append((parent, name, child))
            parent._modules[name] = Parallel(child.base_layer, branch, merge_module=SumModule())
    try:
        yield
    finally:
        for parent, name, child in swaps:
            parent._modules[name] = child


@contextmanager
def _quiet():
    """Silence torch's 'full backward hook is firing ... no inputs require gradients' notice
    (inputs of the first layer never require grad here; BackPACK handles it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextmanager
def _backpack_cleanup(roots, params):
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
            for attr in ("diag_ggn_exact", "diag_ggn_mc", "sum_grad_squared"):
                if hasattr(p, attr):
                    delattr(p, attr)
