"""The held-out source loss during training (``LaLoRATrainer(source_eval_dataset=..., source_eval_steps=N)``):
how much of the source the run forgets, measured while it trains (docs/strength.md).

At the start of training (step 0, not on resume), every N optimizer steps and after the last one, the trainer
evaluates ``lalora.training.heldout_loss`` (mean loss per labelled token, nats) on the source set and logs it
as ``source_loss`` (a log entry of its own, at that step); ``trainer.source_eval_history`` keeps
``{"step", "source_loss"}`` rows. Every process evaluates the whole set (the same value on every rank; FSDP2 and
ZeRO-3 need every rank in the forward passes).
"""
from __future__ import annotations

from transformers import TrainerCallback


def source_eval_batches(trainer, data):
    """``data`` as batches: a ``datasets.Dataset`` or ``torch.utils.data.Dataset`` of examples goes through the
    trainer's data collator (``per_device_eval_batch_size``; columns the model does not take are dropped, as
    for ``eval_dataset``); a DataLoader or an iterable of batch dicts is used as it is."""
    from torch.utils.data import DataLoader, Dataset

    try:
        import datasets

        hf = isinstance(data, datasets.Dataset)
    except ImportError:
        hf = False
    if not (hf or isinstance(data, Dataset)) or isinstance(data, DataLoader):
        return data
    if hf and hasattr(trainer, "_remove_unused_columns"):
        data = trainer._remove_unused_columns(data, description="source_eval_dataset")
    return DataLoader(data, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator,
                      shuffle=False)


def check_source_eval(name: str, dataset, steps) -> int | None:
    """``source_eval_steps`` as an int (None: the trainer's ``logging_steps``), checked in the trainer's words."""
    if dataset is None:
        if steps is not None:
            raise ValueError(f"{name}(source_eval_steps=...) needs source_eval_dataset= (held-out source data)")
        return None
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}(source_eval_steps=...) must be an int >= 1 (optimizer steps), got {steps!r}")
    return steps


class SourceEvalCallback(TrainerCallback):
    """Evaluates and logs the held-out source loss for ``trainer`` (see the module docstring)."""

    def __init__(self, trainer, data, every: int | None):
        self.trainer, self.data, self.every = trainer, data, every

    def _every(self, args, state) -> int:
        if self.every is not None:
            return self.every
        steps = args.logging_steps  # a float < 1 is a ratio of the total steps, as in TrainingArguments
        return max(1, int(steps) if steps >= 1 else int(-(-steps * state.max_steps // 1)))

    def _evaluate(self, state) -> None:
        from ..training import heldout_loss

        trainer = self.trainer
        value = heldout_loss(trainer.model, source_eval_batches(trainer, self.data))
        trainer.source_eval_history.append({"step": state.global_step, "source_loss": value})
        trainer.log({"source_loss": value})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._evaluate(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self._every(args, state) == 0 or state.global_step == state.max_steps:
            self._evaluate(state)
