"""Bitwise equality of tensors and Kronecker factors, with a cheap key to find candidates: how a precision file
stores a shared input factor once (lalora.fileformat) and how the penalty reads it once (lalora.penalty_groups)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .factors import Factor


def tensor_fingerprint(t: Tensor) -> tuple:
    """A cheap key under which equal tensors meet: dtype, shape and ~4096 evenly spaced entries' bytes."""
    flat = t.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // 4096)].cpu().contiguous()
    return str(t.dtype), tuple(t.shape), hashlib.sha256(memoryview(sample.view(torch.uint8).numpy())).hexdigest()


def fingerprint(F: Factor) -> tuple:
    """``tensor_fingerprint`` of each of the factor's tensors: equal factors have equal fingerprints."""
    return tuple((role, tensor_fingerprint(t)) for role, t in F.tensors("F").items())


def factors_equal(F1: Factor, F2: Factor) -> bool:
    """Same representation and bitwise equal tensors (products with them are then identical)."""
    T1, T2 = F1.tensors("F"), F2.tensors("F")
    return type(F1) is type(F2) and T1.keys() == T2.keys() and all(
        T1[k].shape == T2[k].shape and T1[k].dtype == T2[k].dtype and torch.equal(T1[k], T2[k]) for k in T1)
