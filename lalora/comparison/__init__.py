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
``compare_precisions`` (saved precisions, no recomputation); ``cli``: ``lalora compare``.
"""
from __future__ import annotations

import sys

from .api import DEFAULT_MAX_REFERENCE_PARAMS, compare, compare_precisions
from .displacement import load_finetuned_weights
from .exact import dense_reference
from .memory import MemoryMeter
from .result import CompareResult


def cli_main(argv=None) -> int:
    """``lalora compare ARGS`` as a function (see ``lalora.compare.cli``); returns the exit code."""
    from .cli import cli_main as _main

    return _main(argv)


__all__ = ["DEFAULT_MAX_REFERENCE_PARAMS", "CompareResult", "MemoryMeter", "cli_main", "compare", "compare_precisions",
           "dense_reference", "load_finetuned_weights"]


class _CallableModule(type(sys)):
    """``lalora.compare`` is both this package and the function: importing the package (e.g.
    ``from lalora.compare import cli_main``) rebinds ``lalora.compare`` to it, so calls are forwarded."""

    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
