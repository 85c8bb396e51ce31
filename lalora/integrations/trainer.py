"""``LaLoRATrainer``: a ``transformers.Trainer`` that adds the LaLoRA penalty once per optimizer step.

    trainer = lalora.LaLoRATrainer(model=peft_model, args=args, train_dataset=ds,
                                   precision=precision, strength=1e3)
    trainer.train()

or, fitting the precision at the start of training on the model the trainer trains (what TRL's
``peft_config=`` needs: TRL wraps the model itself), ``source_data=ds_or_batches, backend="kfac"``
instead of ``precision=``.

How the penalty enters: the task loss goes through the Trainer unchanged (so its scaling for
gradient accumulation, ``num_items_in_batch`` and data parallelism is the Trainer's own). On
the first micro-batch of every optimizer step the penalty ``reg()`` (float32) gets its own
backward pass through ``accelerator.backward``, so the accumulated gradient is
``grad(task) + grad(reg)`` whatever ``gradient_accumulation_steps`` is. Under DDP and FSDP2 every
rank adds the same penalty gradient (FSDP2: to its shard), which the averaging over ranks leaves
unchanged. Under DeepSpeed (whose ``backward`` also steps the engine, and whose ZeRO-3 weights exist
only inside forward and backward) the penalty joins that micro-batch's loss instead, multiplied by
what ``training_step`` divides the loss by and with zero value (``loss + (c*reg - (c*reg).detach())``),
so the gradient is the same and the logged loss stays the task loss. FSDP1 is refused
(``lalora.sharding``).

Logging: ``loss`` is the task loss only (as in a plain Trainer); ``lalora_penalty`` (mean over
the optimizer steps since the last log) and ``task_loss`` are logged next to it. With
``source_eval_dataset=`` (held-out source data) the trainer also logs ``source_loss`` at step 0 and every
``source_eval_steps`` steps (``trainer_source_eval``; docs/strength.md).

Strength: ``normalize="mean-diagonal"`` makes ``strength`` a multiple of the precision's mean diagonal
(``LaLoRARegularizer``, docs/strength.md); the default ``None`` takes it as lambda.

Checkpoints (``trainer_checkpoint``): every save writes ``lalora_precision.safetensors`` and
``lalora_regularizer.json`` next to the adapter weights; ``train(resume_from_checkpoint=...)``
reloads them (and skips the ``source_data=`` fit).

For other Trainer subclasses use the mixin, ``class MyTrainer(LaLoRATrainerMixin, SomeTrainer): pass``;
TRL's trainers come ready-made in ``lalora.integrations.trl``.
"""
from __future__ import annotations

import inspect
import logging
import os

import torch
from torch import nn
from transformers import Trainer

from ..coverage import check_uncovered_mode
from ..precision import Precision
from ..regularizer import LaLoRARegularizer
from ..sharding import sharding_of
from .trainer_checkpoint import PRECISION_FILE, STATE_FILE, CheckpointMixin, _same_precision
from .trainer_setup import (accept_trainer_config_changes, align_special_tokens, config_snapshot, launcher_of,
                            loss_divisor)
from .trainer_source_eval import SourceEvalCallback, check_source_eval

logger = logging.getLogger("lalora")

ANCHOR_MODES = ("check", "reset", "ignore")
__all__ = ["LaLoRATrainer", "LaLoRATrainerMixin", "PRECISION_FILE", "STATE_FILE", "_same_precision"]


def _split_fit_options(fit_precision, options: dict) -> dict:
    """``fit_options`` as ``fit_precision`` takes them: where it has an ``options=`` parameter for the backend's
    options, the keys that are not its own arguments go there (merged with a given ``options``)."""
    params = inspect.signature(fit_precision).parameters
    if "options" not in params:
        return dict(options)
    own = {k: v for k, v in options.items() if k in params}
    backend = {k: v for k, v in options.items() if k not in params}
    if backend:
        given = own.get("options")
        if given is not None and not isinstance(given, dict):
            raise TypeError(f"fit_options: give the backend options {sorted(backend)} inside fit_options['options'] "
                            f"(a {type(given).__name__}), not next to it")
        own["options"] = {**(given or {}), **backend}
    return own


class LaLoRATrainerMixin(CheckpointMixin):
    """Adds to a ``transformers.Trainer`` subclass: ``precision=`` (a ``Precision`` or a path to a precision
    file) or ``source_data=`` (fit one at the start of ``train()``, see below), ``strength=`` (lambda),
    ``prior_precision=``, ``form=``, ``adapter_name=``, ``anchor=`` ("check": raise ``AnchorMismatchError``
    unless the LoRA weights equal theta0; "reset": copy theta0 into them; "ignore") and ``uncovered=``
    ("warn", "error" or "ignore": trainable tensors the precision does not cover, docs/concepts.md#coverage),
    ``normalize=`` (None: ``strength`` is lambda; "mean-diagonal": multiples of the precision's mean diagonal),
    ``factor_dtype=`` ("auto", the default: the LoRA weights' dtype if it is bfloat16/float16, else float32;
    "bfloat16": Kronecker factors stored in bfloat16, a faster penalty at ~2e-3-1e-2 relative error;
    docs/training.md#factor-dtype),
    ``source_eval_dataset=`` and ``source_eval_steps=`` (log the held-out source loss as ``source_loss`` every
    that many optimizer steps; default: ``logging_steps``).

    ``source_data=`` (what ``lalora.fit_precision`` takes: a DataLoader or an iterable of batches), ``backend=``
    (default "diag") and ``fit_options=`` (a dict of further ``fit_precision`` arguments and backend
    options): ``train()`` fits the precision on ``self.model`` -- the model as the trainer wrapped it, e.g.
    by TRL's ``peft_config=`` -- before the first step, on every rank (each takes its share of the same
    ``source_data``), unless it resumes from a checkpoint that holds a precision."""

    def __init__(self, *args, precision: Precision | str | os.PathLike | None = None, strength: float | None = None,
                 prior_precision: float | None = None, form: str = "auto", adapter_name=None,
                 anchor: str = "check", uncovered: str = "warn", source_data=None, backend: str = "diag",
                 fit_options: dict | None = None, normalize: str | None = None, factor_dtype="auto", source_eval_dataset=None,
                 source_eval_steps: int | None = None, **kwargs):
        name = type(self).__name__
        if normalize not in (None, "mean-diagonal"):
            raise ValueError(f"{name}(normalize={normalize!r}) is unknown; use None or 'mean-diagonal'")
        source_eval_steps = check_source_eval(name, source_eval_dataset, source_eval_steps)
        if anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor={anchor!r} is unknown; use one of {ANCHOR_MODES}")
        check_uncovered_mode(uncovered, name)
        if precision is not None and source_data is not None:
            raise ValueError(f"{name} takes precision= (fitted beforehand) or source_data= (fitted at the start of "
                             "training), not both")
        if (precision is not None or source_data is not None) and strength is None:
            raise ValueError(f"{name} needs strength= (lambda) together with "
                             f"{'precision=' if precision is not None else 'source_data='}")
        if fit_options is not None and not isinstance(fit_options, dict):
            raise TypeError(f"{name}(fit_options=...) must be a dict of fit_precision arguments, "
                            f"got {type(fit_options).__name__}")
        model_arg = kwargs.get("model", args[0] if args else None)
        before = config_snapshot(model_arg if isinstance(model_arg, nn.Module) else None)
        super().__init__(*args, **kwargs)
        self._lalora_launcher = launcher_of(self)
        self._lalora_options = {"prior_precision": prior_precision, "form": form, "adapter_name": adapter_name,
                                "uncovered": uncovered, "normalize": normalize, "factor_dtype": factor_dtype}
        self.source_eval_history: list[dict] = []
        if source_eval_dataset is not None:
            self.add_callback(SourceEvalCallback(self, source_eval_dataset, source_eval_steps))
        self._lalora_strength = None if strength is None else float(strength)
        self._lalora_fit = None if source_data is None else (source_data, backend, dict(fit_options or {}))
        self.regularizer: LaLoRARegularizer | None = None
        self._lalora_step: int | None = None
        self._lalora_fuse = False
        self._lalora_bound = False
        self._lalora_penalty_sum = 0.0
        self._lalora_penalty_count = 0
        if precision is not None:
            if isinstance(precision, (str, os.PathLike)):
                precision = Precision.load(precision)  # checked against the model by the regularizer
            precision = accept_trainer_config_changes(precision, before, self.model)
            self._build_regularizer(precision, strength, check_anchor=anchor == "check")
            if anchor == "reset":
                self.regularizer.reset_to_anchor()

    # --- regularizer -----------------------------------------------------------------
    def _anchor_context(self) -> str | None:
        """Why the LoRA weights may differ from theta0 for this trainer (``lalora.anchor_check``)."""
        return None

    def _build_regularizer(self, precision: Precision, strength: float, *, check_anchor: bool,
                           uncovered: str | None = None) -> None:
        """The regularizer on ``self.model``; its errors and warnings name this trainer's arguments
        (``anchor=``, ``uncovered=``, ``adapter_name=``)."""
        opts = self._lalora_options
        self.regularizer = LaLoRARegularizer(self.model, precision, strength, prior_precision=opts["prior_precision"],
                                             form=opts["form"], adapter_name=opts["adapter_name"],
                                             check_anchor=False,
                                             uncovered=opts["uncovered"] if uncovered is None else uncovered,
                                             normalize=opts["normalize"], factor_dtype=opts["factor_dtype"],
                                             _caller=type(self).__name__)
        if check_anchor:
            self.regularizer.check_anchor(context=self._anchor_context())

    def _fit_at_start(self) -> None:
        from ..fit import fit_precision

        data, backend, options = self._lalora_fit
        name = type(self).__name__
        adapters_sharding = sharding_of(p for p in self.model.parameters() if p.requires_grad)
        if adapters_sharding is not None:
            raise NotImplementedError(
                f"{name}(source_data=...): the model's weights are already sharded ({adapters_sharding}, e.g. "
                "loaded under a DeepSpeed ZeRO-3 config through deepspeed.zero.Init), so the fit cannot run its "
                "forward passes; fit on the model loaded without sharding and pass precision= instead")
        options = _split_fit_options(fit_precision, options)
        options.setdefault("progress", False)
        options.setdefault("adapter_name", self._lalora_options["adapter_name"])
        options.setdefault("uncovered", self._lalora_options["uncovered"])
        logger.info("lalora: %s fits the precision (%s) before the first step", name, backend)
        precision = fit_precision(self.model, data, backend, _caller=name, **options)
        # fitted at the current weights: theta0 is where training starts
        self._build_regularizer(precision, self._lalora_strength, check_anchor=False, uncovered="ignore")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        before = config_snapshot(self.model)
        align_special_tokens(self)
        if self.regularizer is not None:  # record the aligned config, as the checkpoints will have it
            accepted = accept_trainer_config_changes(self.regularizer.precision, before, self.model)
            self.regularizer.precision.metadata.update(accepted.metadata)
        elif self._lalora_fit is not None and self._checkpoint_precision(resume_from_checkpoint) is None:
            self._fit_at_start()
        self._lalora_bound = False  # accelerate's prepare (FSDP2, DeepSpeed) may replace the LoRA Parameters
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _bind_regularizer(self) -> LaLoRARegularizer:
        reg = self.regularizer
        if reg is None:
            raise ValueError(f"{type(self).__name__} has no precision: pass precision= and strength=, or "
                             f"source_data= and strength=, or resume from a checkpoint that holds {PRECISION_FILE}")
        if not self._lalora_bound:
            reg.rebind(self.model)
            device = next(iter(reg._params.values())).device
            if reg.precision.anchor[reg.precision.param_names[0]].device != device:
                reg.to(device)
            self._lalora_bound = True
        return reg

    def _penalty(self) -> torch.Tensor:
        penalty = self.regularizer()
        self._lalora_penalty_sum += float(penalty.detach())
        self._lalora_penalty_count += 1
        return penalty

    # --- the penalty, once per optimizer step ------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self._bind_regularizer()
        first = self._lalora_step != self.state.global_step  # first micro-batch of this optimizer step
        self._lalora_step = self.state.global_step
        if self._lalora_launcher == "deepspeed":
            self._lalora_fuse = first  # compute_loss adds the penalty to this micro-batch's loss
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._lalora_fuse = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        if first:
            # accelerator.backward divides by its own accumulation steps (1 under Trainer): undo it.
            self.accelerator.backward(self._penalty() * self.accelerator.gradient_accumulation_steps)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not self._lalora_fuse:
            return out
        self._lalora_fuse = False
        scaled = self._penalty() * loss_divisor(self, num_items_in_batch)
        extra = scaled - scaled.detach()  # exactly 0: the loss keeps its value, the gradient gets grad(reg)
        if return_outputs:
            loss, outputs = out
            return loss + extra.to(loss.dtype), outputs
        return out + extra.to(out.dtype)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._lalora_penalty_count:
            logs["task_loss"] = logs["loss"]
            logs["lalora_penalty"] = self._lalora_penalty_sum / self._lalora_penalty_count
            self._lalora_penalty_sum, self._lalora_penalty_count = 0.0, 0
        super().log(logs, *args, **kwargs)


class LaLoRATrainer(LaLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` with the LaLoRA penalty; see the module docstring."""

