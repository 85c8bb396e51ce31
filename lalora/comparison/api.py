"""``compare`` (fit every backend now) and ``compare_precisions`` (stored precisions): one row per method.

A row holds the cost (wall time and peak memory of ``fit_precision``, bytes of the curvature
tensors and of the saved file) and, when an exact reference is affordable, the accuracy numbers of
``metrics.evaluate``. See ``docs/compare.md`` for the keys.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BackendError
from ..options import curvature_name
from .displacement import displacement_vector
from .exact import dense_reference
from .memory import MemoryMeter
from .metrics import check_params, evaluate, make_reference
from .result import CompareResult

logger = logging.getLogger("lalora")

DEFAULT_MAX_REFERENCE_PARAMS = 4096


def _backend_spec(entry) -> tuple[str, str, dict]:
    """(label, backend name, options) from ``"kfac"`` or ``(label, "kfac", {...})`` / ``("kfac", {...})``."""
    if isinstance(entry, str):
        return entry, entry, {}
    if isinstance(entry, (tuple, list)):
        if len(entry) == 2 and isinstance(entry[1], dict):
            return entry[0], entry[0], dict(entry[1])
        if len(entry) == 3:
            return entry[0], entry[1], dict(entry[2])
    raise ValueError(f"backends entry {entry!r}: use a name or (label, name, options)")


def _affordable(num_params: int, max_reference_params) -> bool:
    return max_reference_params is None or num_params <= max_reference_params


def _finish(rows, ref, names, shapes, displacement, settings, note=None) -> CompareResult:
    settings = dict(settings)
    if note:
        settings["reference_note"] = note
    return CompareResult(rows=rows, reference=None if ref is None else ref.summary(), blocks=list(names),
                         settings=settings)


def compare(model, data, backends: Sequence = ("diag",), reference: str | None = "auto", directions=16, *,
            top_k: int = 8, displacement=None, loss="auto", adapter_name=None, max_batches: int | None = None,
            max_reference_params: int | None = DEFAULT_MAX_REFERENCE_PARAMS, seed: int = 0,
            save_dir=None, progress: bool = False) -> CompareResult:
    """Fit every backend on the same model and data and compare them (see the module docstring).

    ``backends``: names (``lalora.list_backends()``) or ``(label, name, options)``; a backend that
    fails to import or fit gives a row with ``status`` "unavailable"/"failed" and the error.
    ``reference``: "ggn", "ef", None, or "auto" (EF when every backend estimates an empirical Fisher,
    else GGN); it is computed only if #LoRA weights <= ``max_reference_params`` (None: always).
    ``directions``: number of random directions, or a ``(K, P)`` tensor of directions (flattened in
    the precision's parameter order). ``displacement``: theta_T as a peft adapter dir, a precision
    (file) whose anchor is theta_T, or a dict name -> tensor; d = theta_T - theta0.
    ``save_dir``: keep each fitted precision as ``<label>.lalora`` (and ``reference-<kind>.lalora``).
    """
    from ..adapters import find_lora_adapters, lora_parameters, lora_state

    specs = [_backend_spec(b) for b in backends]
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"backends: duplicate labels {labels}; give (label, name, options) entries")
    if iter(data) is data:  # a one-shot iterator: every backend needs its own pass
        data = list(data)
    adapters = find_lora_adapters(model, adapter_name)
    names = list(lora_parameters(adapters))
    shapes = {n: tuple(p.shape) for n, p in lora_parameters(adapters).items()}
    anchor = lora_state(adapters)
    num_params = sum(torch.Size(s).numel() for s in shapes.values())
    device = adapters[0].A.device
    kinds, kind, note = _reference_choice(specs, reference, num_params, max_reference_params)  # checks reference
    tmp = tempfile.TemporaryDirectory(prefix="lalora-compare-") if save_dir is None else None
    out_dir = Path(save_dir if save_dir is not None else tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"num_random": None if directions is not None and not isinstance(directions, int) else directions,
                "top_k": top_k, "seed": seed, "max_reference_params": max_reference_params, "num_lora_weights": num_params,
                "backends": labels, "mode": "fit"}
    try:
        disp = displacement_vector(displacement, names, shapes, anchor)
        ref = ref_row = None
        if kind is not None:
            with MemoryMeter(device) as mem:
                t0 = time.perf_counter()
                ref_prec = dense_reference(model, data, kind, loss=loss, adapter_name=adapter_name, max_batches=max_batches)
                secs = time.perf_counter() - t0
            ref_path = out_dir / f"reference-{kind}.lalora"
            ref_prec.save(ref_path)
            ref = make_reference(ref_prec, directions, top_k, seed, disp)
            ref_row = {"seconds": round(secs, 3), "peak_memory_bytes": mem.peak_bytes, "memory_method": mem.method,
                       "file_bytes": ref_path.stat().st_size, "path": str(ref_path) if save_dir is not None else None}
            settings["num_random"] = int(ref.Z.shape[0])
        fit = dict(loss=loss, progress=progress, adapter_name=adapter_name, max_batches=max_batches)
        rows = [_fitted_row(model, data, spec, kinds[spec[0]], fit, device, out_dir / f"{_safe(spec[0])}.lalora",
                            save_dir is not None, (ref, disp, names, shapes)) for spec in specs]
        result = _finish(rows, ref, names, shapes, disp, settings, note)
        if result.reference is not None:
            result.reference.update(ref_row)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _reference_choice(specs, reference, num_params: int, max_reference_params):
    """(label -> curvature kind or None, the reference kind to compute or None, the note why none)."""
    from ..backend import get_backend

    if reference not in ("auto", "ggn", "ef", None):
        raise ValueError(f"reference={reference!r}: use 'ggn', 'ef', 'auto' or None")
    kinds = {}
    for label, name, opts in specs:
        try:
            kinds[label] = curvature_name(get_backend(name)(opts).curvature_kind())
        except Exception:  # reported in the backend's row below
            kinds[label] = None
    kind = reference
    if reference == "auto":
        known = [k for k in kinds.values() if k]
        kind = "ef" if all(k == "ef" for k in known) else "ggn"  # none known: the cheap EF
    note = None
    if reference is None:
        note = "reference=None"
    elif not _affordable(num_params, max_reference_params):
        note = f"{num_params} LoRA weights > max_reference_params={max_reference_params}: no exact reference"
        logger.warning("lalora compare: %s", note)
        kind = None
    return kinds, kind, note


def _fitted_row(model, data, spec, curvature, fit: dict, device, path: Path, keep: bool, against) -> dict:
    """One backend's row: fit it (time, peak memory), save it to ``path``, evaluate it ``against`` the
    reference ``(ref, disp, names, shapes)``; a backend that is missing or fails gives a row saying so."""
    from ..backend import get_backend
    from ..fit import fit_precision

    label, name, options = spec
    row = {"name": label, "backend": name, "options": options, "curvature": curvature, "status": "ok", "notes": []}
    try:
        get_backend(name)
    except BackendError as e:
        row.update(status="unavailable", error=str(e))
        return row
    try:
        with MemoryMeter(device) as mem:
            t0 = time.perf_counter()
            with _quiet_zero_warning(row):
                # the comparison is over the LoRA matrices (its reference's parameters): no generic diagonal
                prec = fit_precision(model, data, backend=name, **{"others": "none", **fit}, options=options)
            secs = time.perf_counter() - t0
    except Exception as e:  # one failing backend must not sink the comparison
        logger.warning("lalora compare: backend %r failed: %s", name, e)
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
        return row
    prec.save(path)
    row.update(seconds=round(secs, 3), peak_memory_bytes=mem.peak_bytes, memory_method=mem.method,
               **_storage(prec, path, keep=keep))
    row.update(evaluate(prec, *against))
    return row


@contextlib.contextmanager
def _quiet_zero_warning(row):
    import warnings

    from ..fit import ZeroCurvatureWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ZeroCurvatureWarning)
        yield
    for w in caught:
        if issubclass(w.category, ZeroCurvatureWarning):
            row["notes"].append(str(w.message).split(".")[0])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _storage(prec, path: Path, keep: bool) -> dict:
    return {"structure": prec.structure, "num_bytes": prec.num_bytes, "file_bytes": path.stat().st_size,
            "path": str(path) if keep else None}


def _as_precision(item, label):
    from ..precision import Precision

    if isinstance(item, Precision):
        return item, None
    path = Path(item)
    return Precision.load(path), path


def compare_precisions(precisions, reference=None, directions=16, *, labels: Sequence[str] | None = None,
                       top_k: int = 8, displacement=None, seed: int = 0, model=None, data=None, loss="auto",
                       adapter_name=None, max_batches=None,
                       max_reference_params: int | None = DEFAULT_MAX_REFERENCE_PARAMS) -> CompareResult:
    """Compare stored precisions (paths or ``Precision`` objects) without recomputing them.

    ``reference``: None, a precision (file) holding the exact curvature (e.g. ``dense_reference(...)``
    saved, or a ``block`` precision), or "ggn"/"ef" to compute it from ``model`` and ``data``.
    Time comes from each precision's ``metadata["fit_seconds"]``; peak memory is not known
    (``None``). The accuracy numbers equal those of ``compare`` on the same precisions.
    """
    items = list(precisions) if isinstance(precisions, (list, tuple)) else [precisions]
    if not items:
        raise ValueError("compare_precisions needs at least one precision")
    loaded = []
    for i, item in enumerate(items):
        prec, path = _as_precision(item, i)
        loaded.append((prec, path))
    if labels is None:
        labels = []
        for i, (prec, path) in enumerate(loaded):
            labels.append(path.stem if path is not None else str(prec.metadata.get("backend", f"precision{i}")))
    labels = list(labels)
    for i in range(len(labels)):  # make labels unique
        if labels[i] in labels[:i]:
            labels[i] = f"{labels[i]}-{i}"
    first = loaded[0][0]
    names, shapes = first.param_names, first.shapes
    note = None
    ref_prec = None
    if isinstance(reference, str) and reference in ("ggn", "ef"):
        if model is None or data is None:
            raise ValueError(f"reference={reference!r} needs model= and data= to compute it; or pass a reference precision")
        if not _affordable(first.num_params, max_reference_params):
            note = f"{first.num_params} LoRA weights > max_reference_params={max_reference_params}: no exact reference"
        else:
            ref_prec = dense_reference(model, data, reference, loss=loss, adapter_name=adapter_name, max_batches=max_batches)
    elif reference is not None:
        ref_prec, _ = _as_precision(reference, "reference")
    else:
        note = "reference=None"
    if ref_prec is not None:
        names, shapes = ref_prec.param_names, ref_prec.shapes
    anchor = (ref_prec or first).anchor
    disp = displacement_vector(displacement, names, shapes, anchor)
    ref = None if ref_prec is None else make_reference(ref_prec, directions, top_k, seed, disp)
    settings = {"num_random": None if ref is None else int(ref.Z.shape[0]), "top_k": top_k, "seed": seed,
                "max_reference_params": max_reference_params, "num_lora_weights": first.num_params,
                "backends": labels, "mode": "stored"}
    with tempfile.TemporaryDirectory(prefix="lalora-compare-") as tmp:
        rows = [_stored_row(label, prec, path, Path(tmp), ref_prec, (ref, disp, names, shapes))
                for label, (prec, path) in zip(labels, loaded)]
    result = _finish(rows, ref, names, shapes, disp, settings, note)
    if result.reference is not None:
        result.reference.update(seconds=ref_prec.metadata.get("fit_seconds"), peak_memory_bytes=None, memory_method=None)
    return result


def _stored_row(label: str, prec, path: Path | None, tmp: Path, ref_prec, against) -> dict:
    """The row of a stored precision (its file, or a temporary one, for the storage columns), evaluated
    ``against`` the reference ``(ref, disp, names, shapes)``; notes a theta0 other than the reference's."""
    ref, disp, names, shapes = against
    check_params(prec, names, shapes, f"precision {label!r}")
    row = {"name": label, "backend": prec.metadata.get("backend"), "options": prec.metadata.get("backend_options", {}),
           "curvature": prec.metadata.get("curvature"), "status": "ok", "notes": [],
           "seconds": prec.metadata.get("fit_seconds"), "peak_memory_bytes": None, "memory_method": None}
    if path is None:
        path_ = tmp / f"{_safe(label)}.lalora"
        prec.save(path_)
        row.update(_storage(prec, path_, keep=False))
    else:
        row.update(_storage(prec, path, keep=True))
    if ref_prec is not None and any(not torch.equal(prec.anchor[n].float().cpu(), ref_prec.anchor[n].float().cpu())
                                    for n in names):
        row["notes"].append("anchor differs from the reference's (different theta0)")
    zeros = prec.zero_params()
    if zeros:
        row["notes"].append(f"{len(zeros)} of {len(names)} LoRA matrices have exactly zero curvature")
    row.update(evaluate(prec, *against))
    return row
