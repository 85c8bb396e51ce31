"""Training-loop integrations: the Hugging Face ``Trainer`` (``LaLoRATrainer``, imported lazily
so that ``import lalora`` does not import transformers' Trainer), TRL's trainers (``lalora.integrations.trl``)
and plain PyTorch (``regularized``)."""
from .torch_loop import regularized

__all__ = ["LaLoRATrainer", "regularized"]


def __getattr__(name):
    if name == "LaLoRATrainer":
        from .trainer import LaLoRATrainer

        return LaLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
