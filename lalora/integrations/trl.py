"""TRL's trainers with the LaLoRA penalty (``pip install "lalora[trl]"``).

    from lalora.integrations.trl import LaLoRASFTTrainer     # also LaLoRADPOTrainer, LaLoRAGRPOTrainer
    trainer = LaLoRASFTTrainer(model=base_model, args=SFTConfig(...), train_dataset=ds,
                               peft_config=LoraConfig(..., init_lora_weights="orthogonal"),
                               source_data=source_batches, backend="kfac", strength=1e3)
    trainer.train()

Each class is ``LaLoRATrainerMixin`` in front of the TRL trainer, so every ``LaLoRATrainer`` argument
applies (``precision=`` or ``source_data=``, ``strength=``, ``normalize="mean-diagonal"``, ``anchor=``,
``source_eval_dataset=`` for the held-out source loss, ...) and the penalty gets its own
backward once per optimizer step, whatever the trainer does to its task loss: ``SFTTrainer`` normalises
by ``num_items_in_batch`` (``model_accepts_loss_kwargs``), ``DPOTrainer`` does not
(``loss_is_scaled_for_ga=False``), ``GRPOTrainer`` scales its loss itself (``loss_is_scaled_for_ga=True``).

With ``peft_config=`` TRL wraps the model inside its ``__init__``, with freshly initialised adapters, so a
precision fitted on a model built beforehand is not at the trainer's weights: pass ``source_data=``
(the precision is fitted at the start of ``train()`` on the model TRL wrapped, and saved with every
checkpoint), or ``anchor="reset"`` when the precision was fitted on the same base model with the same
``LoraConfig``. TRL also aligns the config's pad/eos/bos ids with the tokenizer; a precision fitted before
is still accepted when nothing else changed.

``lalora_trainer(cls)`` builds the same for any other ``transformers.Trainer`` subclass (TRL's
``RewardTrainer``, ``KTOTrainer``, ...).
"""
from __future__ import annotations

from .trainer import LaLoRATrainerMixin

_TRL_CLASSES = {"LaLoRASFTTrainer": "SFTTrainer", "LaLoRADPOTrainer": "DPOTrainer", "LaLoRAGRPOTrainer": "GRPOTrainer"}
__all__ = ["LaLoRATRLMixin", "lalora_trainer", *_TRL_CLASSES]
_built: dict[str, type] = {}


class LaLoRATRLMixin(LaLoRATrainerMixin):
    """``LaLoRATrainerMixin`` for trainers that take ``peft_config=`` and wrap the model themselves: the
    ``AnchorMismatchError`` then explains that the adapters are new and how to fit on them."""

    def __init__(self, *args, **kwargs):
        self._lalora_wrapped_by_trainer = kwargs.get("peft_config") is not None
        super().__init__(*args, **kwargs)

    def _anchor_context(self) -> str | None:
        return "peft_config" if self._lalora_wrapped_by_trainer else None


def lalora_trainer(cls: type, name: str | None = None) -> type:
    """``class LaLoRA<cls>(LaLoRATRLMixin, cls)``: the LaLoRA penalty on any ``transformers.Trainer`` subclass."""
    from transformers import Trainer

    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise TypeError(f"lalora_trainer needs a transformers.Trainer subclass, got {cls!r}")
    name = name or f"LaLoRA{cls.__name__}"
    doc = f"{cls.__name__} with the LaLoRA penalty (lalora.integrations.trl)."
    return type(name, (LaLoRATRLMixin, cls), {"__module__": __name__, "__doc__": doc})


def __getattr__(name):
    if name in _TRL_CLASSES:
        if name not in _built:
            try:
                import trl
            except ImportError as e:
                raise ImportError(f"lalora.integrations.trl.{name} needs TRL: pip install 'lalora[trl]'") from e
            base = getattr(trl, _TRL_CLASSES[name], None)
            if base is None:
                raise ImportError(f"the installed TRL {trl.__version__} has no {_TRL_CLASSES[name]}")
            _built[name] = lalora_trainer(base, name)
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
