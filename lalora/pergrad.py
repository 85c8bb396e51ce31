"""Per-example gradients of any tensors (pure torch), in chunks so memory stays bounded.

For the tensors the structured backends do not model (``lalora.others``), the generic curvature is
the empirical-Fisher diagonal of DESIGN.md section 2, as the ``diag`` backend computes for the LoRA
matrices: ``F_ii = (1/N) sum_n (d l_n / d theta_i)^2`` with ``l_n`` example n's summed loss (true
labels, labelled tokens only). The per-example gradients are the rows of the Jacobian of the
``(N,)`` per-example losses of one batched forward: examples of a batch do not interact, so row n
is the gradient of ``l_n`` alone. They come from a vmapped backward (``is_grads_batched``) over
chunks of examples, sized so a chunk's gradients fit ``budget_mb``; a graph with an operation that
has no batching rule falls back to one backward per example (exact too, slower).

``OthersDiag`` accumulates these diagonals for backends that cover only the LoRA matrices: it taps
the batch stream the backend reads (one extra forward and backward per batch) and turns the sums
into ``DiagBlock``s at the end.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from .blocks import DiagBlock

logger = logging.getLogger("lalora")
BUDGET_MB = 64.0


def per_example_grads(losses: Tensor, tensors: list[Tensor], *, budget_mb: float = BUDGET_MB):
    """Yield ``(rows, grads)`` chunk by chunk: ``rows`` the example indices of the chunk, ``grads`` one
    ``(len(rows), *t.shape)`` float32 tensor per tensor of ``tensors`` (zeros where ``l_n`` does not depend
    on it). The graph of ``losses`` is retained (the caller may backward through it again)."""
    n = losses.shape[0]
    numel = max(1, sum(t.numel() for t in tensors))
    chunk = max(1, min(n, int(budget_mb * 2**20 // (4 * numel))))
    batched = chunk > 1
    for start in range(0, n, chunk):
        rows = list(range(start, min(n, start + chunk)))
        grads = None
        if batched:
            eye = torch.zeros(len(rows), n, dtype=losses.dtype, device=losses.device)
            eye[torch.arange(len(rows)), torch.tensor(rows)] = 1
            try:
                grads = torch.autograd.grad(losses, tensors, grad_outputs=eye, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
            except (RuntimeError, NotImplementedError) as e:  # an op without a vmap rule in the backward
                logger.debug("lalora: vmapped backward failed (%s); one backward per example", e)
                batched = False
        if grads is None:
            per = [torch.autograd.grad(losses[i], tensors, retain_graph=True, allow_unused=True) for i in rows]
            grads = [torch.stack([p[j] if p[j] is not None else torch.zeros_like(t) for p in per])
                     for j, t in enumerate(tensors)]
        yield rows, [torch.zeros(len(rows), *t.shape, device=t.device) if g is None else g.detach().float()
                     for g, t in zip(grads, tensors)]


def squared_grad_sums(losses: Tensor, tensors: dict[str, Tensor], *, budget_mb: float = BUDGET_MB) -> dict[str, Tensor]:
    """``{name: sum_n (d l_n / d t)^2}`` (float32, shaped like the tensor) over the batch's examples."""
    names = list(tensors)
    out = {k: torch.zeros(t.shape, device=t.device) for k, t in tensors.items()}
    for _, grads in per_example_grads(losses, list(tensors.values()), budget_mb=budget_mb):
        for k, g in zip(names, grads):
            out[k] += g.square().sum(0)
    return out


def per_example_rows(losses: Tensor, tensors: dict[str, Tensor], *, budget_mb: float = BUDGET_MB) -> dict[str, Tensor]:
    """``{name: (N, numel)}`` float32 per-example gradients, flattened row-major (for dense blocks)."""
    names = list(tensors)
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for _, grads in per_example_grads(losses, list(tensors.values()), budget_mb=budget_mb):
        for k, g in zip(names, grads):
            parts[k].append(g.reshape(g.shape[0], -1))
    return {k: torch.cat(v, 0) for k, v in parts.items()}


def first_nonfinite(sums: dict[str, Tensor]) -> str | None:
    """The first name whose sum has a NaN or Inf entry, or None."""
    return next((k for k, t in sums.items() if not bool(torch.isfinite(t).all())), None)


def diag_blocks(ctx, sums: dict[str, Tensor]) -> list[DiagBlock]:
    """``DiagBlock``s of the float64 ``sums`` (all-reduced over ranks) divided by N."""
    n = ctx.global_num_examples()
    return [DiagBlock(k, (ctx.all_reduce(s) / n).float()) for k, s in sums.items()]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _global_hook_dicts():
    from torch.nn.modules import module as m

    return [getattr(m, n) for n in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                                    "_global_backward_pre_hooks") if hasattr(m, n)]


def _hook_dicts(model):
    return [getattr(mod, n) for mod in model.modules() for n in _HOOK_DICTS if hasattr(mod, n)] + _global_hook_dicts()


class _HooksSince:
    """The module hooks added after construction (the backend's: its factor hooks must not see the tap's extra
    forward and backward), hidden while the context is active and put back after."""

    def __init__(self, model):
        self.model = model
        self.before = {id(d): set(d) for d in _hook_dicts(model)}

    def __enter__(self):
        self.hidden = []
        for d in _hook_dicts(self.model):
            new = [k for k in d if k not in self.before.get(id(d), set())]
            self.hidden += [(d, k, d.pop(k)) for k in new]
        return self

    def __exit__(self, *exc):
        for d, k, hook in self.hidden:
            d[k] = hook
        self.hidden = []


class _Tapped:
    """The backend's stream, with the others' diagonals accumulated for every batch it is given; a batch the
    backend discards (``ctx.nonfinite``: a non-finite loss or gradient of its own) is subtracted again."""

    def __init__(self, tap: "OthersDiag", stream):
        self._tap, self._stream, self._last = tap, stream, None

    def __getattr__(self, name):  # num_examples, loss, state, ... of the BatchStream
        return getattr(self._stream, name)

    def discard(self, batch) -> None:
        if self._last is not None and self._last[0] is batch:
            for k, s in self._last[1].items():
                self._tap.sums[k] -= s
            self._last = None
        self._stream.discard(batch)

    def __iter__(self):
        tap = self._tap
        for batch in self._stream:
            self._last = None
            pending = tap.batch_sums(batch)
            if pending is False:  # non-finite gradient, reported (and, with skip_nonfinite, discarded)
                continue
            if pending is not None:
                for k, s in pending.items():
                    tap.sums[k] += s
                self._last = (batch, pending)
            yield batch


class OthersDiag:
    """Generic EF diagonal of ``others`` (name -> parameter) accumulated while a backend reads ``ctx.stream``:
    ``ctx.stream = tap.wrap(ctx.stream)`` before the fit, ``tap.blocks(ctx)`` after it."""

    def __init__(self, ctx, others: dict[str, Tensor]):
        self.ctx, self.others = ctx, dict(others)
        self.hooks = _HooksSince(ctx.model)  # before the backend's fit installs its hooks
        self.sums = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for k, p in self.others.items()}

    def wrap(self, stream):
        return _Tapped(self, stream)

    def batch_sums(self, batch):
        """This batch's float64 sums; None when its loss is not finite (the backend reports it), False when a
        gradient is not finite (reported here)."""
        ctx = self.ctx
        with self.hooks:
            losses = ctx.loss.per_example(ctx.forward(batch), batch)
            if not bool(torch.isfinite(losses.detach()).all()):
                return None
            sums = squared_grad_sums(losses, self.others)
            del losses
        bad = first_nonfinite(sums)
        if bad is not None:
            ctx.nonfinite(batch, "gradient", f"of {bad!r}")
            return False
        return {k: s.double() for k, s in sums.items()}

    def blocks(self, ctx) -> list[DiagBlock]:
        return diag_blocks(ctx, self.sums)


def tap_others(ctx, backend, checkpoint_dir, caller: str) -> OthersDiag | None:
    """For a backend without ``covers_others``: an ``OthersDiag`` tapping ``ctx.stream`` (None when there are no
    others or the backend covers them); records what covers them in ``ctx.metadata["others"]``."""
    from .others import other_kinds

    if not ctx.others:
        return None
    tap = None
    if not backend.covers_others:
        if checkpoint_dir is not None:
            from .errors import BackendError

            raise BackendError(f"{caller}: checkpoint_dir with backend {backend.name!r} cannot resume the diagonal of "
                               f"the {len(ctx.others)} tensors beside the LoRA matrices (others='diag'); pass "
                               "others='none' or use backend 'diag'")
        tap = OthersDiag(ctx, ctx.others)
        ctx.stream = tap.wrap(ctx.stream)
    ctx.metadata["others"] = {"curvature": "ef", "covered_by": "lalora.pergrad" if tap else backend.name,
                              "params": other_kinds(ctx.others)}
    return tap
