"""lalora: keep what a model knew while fine-tuning it with LoRA (LaLoRA, arXiv 2512.17720).

    precision = lalora.fit_precision(model, source_loader, backend="diag")
    reg = lalora.LaLoRARegularizer(model, precision, strength=1e3)
    loss = task_loss + reg()
"""
__version__ = "0.1.0"

from .adapters import LoraAdapter, find_lora_adapters
from .backend import CurvatureBackend, FitContext, get_backend, list_backends, register_backend
from .blocks import Block, DenseBlock, DiagBlock, register_block
from .compression import compress
from .errors import (AnchorMismatchError, BackendError, DataError, LaloraError, ModelMismatchError,
                     PrecisionFileError, UncoveredParameterError, UncoveredParameterWarning)
from .fit import ZeroCurvatureWarning, fit_precision
from .integrations.torch_loop import regularized
from .precision import Precision
from .regularizer import LaLoRARegularizer

__all__ = [
    "AnchorMismatchError", "BackendError", "Block", "CurvatureBackend", "DataError", "DenseBlock", "DiagBlock",
    "FitContext", "LaLoRARegularizer", "LaloraError", "LoraAdapter", "ModelMismatchError", "Precision",
    "PrecisionFileError", "UncoveredParameterError", "UncoveredParameterWarning", "ZeroCurvatureWarning", "find_lora_adapters", "fit_precision", "get_backend",
    "list_backends", "register_backend", "register_block", "__version__", "compress", "LaLoRATrainer", "regularized", "compare", "compare_precisions",
    "evaluate",
]


def __getattr__(name):
    # LaLoRATrainer imports transformers' Trainer machinery: only on first use.
    if name == "LaLoRATrainer":
        from .integrations.trainer import LaLoRATrainer

        return LaLoRATrainer
    if name == "evaluate":  # lm-evaluation-harness (the 'eval' extra) is imported when it runs
        from .evaluation import evaluate

        return evaluate
    if name in ("compare", "compare_precisions"):
        # lalora.compare is also the submodule's name; the module forwards calls to the function.
        import importlib

        return getattr(importlib.import_module(".compare", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
