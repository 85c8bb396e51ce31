"""The precisions the benchmark compares: ``P = I`` (isotropic L2), one fitted precision per backend, each
rescaled to mean diagonal 1 so that one strength grid is comparable across methods: the same as training with
``LaLoRARegularizer(normalize="mean-diagonal")`` on the fitted precision (docs/strength.md)."""
from __future__ import annotations

import sys
import time

import torch

from ..errors import BackendError


def log(msg: str, progress: bool = True) -> None:
    """A progress line on stderr (the benchmark's own; ``progress=False``: nothing)."""
    if progress:
        print(msg, file=sys.stderr, flush=True)


def identity_precision(model):
    """``P = I`` over all LoRA weights (isotropic L2 to theta0)."""
    from ..adapters import find_lora_adapters, lora_state
    from ..blocks import DiagBlock
    from ..precision import Precision

    adapters = find_lora_adapters(model)
    anchor = lora_state(adapters)
    blocks = [DiagBlock(n, torch.ones_like(t, dtype=torch.float32)) for n, t in anchor.items()]
    return Precision(blocks, anchor, metadata={"backend": "identity", "curvature": "identity"})


def as_tri_kfac(precision):
    """The B-Tri-KFAC precision with the factors of a ``kfac`` precision (both store X, G per adapter)."""
    from ..blocks.kronecker import KFACBlock, TriKFACBlock
    from ..precision import Precision

    blocks = [TriKFACBlock(b.params, b.X, b.G, b.scaling) if isinstance(b, KFACBlock) else b
              for b in precision.blocks]
    meta = dict(precision.metadata, backend="tri-kfac")  # the same (validated) factors: not checked again
    return Precision(blocks, precision.anchor, metadata=meta, prior_precision=precision.prior_precision,
                     validate=False)


def mean_diagonal(precision) -> float:
    """The scale of ``LaLoRARegularizer(normalize="mean-diagonal")`` (``Precision.mean_diagonal``; the benchmark's
    precisions have no prior precision)."""
    return precision.mean_diagonal(include_prior=True)


def backend_status(name: str) -> tuple[bool, str]:
    from ..backend import get_backend

    try:
        cls = get_backend(name)
    except BackendError as e:
        return False, str(e)
    return cls.available()


def fit_precisions(backends, model, src_fit, reset, notes: list[str], *, identity: bool = False,
                   progress: bool = True) -> dict[str, tuple]:
    """One precision per backend in ``backends`` (and ``P = I`` as ``"identity"``): name -> (precision, fit
    seconds), each fitted from theta0 (``reset()``) and rescaled to mean diagonal 1. A backend that is missing,
    fails or gives zero is left out with a note in ``notes``; ``tri-kfac`` reuses the ``kfac`` factors."""
    from ..fit import fit_precision

    fits = {}
    if identity:
        fits["identity"] = (identity_precision(model), 0.0)
    for backend in backends:
        if backend == "tri-kfac" and "kfac" in fits:  # same factors X, G: no second fit
            fits[backend] = (as_tri_kfac(fits["kfac"][0]), fits["kfac"][1])
            log("tri-kfac: built from the kfac factors (same X, G; no second fit)", progress)
            continue
        ok, why = backend_status(backend)
        if not ok:
            notes.append(f"backend {backend!r} skipped: {why}")
            log(f"note: backend {backend!r} skipped: {why}", progress)
            continue
        reset()
        t = time.perf_counter()
        try:
            P = fit_precision(model, src_fit, backend=backend, progress=progress)
        except Exception as e:  # a backend under construction must not sink the whole run
            notes.append(f"backend {backend!r} failed: {type(e).__name__}: {e}")
            log(f"note: backend {backend!r} failed: {e}", progress)
            continue
        seconds = time.perf_counter() - t
        scale = mean_diagonal(P)
        if not scale > 0:
            notes.append(f"backend {backend!r} gave a zero precision; skipped")
            continue
        P = P * (1.0 / scale)
        P.metadata["precision_scale"] = scale
        fits[backend] = (P, seconds)
        log(f"fitted {backend}: {seconds:.1f} s, mean diagonal {scale:.3g}", progress)
    return fits
