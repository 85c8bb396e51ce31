"""Losses in the form backends need: per-example summed losses and the labelled outputs.

Convention (DESIGN.md section 2): example n's loss ``l_n`` is the *sum* over its labelled
tokens; labels ``-100`` and attention-mask padding are excluded (causal LMs: a target also needs a
real input position before it, ``CausalLMLoss``). Every loss gives
- ``prepare(raw)``: split a user batch into model inputs and labels (a ``Batch``);
- ``outputs_and_targets(output, batch)``: the model outputs at labelled positions
  ``(M, C)``, their targets ``(M,)`` (or ``(M, C)`` for MSE) and the example index ``(M,)``;
- ``per_example(output, batch)``: ``(N,)`` tensor of ``l_n``;
- ``output_rows(output, batch)``: all output rows ``(R, C)`` as a view and the mask of labelled rows;
- ``row_targets(output, batch)`` (categorical losses): the ``(R,)`` class targets of those rows,
  ``-100`` where a row has none.
``likelihood`` tells MC-Fisher backends how to sample labels ("categorical", "gaussian").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A prepared batch: ``inputs`` are passed to the model, ``labels`` feed the loss."""

    inputs: dict | tuple
    labels: Tensor | None
    raw: Any
    size: int  # N, examples in the batch (including ones with no labelled token)
    extra: dict = field(default_factory=dict)


def model_outputs(output) -> Tensor:
    """Logits (or predictions) from a model's return value (HF ModelOutput, tuple or tensor)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    raise DataError(f"cannot find logits in the model output of type {type(output).__name__}")


def call_model(model, batch: Batch) -> Tensor:
    out = model(**batch.inputs) if isinstance(batch.inputs, dict) else model(*batch.inputs)
    return model_outputs(out)


def _split_raw(raw):
    """(inputs, labels) of a raw batch: dict (HF), (x, y) tuple, or a tensor of input ids."""
    if isinstance(raw, dict) or hasattr(raw, "keys"):
        raw = dict(raw)
        if "input_ids" not in raw and "inputs_embeds" not in raw:
            raise DataError(f"batch dict has no 'input_ids' (keys: {sorted(raw)})")
        labels = raw.pop("labels", None)
        return raw, labels
    if isinstance(raw, (tuple, list)):
        if len(raw) != 2:
            raise DataError(f"tuple batches must be (inputs, targets), got {len(raw)} elements")
        return (raw[0],), raw[1]
    if isinstance(raw, Tensor):
        return (raw,), None
    raise DataError(f"unsupported batch type {type(raw).__name__}: use dicts (tokenizer output), (x, y) tuples or tensors")


def _batch_size(inputs) -> int:
    first = inputs.get("input_ids", inputs.get("inputs_embeds")) if isinstance(inputs, dict) else inputs[0]
    return int(first.shape[0])


class LossFunction:
    likelihood: str | None = None
    name = "loss"

    def prepare(self, raw) -> Batch:
        inputs, labels = _split_raw(raw)
        return Batch(inputs, labels, raw, _batch_size(inputs))

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

    def labelled_counts(self, batch: Batch) -> Tensor:
        """``(N,)`` number of labelled positions per example (0 = example has no loss)."""
        return torch.ones(batch.size, dtype=torch.long)


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
        inputs, labels = _split_raw(raw)
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

    def outputs_and_targets(self, output, batch):
        logits = output[:, :-1]
        targets = self._targets(batch).to(logits.device)
        mask = targets != IGNORE_INDEX
        index = torch.arange(targets.shape[0], device=logits.device)[:, None].expand_as(targets)
        return logits[mask], targets[mask], index[mask]

    def output_rows(self, output, batch):
        n, t = output.shape[0], output.shape[1]
        return output.reshape(n * t, -1), self.row_targets(output, batch) != IGNORE_INDEX

    def row_targets(self, output, batch):
        # position t predicts token t+1; the last position of each row has no target
        return F.pad(self._targets(batch).to(output.device), (0, 1), value=IGNORE_INDEX).reshape(-1)

    def per_example(self, output, batch):
        # All (N*T, V) rows in place, unlabelled ones ignored (target -100 gives loss 0 and gradient 0):
        # gathering the labelled rows first copies the logits and scatters them back in the backward
        # pass, which doubled the loss's cost on large vocabularies (benchmarks/README.md).
        n, t = output.shape[0], output.shape[1]
        targets = F.pad(self._targets(batch).to(output.device), (0, 1), value=IGNORE_INDEX)
        losses = F.cross_entropy(output.float().reshape(n * t, -1), targets.reshape(-1), reduction="none")
        return losses.view(n, t).sum(1)


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

    def per_example(self, output, batch):
        out, tgt, idx = self.outputs_and_targets(output, batch)
        losses = F.cross_entropy(out.float(), tgt, reduction="none")
        return torch.zeros(batch.size, device=out.device, dtype=losses.dtype).index_add(0, idx, losses)


class MSELoss(LossFunction):
    """``l_n = sum_j (f_nj - y_nj)^2`` (torch's ``MSELoss(reduction="sum")`` per example; Hessian 2I)."""

    likelihood = "gaussian"
    name = "mse"

    def outputs_and_targets(self, output, batch):
        n = batch.size
        return output.reshape(n, -1), batch.labels.reshape(n, -1).to(output), torch.arange(n, device=output.device)

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
    inputs, labels = _split_raw(raw)
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
