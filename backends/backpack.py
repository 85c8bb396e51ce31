"""Backend ``backpack``: diagonal or Kronecker-factored GGN / MC Fisher of the LoRA weights via BackPACK.

Options (``BackPACKOptions``):
- ``curvature``: ``"ggn"`` (the exact GGN) or ``"mc"`` (labels sampled from the model, ``mc_samples``
  of them per labelled output; an unbiased estimate of the same quantity).
- ``structure``: ``"diag"`` (default; ``DiagGGNExact`` for ggn: exact ``diag((1/N) sum_n J_n^T H_n J_n)``,
  ``DiagGGNMC`` or ``SumGradSquared`` for mc), ``"kfac"`` or ``"tri-kfac"`` (Kronecker factors, one block
  per adapter of that kind: B-KFAC, or with the A-B cross terms; BackPACK's ``KFLR`` (exact loss
  Hessian, the type-2 K-FAC) for ggn, its ``KFAC`` (sampled labels, unbiased for KFLR) for mc).
- ``mc_samples``: number of MC samples (default 1); ``seed``: their seed.
lalora 0.1 spelled these ``curvature="ggn" | "mc_fisher" | "kflr" | "kfac"`` and ``kron_block``; those
still work for one release (``kflr`` = ggn + kfac structure, ``kfac`` = mc + kfac structure).

Kronecker factors: with ``reduction="sum"`` BackPACK stores for ``lora_B.weight`` the pair
``[sum_n (s g_n)(s g_n)^T, mean_n h_n h_n^T]`` and for ``lora_A.weight``
``[sum_n (s B^T g_n)(..)^T, mean_n x_n x_n^T]`` per batch (``g`` the gradient of the adapted
layer's output, or its sqrt-Hessian columns). lalora keeps the layer factors
``X = (1/N) sum_n x x^T`` (lora_A's input factor, weighted by batch size over batches) and
``G = (1/N) sum_n g g^T`` (lora_B's output factor / s^2, summed over batches, / N); the per-matrix
factors derive from them exactly (``h = A x``), as in the ``kfac`` backend with one output row per
example (tests: equal to ``kfac(curvature="ggn")`` and curvlinops' KFAC).

Routes:
- **second order** (``DiagGGNExact``/``DiagGGNMC``/``KFLR``/``KFAC``): models whose base is an ``nn.Sequential``
  of modules BackPACK knows, with ``classification`` or ``mse`` losses. Each peft ``lora.Linear``
  is rebuilt for the fit as ``Parallel(base_layer, Sequential(lora_A, lora_B, ScaleModule(s)),
  merge_module=SumModule())`` sharing the same Parameters, and put back afterwards.
- **first order** (``SumGradSquared``, ``curvature="mc"``, ``structure="diag"`` only): any model, e.g.
  transformers. Only the ``lora_A``/``lora_B`` ``nn.Linear`` modules are extended; for every
  MC sample, labels are drawn from the model at every labelled position (``lalora.sampling``: the
  ``kfac`` backend's draws for the same seed), their loss comes from ``lalora.losses``, and BackPACK
  returns ``sum_n ghat_n^2`` with ``ghat_n`` the gradient of example n's summed loss (per-sequence:
  BackPACK's sample axis is the batch axis). ``curvature="ggn"`` or a Kronecker ``structure`` on such
  models raises ``BackendError`` naming the module BackPACK cannot traverse.
The second-order route needs BackPACK's own extended ``CrossEntropyLoss``/``MSELoss`` (summed), and
BackPACK draws the MC labels of ``DiagGGNMC``/``KFAC`` itself from torch's global generator, seeded with
``seed`` for the fit (``lalora.sampling.library_rng``). Afterwards BackPACK's hooks are removed
(``CTX.remove_hooks()``) and the ``_backpack_extend`` flags and stored tensors deleted, so other
backends keep working in the same process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lalora.adapters import base_model_of
from lalora.backend import CurvatureBackend, FitContext, register_backend
from lalora.blocks import DiagBlock
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.errors import BackendError, warn_deprecated
from lalora.options import BackendOptions, Curvature, option
from lalora.logit_rows import sample_rows
from lalora.sampling import library_rng, mc_generator

from .backpack_modules import backpack_cleanup, branching_kflr, quiet, rebuilt_lora, second_order_blocker
from .stored_sizes import diagonal_bytes, kronecker_bytes

KRONECKER = {"kflr": "kflr", "kfac": "kfac"}  # BackPACK extension -> its savefield
DIAGONAL = {"ggn": "diag_ggn_exact", "mc_fisher": "diag_ggn_mc"}
ROUTES = {"ggn": "DiagGGNExact", "mc_fisher": "DiagGGNMC", "kflr": "KFLR", "kfac": "KFAC"}
KRON_BLOCKS = {"kfac": KFACBlock, "tri-kfac": TriKFACBlock}
LEGACY = {"mc_fisher": (Curvature.MC, "diag"), "kflr": (Curvature.GGN, "kfac"), "kfac": (Curvature.MC, "kfac")}


@dataclass(frozen=True)
class BackPACKOptions(BackendOptions):
    """Options of the ``backpack`` backend."""

    curvature: Curvature = option(Curvature.GGN, "ggn (exact GGN) or mc (sampled labels, unbiased for it)",
                                  choices=(Curvature.GGN, Curvature.MC))
    structure: Literal["diag", "kfac", "tri-kfac"] = option(
        "diag", "diag (DiagGGNExact / DiagGGNMC, or SumGradSquared for mc on any model), kfac (B-KFAC) or "
        "tri-kfac (A-B cross terms): Kronecker factors from KFLR (ggn) / KFAC (mc), on nn.Sequential models")
    mc_samples: int = option(1, "MC samples per labelled output (curvature='mc')", ge=1)
    seed: int = option(0, "seed of the label sampling (curvature='mc')")
    legacy_names = ("kron_block",)

    @classmethod
    def upgrade(cls, given: dict, where: str, renamed: dict) -> dict:
        """lalora 0.1: ``curvature`` also chose the structure (mc_fisher, kflr, kfac) and ``kron_block`` the
        Kronecker block."""
        out = dict(given)
        old = out.get("curvature")
        if isinstance(old, str) and old in LEGACY:
            out["curvature"], structure = LEGACY[old]
            if "structure" not in out:
                if "kron_block" in out:
                    structure = out.pop("kron_block")
                    renamed["structure"] = "kron_block"
                out["structure"] = structure
            warn_deprecated(f"{where}: option curvature={str(old)!r} is deprecated, use curvature="
                            f"{out['curvature'].value!r}, structure={str(out['structure'])!r}")
        if "kron_block" in out:
            block = out.pop("kron_block")
            if block != "kfac":
                raise BackendError(f"{where}: option kron_block={block!r} (deprecated) needs a Kronecker curvature "
                                   "in lalora 0.1's words; now pass structure='kfac' or 'tri-kfac'")
            warn_deprecated(f"{where}: option kron_block is deprecated, use structure")
        return super().upgrade(out, where, renamed)


@register_backend("backpack")
class BackPACKBackend(CurvatureBackend):
    requires = ("backpack",)
    Options = BackPACKOptions  # the curvature: its curvature option (default ggn)

    @property
    def _route(self) -> str:
        """The BackPACK computation: DiagGGNExact ("ggn"), DiagGGNMC/SumGradSquared ("mc_fisher"), KFLR, KFAC."""
        o = self.options
        if o["structure"] == "diag":
            return "ggn" if o["curvature"] == Curvature.GGN else "mc_fisher"
        return "kflr" if o["curvature"] == Curvature.GGN else "kfac"

    @classmethod
    def stored_bytes(cls, adapters, options) -> int:
        return diagonal_bytes(adapters) if options["structure"] == "diag" else kronecker_bytes(adapters)

    def fit(self, ctx: FitContext):
        base = base_model_of(ctx.model)
        blocker = second_order_blocker(base)
        kron = self._route in KRONECKER
        if blocker is None:
            sums = self._second_order(ctx, base)
            ctx.metadata["backpack_route"] = ROUTES[self._route]
            if kron:
                return self._kron_blocks(ctx, sums)
        elif kron:
            raise BackendError(
                f"backpack backend: BackPACK's Kronecker extensions (structure={self.options['structure']!r}) cannot "
                f"traverse {blocker} (they need an nn.Sequential of supported modules). Use lalora's 'kfac' or "
                "'tri-kfac' backend (own hooks; any model, masked tokens).")
        elif self._route == "mc_fisher":
            sums = self._sum_grad_squared(ctx)
            ctx.metadata["backpack_route"] = "SumGradSquared"
        else:
            raise BackendError(
                f"backpack backend: BackPACK's second-order extensions cannot traverse {blocker} "
                "(they need an nn.Sequential of supported modules). Use curvature='mc' (MC-Fisher diagonal via "
                "BackPACK's first-order SumGradSquared), or the backends 'block' (curvature='ggn'), 'kfac' or 'diag'.")
        N = ctx.global_num_examples()
        return [DiagBlock(n, (ctx.all_reduce(s) / N).float()) for n, s in sums.items()]

    # --- second order on nn.Sequential -------------------------------------------------
    def _extension(self):
        from backpack.extensions import KFAC, DiagGGNExact, DiagGGNMC

        c, S = self._route, self.options["mc_samples"]
        if c == "kflr":
            return branching_kflr()
        return {"ggn": DiagGGNExact, "mc_fisher": lambda: DiagGGNMC(mc_samples=S), "kfac": lambda: KFAC(mc_samples=S)}[c]()

    def _second_order(self, ctx, base):
        """Sums over batches: per LoRA weight the diagonal (diagonal curvatures), or per adapter
        ``{"X": sum_batches n_b * X_b, "G": sum_n (s g)(s g)^T / s^2, "T": rows}`` (Kronecker)."""
        from backpack import backpack, extend

        params = ctx.params()
        c = self._route
        kron = c in KRONECKER
        attr = KRONECKER.get(c) or DIAGONAL[c]
        if kron:
            for a in ctx.adapters:
                if a.scaling == 0:
                    raise BackendError(f"backpack backend: adapter {a.key!r} has LoRA scaling 0: its layer factor G "
                                       "cannot be recovered from lora_B's")
            sums = {a.key: {"X": torch.zeros(a.A.shape[1], a.A.shape[1], dtype=torch.float64),
                            "G": torch.zeros(a.B.shape[0], a.B.shape[0], dtype=torch.float64), "T": 0}
                    for a in ctx.adapters}
        else:
            sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        # BackPACK's DiagGGNMC/KFAC draw their MC labels from torch's global generators (lalora.sampling)
        rng = library_rng(self.options["seed"], ctx.device)
        with rng, rebuilt_lora(ctx, base), backpack_cleanup(base, params.values()):
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
                if x.shape[0] == 0:  # every label masked: nothing to add
                    continue
                out = base(x)
                value = lossfunc(out.float().reshape(x.shape[0], -1) if loss.name == "mse" else out.float(), y.to(out.device))
                try:
                    with backpack(self._extension()), quiet():
                        value.backward()
                except NotImplementedError as e:  # e.g. KFLR/KFAC on a Linear with 3d inputs
                    raise BackendError(f"backpack backend: BackPACK cannot compute its {ROUTES[c]} here: {e}") from e
                if kron:
                    for a in ctx.adapters:
                        _, X = getattr(a.A, attr)  # [G_A, X_A]: X_A = batch mean of lora_A's input
                        GB, _ = getattr(a.B, attr)  # [G_B, X_B]: G_B = sum over rows of (s g)(s g)^T
                        d = sums[a.key]
                        d["X"] += X.detach().double().cpu() * x.shape[0]
                        d["G"] += GB.detach().double().cpu() / a.scaling ** 2
                        d["T"] += x.shape[0]
                else:
                    for n, p in params.items():
                        sums[n] += getattr(p, attr).detach().double().cpu()
                ctx.batch_done(self)
        return sums

    def _kron_blocks(self, ctx, sums):
        N = ctx.global_num_examples()
        cls = KRON_BLOCKS[self.options["structure"]]
        blocks = []
        for a in ctx.adapters:
            d = sums[a.key]
            T = float(ctx.all_reduce(torch.tensor([float(d["T"])], dtype=torch.float64)))
            if T == 0:
                raise BackendError(f"backpack backend: adapter {a.key!r} saw no labelled example during the fit")
            X = (ctx.all_reduce(d["X"]) / T).float()
            G = (ctx.all_reduce(d["G"]) / N).float()
            X, G = 0.5 * (X + X.T), 0.5 * (G + G.T)
            blocks.append(cls((a.a_name, a.b_name), X, G, a.scaling))  # theta0: the Precision's anchor
        return blocks

    # --- first order (any model) --------------------------------------------------------
    def _sum_grad_squared(self, ctx):
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        params = ctx.params()
        modules = [m for a in ctx.adapters for m in (a.lora_A, a.lora_B)]
        sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        S = self.options["mc_samples"]
        gen = mc_generator(self.options["seed"])  # the fit's MC labels (lalora.sampling)
        with backpack_cleanup(modules, params.values()):
            for m in modules:
                extend(m)
            for batch in ctx.stream:
                loss = ctx.loss
                if loss.likelihood not in ("categorical", "gaussian"):
                    raise BackendError(f"backpack backend: curvature='mc' needs a categorical or gaussian likelihood; "
                                       f"loss {loss.name!r} has none")
                for _ in range(S):  # labels sampled at every output row, the loss of the sampled labels
                    output = ctx.forward(batch)
                    rows, _ = loss.output_rows(output, batch)  # sampled in float32 chunks of rows
                    sampled = loss.with_row_targets(batch, sample_rows(loss.likelihood, rows, gen))
                    value = loss.per_example(output, sampled).sum()
                    with backpack(SumGradSquared()), quiet():
                        value.backward()
                    for n, p in params.items():
                        sums[n] += p.sum_grad_squared.detach().double().cpu() / S
                ctx.batch_done(self)
        return sums
