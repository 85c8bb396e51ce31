"""Backends ``kfac`` (B-KFAC) and ``tri-kfac`` (B-Tri-KFAC): Kronecker factors of the adapted layers.

Per adapter the fit stores the adapted layer's factors (DESIGN.md sections 2-3), mean over the
N examples of the curvature of each example's summed loss:

- ``kfac_approx="expand"`` (default; tokens are treated as extra data points):
  ``G = (1/(N S)) sum_{n,t,k} g g^T`` and ``X = (1/T) sum_{n,t} x x^T`` with ``T`` the number of
  real tokens (attention mask 1) of the N counted examples and ``S`` the number of backward
  passes per batch that make one curvature estimate (``mc_samples`` for MC). Then
  ``kron(G, X) = (1/N) T E_t[g g^T] (x) E_t[x x^T]``, the K-FAC approximation of
  ``(1/N) sum_{n,t} (g g^T) (x) (x x^T)``; for one token per example it is exact.
- ``kfac_approx="reduce"``: per example ``xbar_n`` = mean of ``x`` over its real tokens and
  ``gsum_n`` = sum of ``g`` over its tokens; ``X = (1/N) sum_n xbar xbar^T``,
  ``G = (1/(N S)) sum_n gsum gsum^T``.

``x`` is the input of ``lora_A``; ``g`` the gradient of the adapted layer's output (the
gradient at ``lora_B``'s output divided by the scaling s). ``fisher_type``:

- ``"mc"`` (default): labels sampled from the model at every labelled position, ``mc_samples``
  backward passes per batch (unbiased for the per-position type-2 GGN);
- ``"empirical"``: the true labels, gradient of ``sum_n l_n``;
- ``"type-2"``: exact, one backward per output class through ``sqrt(H)``. Only where each
  example has a single output row (classification, MSE): on causal LMs backpropagating all
  positions together brings in cross-position terms (the curvlinops error, DESIGN.md
  section 5), so it is refused there with a message pointing to ``mc``.

Why own hooks rather than curvlinops' ``KFACLinearOperator``: with padded batches curvlinops
puts pad activations into ``X`` and normalises by the padded shape (DESIGN.md section 5), its
type-2 is wrong on causal LMs, it needs flattened logits and ``batch_size_fn`` plumbing and adds
factors on a second ``compute_kronecker_factors()``. The factors here are two matrix products
per layer and batch on tensors the forward/backward already computes, masked exactly, in
float32 also for bf16 models; the running sums are float64 (``sum_dtype="float32"`` halves them,
for 7-8B models). Only the upper panels of each Gram product are computed (``_gram``). curvlinops
stays the dense reference in
the tests (``GGNLinearOperator``). The backend is single-pass, supports ``skip_nonfinite``,
``torch.distributed`` sharding (every sum is all-reduced) and the checkpoint protocol
(``fit_precision(checkpoint_dir=...)``: the running sums and the MC generator state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.blocks.lowrank_kronecker import check_max_rank, compress_block
from lalora.errors import BackendError

FISHER_TYPES = ("mc", "empirical", "type-2")
APPROXES = ("expand", "reduce")
SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _FactorHooks:
    """Forward hook on ``lora_A`` (input factor, once per forward) and a tensor hook on
    ``lora_B``'s output (gradient factor, once per backward). This batch's sums go to
    ``self.batch`` (float32, one GEMM each) so a batch can be dropped before it is added to the
    float64 running sums."""

    def __init__(self, adapters, approx: str):
        self.adapters = adapters
        self.approx = approx
        self.mask: Tensor | None = None  # (N, T) float: real tokens of counted examples
        self.example_mask: Tensor | None = None  # (N,) float
        self._batch: dict[str, dict[str, Tensor]] = {}
        # this forward's input factors by input tensor: q/k/v (and gate/up, and several adapters on
        # one layer) share their input, so its X is computed once (the input is kept alive by the
        # entry, so identity cannot be reused by another tensor)
        self._x_cache: list[tuple[Tensor, int, dict[str, Tensor]]] = []
        self._handles = []

    @property
    def batch(self) -> dict[str, dict[str, Tensor]]:
        return self._batch

    @batch.setter
    def batch(self, value: dict) -> None:
        """Starting a batch (``hooks.batch = {}``) also drops the previous forward's input cache."""
        self._batch = value
        self._x_cache = []

    def _token_weights(self, x: Tensor) -> Tensor:
        """(N, M) weights for the rows of x reshaped to (N, M, d)."""
        n, m = x.shape[0], x.shape[1]
        if self.mask is not None and self.mask.shape == (n, m):
            return self.mask
        return self.example_mask[:, None].expand(n, m)

    def _add(self, name: str, key: str, value: Tensor) -> None:
        # never in place: one input factor is shared by the adapters reading the same input
        slot = self.batch.setdefault(name, {})
        slot[key] = value if key not in slot else slot[key] + value

    def _input_factor(self, x: Tensor) -> dict[str, Tensor]:
        """``{"X": sum of x x^T, "T": count}`` (float32, this batch) of one lora_A input, per ``approx``."""
        x = x.detach().float()
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, M, d_in)
        w = self._token_weights(x).to(x)
        if self.approx == "expand":
            if bool((w == 1).all()):  # no padding, every example counted: skip the weighted copy of x
                xm = x.reshape(-1, x.shape[-1])
            else:
                xm = (x * w.sqrt()[..., None]).reshape(-1, x.shape[-1])
            return {"X": _gram(xm), "T": w.sum()}
        cnt = w.sum(1)
        xbar = (x * w[..., None]).sum(1) / cnt.clamp_min(1)[:, None]  # (N, d_in)
        return {"X": _gram(xbar), "T": (cnt > 0).sum().float()}

    def _a_hook(self, adapter):
        def hook(module, inputs, output):
            x = inputs[0]
            factor = next((f for seen, version, f in self._x_cache if seen is x and version == x._version), None)
            if factor is None:
                factor = self._input_factor(x)
                self._x_cache.append((x, x._version, factor))
            for key, value in factor.items():
                self._add(adapter.name, key, value)
        return hook

    def _b_hook(self, adapter):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return

            def grad_hook(grad):
                g = grad.detach().float()
                g = g.reshape(g.shape[0], -1, g.shape[-1])  # (N, M, d_out)
                gm = g.reshape(-1, g.shape[-1]) if self.approx == "expand" else g.sum(1)
                # the gradient at lora_B's output is s times the layer's: 1/s^2 is applied when the batch is added
                self._add(adapter.name, "G", _gram(gm))

            output.register_hook(grad_hook)
        return hook

    def __enter__(self):
        for a in self.adapters:
            self._handles.append(a.lora_A.register_forward_hook(self._a_hook(a)))
            self._handles.append(a.lora_B.register_forward_hook(self._b_hook(a)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._x_cache = []


PANEL = 256


class _Panels:
    """The upper panels of a symmetric (d, d) matrix: ``parts[i]`` holds rows ``[a_i, a_i + w)`` from
    column ``a_i`` on (``a_i = starts[i]``). Added to the float64 running sums panel by panel, so a
    batch's product is never zero-filled or copied into a (d, d) buffer."""

    __slots__ = ("d", "starts", "parts")

    def __init__(self, d: int, starts: list[int], parts: list[Tensor]):
        self.d, self.starts, self.parts = d, starts, parts

    def __add__(self, other: "_Panels") -> "_Panels":
        return _Panels(self.d, self.starts, [p + q for p, q in zip(self.parts, other.parts)])

    def trace(self) -> Tensor:
        return sum(torch.diagonal(p).sum() for p in self.parts)

    def add_to(self, dst: Tensor, alpha: float = 1.0) -> None:
        for a0, p in zip(self.starts, self.parts):
            dst[a0:a0 + p.shape[0], a0:].add_(p, alpha=alpha)


def _gram(z: Tensor, panel: int = PANEL) -> _Panels:
    """The upper panels of ``z^T z`` (d, d) for ``z`` (m, d); ``_mirror_panels`` completes their sum
    once per fit. torch has no symmetric rank-k update (BLAS syrk); the factors' GEMMs are the floor
    of the kfac fit, and computing ``(k+1)/(2k)`` of the products (``k`` panels) cut them to
    0.6-0.85x of ``z.T @ z`` for d = 512-1536 (benchmarks/README.md). Narrow matrices: one panel."""
    d = z.shape[1]
    if d < panel + panel // 2:
        return _Panels(d, [0], [z.T @ z])
    starts = list(range(0, d, panel))
    return _Panels(d, starts, [z[:, a0:a0 + panel].T @ z[:, a0:] for a0 in starts])


def _mirror_panels(m: Tensor, panel: int = PANEL) -> Tensor:
    """Complete a sum of ``_gram`` results in place: the blocks below the diagonal panels are copied
    from above. Full (already symmetric) matrices are left unchanged."""
    d = m.shape[0]
    if d < panel + panel // 2:
        return m
    for a0 in range(0, d - panel, panel):
        m[a0 + panel:, a0:a0 + panel] = m[a0:a0 + panel, a0 + panel:].T
    return m


def _sample_categorical(p: Tensor, gen: torch.Generator) -> Tensor:
    """One draw per row of ``p`` (R, C) by inverse CDF: one uniform per row from the CPU generator
    ``gen`` (the same draws on every device). ``torch.multinomial`` draws C exponentials per row,
    which cost as much as the rest of the MC step on LLM vocabularies. The float32 CDF is
    renormalised by its last entry; its rounding (about 1e-7 per entry) is far below MC noise."""
    u = torch.rand(p.shape[0], generator=gen, dtype=torch.float64).to(p.device)
    out = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
    step = max(1, (1 << 24) // max(1, p.shape[1]))  # rows per chunk: at most 16M CDF entries at a time
    for i in range(0, p.shape[0], step):
        c = torch.cumsum(p[i:i + step], -1)
        v = (u[i:i + step].to(c.dtype) * c[:, -1]).unsqueeze(1)
        out[i:i + step] = torch.searchsorted(c, v, right=True).squeeze(1).clamp_max(p.shape[1] - 1)
    return out


def _nonfinite_factor(batch: dict[str, dict[str, Tensor]]) -> str | None:
    """The first adapter with a non-finite factor sum, else None. A Gram matrix ``M = Z^T Z`` has a
    non-finite entry only if a diagonal entry is (``|M_ij| <= sqrt(M_ii M_jj)``), so the trace is
    checked instead of every entry (d^2 -> d elements)."""
    for name, d in batch.items():
        for key, t in d.items():
            if not bool(torch.isfinite(t.trace() if isinstance(t, _Panels) else t).all()):
                return name
    return None


@register_backend("kfac")
class KFACBackend(CurvatureBackend):
    """B-KFAC: per adapter a ``kfac`` block (``F_A``, ``F_B``, no cross terms)."""

    curvature = "mc_fisher"
    block_class = KFACBlock
    default_options = {"fisher_type": "mc", "mc_samples": 1, "kfac_approx": "expand", "seed": 0, "max_rank": None,
                       "sum_dtype": "float64"}
    option_help = {
        "fisher_type": "mc (labels sampled from the model), empirical (true labels) or type-2 (exact GGN; "
                       "not for causal LMs)",
        "mc_samples": "label samples per position for fisher_type='mc'",
        "kfac_approx": "expand (tokens as data points) or reduce (per-example mean input / summed gradient)",
        "seed": "seed of the MC label sampling",
        "max_rank": "store factors wider than this as top-max_rank eigenpairs + diagonal (None: dense); "
                    "see lalora.compress",
        "sum_dtype": "float64 (default) or float32: dtype of the running factor sums held during the fit "
                     "(float32 halves them, e.g. for 7-8B models; each batch's products are float32 either way)",
    }
    supports_skip_nonfinite = True

    def check_options(self):
        o = self.options
        if o["fisher_type"] not in FISHER_TYPES:
            raise BackendError(f"backend {self.name!r}: option fisher_type={o['fisher_type']!r} is unknown; use one of {FISHER_TYPES}")
        if o["kfac_approx"] not in APPROXES:
            raise BackendError(f"backend {self.name!r}: option kfac_approx={o['kfac_approx']!r} is unknown; use one of {APPROXES}")
        if not isinstance(o["mc_samples"], int) or isinstance(o["mc_samples"], bool) or o["mc_samples"] < 1:
            raise BackendError(f"backend {self.name!r}: option mc_samples must be an integer >= 1, got {o['mc_samples']!r}")
        if o["sum_dtype"] not in SUM_DTYPES:
            raise BackendError(f"backend {self.name!r}: option sum_dtype={o['sum_dtype']!r} is unknown; use one of "
                               f"{tuple(SUM_DTYPES)}")
        if o["max_rank"] is not None:
            try:
                check_max_rank(o["max_rank"], f"backend {self.name!r}: option max_rank")
            except ValueError as e:
                raise BackendError(str(e)) from None

    def __init__(self, **options):
        super().__init__(**options)
        self._sums: dict[str, dict[str, Tensor]] | None = None
        self._gen: torch.Generator | None = None
        self._loaded: dict[str, Tensor] | None = None

    # --- checkpoint protocol (lalora.checkpoint, docs/robustness.md) ---------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The running sums so far (``sum_dtype``), ``sum.<adapter>.<X|G|T>`` (X, G: upper panels, see ``_gram``),
        and the MC generator state ``rng``."""
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
        """Start ``sums`` and ``gen`` from a loaded checkpoint state (checked against the adapters)."""
        if self._loaded is None:
            return
        shapes = {a.name: {"X": (a.A.shape[1],) * 2, "G": (a.B.shape[0],) * 2, "T": ()} for a in adapters}
        for k, t in self._loaded.items():
            if k == "rng":
                continue
            name, key = k[len("sum."):].rsplit(".", 1)
            if name not in shapes:
                raise BackendError(f"{self.name} backend state has sums for adapter {name!r}, which the model does not have")
            if tuple(t.shape) != shapes[name][key]:
                raise BackendError(f"{self.name} backend state {k!r} has shape {tuple(t.shape)}, expected "
                                   f"{shapes[name][key]}")
            sums[name][key] = t.to(device)
        gen.set_state(self._loaded["rng"])
        self._loaded = None

    def curvature_kind(self) -> str:
        return {"mc": "mc_fisher", "empirical": "empirical_fisher", "type-2": "ggn"}[self.options["fisher_type"]]

    # --- one batch -----------------------------------------------------------------------
    def _backward_passes(self, ctx: FitContext, batch, output: Tensor, tensors, gen) -> bool:
        """Run the backward passes of one batch (the G hooks fire); False if the batch is skipped."""
        fisher = self.options["fisher_type"]
        if fisher == "empirical":
            losses = ctx.per_example_loss(batch, output)
            if losses is None:
                return False
            torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
            return True
        loss = ctx.loss
        if loss.likelihood not in ("categorical", "gaussian"):
            raise BackendError(f"fisher_type={fisher!r} needs a loss with a known likelihood (causal_lm, "
                               f"classification, mse); loss {loss.name!r} has none: use fisher_type='empirical'")
        if fisher == "mc" and loss.likelihood == "categorical":
            return self._mc_categorical(ctx, batch, output, tensors, gen, self.options["mc_samples"])
        rows, _, index = loss.outputs_and_targets(output, batch)
        z = rows.float()
        if not bool(torch.isfinite(z).all()):
            ctx.nonfinite(batch, "loss", "non-finite outputs")
            return False
        if fisher == "type-2":
            per_example = torch.bincount(index, minlength=batch.size)
            if int(per_example.max()) > 1:
                raise BackendError(
                    "fisher_type='type-2' is refused for losses with several labelled output positions per example "
                    f"(loss {loss.name!r}, up to {int(per_example.max())} positions here, e.g. a causal LM): "
                    "backpropagating sqrt-Hessian columns of all positions together adds cross-position terms, and the "
                    "exact per-position version costs vocab x positions backward passes. Use fisher_type='mc' "
                    "(unbiased for the per-position GGN; raise mc_samples to reduce noise)")
            C = z.shape[1]
            if loss.likelihood == "categorical":
                p = torch.softmax(z.detach(), -1)
                for c in range(C):
                    e = torch.zeros_like(p)
                    e[:, c] = 1
                    v = p[:, c:c + 1].sqrt() * (e - p)
                    torch.autograd.grad(z, tensors, grad_outputs=v, retain_graph=c < C - 1, allow_unused=True)
            else:
                for c in range(C):
                    v = torch.zeros_like(z)
                    v[:, c] = math.sqrt(2.0)
                    torch.autograd.grad(z, tensors, grad_outputs=v, retain_graph=c < C - 1, allow_unused=True)
            return True
        k = self.options["mc_samples"]
        for i in range(k):  # l = |f - y|^2 is the NLL of N(f, I/2) up to constants
            eps = torch.randn(z.shape, generator=gen).to(z.device) * math.sqrt(0.5)
            lmc = (z - (z.detach() + eps)).square().sum()
            torch.autograd.grad(lmc, tensors, retain_graph=i < k - 1, allow_unused=True)
        return True

    def _mc_categorical(self, ctx: FitContext, batch, output: Tensor, tensors, gen, k: int) -> bool:
        """``k`` backward passes of ``softmax(z) - onehot(y)``, ``y ~ softmax(z)``, fed straight into the
        output rows (zero on unlabelled rows): the gradient of the sampled cross-entropy without a
        gather of the labelled rows, a scatter back or a second log-softmax (benchmarks/README.md)."""
        rows, keep = ctx.loss.output_rows(output, batch)  # (R, C) view of the outputs, (R,) bool
        p = torch.softmax(rows.detach().float(), -1)
        if not bool((torch.isfinite(p.sum(-1)) | ~keep).all()):  # a non-finite logit makes its row's sum NaN
            ctx.nonfinite(batch, "loss", "non-finite outputs")
            return False
        drop = (~keep).nonzero().squeeze(1)
        for i in range(k):
            y = _sample_categorical(p, gen)
            v = p.clone() if i < k - 1 else p  # the last sample reuses p's memory
            v[torch.arange(v.shape[0], device=v.device), y] -= 1
            v[drop] = 0
            torch.autograd.grad(rows, tensors, grad_outputs=v.to(rows.dtype), retain_graph=i < k - 1,
                                allow_unused=True)
        return True

    def _samples_per_batch(self) -> int:
        return self.options["mc_samples"] if self.options["fisher_type"] == "mc" else 1

    def fit(self, ctx: FitContext):
        adapters = ctx.adapters
        for a in adapters:
            if a.scaling == 0:
                raise BackendError(f"adapter {a.name!r} has LoRA scaling 0: its output gradient cannot be recovered")
        tensors = list(ctx.params().values())
        approx = self.options["kfac_approx"]
        sums = {a.name: {} for a in adapters}
        scaling = {a.name: a.scaling for a in adapters}
        sum_dtype = SUM_DTYPES[self.options["sum_dtype"]]
        gen = torch.Generator().manual_seed(int(self.options["seed"]))
        self._restore(adapters, sums, gen, ctx.device)
        self._sums, self._gen = sums, gen  # read by state_dict() at each checkpoint
        with _FactorHooks(adapters, approx) as hooks:
            for batch in ctx.stream:
                counted = (batch.extra["labelled_counts"] > 0).float().to(ctx.device)
                hooks.example_mask = counted
                mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
                hooks.mask = None if mask is None else mask.float().to(ctx.device) * counted[:, None]
                hooks.batch = {}
                output = ctx.forward(batch)
                ok = self._backward_passes(ctx, batch, output, tensors, gen)
                del output  # free this batch's outputs before the next forward: one batch of activations at a time
                if not ok:
                    continue
                bad = _nonfinite_factor(hooks.batch)
                if bad:
                    ctx.nonfinite(batch, "gradients", f"in the factors of {bad!r}")
                    continue
                for name, d in hooks.batch.items():
                    for key, t in d.items():
                        # G was taken at lora_B's output, s times the layer's output gradient
                        alpha = 1.0 / scaling[name] ** 2 if key == "G" else 1.0
                        if isinstance(t, _Panels):
                            if key not in sums[name]:
                                sums[name][key] = torch.zeros(t.d, t.d, dtype=sum_dtype, device=ctx.device)
                            t.add_to(sums[name][key], alpha)
                        else:
                            sums[name][key] = t.to(sum_dtype) + sums[name].get(key, 0.0)
                ctx.batch_done(self)
        n_examples = ctx.num_examples
        S = self._samples_per_batch()
        blocks = []
        for a in adapters:
            d = sums.pop(a.name)  # free each adapter's running sums once its factors are built
            d_in, d_out = a.A.shape[1], a.B.shape[0]
            X = ctx.all_reduce(d.get("X", torch.zeros(d_in, d_in, dtype=sum_dtype, device=ctx.device)))
            G = ctx.all_reduce(d.get("G", torch.zeros(d_out, d_out, dtype=sum_dtype, device=ctx.device)))
            T = float(ctx.all_reduce(d.get("T", torch.zeros((), dtype=sum_dtype, device=ctx.device)).reshape(1)))
            if T == 0:
                raise BackendError(f"adapter {a.name!r} saw no token of a counted example during the fit "
                                   "(is the adapted layer used in the forward pass?)")
            # the sums hold the upper panels (_gram); symmetric float32 factors, one mirror per fit
            X, G = _mirror_panels(X).float(), _mirror_panels(G).float()
            X = (X + X.T).mul_(0.5 / T)
            G = (G + G.T).mul_(0.5 / (n_examples * S))
            block = self.block_class((a.a_name, a.b_name), X, G, a.A.detach().float().clone(), a.B.detach().float().clone(),
                                     a.scaling)
            if self.options["max_rank"] is not None:  # on the model's device, before the copy to CPU
                block = compress_block(block, self.options["max_rank"], seed=int(self.options["seed"]))
            blocks.append(block.to("cpu"))
        ctx.metadata.update({"fisher_type": self.options["fisher_type"], "kfac_approx": approx})
        return blocks


@register_backend("tri-kfac")
class TriKFACBackend(KFACBackend):
    """B-Tri-KFAC: the same factors as ``kfac``; per adapter one ``tri-kfac`` block with the A-B cross terms."""

    block_class = TriKFACBlock
