"""Backend ``block``: exact dense curvature per block (one adapter, or one LoRA matrix).

Options (``BlockOptions``):
- ``curvature``: ``"ef"`` (default; the empirical Fisher from per-example gradients of lalora's hooks,
  ``F = (1/N) sum_n g_n g_n^T``) or ``"ggn"`` (``F = (1/N) sum_n sum_t J_t^T H_t J_t``, the
  exact per-token GGN summed over the labelled positions; per-position Jacobians of the
  outputs w.r.t. the LoRA weights from ``torch.func.jacrev``: costs (labelled positions x
  classes x LoRA weights) floats per batch, so small vocabularies/models only; needs
  ``attn_implementation="eager"`` on transformers).
- ``granularity``: ``"adapter"`` (A and B of one adapter with their cross terms) or ``"matrix"``.
- ``storage`` (lalora 0.1: ``form``): ``"auto"`` (dense when the ``(n, n)`` float32 matrix fits
  ``memory_budget_mb``, else factored), ``"dense"`` or ``"factored"`` (EF only: the N per-example
  gradient rows scaled by ``1/sqrt(N)``, a ``FactoredBlock`` of rank <= N, never densified).
- ``memory_budget_mb``: budget per block for the dense matrix (default 256).
The chosen storage is in ``metadata["block_forms"]`` and in ``Precision.summary()``.

DoRA (``curvature="ef"``): an adapter's block holds A, B and its magnitude vector (per-example gradients of
the magnitude from ``lalora.pergrad``; those of A and B from the hooks, which DoRA's detached
``lora_B(lora_A(eye))`` norm call does not reach). The other trainable tensors (``ctx.others``) get
DiagBlocks of their per-example EF diagonal from the same forward. ``curvature="ggn"`` refuses DoRA and
leaves the other tensors to ``fit_precision``'s generic EF diagonal.

Relation to ``lalora.reference`` (the one exact reference): the same quantities, computed for real use
(whole batches, hooks, ``torch.func``), so this backend does not call the reference's slow batch-of-one
loops; it shares the conventions and the loss path instead (``lalora.losses``: per-example losses, the
labelled output rows, the output Hessian contraction ``hessian_sandwich``), and its tests compare it
with the reference, which computes all of these its own way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lalora.backend import CurvatureBackend, FitContext, _distributed, register_backend
from lalora.blocks import DenseBlock
from lalora.blocks.factored import FactoredBlock
from lalora.capture import PerExampleGrads
from lalora.errors import BackendError
from lalora.options import BackendOptions, Curvature, option
from lalora.pergrad import diag_blocks, first_nonfinite, per_example_rows, squared_grad_sums


@dataclass(frozen=True)
class BlockOptions(BackendOptions):
    """Options of the ``block`` backend."""

    curvature: Curvature = option(Curvature.EF, "ef (per-example empirical Fisher) or ggn (exact per-token GGN)",
                                  choices=(Curvature.EF, Curvature.GGN))
    granularity: Literal["adapter", "matrix"] = option(
        "adapter", "adapter (A and B together) or matrix (one block per LoRA matrix)")
    storage: Literal["auto", "dense", "factored"] = option(
        "auto", "auto (dense if it fits memory_budget_mb), dense or factored (ef only)", renamed_from="form")
    memory_budget_mb: float = option(256.0, "largest dense block (float32 MiB) storage='auto' keeps dense", gt=0)

    def check(self):
        if self.storage == "factored" and self.curvature != Curvature.EF:
            raise ValueError("option storage='factored' exists for curvature='ef' only "
                             "(a GGN factor has one row per labelled position and class)")


@register_backend("block")
class BlockBackend(CurvatureBackend):
    Options = BlockOptions  # the curvature: its curvature option (default ef)
    supports_skip_nonfinite = True
    supports_dora = True  # curvature="ef" only (check_options cannot see the model: fit refuses ggn on DoRA)

    def __init__(self, options=None, /, **kwargs):
        super().__init__(options, **kwargs)
        self.covers_others = self.options["curvature"] == Curvature.EF

    @classmethod
    def stored_bytes(cls, adapters, options) -> int | None:
        """``4 n^2`` per block when every block is stored dense; None when one is factored (it grows with N)."""
        shapes = {n: tuple(p.shape) for a in adapters for n, p in _adapter_params(a)}
        groups = _groups(adapters, options["granularity"], set(shapes))
        sizes = [sum(math.prod(shapes[p]) for p in g) for g in groups]
        budget = options["memory_budget_mb"] * 2**20
        dense = options["storage"] == "dense" or (options["storage"] == "auto" and all(4 * n * n <= budget for n in sizes))
        return 4 * sum(n * n for n in sizes) if dense else None

    # --- block layout ---------------------------------------------------------------
    def _groups(self, ctx: FitContext) -> list[tuple[str, ...]]:
        return _groups(ctx.adapters, self.options["granularity"], set(ctx.others))

    def _forms(self, groups, shapes) -> list[str]:
        budget = self.options["memory_budget_mb"] * 2**20
        forms = []
        for g in groups:
            n = sum(math.prod(shapes[p]) for p in g)
            dense_fits = 4 * n * n <= budget
            form = self.options["storage"]
            if form == "auto":
                form = "dense" if dense_fits else "factored"
            if form == "factored" and self.options["curvature"] != Curvature.EF:
                raise BackendError(f"block backend: the dense GGN block over {list(g)} ({n} weights, {4 * n * n / 2**20:.1f} MiB) "
                                   f"exceeds memory_budget_mb={self.options['memory_budget_mb']} and the GGN has no factored form "
                                   "here; raise memory_budget_mb, use granularity='matrix', or another backend (kfac, diag)")
            forms.append(form)
        return forms

    def fit(self, ctx: FitContext):
        params = ctx.params()
        shapes = {n: tuple(p.shape) for n, p in {**params, **ctx.others}.items()}
        groups = self._groups(ctx)
        forms = self._forms(groups, shapes)
        rest = {}
        if self.options["curvature"] == "ggn":
            dora = [a for a in ctx.adapters if a.magnitude is not None]
            if dora:
                raise BackendError(f"block backend: curvature='ggn' does not model DoRA (adapter {dora[0].adapter_name!r} "
                                   f"on layer {dora[0].name!r}): its Jacobians leave the magnitude vector out; use "
                                   "curvature='ef'")
            sums = self._ggn_sums(ctx, params, groups)
            rows = [None] * len(groups)
        else:
            sums, rows, rest = self._ef_accumulate(ctx, groups, forms, shapes)
        N = ctx.global_num_examples()
        blocks = []
        for g, form, s, r in zip(groups, forms, sums, rows):
            if form == "dense":
                blocks.append(DenseBlock(g, (ctx.all_reduce(s) / N).float(), shapes))
            else:
                U = torch.cat(_gather_rows(r), 0) if r else torch.zeros(0, sum(math.prod(shapes[p]) for p in g))
                blocks.append(FactoredBlock(g, (U / math.sqrt(N)).float(), shapes))
        ctx.metadata["block_forms"] = {"+".join(g): f for g, f in zip(groups, forms)}
        return blocks + (diag_blocks(ctx, rest) if rest else [])

    # --- empirical Fisher ------------------------------------------------------------
    def _ef_accumulate(self, ctx, groups, forms, shapes):
        params = ctx.params()
        names, tensors = list(params), list(params.values())
        grouped = {p for g in groups for p in g}
        in_blocks = {n: t for n, t in ctx.others.items() if n in grouped}  # DoRA magnitudes
        rest = {n: t for n, t in ctx.others.items() if n not in grouped}  # diagonal only
        rest_sums = {n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in rest.items()}
        sums = [torch.zeros(sum(math.prod(shapes[p]) for p in g), sum(math.prod(shapes[p]) for p in g), dtype=torch.float64)
                if f == "dense" else None for g, f in zip(groups, forms)]
        rows = [[] if f == "factored" else None for f in forms]
        with PerExampleGrads(ctx.adapters) as capture:
            for batch in ctx.stream:
                capture.clear()
                losses = ctx.per_example_loss(batch)
                if losses is None:
                    continue
                with capture.paused():  # the others' per-example backward first (graph kept), LoRA hooks paused
                    extra_rows = per_example_rows(losses, in_blocks) if in_blocks else {}
                    squares = squared_grad_sums(losses, rest) if rest else {}
                torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                grads = {**capture.grads, **extra_rows}
                if first_nonfinite({**{n: grads[n] for n in [*names, *extra_rows] if n in grads}, **squares}):
                    ctx.nonfinite(batch, "gradient")
                    continue
                for n, sq in squares.items():
                    rest_sums[n] += sq
                keep = (batch.extra["labelled_counts"] > 0).to(losses.device)
                for i, g in enumerate(groups):
                    G = torch.cat([_grad_or_zero(grads, p, batch.size, shapes[p], losses.device) for p in g], 1)[keep]
                    if forms[i] == "dense":
                        G = G.double().cpu()
                        sums[i] += G.T @ G
                    else:
                        rows[i].append(G.float().cpu())
                ctx.batch_done(self)
        return sums, rows, rest_sums

    # --- GGN -------------------------------------------------------------------------
    def _ggn_sums(self, ctx, params, groups):
        from torch.func import functional_call, jacrev

        from lalora.losses import model_outputs

        full_name = {id(p): n for n, p in ctx.model.named_parameters()}
        canon = list(params)
        keys = [full_name[id(params[c])] for c in canon]
        sizes = {c: params[c].numel() for c in canon}
        sums = [torch.zeros(sum(sizes[p] for p in g), sum(sizes[p] for p in g), dtype=torch.float64) for g in groups]
        for batch in ctx.stream:
            loss = ctx.loss
            if loss.likelihood not in ("categorical", "gaussian"):
                raise BackendError(f"block backend: curvature='ggn' needs a categorical or gaussian likelihood; loss {loss.name!r} has none")
            def outputs(theta, batch=batch, loss=loss):
                p = dict(zip(keys, theta))
                if isinstance(batch.inputs, dict):
                    out = functional_call(ctx.model, p, (), dict(batch.inputs))
                else:
                    out = functional_call(ctx.model, p, tuple(batch.inputs))
                z, _, _ = loss.outputs_and_targets(model_outputs(out), batch)
                return z.float(), z.float()

            theta = tuple(params[c].detach() for c in canon)
            try:
                jac, z = jacrev(outputs, has_aux=True)(theta)
            except Exception as e:  # noqa: BLE001 - torch.func failures come in many types
                raise BackendError(f"block backend: curvature='ggn' could not differentiate the model with torch.func ({e}); "
                                   "transformers need attn_implementation='eager'") from e
            if not bool(torch.isfinite(z).all()):
                ctx.nonfinite(batch, "outputs")
                continue
            M, C = z.shape
            J = {c: j.reshape(M, C, -1).double() for c, j in zip(canon, jac)}
            for i, g in enumerate(groups):  # J^T H J of the loss's likelihood (lalora.losses), H never formed
                sums[i] += loss.hessian_sandwich(torch.cat([J[p] for p in g], 2), z).cpu()
            ctx.batch_done(self)
        return sums


def _adapter_params(a):
    """``(name, parameter)`` of an adapter's block: A, B and, for DoRA, the magnitude vector."""
    out = [(a.a_name, a.A), (a.b_name, a.B)]
    return out + ([(a.magnitude_name, a.magnitude)] if a.magnitude is not None else [])


def _groups(adapters, granularity: str, others: set) -> list[tuple[str, ...]]:
    """One group per adapter (A, B and the DoRA magnitude when it is among ``others``) or per matrix."""
    names = [tuple(n for i, (n, _) in enumerate(_adapter_params(a)) if i < 2 or n in others) for a in adapters]
    return names if granularity == "adapter" else [(n,) for g in names for n in g]


def _grad_or_zero(grads, name, n, shape, device):
    g = grads.get(name)
    if g is None:
        return torch.zeros(n, math.prod(shape), device=device)
    return g.reshape(g.shape[0], -1)


def _gather_rows(rows: list) -> list:
    """This rank's rows, or every rank's rows (rank order) under torch.distributed."""
    if not _distributed():
        return rows
    local = torch.cat(rows, 0) if rows else None
    everything = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everything, local)
    return [r for r in everything if r is not None]
