"""Stream user data into prepared batches: device placement, counts, fingerprint, progress.

``data`` may be a DataLoader or any iterable of batches, a single batch (dict, tensor or
``(x, y)`` tuple), or a list of them. Examples with no labelled token carry no loss and
are not counted in N (reported as ``skipped_examples``).
"""
from __future__ import annotations

import hashlib
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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
                 max_batches: int | None = None):
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
        self._hash = hashlib.sha256()

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()[:16]

    def __iter__(self) -> Iterator[Batch]:
        if self.num_batches:
            raise RuntimeError("a BatchStream can be iterated once; backends must make a single pass")
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
            batch = self.loss.prepare(_to_device(raw, self.device))
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
        if self.num_batches == 0:
            raise DataError("data is empty: fit_precision needs at least one batch of source data")
        if self.num_examples == 0:
            raise DataError(f"every label in the {self.num_batches} source batches is masked (-100 or padding): "
                            "there is no loss to take curvature of")
