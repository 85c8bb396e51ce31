"""Backend ``block``: exact dense curvature per block (one adapter, or one LoRA matrix).

Options:
- ``curvature``: ``"empirical_fisher"`` (default; per-example gradients from lalora's hooks,
  ``F = (1/N) sum_n g_n g_n^T``) or ``"ggn"`` (``F = (1/N) sum_n sum_t J_t^T H_t J_t``, the
  exact per-token GGN summed over the labelled positions; per-position Jacobians of the
  outputs w.r.t. the LoRA weights from ``torch.func.jacrev``: costs (labelled positions x
  classes x LoRA weights) floats per batch, so small vocabularies/models only; needs
  ``attn_implementation="eager"`` on transformers).
- ``granularity``: ``"adapter"`` (A and B of one adapter with their cross terms) or ``"matrix"``.
- ``form``: ``"auto"`` (dense when the ``(n, n)`` float32 matrix fits ``memory_budget_mb``,
  else factored), ``"dense"`` or ``"factored"`` (EF only: the N per-example gradient rows
  scaled by ``1/sqrt(N)``, a ``FactoredBlock`` of rank <= N, never densified).
- ``memory_budget_mb``: budget per block for the dense matrix (default 256).
The chosen form is in ``metadata["block_forms"]`` and in ``Precision.summary()``.

Relation to ``lalora.reference`` (the one exact reference): the same quantities, computed for real use
(whole batches, hooks, ``torch.func``), so this backend does not call the reference's slow batch-of-one
loops; it shares the conventions and the loss path instead (``lalora.losses``: per-example losses, the
labelled output rows, the output Hessian contraction ``hessian_sandwich``), and its tests compare it
with the reference, which computes all of these its own way.
"""
from __future__ import annotations

import math

import torch

from lalora.backend import CurvatureBackend, FitContext, _distributed, register_backend
from lalora.blocks import DenseBlock
from lalora.blocks.factored import FactoredBlock
from lalora.capture import PerExampleGrads
from lalora.errors import BackendError


@register_backend("block")
class BlockBackend(CurvatureBackend):
    default_options = {"curvature": "empirical_fisher", "granularity": "adapter", "form": "auto", "memory_budget_mb": 256.0}
    option_help = {
        "curvature": "'empirical_fisher' (per-example EF) or 'ggn' (exact per-token GGN)",
        "granularity": "'adapter' (A and B together) or 'matrix' (one block per LoRA matrix)",
        "form": "'auto', 'dense' or 'factored' (EF only)",
        "memory_budget_mb": "largest dense block (float32 MiB) 'auto' keeps dense",
    }
    supports_skip_nonfinite = True

    def check_options(self):
        o = self.options
        if o["curvature"] not in ("empirical_fisher", "ggn"):
            raise BackendError(f"block backend: option curvature={o['curvature']!r} is unknown; use 'empirical_fisher' or 'ggn'")
        if o["granularity"] not in ("adapter", "matrix"):
            raise BackendError(f"block backend: option granularity={o['granularity']!r} is unknown; use 'adapter' or 'matrix'")
        if o["form"] not in ("auto", "dense", "factored"):
            raise BackendError(f"block backend: option form={o['form']!r} is unknown; use 'auto', 'dense' or 'factored'")
        if o["form"] == "factored" and o["curvature"] != "empirical_fisher":
            raise BackendError("block backend: form='factored' exists for curvature='empirical_fisher' only "
                               "(a GGN factor has one row per labelled position and class)")
        if not (isinstance(o["memory_budget_mb"], (int, float)) and o["memory_budget_mb"] > 0):
            raise BackendError(f"block backend: option memory_budget_mb must be a positive number, got {o['memory_budget_mb']!r}")

    def curvature_kind(self):
        return self.options["curvature"]

    # --- block layout ---------------------------------------------------------------
    def _groups(self, ctx: FitContext) -> list[tuple[str, ...]]:
        if self.options["granularity"] == "adapter":
            return [(a.a_name, a.b_name) for a in ctx.adapters]
        return [(n,) for a in ctx.adapters for n in (a.a_name, a.b_name)]

    def _forms(self, groups, shapes) -> list[str]:
        budget = self.options["memory_budget_mb"] * 2**20
        forms = []
        for g in groups:
            n = sum(math.prod(shapes[p]) for p in g)
            dense_fits = 4 * n * n <= budget
            form = self.options["form"]
            if form == "auto":
                form = "dense" if dense_fits else "factored"
            if form == "factored" and self.options["curvature"] != "empirical_fisher":
                raise BackendError(f"block backend: the dense GGN block over {list(g)} ({n} weights, {4 * n * n / 2**20:.1f} MiB) "
                                   f"exceeds memory_budget_mb={self.options['memory_budget_mb']} and the GGN has no factored form "
                                   "here; raise memory_budget_mb, use granularity='matrix', or another backend (kfac, diag)")
            forms.append(form)
        return forms

    def fit(self, ctx: FitContext):
        params = ctx.params()
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        groups = self._groups(ctx)
        forms = self._forms(groups, shapes)
        if self.options["curvature"] == "ggn":
            sums = self._ggn_sums(ctx, params, groups)
            rows = [None] * len(groups)
        else:
            sums, rows = self._ef_accumulate(ctx, groups, forms, shapes)
        N = ctx.num_examples
        blocks = []
        for g, form, s, r in zip(groups, forms, sums, rows):
            if form == "dense":
                blocks.append(DenseBlock(g, (ctx.all_reduce(s) / N).float(), shapes))
            else:
                U = torch.cat(_gather_rows(r), 0) if r else torch.zeros(0, sum(math.prod(shapes[p]) for p in g))
                blocks.append(FactoredBlock(g, (U / math.sqrt(N)).float(), shapes))
        ctx.metadata["block_forms"] = {"+".join(g): f for g, f in zip(groups, forms)}
        return blocks

    # --- empirical Fisher ------------------------------------------------------------
    def _ef_accumulate(self, ctx, groups, forms, shapes):
        params = ctx.params()
        names, tensors = list(params), list(params.values())
        sums = [torch.zeros(sum(math.prod(shapes[p]) for p in g), sum(math.prod(shapes[p]) for p in g), dtype=torch.float64)
                if f == "dense" else None for g, f in zip(groups, forms)]
        rows = [[] if f == "factored" else None for f in forms]
        with PerExampleGrads(ctx.adapters) as capture:
            for batch in ctx.stream:
                capture.clear()
                losses = ctx.per_example_loss(batch)
                if losses is None:
                    continue
                torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                if not all(bool(torch.isfinite(capture.grads[n]).all()) for n in names if n in capture.grads):
                    ctx.nonfinite(batch, "gradient")
                    continue
                keep = (batch.extra["labelled_counts"] > 0).to(losses.device)
                for i, g in enumerate(groups):
                    G = torch.cat([_grad_or_zero(capture.grads, p, batch.size, shapes[p], losses.device) for p in g], 1)[keep]
                    if forms[i] == "dense":
                        G = G.double().cpu()
                        sums[i] += G.T @ G
                    else:
                        rows[i].append(G.float().cpu())
                ctx.batch_done(self)
        return sums, rows

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
