"""``estimate_fit``: what a fit will cost, from a few batches, before running it (``lalora fit --dry-run``).

    est = lalora.estimate.estimate_fit(model, batches, "kfac", num_batches=2, max_rank=256)
    print(est.format())

- stored bytes: exact from the adapter shapes (``stored_bytes``) for ``diag``, ``kfac`` and
  ``tri-kfac`` (with ``max_rank``: ``n k + k + n`` floats for each factor of side ``n > k``);
  for other backends the bytes of the precision fitted on the sample batches (which for a
  factored EF grows with the number of examples);
- time: the sample fit is timed batch by batch; the estimate is the sample's wall time plus the
  remaining batches at the mean time of the sample batches after the first (the first one pays
  for warm-up); with one sample batch, at that batch's time;
- peak memory: measured around the sample fit (``lalora.comparison.memory.MemoryMeter``: CUDA
  allocator peak, or sampled RSS on CPU). Streaming backends (``diag``, ``kfac``, ``tri-kfac``)
  hold one batch of activations at a time, so their peak does not grow with the number of
  batches. For the Kronecker backends the factor sums (running sums in ``sum_dtype`` + float32
  window sums) are given separately as ``accumulator_bytes``.

Nothing is written to disk.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

from .adapters import find_lora_adapters
from .blocks.factors import check_max_rank

_KRONECKER = ("kfac", "tri-kfac")


def _factor_floats(n: int, max_rank: int | None) -> int:
    """Floats stored for one ``n x n`` Kronecker factor (dense, or low-rank k + diagonal when ``n > k``)."""
    if max_rank is None or n <= max_rank:
        return n * n
    return n * max_rank + max_rank + n


def stored_bytes(model, backend: str, options: dict | None = None, *, adapter_name=None) -> int | None:
    """Exact bytes of the curvature tensors ``backend`` will store (``Precision.num_bytes``), from the
    LoRA shapes alone; ``None`` for a backend whose storage is not known from shapes (float32)."""
    options = dict(options or {})
    adapters = find_lora_adapters(model, adapter_name)
    if backend == "diag":
        return 4 * sum(a.A.numel() + a.B.numel() for a in adapters)
    if backend in _KRONECKER:
        max_rank = options.get("max_rank")
        if max_rank is not None:
            check_max_rank(max_rank)
        floats = 0
        for a in adapters:
            d_in, d_out = a.A.shape[1], a.B.shape[0]
            floats += _factor_floats(d_in, max_rank) + _factor_floats(d_out, max_rank)  # the anchor is not counted
        return 4 * floats
    return None


def accumulator_bytes(model, backend: str, options: dict | None = None, *, adapter_name=None) -> int | None:
    """Upper bound of the factor sums the Kronecker backends hold while fitting: the running sums
    (``sum_dtype``: 8 or 4 bytes per factor entry) and the float32 window sums (at most 4)."""
    if backend not in _KRONECKER:
        return None
    running = 4 if (options or {}).get("sum_dtype") == "float32" else 8
    adapters = find_lora_adapters(model, adapter_name)
    return (running + 4) * sum(a.A.shape[1] ** 2 + a.B.shape[0] ** 2 for a in adapters)


class _TimedBatches:
    """The sample batches, recording ``time.perf_counter()`` whenever the next one is asked for."""

    def __init__(self, batches):
        self.batches, self.marks = batches, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.marks.append(time.perf_counter())
            yield b
        self.marks.append(time.perf_counter())


@dataclass
class FitEstimate:
    """The numbers of a dry run (bytes, seconds); ``format()`` gives the printed report."""

    backend: str
    options: dict
    num_params: int
    sample_batches: int
    total_batches: int | None
    sample_seconds: float
    batch_seconds: list = field(default_factory=list)
    seconds_per_batch: float = 0.0
    estimated_seconds: float | None = None
    stored_bytes: int = 0
    stored_bytes_exact: bool = True
    accumulator_bytes: int | None = None
    peak_memory_bytes: int | None = None
    memory_method: str = ""
    structure: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def mib(b):
            return "?" if b is None else f"{b / 2**20:,.2f} MiB"

        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        total = "?" if self.total_batches is None else str(self.total_batches)
        lines = [f"dry run: backend={self.backend}{' ' + opts if opts else ''}, {self.num_params:,} LoRA weights, "
                 f"sampled {self.sample_batches} of {total} batches (nothing written)",
                 f"  stored precision: {mib(self.stored_bytes)} ({self.stored_bytes:,} bytes, "
                 + ("exact from shapes" if self.stored_bytes_exact else "measured on the sample; may grow with the data")
                 + f"; structure {self.structure})",
                 f"  time: sample {self.sample_seconds:.2f} s, {self.seconds_per_batch:.3f} s/batch -> estimated "
                 + ("? (unknown number of batches)" if self.estimated_seconds is None
                    else f"{self.estimated_seconds:.1f} s for {total} batches")]
        mem = f"  peak memory (measured on the sample, {self.memory_method}): {mib(self.peak_memory_bytes)}"
        if self.accumulator_bytes is not None:
            mem += f"; factor sums held during the fit (bound) {mib(self.accumulator_bytes)}"
        lines.append(mem)
        return "\n".join(lines)


def estimate_fit(model, data, backend: str = "diag", *, num_batches: int = 2, total_batches: int | None = None,
                 loss="auto", adapter_name=None, **options) -> FitEstimate:
    """Fit ``backend`` on the first ``num_batches`` batches of ``data`` and extrapolate to the whole.

    ``total_batches``: the number of batches of the real fit (default ``len(data)``; ``None`` if
    unknown: no time estimate). ``options`` go to the backend. Returns a ``FitEstimate``.
    """
    from .comparison.memory import MemoryMeter
    from .data import _is_single_batch
    from .fit import fit_precision

    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if _is_single_batch(data):
        data = [data]
    if total_batches is None:
        try:
            total_batches = len(data)
        except TypeError:
            total_batches = None
    sample = _TimedBatches(list(itertools.islice(iter(data), num_batches)))
    if not sample.batches:
        raise ValueError("data is empty: no batch to estimate from")
    adapters = find_lora_adapters(model, adapter_name)
    device = adapters[0].A.device
    with MemoryMeter(device) as mem:
        t0 = time.perf_counter()
        precision = fit_precision(model, sample, backend=backend, loss=loss, progress=False, adapter_name=adapter_name,
                                  **options)
        t_end = time.perf_counter()
    marks = sample.marks
    per_batch = [b - a for a, b in zip(marks[:-1], marks[1:])]
    steady = per_batch[1:] if len(per_batch) > 1 else per_batch
    sec_per_batch = sum(steady) / len(steady)
    k = len(sample.batches)
    estimated = None if total_batches is None else (t_end - t0) + sec_per_batch * max(0, total_batches - k)
    exact = stored_bytes(model, backend, options, adapter_name=adapter_name)
    return FitEstimate(backend=backend, options=dict(options), num_params=precision.num_params, sample_batches=k,
                       total_batches=total_batches, sample_seconds=t_end - t0, batch_seconds=per_batch,
                       seconds_per_batch=sec_per_batch, estimated_seconds=estimated,
                       stored_bytes=precision.num_bytes if exact is None else exact, stored_bytes_exact=exact is not None,
                       accumulator_bytes=accumulator_bytes(model, backend, options, adapter_name=adapter_name),
                       peak_memory_bytes=mem.peak_bytes, memory_method=mem.method, structure=precision.structure)
