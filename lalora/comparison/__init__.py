"""Compare curvature approximations: cost, storage and accuracy against an exact dense reference.

    result = lalora.compare(model, source_batches, backends=["diag", "kfac"], reference="ef")
    print(result.table())
    result.to_json("compare.json"); result.to_markdown()

Per backend (one *row*): wall time and peak memory of ``fit_precision`` (``memory``), the bytes the
curvature tensors take and the saved file's size. When an exact reference is affordable
(``num LoRA weights <= max_reference_params``) also, against the dense GGN or per-example EF R
(``exact``; DESIGN.md section 2 conventions), the numbers of ``metrics``: relative error of
``d'Pd`` along random directions, R's top eigenvectors and a displacement ``theta_T - theta0``
(``displacement``), and per LoRA matrix the relative Frobenius error, the ``|cos|`` between top
eigenvectors and both spectra. ``result``: the table / JSON / Markdown; ``api``: ``compare`` and
``compare_precisions`` (saved precisions, no recomputation); ``plot``: the figures (matplotlib). The
command ``lalora compare`` is ``lalora.cli.compare``; ``lalora.compare`` is the function ``compare``
(this package is ``lalora.comparison``, so the two names no longer collide).
"""
from __future__ import annotations

from .api import DEFAULT_MAX_REFERENCE_PARAMS, compare, compare_precisions
from .displacement import load_finetuned_weights
from .exact import dense_reference
from .memory import MemoryMeter
from .result import CompareResult

__all__ = ["DEFAULT_MAX_REFERENCE_PARAMS", "CompareResult", "MemoryMeter", "compare", "compare_precisions",
           "dense_reference", "load_finetuned_weights"]
