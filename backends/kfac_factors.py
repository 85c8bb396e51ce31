"""Kronecker factor sums of the ``kfac``/``tri-kfac`` fits (backends/kfac.py): the hooks that turn each batch's
``lora_A`` inputs and ``lora_B`` output gradients into Gram products.

Layout: the Gram products are summed in upper panels (backends/kfac_gram.py), completed once per fit.
Rows: only the token rows with a nonzero weight (real tokens of counted examples) enter either product
(``kept_rows``); a padded batch costs the Gram products of its real tokens only.
Accumulation: in place into float32 window sums, added to the running sums (``sum_dtype``) every
``window`` batches (``FactorHooks``).
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from lalora.errors import BackendError

from .kfac_gram import add_gram, panel_views


class FactorHooks:
    """The factor sums of one fit. A forward hook on ``lora_A`` records its input; ``forward_done()``
    (after the forward) adds the input Gram products, and a tensor hook on ``lora_B``'s output adds
    the gradient Gram product during each backward.

    Accumulation: each product goes straight into a float32 window sum by an in-place GEMM
    (``addmm_``, beta = 1), so no batch product is materialised and read again (8 instead of 24
    bytes of memory traffic per factor entry and batch); the window sums are added into the running
    sums (``sum_dtype``) every ``window`` batches (``flush``), and a fit of at most ``window``
    batches uses them directly. ``window = 1`` (``skip_nonfinite``): the window holds one batch, so
    a bad batch is dropped exactly. Adapters that read the same input tensor in a batch (q/k/v,
    gate/up, several adapters on one layer) share one window sum of ``X``: its product is
    computed once."""

    def __init__(self, adapters, approx: str, sums: dict, sum_dtype: torch.dtype, window: int, device):
        self.adapters = adapters
        self.approx = approx
        self.sums, self.sum_dtype, self.window, self.device = sums, sum_dtype, window, device
        self.mask: Tensor | None = None  # (N, T) float: real tokens of counted examples
        self.example_mask: Tensor | None = None  # (N,) float
        self.acc_G: dict[str, Tensor] = {}  # adapter -> (d_out, d_out) float32 window sum (upper panels)
        self.acc_X: dict[str, Tensor] = {}  # group leader -> (d_in, d_in) float32 window sum (upper panels)
        self.x_leader: dict[str, str] = {}  # adapter -> the leader whose acc_X holds its X
        self.members: dict[str, set[str]] = {}  # leader -> adapters sharing its acc_X
        self.batch_T: dict[str, Tensor] = {}  # this batch's token counts
        self._rows: dict[tuple[int, int], tuple[Tensor | None, Tensor | None]] = {}  # (N, M) -> kept_rows
        self._inputs: list[tuple[str, Tensor, int]] = []  # this forward's lora_A inputs
        self.targets: list[Tensor] = []  # this forward's lora_B outputs: what the backward passes differentiate
        self._in_window, self._handles = 0, []

    # --- per batch ------------------------------------------------------------------------
    def begin_batch(self, mask: Tensor | None, example_mask: Tensor) -> None:
        self.mask, self.example_mask = mask, example_mask
        self._inputs, self.batch_T, self.targets, self._rows = [], {}, [], {}

    def _token_weights(self, n: int, m: int) -> Tensor:
        """(N, M) weights for the rows of a tensor reshaped to (N, M, d)."""
        if self.mask is not None and self.mask.shape == (n, m):
            return self.mask
        return self.example_mask[:, None].expand(n, m)

    def kept_rows(self, n: int, m: int) -> tuple[Tensor | None, Tensor | None]:
        """The rows of an (N * M, d) reshape that enter the Gram products: ``(index, scale)``, the indices of
        the rows with a nonzero token weight ``w`` (None: all of them) and the ``sqrt(w)`` they are scaled by
        in ``X`` (None: all weights are 1, the attention mask times the counted examples).

        Leaving the zero-weight rows out of ``G`` too is exact: a pad position's (or an uncounted
        example's) output gradient is zero when the model masks attention to pads, as every model here
        does (the unpadded-singleton references of tests/test_padding.py check it for left and right
        padding). Computed once per batch and shape: one host sync per batch, not per hook."""
        if (n, m) not in self._rows:
            w = self._token_weights(n, m).reshape(-1)
            keep = w != 0
            index = None if bool(keep.all()) else keep.nonzero().squeeze(1)
            kept = w if index is None else w.index_select(0, index)
            self._rows[(n, m)] = index, (None if bool((kept == 1).all()) else kept.sqrt())
        return self._rows[(n, m)]

    @staticmethod
    def _select(rows: Tensor, index: Tensor | None) -> Tensor:
        """``rows[index]`` (all rows for None), on the rows' device (a layer's own device, ``device_map``)."""
        return rows if index is None else rows.index_select(0, index.to(rows.device))

    def _input_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``z`` with ``X += z^T z`` and the token count ``T`` of one lora_A input, per ``approx``."""
        x = x.detach()
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, M, d_in)
        w = self._token_weights(x.shape[0], x.shape[1]).to(device=x.device, dtype=torch.float32)
        if self.approx == "expand":
            index, scale = self.kept_rows(x.shape[0], x.shape[1])
            z = self._select(x.reshape(-1, x.shape[-1]), index).float()  # the real tokens' rows, then float32
            return (z if scale is None else z * scale.to(z.device)[:, None]), w.sum()
        x = x.float()
        cnt = w.sum(1)
        xbar = (x * w[..., None]).sum(1) / cnt.clamp_min(1)[:, None]  # (N, d_in)
        return xbar, (cnt > 0).sum().float()

    def forward_done(self) -> None:
        """Add this forward's input factors: one product per distinct input tensor."""
        groups: dict[int, tuple[Tensor, int, dict[str, int]]] = {}
        for name, x, version in self._inputs:  # the tensors are alive here, so id() is unique
            users = groups.setdefault(id(x), (x, version, {}))[2]
            users[name] = users.get(name, 0) + 1  # a layer called twice adds its input twice
        self._inputs = []
        for x, version, users in groups.values():
            if x._version != version:
                raise BackendError(f"the input of {sorted(users)} was modified in place after lora_A read it")
            z, count = self._input_rows(x)
            for name, m in users.items():
                self.batch_T[name] = self.batch_T.get(name, 0.0) + m * count
            self._add_input_product(z, users)

    def _add_input_product(self, z: Tensor, users: dict[str, int]) -> None:
        names, mult = set(users), set(users.values())
        leaders = {self.x_leader.get(n) for n in names}
        if len(mult) == 1 and len(leaders) == 1:
            (leader,) = leaders
            if leader is None:  # first sight of all of them: one shared window sum from now on
                leader = next(iter(users))
                self.acc_X[leader] = self._zeros(z)
                self.members[leader] = names
                for n in names:
                    self.x_leader[n] = leader
            if self.members[leader] == names:
                add_gram(self.acc_X[leader], z, alpha=float(mult.pop()))
                return
        # the sharing changed (rare): every user gets its own window sum, and the product is added to each
        product = add_gram(self._zeros(z), z)
        for n, m in users.items():
            self._split(n, z)
            for dst, src in zip(panel_views(self.acc_X[n]), panel_views(product)):
                dst.add_(src, alpha=float(m))

    def _split(self, name: str, z: Tensor) -> None:
        """Give ``name`` its own window sum of X (a copy of its group's)."""
        leader = self.x_leader.get(name)
        if leader is None:
            self.acc_X[name], self.members[name], self.x_leader[name] = self._zeros(z), {name}, name
            return
        group = self.members[leader]
        if group == {name}:
            return
        group.discard(name)
        if leader == name:  # the others move to a new leader, keeping the tensor
            new = next(iter(group))
            self.acc_X[new] = self.acc_X[name]
            self.members[new] = self.members.pop(name)
            for n in group:
                self.x_leader[n] = new
            leader = new
        self.acc_X[name], self.members[name], self.x_leader[name] = self.acc_X[leader].clone(), {name}, name

    @staticmethod
    def _zeros(z: Tensor) -> Tensor:
        """A (d, d) float32 window sum for rows ``z`` (m, d), on ``z``'s device: the layer's own device (a model
        spread over devices keeps each layer's sums beside it)."""
        return torch.zeros(z.shape[1], z.shape[1], dtype=torch.float32, device=z.device)

    def nonfinite(self) -> str | None:
        """The first adapter whose window sums are non-finite, else None. A Gram matrix ``M = Z^T Z``
        has a non-finite entry only if a diagonal one does (``|M_ij| <= sqrt(M_ii M_jj)``), so the
        traces are checked (d elements instead of d^2)."""
        named = [(n, t) for n, t in self.acc_G.items()] + [(sorted(self.members[n])[0], t) for n, t in self.acc_X.items()]
        if not named:
            return None
        traces = torch.stack([torch.diagonal(t).sum() for _, t in named])
        if bool(torch.isfinite(traces).all()):
            return None
        return named[int((~torch.isfinite(traces)).nonzero()[0])][0]

    def drop_batch(self) -> None:
        """Forget this batch (skip_nonfinite: the window holds this batch only)."""
        if self.window != 1:
            raise RuntimeError("a batch can only be dropped with window 1")
        for t in itertools.chain(self.acc_G.values(), self.acc_X.values()):
            t.zero_()
        self.batch_T = {}

    def commit_batch(self) -> None:
        for name, count in self.batch_T.items():
            slot = self.sums.setdefault(name, {})
            device = count.device if isinstance(count, Tensor) else self.device  # the layer's device
            slot["T"] = slot.get("T", torch.zeros((), dtype=self.sum_dtype, device=device)) + count
        self.batch_T = {}
        self._in_window += 1
        if self._in_window >= self.window:
            self.flush()

    def flush(self) -> None:
        """Add the window sums into the running sums (upper panels) and zero them."""
        pairs = [(n, "G", t) for n, t in self.acc_G.items()] + [(n, "X", self.acc_X[l]) for n, l in self.x_leader.items()]
        for name, key, acc in pairs:
            slot = self.sums.setdefault(name, {})
            if key not in slot:
                slot[key] = torch.zeros(acc.shape, dtype=self.sum_dtype, device=acc.device)
            for dst, src in zip(panel_views(slot[key]), panel_views(acc)):
                dst.add_(src)
        for t in itertools.chain(self.acc_G.values(), self.acc_X.values()):
            t.zero_()
        self._in_window = 0

    def take(self, name: str, key: str) -> Tensor | None:
        """Upper panels of the sum of factor ``key`` ("X" or "G") of adapter ``name`` over the fit: the running
        sums plus this window; the float32 window sum itself when nothing was flushed yet (a fit of at most
        ``window`` batches, no round trip through ``sum_dtype``). None if never accumulated. Called once per
        adapter and factor after the last batch: the caller owns the result (a window sum still shared
        with other adapters is copied), and the hooks release it."""
        if key == "G":
            acc = self.acc_G.pop(name, None)
        else:
            leader = self.x_leader.pop(name, None)
            acc = None if leader is None else self.acc_X[leader]
            if leader is not None:
                self.members[leader].discard(name)
                if not self.members[leader]:
                    del self.acc_X[leader], self.members[leader]
                    leader = None
        running = self.sums.get(name, {}).get(key)
        if running is None:
            # a window sum still read by other adapters is copied (the caller may all-reduce it in place)
            return acc if key == "G" or leader is None else acc.clone()
        if acc is not None:
            for dst, src in zip(panel_views(running), panel_views(acc)):
                dst.add_(src)
        return running

    # --- hooks ------------------------------------------------------------------------------
    def _a_hook(self, adapter):
        def hook(module, inputs, output):
            self._inputs.append((adapter.key, inputs[0], inputs[0]._version))
        return hook

    def _b_hook(self, adapter):
        # the gradient at lora_B's output is s times the layer's: the product is scaled by 1/s^2
        alpha = 1.0 / adapter.scaling ** 2

        def hook(module, inputs, output):
            if not output.requires_grad:
                return

            def grad_hook(grad):
                g = grad.detach()
                g = g.reshape(g.shape[0], -1, g.shape[-1])  # (N, M, d_out)
                if self.approx == "expand":  # the rows of X's tokens (``kept_rows``: the others are zero here)
                    gm = self._select(g.reshape(-1, g.shape[-1]), self.kept_rows(g.shape[0], g.shape[1])[0]).float()
                else:
                    gm = g.float().sum(1)
                if adapter.key not in self.acc_G:
                    self.acc_G[adapter.key] = self._zeros(gm)
                add_gram(self.acc_G[adapter.key], gm, alpha=alpha)

            output.register_hook(grad_hook)
            self.targets.append(output)
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
        self._inputs, self.targets = [], []
