"""Output rows (logits) in chunks: no float32 copy of all ``R x V`` rows, anywhere in a loss path.

A causal LM's outputs are ``R = N * T`` rows of ``V`` logits (at a 128k vocabulary and 8 x 2048 tokens, one
float32 copy is ~8 GiB). The losses (``lalora.losses``), the backends' output gradients (empirical Fisher,
MC Fisher) and the training loss therefore work on ``CHUNK_ROWS`` rows at a time: the extra memory is one
chunk of float32 rows (``chunk x V``) beyond what is inherent (the logits themselves and the gradient w.r.t.
them, both in the model's dtype). The numbers are those of the unchunked float32 computation (the same
float32 operations row by row).

- ``row_cross_entropy(rows, targets)``: ``(R,)`` float32 cross-entropy per row (target ``-100``: 0), with a
  backward that recomputes each chunk's softmax instead of saving an ``R x V`` log-softmax;
- ``row_gradients(rows, keep, labels)``: ``softmax(z) - onehot(y)`` for every row in ``rows``' dtype (zero
  where ``keep`` is False), for the labels ``labels(p, start)`` of each chunk's probabilities;
- ``sample_rows(likelihood, rows, gen)``: MC targets of the rows, the draws of ``lalora.sampling``;
- ``causal_lm_loss``: transformers' causal-LM loss in chunks, for ``Trainer(compute_loss_func=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import model_outputs
from .sampling import sample_categorical, sample_gaussian

__all__ = ["CHUNK_ROWS", "causal_lm_loss", "finite_rows", "row_cross_entropy", "row_gradients", "sample_rows"]

#: output rows per chunk (peak extra memory: CHUNK_ROWS x V float32, 512 MiB at a 128k vocabulary)
CHUNK_ROWS = 1024
IGNORE_INDEX = -100


def _chunks(n: int, chunk: int | None):
    step = max(1, int(chunk or CHUNK_ROWS))
    for s in range(0, n, step):
        yield s, min(n, s + step)


class _RowCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of float32-upcast rows, computed and differentiated chunk by chunk; saves only
    its inputs (the logits, a reference, and the targets)."""

    @staticmethod
    def forward(ctx, rows: Tensor, targets: Tensor, chunk: int):
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for s, e in _chunks(rows.shape[0], chunk):
            out[s:e] = F.cross_entropy(rows[s:e].float(), targets[s:e], reduction="none", ignore_index=IGNORE_INDEX)
        ctx.save_for_backward(rows, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, targets = ctx.saved_tensors
        out = torch.empty_like(rows)
        for s, e in _chunks(rows.shape[0], ctx.chunk):
            g = torch.softmax(rows[s:e].float(), -1)
            t = targets[s:e]
            g[torch.arange(e - s, device=g.device), t.clamp_min(0)] -= 1
            g.mul_(grad[s:e].float()[:, None])
            g[t == IGNORE_INDEX] = 0
            out[s:e] = g
        return out, None, None


def row_cross_entropy(rows: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """``(R,)`` float32 ``F.cross_entropy(rows.float(), targets, reduction="none")`` (target ``-100``: 0) of
    output rows ``rows`` (R, C), differentiable w.r.t. ``rows`` (once), ``chunk`` rows at a time (default
    ``CHUNK_ROWS``): no ``R x C`` float32 tensor is made, in the forward or the backward."""
    return _RowCrossEntropy.apply(rows, targets.to(rows.device), int(chunk or CHUNK_ROWS))


def finite_rows(rows: Tensor, keep: Tensor, chunk: int | None = None) -> bool:
    """True if every row of ``rows`` with ``keep`` has a finite softmax: no NaN, no ``+inf``, not all ``-inf``
    (``-inf`` logits of masked tokens are fine). That is exactly "the row's maximum is finite" (``amax``
    propagates NaN), one read of the rows in their own dtype: no float32 copy and no exponentials (a
    softmax here cost as much as the one of the output gradients, ~2-4% of a kfac fit at a 49k vocabulary)."""
    for s, e in _chunks(rows.shape[0], chunk):
        if not bool((torch.isfinite(rows[s:e].detach().amax(-1)) | ~keep[s:e]).all()):
            return False
    return True


def row_gradients(rows: Tensor, keep: Tensor, labels, chunk: int | None = None) -> Tensor:
    """``(R, C)`` in ``rows``' dtype: the gradient of the summed cross-entropy w.r.t. the rows,
    ``softmax(z) - onehot(y)`` (computed in float32), zero on rows where ``keep`` is False; ``y`` for rows
    ``start .. start + len(p)`` is ``labels(p, start)`` (``p``: those rows' float32 softmax). One chunk of
    float32 rows at a time."""
    out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    for s, e in _chunks(rows.shape[0], chunk):
        p = torch.softmax(rows[s:e].detach().float(), -1)
        y = labels(p, s)
        p[torch.arange(e - s, device=p.device), y.clamp_min(0)] -= 1
        p[(~keep[s:e]).nonzero().squeeze(1)] = 0
        out[s:e] = p
    return out


def categorical_labels(targets: Tensor | None, gen: torch.Generator | None, rows: int):
    """The ``labels`` function of ``row_gradients``: the rows' ``targets`` (empirical Fisher), or MC labels
    drawn from ``gen`` exactly as ``sample_categorical`` on all ``rows`` rows at once (one float64 uniform per
    row, drawn here up front, then used chunk by chunk)."""
    if targets is not None:
        return lambda p, s: targets[s:s + p.shape[0]]
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    return lambda p, s: sample_categorical(p, gen, uniforms=u[s:s + p.shape[0]])


def sample_rows(likelihood: str, rows: Tensor, gen: torch.Generator, chunk: int | None = None) -> Tensor:
    """MC targets of output rows ``rows`` (R, C), as ``lalora.sampling.sample_row_targets`` draws them (same
    generator use, same values), with the categorical softmax taken chunk by chunk."""
    if likelihood == "categorical":
        draw = categorical_labels(None, gen, rows.shape[0])
        out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        for s, e in _chunks(rows.shape[0], chunk):
            out[s:e] = draw(torch.softmax(rows[s:e].detach().float(), -1), s)
        return out
    if likelihood == "gaussian":
        return sample_gaussian(rows.float(), gen)
    raise ValueError(f"no MC label sampler for likelihood {likelihood!r} (categorical or gaussian only)")


def causal_lm_loss(outputs, labels: Tensor, num_items_in_batch=None, chunk: int | None = None) -> Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``: position t predicts ``labels[:, t + 1]``, ``-100``
    ignored; the mean over the targets, or their sum / ``num_items_in_batch``) on float32 chunks of rows
    instead of a float32 copy of all logits. A ``compute_loss_func`` for ``transformers.Trainer`` (and
    ``lalora.LaLoRATrainer``): ``Trainer(..., compute_loss_func=lalora.logit_rows.causal_lm_loss)``."""
    logits = model_outputs(outputs)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(logits.device)
    total = row_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, chunk).sum()
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
