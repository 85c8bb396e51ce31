"""``estimate_fit``: what a fit will cost, from a few batches, before running it (``lalora fit --dry-run``).

    est = lalora.estimate.estimate_fit(model, batches, "kfac", num_batches=2, options={"max_rank": 256})
    print(est.format())

- stored bytes: exact from the adapter shapes when the backend class says
  (``CurvatureBackend.stored_bytes``: ``diag``, ``kfac``/``tri-kfac`` (with ``max_rank``: ``n k + k + n``
  floats for each factor of side ``n > k``), ``backpack``, ``laplace``, ``block`` when every block is
  dense); otherwise (a factored EF, which grows with the number of examples; a plugin that does not
  say) the bytes of the precision fitted on the sample batches;
- time: the sample fit is timed batch by batch; the estimate is the sample's wall time plus the
  remaining batches at the mean time of the sample batches after the first (the first one pays
  for warm-up); with one sample batch, at that batch's time;
- peak memory: measured around the sample fit (``lalora.comparison.memory.MemoryMeter``: CUDA
  allocator peak, or sampled RSS on CPU). Streaming backends (``diag``, ``kfac``, ``tri-kfac``)
  hold one batch of activations at a time, so their peak does not grow with the number of
  batches. What a backend holds while fitting, when its class says
  (``CurvatureBackend.accumulator_bytes``; the Kronecker backends: running sums in ``sum_dtype`` +
  float32 window sums), is given separately as ``accumulator_bytes``.

Nothing is written to disk.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

from .adapters import find_lora_adapters
from .backend import get_backend, make_backend


def stored_bytes(model, backend: str, options=None, *, adapter_name=None, others: str = "diag") -> int | None:
    """Exact bytes of the curvature tensors ``backend`` will store (``Precision.num_bytes``), from the
    LoRA shapes alone (the backend class's ``stored_bytes``) plus one float32 per other trainable tensor's
    weight (``fit_precision(others="diag")``); ``None`` when the backend cannot say."""
    cls = get_backend(backend)
    adapters = cls.select_adapters(find_lora_adapters(model, adapter_name))
    return _plus_others(cls.stored_bytes(adapters, cls.resolve_options(options)), model, adapters, others)


def _plus_others(nbytes: int | None, model, adapters, others: str) -> int | None:
    """``nbytes`` plus the DiagBlocks of the other trainable tensors (DoRA magnitudes are counted by the backend)."""
    from .others import named_others

    if nbytes is None or others != "diag":
        return nbytes
    magnitudes = {a.magnitude_name for a in adapters if a.magnitude is not None}
    return nbytes + 4 * sum(p.numel() for n, p in named_others(model, adapters).items() if n not in magnitudes)


def accumulator_bytes(model, backend: str, options=None, *, adapter_name=None) -> int | None:
    """Upper bound of the sums ``backend`` holds while fitting (the backend class's ``accumulator_bytes``;
    the Kronecker backends: running sums in ``sum_dtype`` and float32 window sums); ``None`` if unknown."""
    cls = get_backend(backend)
    return cls.accumulator_bytes(cls.select_adapters(find_lora_adapters(model, adapter_name)), cls.resolve_options(options))


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


def estimate_fit(model, data, backend: str = "diag", *, options=None, num_batches: int = 2,
                 total_batches: int | None = None, loss="auto", adapter_name=None, **legacy_options) -> FitEstimate:
    """Fit ``backend`` on the first ``num_batches`` batches of ``data`` and extrapolate to the whole.

    ``total_batches``: the number of batches of the real fit (default ``len(data)``; ``None`` if
    unknown: no time estimate). ``options``: the backend's options (its ``Options`` or a dict, as
    for ``fit_precision``; as keyword arguments: deprecated). Returns a ``FitEstimate``.
    """
    from .comparison.memory import MemoryMeter
    from .data import _is_single_batch
    from .fit import _arguments, fit_precision

    instance = make_backend(backend, options, legacy_options, caller="estimate_fit", caller_args=_arguments(estimate_fit))
    opts = instance.options

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
    adapters = instance.select_adapters(find_lora_adapters(model, adapter_name))
    device = adapters[0].A.device
    with MemoryMeter(device) as mem:
        t0 = time.perf_counter()
        precision = fit_precision(model, sample, backend=instance, loss=loss, progress=False, adapter_name=adapter_name)
        t_end = time.perf_counter()
    marks = sample.marks
    per_batch = [b - a for a, b in zip(marks[:-1], marks[1:])]
    steady = per_batch[1:] if len(per_batch) > 1 else per_batch
    sec_per_batch = sum(steady) / len(steady)
    k = len(sample.batches)
    estimated = None if total_batches is None else (t_end - t0) + sec_per_batch * max(0, total_batches - k)
    exact = _plus_others(type(instance).stored_bytes(adapters, opts), model, adapters, "diag")
    given = {k: v for k, v in opts.to_dict().items() if v != type(instance).default_options.get(k)}
    return FitEstimate(backend=instance.name, options=given, num_params=precision.num_params, sample_batches=k,
                       total_batches=total_batches, sample_seconds=t_end - t0, batch_seconds=per_batch,
                       seconds_per_batch=sec_per_batch, estimated_seconds=estimated,
                       stored_bytes=precision.num_bytes if exact is None else exact, stored_bytes_exact=exact is not None,
                       accumulator_bytes=type(instance).accumulator_bytes(adapters, opts),
                       peak_memory_bytes=mem.peak_bytes, memory_method=mem.method, structure=precision.structure)
