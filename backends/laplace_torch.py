"""Backend ``laplace``: fit a precision with laplace-torch (``Laplace(...).fit``), converted to lalora's
mean-over-examples convention by ``lalora.backends.laplace_conversion`` (which also turns a precision into a
fitted laplace-torch object: ``LaplaceBackend.to_laplace`` / ``from_laplace``, what the deprecated
``Precision.to_laplace`` / ``from_laplace`` reach through the registry).

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

"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lalora.adapters import base_model_of
from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.errors import BackendError
from lalora.options import BackendOptions, Curvature, option
from lalora.quantized import quantized_adapters
from lalora.sampling import library_rng

from .laplace_conversion import (blocks_from_laplace, check_only_lora_trainable, precision_from_laplace,
                                 precision_to_laplace)


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

    #: conversions (``lalora.backends.laplace_conversion``), reachable through the registry:
    #: ``lalora.get_backend("laplace").to_laplace(precision, model)``
    from_laplace = staticmethod(precision_from_laplace)
    to_laplace = staticmethod(precision_to_laplace)

    def fit(self, ctx: FitContext):
        from laplace import Laplace
        from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

        o = self.options
        quantized = quantized_adapters(ctx.adapters)
        if quantized:  # lalora.quantized: measured, CPU bitsandbytes 0.50
            raise BackendError(f"laplace backend: the base layers of {quantized[:3]} are quantized (QLoRA); laplace-torch's "
                               "curvlinops route differentiates the model with torch.func, which cannot run bitsandbytes' "
                               "matmul (an autograd.Function without setup_context) and got zero gradients through its "
                               "packed CPU kernel. Use backend 'diag', 'kfac', 'tri-kfac' or 'block'")
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
        check_only_lora_trainable(model, ctx.params())
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
                + ". Use backends 'kfac', 'block' or 'diag' (and precision_to_laplace for predictive uncertainty)")
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
            "(curvature='mc') and lalora.backends.laplace_conversion.precision_to_laplace, or "
            "hessian_structure='diag' here")
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
