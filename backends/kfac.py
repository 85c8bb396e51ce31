"""Backends ``kfac`` (B-KFAC) and ``tri-kfac`` (B-Tri-KFAC): Kronecker factors of the adapted layers.

Per adapter the fit stores the adapted layer's factors (DESIGN.md sections 2-3), mean over the
N examples of the curvature of each example's summed loss:

- ``kfac_approx="expand"`` (default; tokens are treated as extra data points):
  ``G = (1/(N S)) sum_{n,t,k} g g^T`` and ``X = (1/T) sum_{n,t} x x^T`` with ``T`` the number of
  real tokens (attention mask 1) of the N counted examples and ``S`` the number of backward
  passes per batch that make one curvature estimate (``mc_samples`` for MC). Then
  ``kron(G, X) = (1/N) T E_t[g g^T] (x) E_t[x x^T]``, the K-FAC approximation of
  ``(1/N) sum_{n,t} (g g^T) (x) (x x^T)``. It is exact only for a single example (or identical
  ones) with one token: for distinct examples ``E[g g^T (x) x x^T] != E[g g^T] (x) E[x x^T]``,
  also with one token each (DESIGN.md section 6).
- Which tokens count: ``x`` and ``T`` run over *every real token* (attention mask 1) of each counted
  example (one with at least one target, ``CausalLMLoss``), labelled or not: its prompt, first and
  last token too, i.e. exactly the tokens of the example run alone without padding (``g`` at an
  unlabelled position is in general not zero: attention passes the loss of later tokens back to
  it). Pad positions get ``x`` weight 0 and have ``g = 0``.
- ``kfac_approx="reduce"``: per example ``xbar_n`` = mean of ``x`` over its real tokens and
  ``gsum_n`` = sum of ``g`` over its tokens; ``X = (1/N) sum_n xbar xbar^T``,
  ``G = (1/(N S)) sum_n gsum gsum^T``.

``x`` is the input of ``lora_A``; ``g`` the gradient of the adapted layer's output (the
gradient at ``lora_B``'s output divided by the scaling s). Each adapter is its own block, also
when several adapters are active on one layer: they share that layer's ``x`` and ``g``, but each
has its own A, B, s and sums (keyed by ``LoraAdapter.key``); the input products of adapters reading
one tensor are computed once (``FactorHooks``). ``curvature`` (``KFACOptions``; lalora 0.1 called it
``fisher_type`` with the values mc, empirical, type-2):

- ``"mc"`` (default): labels sampled from the model at every labelled position, ``mc_samples``
  backward passes per batch (unbiased for the per-position type-2 GGN); the draws: ``lalora.sampling``
  (one CPU generator per fit seeded with ``seed``, the same labels as the ``backpack`` backend's);
- ``"ef"``: the true labels, gradient of ``sum_n l_n`` (empirical Fisher);
- ``"ggn"``: exact type-2 Fisher, one backward per output class through ``sqrt(H)``
  (``LossFunction.hessian_sqrt_column``). Only where each example has a single output row
  (classification, MSE): on causal LMs backpropagating all positions together brings in
  cross-position terms (the curvlinops error, DESIGN.md section 5), so it is refused there with a
  message pointing to ``mc``.

LoRA on embeddings (peft's ``lora_embedding_A/B``): the same blocks with one-hot inputs, ``X`` diagonal
(token frequencies), ``kfac_approx="expand"`` only (backends/kfac_embedding.py).

Why own hooks rather than curvlinops' ``KFACLinearOperator``: with padded batches curvlinops
puts pad activations into ``X`` and normalises by the padded shape (DESIGN.md section 5), its
type-2 is wrong on causal LMs, it needs flattened logits and ``batch_size_fn`` plumbing and adds
factors on a second ``compute_kronecker_factors()``. The factors here are two matrix products
per layer and batch on tensors the forward/backward already computes, masked exactly, in
float32 also for bf16 models; the running sums are float64 (``sum_dtype="float32"`` halves them,
for 7-8B models). Only the upper panels of each Gram product are computed, in place into
float32 window sums (backends/kfac_factors.py). curvlinops stays the dense reference in the
tests (``GGNLinearOperator``). The backend is single-pass (several passes, one per group of layers, under
``max_memory``: backends/kfac_fit.py, docs/scale.md), supports ``skip_nonfinite``, ``torch.distributed``
sharding (every sum is all-reduced, or with ``shard_factors`` reduced to its owning rank) and the checkpoint
protocol (``fit_precision(checkpoint_dir=...)``: the running sums and the MC generator state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.errors import BackendError
from lalora.options import BackendOptions, Curvature, option
from lalora.logit_rows import categorical_labels, finite_rows, row_gradients, sample_rows

from .kfac_factors import FactorHooks
from .kfac_embedding import input_sum_shape
from .kfac_fit import fit_kfac
from .kfac_passes import SUM_DTYPES, check_max_memory
from .stored_sizes import kronecker_bytes

# batches per float32 window sum (FactorHooks): at most ~16 eps = 2e-6 relative rounding before each
# addition into the running sums
FLUSH_EVERY = 16


@dataclass(frozen=True)
class KFACOptions(BackendOptions):
    """Options of the ``kfac`` and ``tri-kfac`` backends."""

    curvature: Curvature = option(
        Curvature.MC, "mc (labels sampled from the model), ef (true labels: empirical Fisher) or ggn (exact type-2 "
        "Fisher, one backward per class; not for causal LMs)", choices=(Curvature.MC, Curvature.EF, Curvature.GGN),
        renamed_from="fisher_type", value_aliases={"empirical": Curvature.EF, "type-2": Curvature.GGN})
    mc_samples: int = option(1, "label samples per position for curvature='mc'", ge=1)
    kfac_approx: Literal["expand", "reduce"] = option(
        "expand", "expand (tokens as data points) or reduce (per-example mean input / summed gradient)")
    seed: int = option(0, "seed of the MC label sampling")
    max_rank: int | None = option(None, "store factors wider than this as top-max_rank eigenpairs + diagonal "
                                        "(None: dense); see lalora.compress", ge=1)
    sum_dtype: Literal["float64", "float32"] = option(
        "float64", "dtype of the running factor sums held during the fit (float32 halves them, e.g. for 7-8B "
        "models; each batch's products are float32 either way)")
    max_memory: str | None = option(
        None, "bound on the factor sums held during the fit, e.g. '40GiB' (None: unbounded); when they do not fit, "
        "groups of layers are fitted in successive passes over the (re-iterable) data", check=check_max_memory)
    shard_factors: bool = option(
        False, "under torch.distributed: reduce each layer's factors to one owning rank (balanced by size) instead "
        "of all ranks; each rank returns its shard, Precision.save writes a sharded precision (docs/scale.md)")


@register_backend("kfac")
class KFACBackend(CurvatureBackend):
    """B-KFAC: per adapter a ``kfac`` block (``F_A``, ``F_B``, no cross terms)."""

    Options = KFACOptions  # the curvature: its curvature option (default mc)
    block_class = KFACBlock
    supports_skip_nonfinite = True
    supports_embedding_lora = True  # X diagonal (one-hot inputs): backends/kfac_embedding.py

    @classmethod
    def stored_bytes(cls, adapters, options) -> int:
        """Per adapter the layer factors X and G, dense or low-rank (``stored_sizes.kronecker_bytes``)."""
        return kronecker_bytes(adapters, options["max_rank"])

    @classmethod
    def accumulator_bytes(cls, adapters, options) -> int:
        """Upper bound of the factor sums held while fitting: running sums (``sum_dtype``: 8 or 4 bytes per
        factor entry) and the float32 window sums (at most 4), and each adapter's token count T (one scalar
        in ``sum_dtype``)."""
        running = SUM_DTYPES[options["sum_dtype"]].itemsize
        return ((running + 4) * sum(math.prod(input_sum_shape(a)) + a.B.shape[0] ** 2 for a in adapters)
                + running * len(adapters))

    def __init__(self, options=None, /, **kwargs):
        super().__init__(options, **kwargs)
        self._sums: dict[str, dict[str, Tensor]] | None = None
        self._gen: torch.Generator | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._hooks: FactorHooks | None = None

    # --- checkpoint protocol (lalora.checkpoint, docs/robustness.md) ---------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The running sums so far (``sum_dtype``), ``sum.<adapter key>.<X|G|T>`` (``LoraAdapter.key``: unique per
        adapter, also for several adapters on one layer; X, G: upper panels, see
        ``kfac_factors.add_gram``), and the MC generator state ``rng``. During a fit the window sums are flushed
        first (the flush points are then the same in an uninterrupted and a resumed fit)."""
        if self._hooks is not None:
            self._hooks.flush()
        if self._sums is None:
            return {} if self._loaded is None else dict(self._loaded)
        state = {f"sum.{n}.{k}": t for n, d in self._sums.items() for k, t in d.items()}
        state["rng"] = self._gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, t in state.items():
            ok = (t.dtype == torch.uint8) if k == "rng" else (
                k.startswith("sum.") and k.rsplit(".", 1)[-1] in ("X", "G", "T")
                and t.dtype == SUM_DTYPES[self.options["sum_dtype"]])
            if not ok:
                raise BackendError(f"{self.name} backend state: unexpected entry {k!r} ({t.dtype})")
        if "rng" not in state:
            raise BackendError(f"{self.name} backend state has no 'rng' entry (the MC generator state)")
        self._loaded = dict(state)

    def _restore(self, adapters, sums: dict, gen: torch.Generator, device) -> None:
        """Start ``sums`` and ``gen`` from a state loaded for this fit (checked against the adapters); the state
        is consumed, so a later fit of this instance starts from zero."""
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        shapes = {a.key: {"X": input_sum_shape(a), "G": (a.B.shape[0],) * 2, "T": ()} for a in adapters}
        for k, t in loaded.items():
            if k == "rng":
                continue
            name, key = k[len("sum."):].rsplit(".", 1)
            if name not in shapes:
                raise BackendError(f"{self.name} backend state has sums for adapter {name!r}, which the model does not have")
            if tuple(t.shape) != shapes[name][key]:
                raise BackendError(f"{self.name} backend state {k!r} has shape {tuple(t.shape)}, expected "
                                   f"{shapes[name][key]}")
            sums[name][key] = t.to(device)
        gen.set_state(loaded["rng"])

    # --- one batch -----------------------------------------------------------------------
    def _backward_passes(self, ctx: FitContext, batch, output: Tensor, tensors, gen) -> bool:
        """Run the backward passes of one batch (the G hooks fire); False if the batch is skipped."""
        fisher = self.options["curvature"]
        if fisher == Curvature.EF and ctx.loss.likelihood == "categorical":
            # the cross-entropy gradient softmax(z) - onehot(label), fed into the output rows like the MC
            # one: no log-softmax saved for a backward (one logit-sized tensor less per batch)
            targets = ctx.loss.row_targets(output, batch)
            return self._categorical(ctx, batch, output, tensors, lambda rows: categorical_labels(targets, None, rows), 1)
        if fisher == Curvature.EF:
            losses = ctx.per_example_loss(batch, output)
            if losses is None:
                return False
            torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
            return True
        loss = ctx.loss
        if loss.likelihood not in ("categorical", "gaussian"):
            raise BackendError(f"curvature={fisher.value!r} needs a loss with a known likelihood (causal_lm, "
                               f"classification, mse); loss {loss.name!r} has none: use curvature='ef'")
        if fisher == Curvature.MC and loss.likelihood == "categorical":
            return self._categorical(ctx, batch, output, tensors, lambda rows: categorical_labels(None, gen, rows),
                                     self.options["mc_samples"])
        rows, _, index = loss.outputs_and_targets(output, batch)
        z = rows.float()
        if not bool(torch.isfinite(z).all()):
            ctx.nonfinite(batch, "loss", "non-finite outputs")
            return False
        if fisher == Curvature.GGN:
            per_example = torch.bincount(index, minlength=batch.size)
            if int(per_example.max()) > 1:
                raise BackendError(
                    "curvature='ggn' (the exact type-2 Fisher) is refused for losses with several labelled output positions per example "
                    f"(loss {loss.name!r}, up to {int(per_example.max())} positions here, e.g. a causal LM): "
                    "backpropagating sqrt-Hessian columns of all positions together adds cross-position terms, and the "
                    "exact per-position version costs vocab x positions backward passes. Use curvature='mc' "
                    "(unbiased for the per-position GGN; raise mc_samples to reduce noise)")
            C = z.shape[1]
            p = torch.softmax(z.detach(), -1) if loss.likelihood == "categorical" else None
            for c in range(C):  # the columns of sqrt(H): sum_c J^T s_c s_c^T J = J^T H J
                torch.autograd.grad(z, tensors, grad_outputs=loss.hessian_sqrt_column(z, c, probs=p),
                                    retain_graph=c < C - 1, allow_unused=True)
            return True
        k = self.options["mc_samples"]
        for i in range(k):  # Gaussian MC targets (lalora.sampling), the loss of the sampled targets
            lmc = loss.per_example(output, loss.with_row_targets(batch, sample_rows("gaussian", z, gen))).sum()
            torch.autograd.grad(lmc, tensors, retain_graph=i < k - 1, allow_unused=True)
        return True

    def _categorical(self, ctx: FitContext, batch, output: Tensor, tensors, labels, k: int) -> bool:
        """``k`` backward passes of the cross-entropy gradient ``softmax(z) - onehot(y)`` (zero on unlabelled
        rows; ``lalora.logit_rows.row_gradients``, float32 chunks of rows, no full float32 copy) for the labels
        ``labels(R)`` gives (sampled for MC, the true targets for the empirical Fisher), fed straight into the
        output rows: without a gather of the labelled rows, a scatter back or a second log-softmax."""
        rows, keep = ctx.loss.output_rows(output, batch)  # (R, C) view of the outputs, (R,) bool
        if not finite_rows(rows, keep):
            ctx.nonfinite(batch, "loss", "non-finite outputs")
            return False
        for i in range(k):
            v = row_gradients(rows, keep, labels(rows.shape[0]))  # in the outputs' dtype
            torch.autograd.grad(rows, tensors, grad_outputs=v, retain_graph=i < k - 1, allow_unused=True)
            del v
        return True

    def _samples_per_batch(self) -> int:
        return self.options["mc_samples"] if self.options["curvature"] == Curvature.MC else 1

    def _one_batch(self, ctx: FitContext, hooks: FactorHooks, batch, tensors, gen) -> None:
        """Forward (input factors), backward passes (gradient factors), then commit or drop the batch."""
        counted = (batch.extra["labelled_counts"] > 0).float().to(ctx.device)
        mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
        hooks.begin_batch(None if mask is None else mask.float().to(ctx.device) * counted[:, None], counted)
        output = ctx.forward(batch)
        hooks.forward_done()
        # differentiate w.r.t. the adapted outputs, whose gradients are all the factors need: the backward then
        # skips the LoRA weight gradients (two products per adapter) and stops below the first adapted layer
        ok = self._backward_passes(ctx, batch, output, hooks.targets or tensors, gen)
        del output  # free this batch's outputs before the next forward: one batch of activations at a time
        if not ok:  # skipped (skip_nonfinite): the window holds this batch only
            hooks.drop_batch()
            return
        bad = hooks.nonfinite()
        if bad:
            ctx.nonfinite(batch, "gradient", f"in the factors of {bad!r}")  # raises unless skip_nonfinite
            hooks.drop_batch()
            return
        hooks.commit_batch()
        ctx.batch_done(self)

    def fit(self, ctx: FitContext):
        return fit_kfac(self, ctx, FLUSH_EVERY)  # backends/kfac_fit.py: passes (max_memory), owners (shard_factors)


@register_backend("tri-kfac")
class TriKFACBackend(KFACBackend):
    """B-Tri-KFAC: the same factors as ``kfac``; per adapter one ``tri-kfac`` block with the A-B cross terms."""

    block_class = TriKFACBlock
