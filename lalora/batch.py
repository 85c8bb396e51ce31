"""A user batch in the form the losses and backends read: model inputs, labels, model outputs.

``split_raw`` accepts dicts (tokenizer/collator output), ``(x, y)`` tuples and tensors of input ids;
``Batch`` is what ``LossFunction.prepare`` returns; ``call_model`` runs a model on it and
``model_outputs`` finds the logits in whatever the model returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .errors import DataError


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


def split_raw(raw):
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


def batch_size(inputs) -> int:
    first = inputs.get("input_ids", inputs.get("inputs_embeds")) if isinstance(inputs, dict) else inputs[0]
    return int(first.shape[0])
