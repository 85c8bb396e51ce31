"""Exact dense curvature over all LoRA weights (GGN or per-example EF), the reference of a comparison.

The matrix comes from ``lalora.reference``, the one exact reference (brute force: every example run alone,
unpadded, plain autograd; the tests check the backends against the same code); this module wraps it as a
``Precision`` with the stream's counts and fingerprint. Conventions of DESIGN.md section 2: the mean over
the N examples of each example's summed-loss curvature, float64, parameters in ``lora_parameters`` order,
each flattened row-major. Small models only: the matrix is ``P x P`` for P LoRA weights.
"""
from __future__ import annotations

import itertools
import time

import torch

from ..errors import BackendError, warn_deprecated


def dense_reference(model, data, kind: str = "ggn", *, loss="auto", adapter_name=None, max_batches=None,
                    progress: bool = False, implementation: str = "auto"):
    """Exact dense curvature over all LoRA weights as a ``Precision`` with one float64 ``DenseBlock``.

    ``kind="ef"``: ``(1/N) sum_n g_n g_n^T`` (per-example gradients, one backward per example).
    ``kind="ggn"``: ``(1/N) sum_n sum_t J_t^T H_t J_t`` with the explicit Jacobian of the outputs at
    every labelled position (one backward per output entry, batched) and ``H`` the Hessian of the loss
    w.r.t. that position's output (``diag(p) - p p^T`` for softmax CE, ``2 I`` for MSE). Cost grows with
    ``#positions x #classes``: small models only. Both from ``lalora.reference`` (batch-of-one autograd
    loops on unpadded examples), on the model's device.
    ``implementation``: deprecated; "auto" and "lalora.reference" are the same, "builtin" (a former
    batched GGN over padded batches) warns and uses ``lalora.reference`` too.
    """
    if implementation not in ("auto", "builtin", "lalora.reference"):
        raise ValueError(f"implementation={implementation!r}: use 'auto' (the only implementation is lalora.reference)")
    if implementation == "builtin":
        warn_deprecated("dense_reference(implementation='builtin') is deprecated: the reference is always "
                        "lalora.reference; drop the argument")
    if kind not in ("ggn", "ef"):
        raise ValueError(f"reference kind must be 'ggn' or 'ef', got {kind!r}")
    from .. import reference
    from ..adapters import find_lora_adapters, lora_parameters, lora_state
    from ..blocks import DenseBlock
    from ..data import BatchStream, _is_single_batch
    from ..fit import fitting_mode
    from ..losses import resolve_loss
    from ..precision import Precision

    # only the batches the reference uses are drawn (data may be a long DataLoader)
    batches = [data] if _is_single_batch(data) else list(itertools.islice(data, max_batches))
    stream = BatchStream(batches, resolve_loss(loss), torch.device("cpu"), progress=False)
    for _ in stream:  # counts N and the fingerprint exactly as fit_precision does
        pass
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    started = time.perf_counter()
    fn = reference.dense_empirical_fisher if kind == "ef" else reference.dense_ggn
    try:
        with fitting_mode(model, adapters):  # eval mode, no gradient checkpointing, only LoRA weights trainable
            matrix = fn(model, batches, loss=stream.loss, adapter_name=adapter_name, progress=progress)
    except ValueError as e:
        raise BackendError(f"reference={kind!r}: {e}" + ("; use reference='ef'" if kind == "ggn" else "")) from None
    matrix = 0.5 * (matrix + matrix.T).double().cpu()
    meta = {"backend": f"reference-{kind}", "curvature": kind,
            "implementation": "lalora.reference", "num_examples": stream.num_examples, "num_tokens": stream.num_tokens,
            "data_fingerprint": stream.fingerprint, "fit_seconds": round(time.perf_counter() - started, 3)}
    return Precision([DenseBlock(tuple(params), matrix, {n: tuple(p.shape) for n, p in params.items()})],
                     lora_state(adapters), metadata=meta)
