"""Checkpoints of long ``fit_precision`` runs: partial sums + stream position, resumable.

Protocol (docs/robustness.md): a backend that can be checkpointed implements
``state_dict() -> dict[str, Tensor]`` (its accumulated *sums*, not divided by N) and
``load_state_dict(state)`` (called before ``fit``; ``fit`` then continues from it), and
calls ``ctx.batch_done(self)`` after each fully accumulated batch. The checkpoint file
(one safetensors file, JSON header, written atomically) also holds the stream's position
and counts and the data fingerprint so far; on resume the stream re-reads and hashes the
consumed batches without computing on them and refuses data that differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import BackendError, PrecisionFileError

FORMAT_NAME = "lalora.fit-checkpoint"
FORMAT_VERSION = 1


def supports_checkpoint(backend) -> bool:
    return callable(getattr(backend, "state_dict", None)) and callable(getattr(backend, "load_state_dict", None))


def _anchor_hash(anchor: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n, t in anchor.items():
        h.update(n.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Checkpointer:
    """Saves ``backend.state_dict()`` + ``stream.state()`` to ``<dir>/fit-checkpoint[-rankR].safetensors``
    every ``every`` consumed batches; ``resume`` restores them; ``finish`` deletes the file."""

    def __init__(self, directory, every: int, backend, stream, *, identity: dict, rank: int | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}")
        if not supports_checkpoint(backend):
            raise BackendError(f"backend {backend.name!r} cannot be checkpointed: it does not implement "
                               "state_dict()/load_state_dict() (see docs/robustness.md); drop checkpoint_dir")
        self.dir = Path(directory)
        self.path = self.dir / (f"fit-checkpoint-rank{rank}.safetensors" if rank is not None else "fit-checkpoint.safetensors")
        self.every = every
        self.stream = stream
        self.identity = identity  # backend, options, config hash, anchor hash, loss: must match on resume
        self._last = 0
        self.saves = 0
        self.resumed_from = 0

    def resume(self, backend) -> bool:
        """Load an existing checkpoint into ``backend`` and the stream; False if there is none."""
        if not self.path.is_file():
            return False
        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["lalora_checkpoint"])
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise PrecisionFileError(f"{self.path}: unreadable fit checkpoint ({type(e).__name__}: {e}); delete it to "
                                     "start over") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
            raise PrecisionFileError(f"{self.path}: not a lalora fit checkpoint of format version {FORMAT_VERSION}")
        for key, want in self.identity.items():
            if header.get("identity", {}).get(key) != want:
                raise BackendError(f"{self.path} was written by another fit ({key}: checkpoint has "
                                   f"{header.get('identity', {}).get(key)!r}, this run {want!r}); delete it or use "
                                   "another checkpoint_dir")
        stream_state = header.get("stream")
        if not isinstance(stream_state, dict) or not isinstance(stream_state.get("num_batches"), int):
            raise PrecisionFileError(f"{self.path}: fit checkpoint has no valid stream position")
        backend.load_state_dict(state)
        self.stream.resume_state = stream_state
        self._last = self.resumed_from = stream_state["num_batches"]
        return True

    def after_batch(self, backend) -> None:
        if self.stream.num_batches - self._last >= self.every:
            self.save(backend)

    def save(self, backend) -> None:
        from .atomic_file import atomic_save_file

        state = {k: v.detach().cpu().contiguous() for k, v in backend.state_dict().items()}
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "identity": self.identity,
                  "stream": self.stream.state()}
        atomic_save_file(state, self.path, {"lalora_checkpoint": json.dumps(header)})
        self._last = self.stream.num_batches
        self.saves += 1

    def finish(self) -> None:
        """The fit completed: the checkpoint is no longer needed."""
        self.path.unlink(missing_ok=True)
