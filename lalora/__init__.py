"""lalora: keep what a model knew while fine-tuning it with LoRA (LaLoRA, arXiv 2512.17720).

    precision = lalora.fit_precision(model, source_loader, backend="diag")
    reg = lalora.LaLoRARegularizer(model, precision, strength=1e3)
    loss = task_loss + reg()

This module is the users' facade: it re-exports what they call, and no module of the package imports it.
Behind it, bottom to top (a module imports its own group or lower ones; no import circle, lazy imports
included: tests/test_layering.py checks both): the foundations (``errors``, ``blocks``, ``adapters``,
``losses``, ``data``, ``options``, ...), the precision (``fileformat``, ``validation``, ``backend``, then ``precision``),
what uses a precision (``fit``, ``regularizer``, ``penalty``, ``integrations``, ...), the backends
(``lalora.backends``, reached through the registry only) and the tools (``comparison``, ``bench``, ``evaluation``,
``surrogate``, ``sweep``, ``cli``).
"""
from .adapters import LoraAdapter, find_lora_adapters
from .backend import CurvatureBackend, FitContext, get_backend, list_backends, register_backend
from .blocks import Block, DenseBlock, DiagBlock, register_block
from .comparison import compare, compare_precisions
from .compression import compress
from .errors import (AnchorMismatchError, BackendError, DataError, LaloraDeprecationWarning, LaloraError,
                     ModelMismatchError, PrecisionFileError, UncoveredParameterError, UncoveredParameterWarning)
from .options import BackendOptions, Curvature, option
from .fit import ZeroCurvatureWarning, fit_precision
from .integrations.torch_loop import regularized
from .precision import Precision
from .regularizer import LaLoRARegularizer
from .version import __version__

__all__ = [
    "AnchorMismatchError", "BackendError", "BackendOptions", "Block", "Curvature", "LaloraDeprecationWarning", "option", "CurvatureBackend", "DataError", "DenseBlock", "DiagBlock",
    "FitContext", "LaLoRARegularizer", "LaloraError", "LoraAdapter", "ModelMismatchError", "Precision",
    "PrecisionFileError", "UncoveredParameterError", "UncoveredParameterWarning", "ZeroCurvatureWarning", "find_lora_adapters", "fit_precision", "get_backend",
    "list_backends", "register_backend", "register_block", "__version__", "compress", "LaLoRATrainer", "regularized", "compare", "compare_precisions",
    "evaluate", "sweep_strengths",
]


def __getattr__(name):
    # LaLoRATrainer imports transformers' Trainer machinery: only on first use.
    if name == "LaLoRATrainer":
        from .integrations.trainer import LaLoRATrainer

        return LaLoRATrainer
    if name == "evaluate":  # lm-evaluation-harness (the 'eval' extra) is imported when it runs
        from .evaluation import evaluate

        return evaluate
    if name == "sweep_strengths":  # choosing the strength (docs/strength.md)
        from .sweep import sweep_strengths

        return sweep_strengths
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
