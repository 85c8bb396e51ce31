"""Stream user data into prepared batches: device placement, counts, fingerprint, progress.

``data`` may be a DataLoader or any iterable of batches, a single batch (dict, tensor or
``(x, y)`` tuple), or a list of them. Examples with no labelled token carry no loss and
are not counted in N (reported as ``skipped_examples``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .errors import DataError
from .losses import Batch, LossFunction, infer_loss

logger = logging.getLogger("lalora")


def _is_single_batch(data) -> bool:
    return isinstance(data, (dict, Tensor)) or (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data))


def source_metadata(source, caller: str = "fit_precision") -> dict | None:
    """``fit_precision(source=...)`` (where the source data came from) as stored in ``metadata["source"]``: a
    copy through JSON, so the precision file can hold it; ``DataError`` if it is not a JSON-able dict."""
    if source is None:
        return None
    try:
        copy = json.loads(json.dumps(source, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DataError(f"{caller}(source=...) must be a JSON-able dict: {e}") from None
    if not isinstance(copy, dict):
        raise DataError(f"{caller}(source=...) must be a dict, got {type(source).__name__}")
    return copy


def _to_device(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        return {k: _to_device(v, device) for k, v in dict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _hash_update(h, obj) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")  # no copy of the bytes
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _hash_update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_update(h, v)


class BatchStream:
    """Iterate once over ``data`` yielding ``Batch`` objects; counts examples and tokens.

    After iteration: ``num_examples`` (N, examples with >= 1 labelled token),
    ``num_tokens`` (labelled positions), ``skipped_examples``, ``num_batches`` and
    ``fingerprint`` (SHA-256 over the batches' tensors).
    """

    def __init__(self, data, loss: LossFunction | None, device, *, progress: bool = True, desc: str = "lalora",
                 max_batches: int | None = None, max_positions: int | None = None, vocab_size: int | None = None):
        self.data = [data] if _is_single_batch(data) else data
        self.loss = loss
        self.device = device
        self.progress = progress
        self.desc = desc
        self.max_batches = max_batches
        self.num_examples = 0
        self.num_tokens = 0
        self.skipped_examples = 0
        self.num_batches = 0
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        #: indices of batches dropped by ``discard`` (non-finite loss/gradients with skip_nonfinite)
        self.skipped_nonfinite: list[int] = []
        #: ``state()`` of a checkpointed run: ``__iter__`` fast-forwards past its batches
        self.resume_state: dict | None = None
        self._hash = hashlib.sha256()
        self._iterated = False

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()[:16]

    _COUNTERS = ("num_batches", "num_examples", "num_tokens", "skipped_examples")

    def state(self) -> dict:
        """JSON-able position and counts (for fit checkpoints)."""
        return {**{k: getattr(self, k) for k in self._COUNTERS}, "fingerprint": self.fingerprint,
                "skipped_nonfinite": list(self.skipped_nonfinite)}

    def discard(self, batch: Batch) -> None:
        """Remove a yielded batch from the counts (its curvature was not accumulated)."""
        counts = batch.extra["labelled_counts"]
        self.num_examples -= int((counts > 0).sum())
        self.num_tokens -= int(counts.sum())
        self.skipped_nonfinite.append(int(batch.extra.get("index", -1)))

    def _check_batch(self, batch: Batch, index: int) -> None:
        inputs = batch.inputs if isinstance(batch.inputs, dict) else {}
        seq = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if self.max_positions is not None and seq is not None and seq.dim() >= 2 and seq.shape[1] > self.max_positions:
            raise DataError(f"source batch {index} has sequences of length {seq.shape[1]} > the model's "
                            f"max_position_embeddings {self.max_positions}: truncate them when tokenizing "
                            "(tokenizer(..., truncation=True, max_length=...))")
        ids = inputs.get("input_ids")
        if self.vocab_size is not None and isinstance(ids, Tensor) and ids.numel() and not torch.is_floating_point(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"source batch {index} has token id {hi if hi >= self.vocab_size else lo} outside the "
                                f"model's vocabulary [0, {self.vocab_size}): the data was tokenized with another tokenizer")

    def _fast_forward(self, raw) -> bool:
        """While resuming: hash and skip one already-consumed raw batch; True if skipped."""
        resume = self.resume_state
        if resume is None or self.num_batches >= resume["num_batches"]:
            return False
        _hash_update(self._hash, raw)
        self.num_batches += 1
        if self.num_batches == resume["num_batches"]:
            self._finish_fast_forward()
        return True

    def _finish_fast_forward(self) -> None:
        resume = self.resume_state
        if self.fingerprint != resume["fingerprint"]:
            raise DataError(f"the source data differs from the checkpointed fit's in its first {resume['num_batches']} "
                            "batches (fingerprint mismatch): pass the same data in the same order, or delete the checkpoint")
        for k in self._COUNTERS:
            setattr(self, k, int(resume[k]))
        self.skipped_nonfinite = list(resume.get("skipped_nonfinite", []))

    def __iter__(self) -> Iterator[Batch]:
        if self._iterated:
            raise RuntimeError("a BatchStream can be iterated once; backends must make a single pass")
        self._iterated = True
        if self.resume_state is not None and self.resume_state["num_batches"] == 0:
            self._finish_fast_forward()
        total = None
        try:
            total = len(self.data)
        except TypeError:
            pass
        if self.max_batches is not None:
            total = self.max_batches if total is None else min(total, self.max_batches)
        iterable: Iterable = self.data
        if self.progress:
            from tqdm.auto import tqdm

            iterable = tqdm(iterable, total=total, desc=self.desc, unit="batch", leave=False)
        for raw in iterable:
            if self.max_batches is not None and self.num_batches >= self.max_batches:
                break
            if self.loss is None:
                self.loss = infer_loss(raw)
                logger.info("lalora: loss='auto' chose %s", self.loss.name)
            if self._fast_forward(raw):
                continue
            batch = self.loss.prepare(_to_device(raw, self.device))
            self._check_batch(batch, self.num_batches)
            counts = self.loss.labelled_counts(batch)
            batch.extra["labelled_counts"] = counts
            self.num_batches += 1
            self.num_examples += int((counts > 0).sum())
            self.skipped_examples += int((counts == 0).sum())
            self.num_tokens += int(counts.sum())
            _hash_update(self._hash, raw)
            if int(counts.sum()) == 0:
                logger.info("lalora: batch %d has no labelled token; skipped", self.num_batches - 1)
                continue
            batch.extra["index"] = self.num_batches - 1
            yield batch
        if self.resume_state is not None and self.num_batches < self.resume_state["num_batches"]:
            raise DataError(f"the source data ended after {self.num_batches} batches, but the checkpoint being resumed "
                            f"had consumed {self.resume_state['num_batches']}")
        if self.num_batches == 0:
            raise DataError("data is empty: fit_precision needs at least one batch of source data")
        if self.num_examples == 0 and self.skipped_nonfinite:
            raise DataError(f"every source batch with a labelled token was skipped for a non-finite loss or gradient "
                            f"(batches {self.skipped_nonfinite[:10]}): nothing is left to fit")
        if self.num_examples == 0:
            raise DataError(f"every label in the {self.num_batches} source batches is masked (-100 or padding): "
                            "there is no loss to take curvature of")
