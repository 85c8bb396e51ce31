"""Compare curvature approximations: cost, storage and accuracy against an exact dense reference.

    result = lalora.compare(model, source_batches, backends=["diag", "kfac"], reference="ef")
    print(result.table())
    result.to_json("compare.json"); result.to_markdown()

Per backend (one *row*): wall time and peak memory of ``fit_precision``, the bytes the curvature
tensors take (``Precision.num_bytes``) and the saved file's size. When an exact reference is
affordable (``num LoRA weights <= max_reference_params``) also, against the dense reference R
(GGN or per-example EF over all LoRA weights, DESIGN.md section 2 conventions):

- relative error ``|d^T P d - d^T R d| / d^T R d`` of the quadratic form along (a) random
  Gaussian directions, (b) R's top eigenvectors, (c) a real displacement ``theta_T - theta0``;
  ``d^T P d`` uses the precision's own blocks (``Precision.quadratic``: what the regularizer uses),
  cast to float64 so the numbers measure the approximation and not float32 rounding;
- per *block* (one LoRA matrix = one diagonal block of the dense matrix, plus ``all`` = the whole
  matrix, cross terms included): relative Frobenius error ``|P_b - R_b|_F / |R_b|_F``, the
  ``|cos|`` between the top eigenvectors of ``P_b`` and ``R_b``, and both eigenvalue spectra.

``compare_precisions`` does the same for saved precisions without recomputing them.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .errors import BackendError, LaloraError, PrecisionFileError

logger = logging.getLogger("lalora")

DEFAULT_MAX_REFERENCE_PARAMS = 4096
_SPECTRUM_LEN = 64  # eigenvalues kept per block in the result (for plots)


# --------------------------------------------------------------------------------------------------
# exact dense references
# --------------------------------------------------------------------------------------------------
def dense_reference(model, data, kind: str = "ggn", *, loss="auto", adapter_name=None, max_batches=None,
                    progress: bool = False, implementation: str = "auto"):
    """Exact dense curvature over all LoRA weights as a ``Precision`` with one float64 ``DenseBlock``.

    ``kind="ef"``: ``(1/N) sum_n g_n g_n^T`` (per-example gradients, one backward per example).
    ``kind="ggn"``: ``(1/N) sum_n sum_t J_t^T H_t J_t`` with the explicit Jacobian of the outputs at
    every labelled position (one backward per output entry, batched) and ``H = diag(p) - p p^T``
    (categorical) or ``2 I`` (MSE). Cost grows with ``#positions x #classes``: small models only.
    ``implementation``: "builtin" (this module, batched), "lalora.reference" (the brute-force
    batch-of-one loops of ``lalora.reference``, CPU only) or "auto" (lalora.reference for the EF on
    CPU, builtin for the GGN: one batched Jacobian per batch instead of one backward per logit).
    """
    if implementation not in ("auto", "builtin", "lalora.reference"):
        raise ValueError(f"implementation={implementation!r}: use 'auto', 'builtin' or 'lalora.reference'")
    if implementation != "builtin":
        use_ref = _reference_module() is not None and _model_device(model, adapter_name).type == "cpu"
        if implementation == "lalora.reference" and not use_ref:
            raise BackendError("implementation='lalora.reference' needs lalora.reference and a CPU model")
        if use_ref and (implementation == "lalora.reference" or kind == "ef"):
            return _dense_reference_external(model, data, kind, loss=loss, adapter_name=adapter_name,
                                             max_batches=max_batches)
    return _dense_reference_builtin(model, data, kind, loss=loss, adapter_name=adapter_name, max_batches=max_batches,
                                    progress=progress)


def _reference_module():
    try:
        from . import reference
    except ImportError:
        return None
    return reference if hasattr(reference, "dense_empirical_fisher") and hasattr(reference, "dense_ggn") else None


def _model_device(model, adapter_name=None) -> torch.device:
    from .adapters import find_lora_adapters

    return find_lora_adapters(model, adapter_name)[0].A.device


def _dense_reference_external(model, data, kind, *, loss, adapter_name, max_batches):
    """The same reference through ``lalora.reference`` (batch-of-one autograd loops)."""
    from .adapters import find_lora_adapters, lora_parameters, lora_state
    from .blocks import DenseBlock
    from .data import BatchStream, _is_single_batch
    from .fit import fitting_mode
    from .losses import resolve_loss
    from .precision import Precision

    if kind not in ("ggn", "ef"):
        raise ValueError(f"reference kind must be 'ggn' or 'ef', got {kind!r}")
    ref = _reference_module()
    batches = [data] if _is_single_batch(data) else list(data)
    if max_batches is not None:
        batches = batches[:max_batches]
    stream = BatchStream(batches, resolve_loss(loss), torch.device("cpu"), progress=False)
    for _ in stream:  # counts N and the fingerprint exactly as fit_precision does
        pass
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    started = time.perf_counter()
    with fitting_mode(model, adapters):
        fn = ref.dense_empirical_fisher if kind == "ef" else ref.dense_ggn
        try:
            matrix = fn(model, batches, loss=stream.loss, adapter_name=adapter_name)
        except ValueError as e:
            raise BackendError(f"reference={kind!r}: {e}") from None
    matrix = 0.5 * (matrix + matrix.T).double().cpu()
    meta = {"backend": f"reference-{kind}", "curvature": "ggn" if kind == "ggn" else "empirical_fisher",
            "implementation": "lalora.reference", "num_examples": stream.num_examples, "num_tokens": stream.num_tokens,
            "data_fingerprint": stream.fingerprint, "fit_seconds": round(time.perf_counter() - started, 3)}
    return Precision([DenseBlock(tuple(params), matrix, {n: tuple(p.shape) for n, p in params.items()})],
                     lora_state(adapters), metadata=meta)


def _dense_reference_builtin(model, data, kind: str = "ggn", *, loss="auto", adapter_name=None, max_batches=None,
                             progress: bool = False):
    from .adapters import find_lora_adapters, lora_parameters, lora_state
    from .blocks import DenseBlock
    from .data import BatchStream
    from .fit import fitting_mode
    from .losses import call_model, resolve_loss
    from .precision import Precision

    if kind not in ("ggn", "ef"):
        raise ValueError(f"reference kind must be 'ggn' or 'ef', got {kind!r}")
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    numel = sum(t.numel() for t in tensors)
    stream = BatchStream(data, resolve_loss(loss), device, progress=progress, desc=f"lalora reference [{kind}]",
                         max_batches=max_batches)
    anchor = lora_state(adapters)
    total = torch.zeros(numel, numel, dtype=torch.float64, device=device)

    def flat(grads):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, tensors)])

    started = time.perf_counter()
    with fitting_mode(model, adapters):
        for batch in stream:
            output = call_model(model, batch)
            lossfn = stream.loss
            if kind == "ef":
                losses = lossfn.per_example(output, batch)
                counts = batch.extra["labelled_counts"]
                for n in range(batch.size):
                    if int(counts[n]) == 0:
                        continue
                    g = flat(torch.autograd.grad(losses[n], tensors, retain_graph=True, allow_unused=True))
                    total.addr_(g, g)
                continue
            if lossfn.likelihood == "categorical":
                out, _, _ = lossfn.outputs_and_targets(output, batch)
                p = torch.softmax(out.detach().double(), dim=-1)
                hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            elif lossfn.likelihood == "gaussian":
                out, _, _ = lossfn.outputs_and_targets(output, batch)
                c = out.shape[-1]
                hess = 2.0 * torch.eye(c, dtype=torch.float64, device=out.device).expand(out.shape[0], c, c)
            else:
                raise BackendError(f"reference='ggn' needs a loss with a known output Hessian (categorical or MSE); "
                                   f"loss {lossfn.name!r} has none: use reference='ef'")
            jac = _jacobian(out, tensors, flat)  # (M, C, P)
            total += torch.einsum("mcp,mcd,mdq->pq", jac, hess, jac)
    n_examples = stream.num_examples
    matrix = (total / n_examples).cpu()
    matrix = 0.5 * (matrix + matrix.T)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    meta = {"backend": f"reference-{kind}", "curvature": "ggn" if kind == "ggn" else "empirical_fisher",
            "implementation": "builtin", "num_examples": n_examples, "num_tokens": stream.num_tokens, "data_fingerprint": stream.fingerprint,
            "fit_seconds": round(time.perf_counter() - started, 3)}
    return Precision([DenseBlock(tuple(names), matrix, shapes)], anchor, metadata=meta)


def _jacobian(out: Tensor, tensors, flat, chunk: int = 256) -> Tensor:
    """``(M, C, P)`` Jacobian of ``out`` (M, C) w.r.t. ``tensors`` (rows batched through autograd)."""
    m, c = out.shape
    k = m * c
    rows = []
    eye = torch.eye(k, dtype=out.dtype, device=out.device)
    for start in range(0, k, chunk):
        seeds = eye[start:start + chunk].reshape(-1, m, c)
        try:
            grads = torch.autograd.grad(out, tensors, grad_outputs=seeds, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros(seeds.shape[0], *p.shape, device=p.device))
                                   .reshape(seeds.shape[0], -1).double() for g, p in zip(grads, tensors)], dim=1))
        except RuntimeError:  # an op without a vmap rule: one backward per row
            rows.append(torch.stack([flat(torch.autograd.grad(out, tensors, grad_outputs=s, retain_graph=True,
                                                              allow_unused=True)) for s in seeds]))
    return torch.cat(rows).reshape(m, c, -1)


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Peak memory of a code region. ``method`` says how it was measured:

    - ``cuda_max_memory_allocated``: ``torch.cuda.max_memory_allocated`` minus the allocation at entry;
    - ``rss_sampled``: peak resident set size (``/proc/self/statm`` polled every ~1 ms by a thread,
      after ``malloc_trim``) minus the RSS at entry: all memory of the process, torch included;
    - ``ru_maxrss_delta``: growth of ``resource.getrusage().ru_maxrss`` (only sees new process peaks).
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        base = _rss_bytes()
        if base is None:
            self.method = "ru_maxrss_delta"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self.method = "rss_sampled"
        self._base, self._peak, self._stop = base, base, threading.Event()

        def poll():
            while not self._stop.is_set():
                rss = _rss_bytes() or 0
                if rss > self._peak:
                    self._peak = rss
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.method == "rss_sampled":
            self._peak = max(self._peak, _rss_bytes() or 0)
            self._stop.set()
            self._thread.join()
            self.peak_bytes = int(self._peak - self._base)
        else:
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)
        return False


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------
_ROW_COLUMNS = [  # (key, header, format)
    ("name", "method", "{}"), ("curvature", "curvature", "{}"), ("seconds", "time s", "{:.2f}"),
    ("peak_memory_bytes", "peak MiB", "mib"), ("num_bytes", "stored MiB", "mib"), ("file_bytes", "file MiB", "mib"),
    ("rel_err_random_mean", "err rand", "{:.3g}"), ("rel_err_eigen_mean", "err eig", "{:.3g}"),
    ("rel_err_displacement", "err disp", "{:.3g}"), ("frobenius_all", "frob", "{:.3g}"),
    ("cosine_all", "cos top1", "{:.3f}"),
]


def _fmt(value, spec) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "mib":
        return f"{value / 2**20:.3f}"
    return spec.format(value)


def _clean(obj):
    """JSON-safe copy: non-finite floats -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class CompareResult:
    """Rows (one dict per method, see ``docs/compare.md`` for the keys), the reference's summary
    (``None`` without a reference), the block names and the settings used."""

    rows: list[dict]
    reference: dict | None = None
    blocks: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r['name'] for r in self.rows]}")

    def to_dict(self) -> dict:
        return _clean({"rows": self.rows, "reference": self.reference, "blocks": self.blocks, "settings": self.settings})

    def to_json(self, path=None, indent: int = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "CompareResult":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        return cls(rows=d["rows"], reference=d.get("reference"), blocks=d.get("blocks", []), settings=d.get("settings", {}))

    def _header_lines(self) -> list[str]:
        ref = self.reference
        if ref is None:
            why = self.settings.get("reference_note") or "no reference"
            return [f"reference: none ({why})"]
        mem = _fmt(ref.get("peak_memory_bytes"), "mib")
        return [f"reference: exact dense {ref['kind']} over {ref['num_params']} LoRA weights "
                f"({ref.get('seconds') if ref.get('seconds') is not None else '-'} s, peak {mem} MiB); "
                f"errors are relative: |d'Pd - d'Rd| / d'Rd over {self.settings.get('num_random')} random directions "
                f"(mean), the top {self.settings.get('top_k')} eigenvectors of R (mean), the displacement; "
                f"frob = |P - R|_F / |R|_F; cos = |cos| between top eigenvectors"]

    def table(self) -> str:
        """Fixed-width table for the terminal."""
        heads = [h for _, h, _ in _ROW_COLUMNS]
        body = [[_fmt(r.get(k), f) if r.get("status", "ok") == "ok" or k in ("name",) else
                 (r.get("status") if k == "curvature" else "-") for k, _, f in _ROW_COLUMNS] for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = self._header_lines() + [line(heads), line(["-" * w for w in widths])] + [line(b) for b in body]
        methods = {r.get("memory_method") for r in self.rows if r.get("memory_method")}
        if methods:
            out.append(f"peak memory: {', '.join(sorted(methods))}")
        for r in self.rows:
            if r.get("status", "ok") != "ok":
                out.append(f"{r['name']}: {r['status']}: {r.get('error', '')}")
            for note in r.get("notes", []):
                out.append(f"{r['name']}: {note}")
        return "\n".join(out)

    def to_markdown(self) -> str:
        """Markdown: the main table, then per-block Frobenius errors and top-eigenvector cosines."""
        heads = [h for _, h, _ in _ROW_COLUMNS]
        lines = [f"_{self._header_lines()[0]}_", "", "| " + " | ".join(heads) + " |",
                 "|" + "|".join(["---"] * 2 + ["---:"] * (len(heads) - 2)) + "|"]
        for r in self.rows:
            ok = r.get("status", "ok") == "ok"
            cells = [_fmt(r.get(k), f) if ok or k == "name" else (r.get("status") if k == "curvature" else "-")
                     for k, _, f in _ROW_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        methods = {r.get("memory_method") for r in self.rows if r.get("memory_method")}
        if methods:
            lines += ["", f"Peak memory measured as: {', '.join(sorted(methods))}."]
        ok_rows = [r for r in self.rows if r.get("status", "ok") == "ok" and r.get("frobenius")]
        for key, title in (("frobenius", "Relative Frobenius error per block"), ("cosine", "|cos| between top eigenvectors per block")):
            if not ok_rows:
                break
            lines += ["", f"**{title}**", "", "| block | " + " | ".join(r["name"] for r in ok_rows) + " |",
                      "|---|" + "|".join(["---:"] * len(ok_rows)) + "|"]
            for b in self.blocks + ["all"]:
                lines.append(f"| {b} | " + " | ".join(_fmt(r[key].get(b), "{:.3g}") for r in ok_rows) + " |")
        notes = [f"- {r['name']}: {r['status']}: {r.get('error', '')}" for r in self.rows if r.get("status", "ok") != "ok"]
        notes += [f"- {r['name']}: {n}" for r in self.rows for n in r.get("notes", [])]
        if notes:
            lines += [""] + notes
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------------
# evaluation against a reference
# --------------------------------------------------------------------------------------------------
def _split(vec: Tensor, names, shapes) -> dict[str, Tensor]:
    out, i = {}, 0
    for n in names:
        k = torch.Size(shapes[n]).numel()
        out[n] = vec[i:i + k].reshape(shapes[n])
        i += k
    return out


def _rel(a: float, b: float) -> float:
    if b == 0:
        return 0.0 if a == 0 else float("inf")
    return abs(a - b) / abs(b)


class _Reference:
    """The dense reference R with everything the rows are measured against (computed once)."""

    def __init__(self, precision, *, num_random: int, top_k: int, seed: int, displacement=None, directions=None):
        self.precision = precision
        self.names = precision.param_names
        self.shapes = precision.shapes
        self.anchor = precision.anchor
        self.R = precision.to_dense().double()
        self.offsets, i = {}, 0
        for n in self.names:
            k = torch.Size(self.shapes[n]).numel()
            self.offsets[n] = (i, i + k)
            i += k
        self.P = i
        g = torch.Generator().manual_seed(seed)
        if directions is not None:
            self.Z = torch.as_tensor(directions, dtype=torch.float64).reshape(-1, self.P)
        else:
            self.Z = torch.randn(num_random, self.P, generator=g, dtype=torch.float64)
        self.ref_random = [float(z @ self.R @ z) for z in self.Z]
        evals, evecs = torch.linalg.eigh(self.R)
        order = torch.argsort(evals, descending=True)
        self.evals, self.evecs = evals[order], evecs[:, order]
        lam_max = float(self.evals[0]) if self.P else 0.0
        keep = [j for j in range(min(top_k, self.P)) if float(self.evals[j]) > 1e-12 * max(lam_max, 1e-300)]
        self.top = keep
        self.blocks = {n: self.R[self._idx(n)][:, self._idx(n)] for n in self.names}
        self.block_eigs = {n: _eigh_desc(m) for n, m in self.blocks.items()}
        self.block_eigs["all"] = (self.evals, self.evecs)
        self.top_k = top_k
        self.displacement = displacement
        self.ref_disp = None if displacement is None else float(displacement @ self.R @ displacement)

    def _idx(self, n):
        return slice(*self.offsets[n])

    def summary(self) -> dict:
        spectra = {b: _spectrum(e) for b, (e, _) in self.block_eigs.items()}
        return {"kind": self.precision.metadata.get("curvature", "?"), "backend": self.precision.metadata.get("backend"),
                "num_params": self.P, "num_examples": self.precision.metadata.get("num_examples"),
                "top_eigenvalues": [float(v) for v in self.evals[:self.top_k]], "spectra": spectra,
                "quad_displacement": self.ref_disp}

    def dense_of(self, precision) -> Tensor:
        """``precision``'s dense matrix in the reference's parameter order."""
        try:
            own = precision.to_dense().double()
        except Exception as e:  # a block kind without a working to_dense: build it from matvecs
            logger.warning("lalora compare: to_dense failed (%s: %s); building the dense matrix from matvecs",
                           type(e).__name__, e)
            own = _dense_from_matvec(precision)
        order, i = {}, 0
        for n, t in precision.anchor.items():
            order[n] = (i, i + t.numel())
            i += t.numel()
        idx = torch.cat([torch.arange(*order[n]) for n in self.names])
        return own[idx[:, None], idx[None, :]]


def _dense_from_matvec(precision) -> Tensor:
    """``(P, P)`` float64 from ``P`` matrix-vector products (column j = F e_j)."""
    names, shapes = precision.param_names, precision.shapes
    P = precision.num_params
    cols = []
    for j in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[j] = 1.0
        mv = precision.matvec(_split(e, names, shapes))
        cols.append(torch.cat([mv[n].detach().double().cpu().reshape(-1) for n in names]))
    return torch.stack(cols, dim=1)


def _eigh_desc(m: Tensor):
    e, v = torch.linalg.eigh(m)
    o = torch.argsort(e, descending=True)
    return e[o], v[:, o]


def _spectrum(evals: Tensor) -> list[float]:
    return [float(v) for v in evals[:_SPECTRUM_LEN].clamp_min(0)]


def _check_params(precision, names, shapes, label) -> None:
    if set(precision.param_names) != set(names):
        diff = sorted(set(precision.param_names) ^ set(names))
        raise LaloraError(f"{label}: its LoRA weights differ from the reference's (first difference: {diff[0]!r})")
    for n in names:
        if tuple(precision.shapes[n]) != tuple(shapes[n]):
            raise LaloraError(f"{label}: parameter {n!r} has shape {precision.shapes[n]}, the reference has {shapes[n]}")


def _evaluate(precision, ref: _Reference | None, displacement: Tensor | None, names, shapes) -> dict:
    """The accuracy part of a row (quadratic forms through the precision's own blocks)."""
    out: dict = {}
    try:  # evaluate in float64: the numbers measure the approximation, not float32 cancellation
        precision = precision.to(dtype=torch.float64)
    except Exception as e:  # pragma: no cover - a block kind that cannot be cast
        logger.warning("lalora compare: evaluating in the stored dtype (%s)", e)

    def quad(vec: Tensor) -> float:
        return float(precision.quadratic(_split(vec, names, shapes)))

    if displacement is not None:
        out["quad_displacement"] = quad(displacement)
    if ref is None:
        return out
    rand = [_rel(quad(z), r) for z, r in zip(ref.Z, ref.ref_random)]
    out["rel_err_random"] = rand
    out["rel_err_random_mean"] = float(sum(rand) / len(rand)) if rand else None
    out["rel_err_random_max"] = max(rand) if rand else None
    eig = [_rel(quad(ref.evecs[:, j]), float(ref.evals[j])) for j in ref.top]
    out["rel_err_eigen"] = eig
    out["rel_err_eigen_mean"] = float(sum(eig) / len(eig)) if eig else None
    out["rel_err_eigen_max"] = max(eig) if eig else None
    if displacement is not None:
        out["rel_err_displacement"] = _rel(out["quad_displacement"], ref.ref_disp)
    A = ref.dense_of(precision)
    frob, cos, overlap, spectra = {}, {}, {}, {}
    for b, (re, rv) in ref.block_eigs.items():
        if b == "all":
            Ab, Rb = A, ref.R
        else:
            s = ref._idx(b)
            Ab, Rb = A[s][:, s], ref.blocks[b]
        rn = float(torch.linalg.matrix_norm(Rb))
        dn = float(torch.linalg.matrix_norm(Ab - Rb))
        frob[b] = _rel(dn, 0.0) if rn == 0 else dn / rn
        ae, av = _eigh_desc(Ab)
        spectra[b] = _spectrum(ae)
        if float(re[0]) <= 0 or float(ae[0]) <= 0:
            cos[b] = float("nan")  # a zero block has no top eigenvector
            overlap[b] = float("nan")
            continue
        cos[b] = float(abs(rv[:, 0] @ av[:, 0]))
        k = max(1, min(ref.top_k, Rb.shape[0], int((re > 1e-12 * re[0]).sum())))
        overlap[b] = float((rv[:, :k].T @ av[:, :k]).square().sum() / k)
    out.update(frobenius={k: v for k, v in frob.items()}, cosine=cos, overlap_topk=overlap, spectra=spectra,
               frobenius_all=frob["all"], cosine_all=cos["all"], overlap_all=overlap["all"])
    return out


# --------------------------------------------------------------------------------------------------
# displacements theta_T - theta0
# --------------------------------------------------------------------------------------------------
def load_finetuned_weights(spec, names: Sequence[str]) -> dict[str, Tensor]:
    """theta_T (name -> tensor) from a peft adapter directory (``adapter_model.safetensors``), a
    safetensors adapter file, a precision file or ``Precision`` (its anchor) or a dict."""
    from .precision import Precision

    if isinstance(spec, Precision):
        return dict(spec.anchor)
    if isinstance(spec, Mapping):
        return {k: torch.as_tensor(v) for k, v in spec.items()}
    path = Path(spec)
    if path.is_dir():
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise LaloraError(f"displacement: {str(path)!r} has no adapter_model.safetensors (only safetensors adapters "
                              "are read; pickle files are not loaded)")
        path = file
    if not path.is_file():
        raise LaloraError(f"displacement: {str(path)!r} does not exist")
    from .fileformat import read_header

    with contextlib.suppress(PrecisionFileError):
        read_header(path)
        return dict(Precision.load(path).anchor)
    from safetensors.torch import load_file

    from .adapters import canonical_module_path

    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        key = canonical_module_path(k)
        key = key[:-len(".weight")] if key.endswith(".weight") else key
        out[key] = v
    # peft drops the adapter name when saving; with several adapters canonical names end in ".<adapter>"
    for n in names:
        if n not in out:
            stem = n.rsplit(".", 1)[0]
            if stem in out and (stem.endswith(".lora_A") or stem.endswith(".lora_B")):
                out[n] = out[stem]
    return out


def _displacement_vector(spec, names, shapes, anchor) -> Tensor | None:
    if spec is None:
        return None
    theta = load_finetuned_weights(spec, names)
    parts = []
    for n in names:
        if n not in theta:
            raise LaloraError(f"displacement: no weight for LoRA parameter {n!r} (has {sorted(theta)[:3]}...)")
        t = theta[n].detach().double().cpu()
        if tuple(t.shape) != tuple(shapes[n]):
            raise LaloraError(f"displacement: {n!r} has shape {tuple(t.shape)}, expected {tuple(shapes[n])}")
        parts.append((t - anchor[n].double().cpu()).reshape(-1))
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------
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
    from .adapters import find_lora_adapters, lora_parameters, lora_state
    from .backend import get_backend
    from .fit import fit_precision

    if reference not in ("auto", "ggn", "ef", None):
        raise ValueError(f"reference={reference!r}: use 'ggn', 'ef', 'auto' or None")
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
    kinds = {}
    for label, name, opts in specs:
        try:
            kinds[label] = get_backend(name)(**opts).curvature_kind()
        except Exception:  # reported in the backend's row below
            kinds[label] = None
    kind = reference
    if reference == "auto":
        known = [k for k in kinds.values() if k]
        kind = "ef" if known and all(k == "empirical_fisher" for k in known) else "ggn"
    note = None
    if reference is None:
        note = "reference=None"
    elif not _affordable(num_params, max_reference_params):
        note = f"{num_params} LoRA weights > max_reference_params={max_reference_params}: no exact reference"
        logger.warning("lalora compare: %s", note)
        kind = None
    tmp = tempfile.TemporaryDirectory(prefix="lalora-compare-") if save_dir is None else None
    out_dir = Path(save_dir if save_dir is not None else tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"num_random": None if directions is not None and not isinstance(directions, int) else directions,
                "top_k": top_k, "seed": seed, "max_reference_params": max_reference_params, "num_lora_weights": num_params,
                "backends": labels, "mode": "fit"}
    try:
        disp = _displacement_vector(displacement, names, shapes, anchor)
        ref = None
        ref_row = None
        if kind is not None:
            with MemoryMeter(device) as mem:
                t0 = time.perf_counter()
                ref_prec = dense_reference(model, data, kind, loss=loss, adapter_name=adapter_name, max_batches=max_batches)
                secs = time.perf_counter() - t0
            ref_path = out_dir / f"reference-{kind}.lalora"
            ref_prec.save(ref_path)
            ref = _make_reference(ref_prec, directions, top_k, seed, disp)
            ref_row = {"seconds": round(secs, 3), "peak_memory_bytes": mem.peak_bytes, "memory_method": mem.method,
                       "file_bytes": ref_path.stat().st_size, "path": str(ref_path) if save_dir is not None else None}
            settings["num_random"] = int(ref.Z.shape[0])
        rows = []
        for label, name, options in specs:
            row = {"name": label, "backend": name, "options": options, "curvature": kinds[label], "status": "ok", "notes": []}
            try:
                get_backend(name)
            except BackendError as e:
                row.update(status="unavailable", error=str(e))
                rows.append(row)
                continue
            try:
                with MemoryMeter(device) as mem:
                    t0 = time.perf_counter()
                    with _quiet_zero_warning(row):
                        prec = fit_precision(model, data, backend=name, loss=loss, progress=progress,
                                             adapter_name=adapter_name, max_batches=max_batches, **options)
                    secs = time.perf_counter() - t0
            except Exception as e:  # one failing backend must not sink the comparison
                logger.warning("lalora compare: backend %r failed: %s", name, e)
                row.update(status="failed", error=f"{type(e).__name__}: {e}")
                rows.append(row)
                continue
            path = out_dir / f"{_safe(label)}.lalora"
            prec.save(path)
            row.update(seconds=round(secs, 3), peak_memory_bytes=mem.peak_bytes, memory_method=mem.method,
                       **_storage(prec, path, keep=save_dir is not None))
            row.update(_evaluate(prec, ref, disp, names, shapes))
            rows.append(row)
        result = _finish(rows, ref, names, shapes, disp, settings, note)
        if result.reference is not None:
            result.reference.update(ref_row)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def _quiet_zero_warning(row):
    import warnings

    from .fit import ZeroCurvatureWarning

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


def _make_reference(ref_prec, directions, top_k, seed, disp) -> _Reference:
    if isinstance(directions, int) or directions is None:
        return _Reference(ref_prec, num_random=16 if directions is None else directions, top_k=top_k, seed=seed,
                          displacement=disp)
    return _Reference(ref_prec, num_random=0, top_k=top_k, seed=seed, displacement=disp, directions=directions)


def _as_precision(item, label):
    from .precision import Precision

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
    disp = _displacement_vector(displacement, names, shapes, anchor)
    ref = None if ref_prec is None else _make_reference(ref_prec, directions, top_k, seed, disp)
    settings = {"num_random": None if ref is None else int(ref.Z.shape[0]), "top_k": top_k, "seed": seed,
                "max_reference_params": max_reference_params, "num_lora_weights": first.num_params,
                "backends": labels, "mode": "stored"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lalora-compare-") as tmp:
        for label, (prec, path) in zip(labels, loaded):
            _check_params(prec, names, shapes, f"precision {label!r}")
            row = {"name": label, "backend": prec.metadata.get("backend"), "options": prec.metadata.get("backend_options", {}),
                   "curvature": prec.metadata.get("curvature"), "status": "ok", "notes": [],
                   "seconds": prec.metadata.get("fit_seconds"), "peak_memory_bytes": None, "memory_method": None}
            if path is None:
                path_ = Path(tmp) / f"{_safe(label)}.lalora"
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
            row.update(_evaluate(prec, ref, disp, names, shapes))
            rows.append(row)
    result = _finish(rows, ref, names, shapes, disp, settings, note)
    if result.reference is not None:
        result.reference.update(seconds=ref_prec.metadata.get("fit_seconds"), peak_memory_bytes=None, memory_method=None)
    return result


# --------------------------------------------------------------------------------------------------
# command line: ``lalora compare``
# --------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="lalora compare", description=(
        "Compare curvature approximations: stored precisions (lalora compare a.lalora b.lalora) or "
        "backends fitted now (--model DIR --data FILE.jsonl --backends diag kfac)."))
    p.add_argument("precisions", nargs="*", help="precision files to compare without recomputing")
    p.add_argument("--model", help="model directory (transformers) or peft adapter directory")
    p.add_argument("--data", help="JSONL source data: {'text'}, {'prompt','completion'} or {'input_ids'[,'labels']}")
    p.add_argument("--backends", nargs="+", default=None, help="backend names (default: diag)")
    p.add_argument("--option", action="append", default=[], metavar="BACKEND:KEY=VALUE",
                   help="backend option (value parsed as JSON when possible); repeatable")
    p.add_argument("--reference", default="auto",
                   help="ggn, ef, auto, none, or a precision file holding the exact curvature")
    p.add_argument("--max-reference-params", type=int, default=DEFAULT_MAX_REFERENCE_PARAMS,
                   help="compute the dense reference only up to this many LoRA weights (0: no limit)")
    p.add_argument("--directions", type=int, default=16, help="number of random directions")
    p.add_argument("--top-k", type=int, default=8, help="top eigenvectors of the reference to test")
    p.add_argument("--displacement", help="theta_T: peft adapter dir or precision file (d = theta_T - theta0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank when --model is a plain model")
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--lora-init", default="orthogonal", help="peft init_lora_weights (default orthogonal: B != 0)")
    p.add_argument("--save-dir", help="keep the fitted precisions here")
    p.add_argument("--out", help="write the result: .json or .md")
    p.add_argument("--plot", help="PNG path: errors per method; spectra go to <stem>_spectra.png")
    return p


def _parse_options(items) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        if ":" not in item or "=" not in item.split(":", 1)[1]:
            raise ValueError(f"--option {item!r}: use BACKEND:KEY=VALUE")
        backend, kv = item.split(":", 1)
        key, value = kv.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        out.setdefault(backend, {})[key] = value
    return out


def load_model_for_cli(path: str, *, r: int = 8, targets=("q_proj", "v_proj"), init="orthogonal"):
    """(peft model, tokenizer) from a peft adapter directory or a plain transformers model directory
    (then LoRA with ``r``/``targets``/``init`` is added). Local files only."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise LaloraError(f"--model {path!r} is not a directory")
    if (p / "adapter_config.json").is_file():
        base_path = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():
            raise LaloraError(f"--model {path!r}: the adapter's base model {base_path!r} is not a local directory")
        base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
        model = PeftModel.from_pretrained(base, str(p), is_trainable=True)
        tok_dir = p if (p / "tokenizer_config.json").is_file() else Path(base_path)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init))
        tok_dir = p
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, TypeError):  # no tokenizer files: only pre-tokenized JSONL works
        return model, None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_jsonl_batches(path: str, tokenizer, batch_size: int = 4, max_length: int = 256) -> list[dict]:
    """Right-padded causal-LM batches from JSONL: ``text`` (loss on all tokens), ``prompt`` +
    ``completion`` (loss on the completion only) or pre-tokenized ``input_ids`` [+ ``labels``]."""
    examples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LaloraError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if "input_ids" in rec:
                ids = list(rec["input_ids"])[:max_length]
                labels = list(rec.get("labels", ids))[:max_length]
            elif tokenizer is None:
                raise LaloraError(f"{path}:{lineno}: the model has no tokenizer, so records need 'input_ids'")
            elif "prompt" in rec and "completion" in rec:
                pid = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
                cid = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
                ids = (pid + cid)[:max_length]
                labels = ([-100] * len(pid) + cid)[:max_length]
            elif "text" in rec:
                ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"][:max_length]
                labels = list(ids)
            else:
                raise LaloraError(f"{path}:{lineno}: a record needs 'text', 'prompt'+'completion' or 'input_ids'")
            examples.append((ids, labels))
    if not examples:
        raise LaloraError(f"--data {path!r} holds no examples")
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, (a, b) in enumerate(chunk):
            ids[j, :len(a)] = torch.tensor(a)
            labels[j, :len(b)] = torch.tensor(b)
            mask[j, :len(a)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def cli_main(argv=None) -> int:
    """``lalora compare ...``; returns the exit code (0 ok, 2 usage/input error)."""
    args = build_parser().parse_args(argv)
    try:
        result = _run_cli(args)
    except (LaloraError, ValueError, OSError) as e:
        print(f"lalora compare: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".md":
            out.write_text(result.to_markdown())
        else:
            result.to_json(out)
        print(f"wrote {out}")
    if args.plot:
        from .compare_plot import plot_result

        for p in plot_result(result, args.plot):
            print(f"wrote {p}")
    return 0


def _run_cli(args) -> CompareResult:
    max_ref = args.max_reference_params or None
    ref_arg = None if str(args.reference).lower() == "none" else args.reference
    if args.precisions and (args.backends or args.model is None):
        if args.backends:
            raise ValueError("give either precision files or --backends, not both")
        reference = ref_arg
        model = data = None
        if ref_arg in ("ggn", "ef"):
            if not (args.model and args.data):
                raise ValueError(f"--reference {ref_arg} with precision files needs --model and --data")
            model, tok = load_model_for_cli(args.model, r=args.lora_r, targets=args.lora_targets, init=args.lora_init)
            data = load_jsonl_batches(args.data, tok, args.batch_size, args.max_length)
        elif ref_arg == "auto":
            reference = None
        return compare_precisions(args.precisions, reference=reference, directions=args.directions, top_k=args.top_k,
                                  displacement=args.displacement, seed=args.seed, model=model, data=data,
                                  max_batches=args.max_batches, max_reference_params=max_ref)
    if not (args.model and args.data):
        raise ValueError("give precision files, or --model and --data (with --backends)")
    if ref_arg not in ("ggn", "ef", "auto", None):
        raise ValueError(f"--reference {ref_arg!r}: with --model use ggn, ef, auto or none")
    model, tok = load_model_for_cli(args.model, r=args.lora_r, targets=args.lora_targets, init=args.lora_init)
    data = load_jsonl_batches(args.data, tok, args.batch_size, args.max_length)
    options = _parse_options(args.option)
    names = args.backends or ["diag"]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"--option for backend {unknown[0]!r} which is not in --backends")
    backends = [(n, n, options.get(n, {})) for n in names]
    return compare(model, data, backends=backends, reference=ref_arg, directions=args.directions, top_k=args.top_k,
                   displacement=args.displacement, max_batches=args.max_batches, max_reference_params=max_ref,
                   seed=args.seed, save_dir=args.save_dir)


class _CallableModule(type(sys)):
    """``lalora.compare`` is both this module and the function: importing the submodule (e.g.
    ``from lalora.compare import cli_main``) rebinds the package attribute to the module, so the
    module forwards calls to ``compare``."""

    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
