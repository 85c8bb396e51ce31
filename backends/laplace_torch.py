"""Backend ``laplace`` and conversions between laplace-torch objects and ``Precision``.

laplace-torch's ``H`` is a *sum* over its ``n_data`` data points (``len(loader.dataset)``);
lalora stores the mean over examples, so every conversion divides by ``n_data`` (and
``to_laplace`` multiplies by N). Regression: laplace-torch's Gaussian likelihood gives
``H = sum J^T J`` (loss factor 1/2), lalora's ``"mse"`` loss ``|f - y|^2`` has output Hessian
``2 I``, so ``F = 2 H / N``.

Backend options:
- ``hessian_structure``: ``"diag"`` or ``"kron"`` (``subset_of_weights="all"`` on the LoRA-only model);
- ``curvature``: ``"ggn"`` (``CurvlinopsGGN``; exact type-2 GGN), ``"mc"`` (``CurvlinopsGGN``
  with ``stochastic=True``) or ``"ef"`` (``CurvlinopsEF``, kron only is per-sample exact); lalora 0.1's
  ``"mc_fisher"`` and ``"empirical_fisher"`` still work for one release.
Supported: models taking one tensor with ``classification`` losses on ``(x, y)`` batches (one output
row per example, so laplace-torch's "data point" is lalora's example), and causal LMs with
``hessian_structure="diag"`` and ``curvature`` ``"ggn"``/``"mc"``: the LM is wrapped
(``_LabelledRows``) to return one logits row per labelled token, laplace-torch's per-row GGN
``sum_rows J^T H J`` is then lalora's per-position GGN summed over examples, and the loader reports
N examples (tiny models: the Jacobian is M x V x P per batch). Refused on causal LMs: ``kron``
(curvlinops' KFAC inside laplace-torch puts padding into ``X``, normalises per token, laplace
rescales by labelled tokens / examples, and its type-2 mixes positions) and ``ef``
(per-token gradients); docs/block-backpack-laplace.md has the details.

Kron results become per-matrix ``DenseBlock``s of ``kron(Q, H)`` (laplace-torch's factors
``[Q (out x out), H (in x in)]`` of an ``nn.Linear`` weight, in flatten order): fine for the
small LoRA factors of small models; ``max_dense_numel`` guards against large ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lalora.adapters import base_model_of, find_lora_adapters, lora_parameters, lora_state
from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks import DenseBlock, DiagBlock
from lalora.errors import BackendError
from lalora.options import BackendOptions, Curvature, option
from lalora.sampling import library_rng

MAX_DENSE_NUMEL = 4096  # a kron block of a matrix with more weights is refused (its dense form is numel^2 floats)


@dataclass(frozen=True)
class LaplaceOptions(BackendOptions):
    """Options of the ``laplace`` backend (laplace-torch)."""

    hessian_structure: Literal["diag", "kron"] = option("diag", "diag or kron (kron: classification models only)")
    curvature: Curvature = option(Curvature.GGN, "ggn, mc or ef (causal LMs: ggn or mc)",
                                  choices=(Curvature.GGN, Curvature.MC, Curvature.EF))
    seed: int = option(0, "seed of laplace-torch's MC label sampling (curvature='mc')")


@register_backend("laplace")
class LaplaceBackend(CurvatureBackend):
    requires = ("laplace",)
    Options = LaplaceOptions  # the curvature: its curvature option (default ggn)

    @classmethod
    def stored_bytes(cls, adapters, options) -> int:
        """diag: one float32 per LoRA weight; kron: a dense ``kron(Q, H)`` per LoRA matrix (``numel^2`` floats)."""
        sizes = [p.numel() for a in adapters for p in (a.A, a.B)]
        return 4 * sum(sizes if options["hessian_structure"] == "diag" else (n * n for n in sizes))

    def fit(self, ctx: FitContext):
        from laplace import Laplace
        from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

        o = self.options
        stream = iter(ctx.stream)
        first = next(stream, None)
        if first is None:
            raise BackendError("laplace backend: the source data is empty")
        lm = ctx.loss.name == "causal_lm"
        if lm:
            _check_lm_options(o)
            model, batches = _LabelledRows(ctx.model, ctx.loss), _lm_batches(first, stream, ctx.loss)
        else:
            model, batches = base_model_of(ctx.model), _xy_batches(first, stream, ctx.loss)
        N = ctx.global_num_examples()
        loader = _Loader(batches, N)
        backend = CurvlinopsEF if o["curvature"] == Curvature.EF else CurvlinopsGGN
        kwargs = {"stochastic": True} if o["curvature"] == Curvature.MC else {}
        _check_only_lora_trainable(model, ctx.params())
        with library_rng(o["seed"], ctx.device):  # laplace-torch draws MC labels from the global RNG (lalora.sampling)
            la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=o["hessian_structure"],
                         backend=backend, backend_kwargs=kwargs or None)
            la.fit(loader)
        if la.n_data != N:
            raise BackendError(f"laplace backend: laplace-torch counted {la.n_data} data points, lalora {N} examples")
        ctx.metadata["laplace_backend"] = f"{backend.__name__}{'(stochastic=True)' if kwargs else ''}"
        return blocks_from_laplace(la, ctx.params())


def _xy_batches(first, stream, loss):
    """(x, y) batches of a classification model, masked labels dropped (one row per example)."""
    out = []
    for batch in (first, *stream):
        if loss.name != "classification" or isinstance(batch.inputs, dict) or len(batch.inputs) != 1:
            raise BackendError(
                f"laplace backend: supports classification models on (x, y) batches and causal LMs (hessian_structure="
                f"'diag'), got loss {loss.name!r}" + (" with dict inputs" if isinstance(batch.inputs, dict) else "")
                + ". Use backends 'kfac', 'block' or 'diag' (and Precision.to_laplace for predictive uncertainty)")
        keep = batch.labels != -100
        out.append((batch.inputs[0][keep], batch.labels[keep]))
    return out


def _check_lm_options(o):
    if o["hessian_structure"] == "kron":
        raise BackendError(
            "laplace backend: hessian_structure='kron' is refused for causal LMs: laplace-torch's Kron fit counts "
            "tokens as data points (curvlinops KFAC puts padding and every position into X with a per-token "
            "normalisation, laplace rescales X by labelled tokens / examples per batch, and its exact type-2 mixes "
            "positions of a sequence); see docs/block-backpack-laplace.md. Use lalora's 'kfac' backend "
            "(curvature='mc') and Precision.to_laplace, or hessian_structure='diag' here")
    if o["curvature"] == Curvature.EF:
        raise BackendError(
            "laplace backend: curvature='ef' is refused for causal LMs: laplace-torch's EF squares "
            "per-token gradients, lalora's EF per-sequence ones. Use curvature='ggn' or 'mc', or lalora's "
            "'diag' backend for the per-sequence EF")


class _LabelledRows(nn.Module):
    """A causal LM as laplace-torch sees it: called with a batch dict (the model inputs, the full
    ``lalora_labels`` (N, T) and ``labels`` = the M labelled next-token targets), returns the logits of
    those M positions, float32 (M, V). One row per labelled token, so laplace-torch's per-row GGN
    ``sum_rows J^T H J`` is lalora's per-position GGN summed over all examples."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, data):
        from lalora.losses import Batch, call_model

        inputs = {k: v for k, v in data.items() if k not in ("labels", "lalora_labels")}
        batch = Batch(inputs, data["lalora_labels"], None, int(data["lalora_labels"].shape[0]))
        rows, _, _ = self.loss.outputs_and_targets(call_model(self.model, batch), batch)
        return rows.float()


def _lm_batches(first, stream, loss):
    out = []
    for batch in (first, *stream):
        if not isinstance(batch.inputs, dict):
            raise BackendError("laplace backend: causal LM batches must be dicts (input_ids, attention_mask, labels)")
        _, targets, _ = loss.labelled_targets(batch)
        if targets.numel():
            out.append({**batch.inputs, "lalora_labels": batch.labels, "labels": targets})
    return out


class _Loader:
    """An iterable of (x, y) with ``.dataset`` of length N, as ``Laplace.fit`` expects."""

    def __init__(self, batches, n):
        self.batches, self.dataset = batches, range(n)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _check_only_lora_trainable(model: nn.Module, params: dict) -> None:
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
    _check_only_lora_trainable(base, params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(precision.anchor[n].to(p))
    is_diag = all(b.kind == "diag" for b in precision.blocks)
    is_kfac = bool(precision.blocks) and all(b.kind == "kfac" for b in precision.blocks)
    if prior_precision is None:
        prior_precision = N * precision.prior_precision if precision.prior_precision > 0 else 1.0
    structure = "diag" if is_diag else "kron" if is_kfac else "full"
    la = Laplace(base, likelihood, subset_of_weights="all", hessian_structure=structure, prior_precision=prior_precision)
    inv = 1.0 / _likelihood_factor(la)
    order = [p for p in la.params]
    name_of = {id(p): n for n, p in params.items()}
    names = [name_of[id(p)] for p in order]
    p0 = order[0]
    if is_kfac:
        from laplace.utils.matrix import Kron

        factors = {}
        for b in precision.blocks:
            (GA, XA), (GB, XB) = b.term.matrix_factors()
            factors[b.params[0]], factors[b.params[1]] = [GA * (N * inv), XA], [GB * (N * inv), XB]
        if set(factors) != set(names):
            raise BackendError("the kfac precision does not cover every LoRA weight the Laplace object sees")
        la.H_facs = Kron([[f.to(device=p0.device, dtype=p0.dtype) for f in factors[n]] for n in names])
        la.H = la.H_facs.decompose(damping=la.damping)
    elif is_diag:
        diag = precision.diagonal()
        la.H = (torch.cat([diag[n].reshape(-1) for n in names]) * (N * inv)).to(device=p0.device, dtype=p0.dtype)
    else:
        if names != precision.param_names:
            raise BackendError("laplace-torch's parameter order differs from the precision's")
        la.H = (precision.to_dense().float() * (N * inv)).to(device=p0.device, dtype=p0.dtype)
    la.mean = torch.nn.utils.parameters_to_vector(order).detach()
    la.n_data = N
    la.loss = torch.zeros((), device=p0.device)
    with torch.no_grad():
        probe = _output_size(base)
    if probe is not None:
        la.n_outputs = probe
        setattr(base, "output_size", probe)
    return la


def _output_size(model: nn.Module):
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and not any(True for _ in m.children())]
    return last[-1].out_features if last else None
