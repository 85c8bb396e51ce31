"""Losses in the form backends need: per-example summed losses and the labelled outputs.

The one loss path (docs/concepts.md#one-reference): every backend, ``lalora.comparison`` and the training loss
compute losses, output gradients and output Hessians here (logit rows in float32 chunks: ``lalora.logit_rows``).

Convention (DESIGN.md section 2): example n's loss ``l_n`` is the *sum* over its labelled
tokens; labels ``-100`` and attention-mask padding are excluded (causal LMs: a target also needs a
real input position before it, ``CausalLMLoss``). Every loss gives
- ``prepare(raw)``: split a user batch into model inputs and labels (a ``Batch``);
- ``outputs_and_targets(output, batch)``: the model outputs at labelled positions
  ``(M, C)``, their targets ``(M,)`` (or ``(M, C)`` for MSE) and the example index ``(M,)``;
- ``per_example(output, batch)``: ``(N,)`` tensor of ``l_n``;
- ``output_rows(output, batch)``: all output rows ``(R, C)`` as a view and the mask of labelled rows;
- ``row_targets(output, batch)`` (categorical): the ``(R,)`` class targets of those rows (``-100``: none);
  ``with_row_targets(batch, targets)``: the batch with other targets for the same rows (MC labels);
- its ``likelihood``'s ("categorical", "gaussian") curvature building blocks: ``output_hessian`` (``H``
  per labelled row), ``hessian_sandwich`` (``sum_m J_m^T H_m J_m``, ``H`` not formed),
  ``hessian_sqrt_column`` (``H = sum_c s_c s_c^T``), ``row_gradient`` (``softmax(z) - onehot(y)``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import Batch, batch_size, call_model, model_outputs, split_raw
from .errors import DataError
from .logit_rows import row_cross_entropy

__all__ = ["Batch", "CallableLoss", "CausalLMLoss", "ClassificationLoss", "IGNORE_INDEX", "LossFunction", "MSELoss",
           "call_model", "infer_loss", "model_outputs", "resolve_loss"]

IGNORE_INDEX = -100


class LossFunction:
    likelihood: str | None = None
    name = "loss"

    def prepare(self, raw) -> Batch:
        inputs, labels = split_raw(raw)
        return Batch(inputs, labels, raw, batch_size(inputs))

    def outputs_and_targets(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError(f"loss {self.name!r} does not expose per-position outputs")

    def per_example(self, output: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def output_rows(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(rows, keep)``: the outputs as ``(R, C)`` rows (a view where possible, so gradients can be
        fed in without a gather/scatter) and a ``(R,)`` bool mask of the rows with a target."""
        rows, _, _ = self.outputs_and_targets(output, batch)
        return rows, torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)

    def row_targets(self, output: Tensor, batch: Batch) -> Tensor:
        """``(R,)`` class targets of ``output_rows`` (``-100``: no target); categorical losses only."""
        raise NotImplementedError(f"loss {self.name!r} has no class targets per output row")

    def with_row_targets(self, batch: Batch, targets: Tensor) -> Batch:
        """``batch`` with ``targets`` for the labelled rows of ``output_rows`` (class indices ``(R,)``, or
        ``(R, C)`` values for MSE) and no target elsewhere: MC labels go through ``per_example`` this way."""
        raise NotImplementedError(f"loss {self.name!r} cannot take other targets")

    def labelled_counts(self, batch: Batch) -> Tensor:
        """``(N,)`` number of labelled positions per example (0 = example has no loss)."""
        return torch.ones(batch.size, dtype=torch.long)

    # --- curvature building blocks of the likelihood -----------------------------------------------
    def output_hessian(self, z: Tensor) -> Tensor:
        """``(M, C, C)`` float64: per output row ``z`` (M, C) the Hessian of its loss w.r.t. the row (it does not
        depend on the target): softmax cross-entropy ``diag(p) - p p^T``, ``|f - y|^2`` ``2 I``."""
        z = z.detach().double()
        if self.likelihood == "categorical":
            p = torch.softmax(z, -1)
            return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if self.likelihood == "gaussian":
            return 2.0 * torch.eye(z.shape[-1], dtype=torch.float64, device=z.device).expand(z.shape[0], -1, -1)
        raise NotImplementedError(f"loss {self.name!r} has no known output Hessian (categorical/gaussian only)")

    def hessian_sandwich(self, jac: Tensor, z: Tensor) -> Tensor:
        """``(n, n)`` float64 ``sum_m J_m^T H_m J_m`` for the Jacobians ``jac`` (M, C, n) of output rows ``z``
        (M, C), without forming ``H``: categorical ``J^T diag(p) J - (J^T p)(J^T p)^T`` per row, gaussian
        ``2 J^T J``."""
        jac = jac.double()
        if self.likelihood == "categorical":
            p = torch.softmax(z.detach().double(), -1)
            jp = torch.einsum("mcn,mc->mn", jac, p)
            return torch.einsum("mcn,mc,mck->nk", jac, p, jac) - jp.T @ jp
        if self.likelihood == "gaussian":
            return 2.0 * torch.einsum("mcn,mck->nk", jac, jac)
        raise NotImplementedError(f"loss {self.name!r} has no known output Hessian (categorical/gaussian only)")

    def hessian_sqrt_column(self, z: Tensor, c: int, probs: Tensor | None = None) -> Tensor:
        """``(M, C)``: column ``c`` of a square root of ``output_hessian`` per row (``H = sum_c s_c s_c^T``):
        categorical ``sqrt(p_c) (e_c - p)`` (``p`` = ``probs``, the rows' softmax, if given), gaussian
        ``sqrt(2) e_c``; ``z``'s dtype."""
        if self.likelihood == "categorical":
            p = torch.softmax(z.detach(), -1) if probs is None else probs
            e = torch.zeros_like(p)
            e[:, c] = 1
            return p[:, c:c + 1].sqrt() * (e - p)
        if self.likelihood == "gaussian":
            v = torch.zeros_like(z)
            v[:, c] = 2.0 ** 0.5
            return v
        raise NotImplementedError(f"loss {self.name!r} has no known output Hessian")

    def row_gradient(self, probs: Tensor, targets: Tensor, keep: Tensor, overwrite: bool = False) -> Tensor:
        """``(R, C)`` gradient of the summed loss w.r.t. the rows of ``output_rows`` for class ``targets``
        ``(R,)``: ``probs - onehot(targets)`` (``probs`` = the rows' softmax), zero on rows where ``keep`` is
        False. ``overwrite``: write into ``probs`` (saves one (R, C) tensor). Categorical likelihoods only."""
        if self.likelihood != "categorical":
            raise NotImplementedError(f"loss {self.name!r} has no class targets per output row")
        v = probs if overwrite else probs.clone()
        v[torch.arange(v.shape[0], device=v.device), targets.clamp_min(0)] -= 1
        v[(~keep).nonzero().squeeze(1)] = 0
        return v


class CausalLMLoss(LossFunction):
    """Next-token cross-entropy: logits ``(N, T, V)``, position t predicts ``labels[:, t + 1]``.

    Targets (the one place they are made; every backend reads them through this class): the token at
    position t + 1 is a target only when its label is not ``-100``, it is a real token (attention mask 1)
    *and the input position t is a real token*. So with left padding the last pad position does not
    "predict" the first real token from pad-only context: an example's first real token is never a
    target, wherever the padding is, exactly as when the example is run alone without padding
    (DESIGN.md section 6). ``prepare`` writes this into ``Batch.labels`` (``-100`` where a position is
    not a target), so ``labels[:, 1:]`` are the targets of positions ``0 .. T-2``.
    """

    likelihood = "categorical"
    name = "causal_lm"

    def prepare(self, raw) -> Batch:
        inputs, labels = split_raw(raw)
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs[0]
        if labels is None:
            if ids is None:
                raise DataError("causal LM batch needs 'labels' or 'input_ids'")
            labels = ids.clone()
        labels = labels.clone()
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if mask is not None:
            if mask.shape != labels.shape:
                raise DataError(f"attention_mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
            real = mask.to(labels.device) != 0
            labels[~real] = IGNORE_INDEX  # a pad token is never a target
            labels[:, 1:][~real[:, :-1]] = IGNORE_INDEX  # nor a token predicted from a pad position
        return Batch(inputs, labels, raw, int(labels.shape[0]))

    def _targets(self, batch):
        return batch.labels[:, 1:]

    def labelled_counts(self, batch):
        return (self._targets(batch) != IGNORE_INDEX).sum(1).cpu()

    def labelled_targets(self, batch, device=None) -> tuple[Tensor, Tensor, Tensor]:
        """``(mask, targets, index)``: the ``(N, T-1)`` mask of positions with a target, their ``(M,)`` targets
        and example indices, in the order of ``outputs_and_targets``."""
        targets = self._targets(batch).to(device)
        mask = targets != IGNORE_INDEX
        index = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        return mask, targets[mask], index[mask]

    def outputs_and_targets(self, output, batch):
        mask, targets, index = self.labelled_targets(batch, output.device)
        return output[:, :-1][mask], targets, index

    def output_rows(self, output, batch):
        n, t = output.shape[0], output.shape[1]
        return output.reshape(n * t, -1), self.row_targets(output, batch) != IGNORE_INDEX

    def row_targets(self, output, batch):
        # position t predicts token t+1; the last position of each row has no target
        return F.pad(self._targets(batch).to(output.device), (0, 1), value=IGNORE_INDEX).reshape(-1)

    def with_row_targets(self, batch, targets):
        n = batch.size
        old = self._targets(batch).to(targets.device)
        labels = torch.full(batch.labels.shape, IGNORE_INDEX, dtype=torch.long, device=targets.device)
        labels[:, 1:] = torch.where(old != IGNORE_INDEX, targets.view(n, -1)[:, :-1], IGNORE_INDEX)
        return replace(batch, labels=labels)

    def per_example(self, output, batch):
        # All (N*T, V) rows in place, unlabelled ones ignored (target -100: loss 0, gradient 0): a gather of the
        # labelled rows copies the logits and scatters them back in the backward (benchmarks/README.md). In
        # float32 chunks of rows (lalora.logit_rows): no float32 copy of all rows, no saved log-softmax.
        n, t = output.shape[0], output.shape[1]
        losses = row_cross_entropy(output.reshape(n * t, -1), self.row_targets(output, batch))
        return losses.view(n, t).sum(1)

    def per_example_from_hidden(self, hidden: Tensor, head, batch: Batch) -> Tensor:
        """``per_example`` of the logits ``head(hidden)`` (``hidden`` (N, T, d): the last hidden states,
        ``head``: the output layer), with ``head`` applied to the positions with a target only: exact where
        the model's logits are ``head(hidden)`` row by row, and cheaper when many positions are unlabelled
        (prompts) and the vocabulary is large (the benchmark's training loss)."""
        mask, targets, index = self.labelled_targets(batch, hidden.device)
        losses = row_cross_entropy(head(hidden[:, :-1][mask]), targets)
        return torch.zeros(batch.size, device=hidden.device, dtype=losses.dtype).index_add(0, index, losses)


class ClassificationLoss(LossFunction):
    """Cross-entropy on logits ``(N, C)`` with labels ``(N,)``; label -100 masks an example."""

    likelihood = "categorical"
    name = "classification"

    def labelled_counts(self, batch):
        return (batch.labels != IGNORE_INDEX).long().cpu()

    def outputs_and_targets(self, output, batch):
        targets = batch.labels.to(output.device)
        mask = targets != IGNORE_INDEX
        index = torch.arange(targets.shape[0], device=output.device)
        return output[mask], targets[mask], index[mask]

    def output_rows(self, output, batch):
        return output, batch.labels.to(output.device) != IGNORE_INDEX

    def row_targets(self, output, batch):
        return batch.labels.to(output.device)

    def with_row_targets(self, batch, targets):
        old = batch.labels.to(targets.device)
        return replace(batch, labels=torch.where(old != IGNORE_INDEX, targets, IGNORE_INDEX))

    def per_example(self, output, batch):
        out, tgt, idx = self.outputs_and_targets(output, batch)
        losses = row_cross_entropy(out, tgt)
        return torch.zeros(batch.size, device=out.device, dtype=losses.dtype).index_add(0, idx, losses)


class MSELoss(LossFunction):
    """``l_n = sum_j (f_nj - y_nj)^2`` (torch's ``MSELoss(reduction="sum")`` per example; Hessian 2I)."""

    likelihood = "gaussian"
    name = "mse"

    def outputs_and_targets(self, output, batch):
        n = batch.size
        return output.reshape(n, -1), batch.labels.reshape(n, -1).to(output), torch.arange(n, device=output.device)

    def with_row_targets(self, batch, targets):
        return replace(batch, labels=targets.reshape(batch.labels.shape))

    def per_example(self, output, batch):
        out, tgt, _ = self.outputs_and_targets(output, batch)
        return (out.float() - tgt.float()).square().sum(1)


class CallableLoss(LossFunction):
    """A user function ``fn(output, raw_batch) -> (N,)`` per-example summed losses."""

    name = "callable"

    def __init__(self, fn: Callable):
        self.fn = fn

    def per_example(self, output, batch):
        losses = self.fn(output, batch.raw)
        if not isinstance(losses, Tensor) or losses.shape != (batch.size,):
            raise DataError(f"loss callable must return a tensor of shape ({batch.size},) (one summed loss per example), "
                            f"got {getattr(losses, 'shape', type(losses).__name__)}")
        return losses


_NAMED = {"causal_lm": CausalLMLoss, "classification": ClassificationLoss, "mse": MSELoss}


def infer_loss(raw) -> LossFunction:
    """The loss ``loss="auto"`` picks for a batch: dicts -> causal LM (classification if labels are 1-D),
    tensors -> causal LM, ``(x, y)`` -> classification for integer ``y`` of shape (N,), else MSE."""
    inputs, labels = split_raw(raw)
    if isinstance(inputs, dict):
        return ClassificationLoss() if labels is not None and labels.dim() == 1 else CausalLMLoss()
    if labels is None:
        return CausalLMLoss()
    if not torch.is_floating_point(labels) and labels.dim() == 1:
        return ClassificationLoss()
    return MSELoss()


def resolve_loss(loss) -> LossFunction | None:
    """A ``LossFunction`` for ``loss`` ("auto" gives None: inferred from the first batch)."""
    if isinstance(loss, LossFunction):
        return loss
    if loss == "auto":
        return None
    if isinstance(loss, str):
        if loss not in _NAMED:
            raise ValueError(f"loss={loss!r} is unknown; use 'auto', one of {sorted(_NAMED)}, or a callable")
        return _NAMED[loss]()
    if callable(loss):
        return CallableLoss(loss)
    raise ValueError(f"loss must be a string, a LossFunction or a callable, got {type(loss).__name__}")
