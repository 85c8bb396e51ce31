"""Conversions between laplace-torch objects and ``Precision`` (the ``laplace`` backend's, and for any
precision: ``precision_to_laplace`` gives a fitted laplace-torch object for predictive uncertainty).

laplace-torch's ``H`` is a *sum* over its ``n_data`` data points (``len(loader.dataset)``);
lalora stores the mean over examples, so every conversion divides by ``n_data`` (and
``precision_to_laplace`` multiplies by N). Regression: laplace-torch's Gaussian likelihood gives
``H = sum J^T J`` (loss factor 1/2), lalora's ``"mse"`` loss ``|f - y|^2`` has output Hessian
``2 I``, so ``F = 2 H / N``.

Kron results become per-matrix ``DenseBlock``s of ``kron(Q, H)`` (laplace-torch's factors
``[Q (out x out), H (in x in)]`` of an ``nn.Linear`` weight, in flatten order): fine for the
small LoRA factors of small models; ``MAX_DENSE_NUMEL`` guards against large ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lalora.adapters import base_model_of, find_lora_adapters, lora_parameters
from lalora.blocks import DenseBlock, DiagBlock
from lalora.errors import BackendError

MAX_DENSE_NUMEL = 4096  # a kron block of a matrix with more weights is refused (its dense form is numel^2 floats)


def check_only_lora_trainable(model: nn.Module, params: dict) -> None:
    lora = {id(p) for p in params.values()}
    other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora]
    if other:
        raise BackendError(f"laplace-torch fits every parameter that requires grad; {other[0]!r} is not a LoRA weight: "
                           "freeze it (requires_grad_(False)) so the Laplace object covers the LoRA weights only")


def _likelihood_factor(la) -> float:
    like = str(getattr(la.likelihood, "value", la.likelihood))
    if like == "classification":
        return 1.0
    if like == "regression":
        return 2.0  # laplace-torch's Gaussian loss is |f-y|^2/2, lalora's "mse" is |f-y|^2
    raise BackendError(f"cannot convert a Laplace object with likelihood {like!r}")


def blocks_from_laplace(la, params: dict) -> list:
    """lalora blocks (mean over ``la.n_data``) from a fitted laplace-torch object over ``params``
    (canonical name -> Parameter; must be exactly ``la.params``)."""
    name_of = {id(p): n for n, p in params.items()}
    names = []
    for p in la.params:
        if id(p) not in name_of:
            raise BackendError(f"the Laplace object covers a parameter of shape {tuple(p.shape)} that is not a LoRA "
                               "weight of this model: fit it on the model with only LoRA weights requiring grad")
        names.append(name_of[id(p)])
    if set(names) != set(params):
        missing = sorted(set(params) - set(names))
        raise BackendError(f"the Laplace object does not cover LoRA weight {missing[0]!r}")
    if not la.n_data:
        raise BackendError("the Laplace object is not fitted (n_data = 0): call la.fit(loader) first")
    scale = _likelihood_factor(la) / la.n_data
    shapes = {n: tuple(params[n].shape) for n in names}
    structure = type(la).__name__
    if structure.startswith("Diag"):
        H, blocks, i = la.H.detach().double().cpu(), [], 0
        for n in names:
            k = math.prod(shapes[n])
            blocks.append(DiagBlock(n, (H[i:i + k] * scale).float().reshape(shapes[n])))
            i += k
        return blocks
    if structure.startswith("Kron"):
        kfacs = la.H_facs.kfacs if getattr(la, "H_facs", None) is not None else la.H.kfacs
        if len(kfacs) != len(names):
            raise BackendError(f"the Kron Laplace object has {len(kfacs)} factor groups for {len(names)} LoRA weights")
        blocks = []
        for n, F in zip(names, kfacs):
            k = math.prod(shapes[n])
            if k > MAX_DENSE_NUMEL:
                raise BackendError(f"LoRA weight {n!r} has {k} weights: its kron block would be stored densely "
                                   f"({k}x{k}); use lalora's 'kfac' backend for large layers")
            F = [f.detach().double().cpu() for f in F]
            M = torch.kron(F[0], F[1]) if len(F) == 2 else (F[0] if F[0].dim() == 2 else torch.diag(F[0]))
            blocks.append(DenseBlock((n,), (M * scale).float(), shapes))
        return blocks
    if structure.startswith("Full"):
        return [DenseBlock(tuple(names), (la.H.detach().double().cpu() * scale).float(), shapes)]
    raise BackendError(f"cannot convert a laplace-torch {structure} (diag, kron and full are supported)")


def precision_from_laplace(la, model: nn.Module, adapter_name=None):
    """``Precision`` (mean convention) from a fitted laplace-torch object over ``model``'s LoRA weights,
    anchored at ``la.mean`` (the point laplace-torch linearised at)."""
    from lalora.precision import Precision

    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    blocks = blocks_from_laplace(la, params)
    anchor, i = {}, 0
    mean = la.mean.detach().float().cpu()
    by_id = {id(p): n for n, p in params.items()}
    for p in la.params:
        anchor[by_id[id(p)]] = mean[i:i + p.numel()].reshape(p.shape).clone()
        i += p.numel()
    anchor = {n: anchor[n] for n in params}
    meta = {"backend": "laplace-torch", "curvature": type(la).__name__, "num_examples": int(la.n_data)}
    return Precision(blocks, anchor, metadata=meta)


def precision_to_laplace(precision, model: nn.Module, likelihood: str = "classification", prior_precision=None,
                         num_examples: int | None = None, adapter_name=None):
    """A fitted laplace-torch object with ``H = N * F`` (``N`` = ``num_examples`` or the precision's
    ``metadata["num_examples"]``) at the precision's anchor, over ``model``'s LoRA weights (these
    must be the only parameters requiring grad; the model's LoRA weights are set to the anchor).
    Diagonal precisions give a ``DiagLaplace``, ``kfac`` (B-KFAC) precisions a ``KronLaplace`` (one
    factor pair per LoRA matrix), all others a ``FullLaplace`` (dense, small models).
    ``prior_precision`` defaults to ``N * precision.prior_precision`` if that is > 0, else 1."""
    from laplace import Laplace

    N = int(num_examples or precision.metadata.get("num_examples") or 0)
    if N <= 0:
        raise BackendError("to_laplace needs the number of examples N (laplace-torch's H is a sum): "
                           "pass num_examples=")
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    if list(params) != precision.param_names:
        raise BackendError(f"the precision's parameters do not match the model's LoRA weights "
                           f"(first model weight {next(iter(params))!r})")
    base = base_model_of(model)
    check_only_lora_trainable(base, params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(precision.anchor[n].to(p))
    is_diag = all(b.kind == "diag" for b in precision.blocks)
    is_kfac = bool(precision.blocks) and all(b.kind == "kfac" for b in precision.blocks)
    if prior_precision is None:
        prior_precision = N * precision.prior_precision if precision.prior_precision > 0 else 1.0
    structure = "diag" if is_diag else "kron" if is_kfac else "full"
    la = Laplace(base, likelihood, subset_of_weights="all", hessian_structure=structure, prior_precision=prior_precision)
    order = [p for p in la.params]
    name_of = {id(p): n for n, p in params.items()}
    _set_hessian(la, precision, structure, [name_of[id(p)] for p in order], N / _likelihood_factor(la))
    p0 = order[0]
    la.mean = torch.nn.utils.parameters_to_vector(order).detach()
    la.n_data = N
    la.loss = torch.zeros((), device=p0.device)
    with torch.no_grad():
        probe = _output_size(base)
    if probe is not None:
        la.n_outputs = probe
        setattr(base, "output_size", probe)
    return la


def _set_hessian(la, precision, structure: str, names: list[str], scale: float) -> None:
    """``la.H`` (and for ``kron`` ``la.H_facs``) = ``scale * F`` over the LoRA weights ``names``, in the
    Laplace object's parameter order."""
    p0 = next(iter(la.params))
    if structure == "kron":
        from laplace.utils.matrix import Kron

        factors = {}
        for b in precision.blocks:
            (GA, XA), (GB, XB) = b.term.matrix_factors()
            factors[b.params[0]], factors[b.params[1]] = [GA * scale, XA], [GB * scale, XB]
        if set(factors) != set(names):
            raise BackendError("the kfac precision does not cover every LoRA weight the Laplace object sees")
        la.H_facs = Kron([[f.to(device=p0.device, dtype=p0.dtype) for f in factors[n]] for n in names])
        la.H = la.H_facs.decompose(damping=la.damping)
    elif structure == "diag":
        diag = precision.diagonal()
        la.H = (torch.cat([diag[n].reshape(-1) for n in names]) * scale).to(device=p0.device, dtype=p0.dtype)
    else:
        if names != precision.param_names:
            raise BackendError("laplace-torch's parameter order differs from the precision's")
        la.H = (precision.to_dense().float() * scale).to(device=p0.device, dtype=p0.dtype)


def _output_size(model: nn.Module):
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and not any(True for _ in m.children())]
    return last[-1].out_features if last else None
