"""Accuracy of a precision P against an exact dense reference R.

Relative error ``|d'Pd - d'Rd| / d'Rd`` of the quadratic form along random directions, R's top
eigenvectors and a displacement; per block (one LoRA matrix, plus ``all``) the relative Frobenius
error, the ``|cos|`` between top eigenvectors, the top-k eigenspace overlap and both spectra.
Everything in float64; ``d'Pd`` goes through the precision's own blocks (``Precision.quadratic``).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..errors import LaloraError

logger = logging.getLogger("lalora")

SPECTRUM_LEN = 64  # eigenvalues kept per block in the result (for plots)


def split_vector(vec: Tensor, names, shapes) -> dict[str, Tensor]:
    """Flat ``(P,)`` vector -> {name: tensor of shapes[name]} (row-major, in ``names`` order)."""
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


class Reference:
    """The dense reference R (``P x P`` float64) with everything the rows are measured against, computed
    once: the directions ``Z (K, P)`` and ``z'Rz``, R's eigenpairs (descending), per-block eigenpairs."""

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
        mv = precision.matvec(split_vector(e, names, shapes))
        cols.append(torch.cat([mv[n].detach().double().cpu().reshape(-1) for n in names]))
    return torch.stack(cols, dim=1)


def _eigh_desc(m: Tensor):
    e, v = torch.linalg.eigh(m)
    o = torch.argsort(e, descending=True)
    return e[o], v[:, o]


def _spectrum(evals: Tensor) -> list[float]:
    return [float(v) for v in evals[:SPECTRUM_LEN].clamp_min(0)]


def check_params(precision, names, shapes, label) -> None:
    """Raise ``LaloraError`` unless ``precision`` covers exactly the reference's LoRA weights and shapes."""
    if set(precision.param_names) != set(names):
        diff = sorted(set(precision.param_names) ^ set(names))
        raise LaloraError(f"{label}: its LoRA weights differ from the reference's (first difference: {diff[0]!r})")
    for n in names:
        if tuple(precision.shapes[n]) != tuple(shapes[n]):
            raise LaloraError(f"{label}: parameter {n!r} has shape {precision.shapes[n]}, the reference has {shapes[n]}")


def evaluate(precision, ref: Reference | None, displacement: Tensor | None, names, shapes) -> dict:
    """The accuracy part of a row (quadratic forms through the precision's own blocks)."""
    out: dict = {}
    try:  # evaluate in float64: the numbers measure the approximation, not float32 cancellation
        precision = precision.to(dtype=torch.float64)
    except Exception as e:  # pragma: no cover - a block kind that cannot be cast
        logger.warning("lalora compare: evaluating in the stored dtype (%s)", e)

    def quad(vec: Tensor) -> float:
        return float(precision.quadratic(split_vector(vec, names, shapes)))

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


def make_reference(ref_prec, directions, top_k, seed, disp) -> Reference:
    """``directions``: a count of seeded Gaussian directions (None: 16) or a ``(K, P)`` tensor."""
    if isinstance(directions, int) or directions is None:
        return Reference(ref_prec, num_random=16 if directions is None else directions, top_k=top_k, seed=seed,
                         displacement=disp)
    return Reference(ref_prec, num_random=0, top_k=top_k, seed=seed, displacement=disp, directions=directions)

