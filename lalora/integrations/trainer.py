"""``LaLoRATrainer``: a ``transformers.Trainer`` that adds the LaLoRA penalty once per optimizer step.

    trainer = lalora.LaLoRATrainer(model=peft_model, args=args, train_dataset=ds,
                                   precision=precision, strength=1e3)
    trainer.train()

How the penalty enters: the task loss goes through the Trainer unchanged (so its scaling for
gradient accumulation, ``num_items_in_batch`` and data parallelism is the Trainer's own). On
the first micro-batch of every optimizer step the penalty ``reg()`` (float32) gets its own
backward pass through ``accelerator.backward``, so the accumulated gradient is
``grad(task) + grad(reg)`` whatever ``gradient_accumulation_steps`` is. Under DDP every rank
adds the same penalty gradient, which DDP's averaging leaves unchanged.

Logging: ``loss`` is the task loss only (as in a plain Trainer); ``lalora_penalty`` (mean over
the optimizer steps since the last log) and ``task_loss`` are logged next to it.

Checkpoints: every save writes ``lalora_precision.safetensors`` (``Precision.save``, no
pickle) and ``lalora_regularizer.json`` (strength, prior precision, form) next to the
adapter weights; ``train(resume_from_checkpoint=...)`` reloads them, so training continues with
the same anchor (with ``precision=None`` the checkpoint's precision is used).

For other Trainer subclasses (e.g. TRL's ``SFTTrainer``) use the mixin:
``class MySFT(LaLoRATrainerMixin, SFTTrainer): pass``. DeepSpeed and FSDP are not supported
(the regularizer needs the unsharded LoRA parameters).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from transformers import Trainer

from ..coverage import check_uncovered_mode
from ..errors import AnchorMismatchError
from ..precision import Precision
from ..regularizer import LaLoRARegularizer

logger = logging.getLogger("lalora")

PRECISION_FILE = "lalora_precision.safetensors"
STATE_FILE = "lalora_regularizer.json"
ANCHOR_MODES = ("check", "reset", "ignore")


def _same_precision(a: Precision, b: Precision) -> str | None:
    """None if ``a`` and ``b`` hold the same anchor and curvature; else what differs."""
    if a.param_names != b.param_names:
        return "parameter names"
    for n in a.param_names:
        if not torch.equal(a.anchor[n].detach().float().cpu(), b.anchor[n].detach().float().cpu()):
            return f"anchor of {n!r}"
    if len(a.blocks) != len(b.blocks):
        return "number of blocks"
    for i, (x, y) in enumerate(zip(a.blocks, b.blocks)):
        tx, ty = x.tensors(), y.tensors()
        if x.kind != y.kind or tuple(x.params) != tuple(y.params) or set(tx) != set(ty):
            return f"block {i} structure"
        for role in tx:
            if not torch.equal(tx[role].detach().float().cpu(), ty[role].detach().float().cpu()):
                return f"block {i} tensor {role!r}"
    if a.prior_precision != b.prior_precision:
        return "prior precision"
    return None


class LaLoRATrainerMixin:
    """Adds ``precision=`` (a ``Precision`` or a path to a precision file), ``strength=``
    (lambda), ``prior_precision=``, ``form=``, ``anchor=`` ("check": raise
    ``AnchorMismatchError`` unless the LoRA weights equal theta0; "reset": copy theta0 into
    them; "ignore") and ``uncovered=`` ("warn", "error" or "ignore": what to do about trainable
    tensors the precision does not cover, see docs/concepts.md#coverage) to a
    ``transformers.Trainer`` subclass."""

    def __init__(self, *args, precision: Precision | str | os.PathLike | None = None, strength: float | None = None,
                 prior_precision: float | None = None, form: str = "linearized", adapter_name=None,
                 anchor: str = "check", uncovered: str = "warn", **kwargs):
        if anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor={anchor!r} is unknown; use one of {ANCHOR_MODES}")
        check_uncovered_mode(uncovered, type(self).__name__)
        if precision is not None and strength is None:
            raise ValueError("LaLoRATrainer needs strength= (lambda) together with precision=")
        super().__init__(*args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError("LaLoRATrainer supports single-process and DDP training; DeepSpeed and FSDP "
                                      "shard the LoRA parameters the regularizer needs")
        self._lalora_options = {"prior_precision": prior_precision, "form": form, "adapter_name": adapter_name,
                                "uncovered": uncovered}
        self.regularizer: LaLoRARegularizer | None = None
        self._lalora_step: int | None = None
        self._lalora_penalty_sum = 0.0
        self._lalora_penalty_count = 0
        if precision is not None:
            if isinstance(precision, (str, os.PathLike)):
                precision = Precision.load(precision, self.model, adapter_name=adapter_name)
            if anchor == "reset":
                self._build_regularizer(precision, strength, check_anchor=False)
                self.regularizer.reset_to_anchor()
            else:
                self._build_regularizer(precision, strength, check_anchor=anchor == "check")

    # --- regularizer -----------------------------------------------------------------
    def _build_regularizer(self, precision: Precision, strength: float, *, check_anchor: bool,
                           uncovered: str | None = None) -> None:
        """The regularizer on ``self.model``; its errors and warnings name this trainer's arguments
        (``anchor=``, ``uncovered=``, ``adapter_name=``)."""
        opts = self._lalora_options
        self.regularizer = LaLoRARegularizer(self.model, precision, strength, prior_precision=opts["prior_precision"],
                                             form=opts["form"], adapter_name=opts["adapter_name"],
                                             check_anchor=check_anchor,
                                             uncovered=opts["uncovered"] if uncovered is None else uncovered,
                                             _caller=type(self).__name__)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.regularizer is None:
            raise ValueError("LaLoRATrainer has no precision: pass precision= and strength=, or resume from a "
                             f"checkpoint that holds {PRECISION_FILE}")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._lalora_step != self.state.global_step:  # first micro-batch of this optimizer step
            self._lalora_step = self.state.global_step
            penalty = self.regularizer()
            # accelerator.backward divides by its own accumulation steps (1 under Trainer): undo it.
            self.accelerator.backward(penalty * self.accelerator.gradient_accumulation_steps)
            self._lalora_penalty_sum += float(penalty.detach())
            self._lalora_penalty_count += 1
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._lalora_penalty_count:
            logs["task_loss"] = logs["loss"]
            logs["lalora_penalty"] = self._lalora_penalty_sum / self._lalora_penalty_count
            self._lalora_penalty_sum, self._lalora_penalty_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    # --- checkpoints -------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.regularizer is None or not self.args.should_save:
            return
        out = Path(output_dir)
        self.regularizer.precision.save(out / PRECISION_FILE)
        state = {"strength": self.regularizer.strength, "prior_precision": self.regularizer.prior_precision,
                 "form": self.regularizer.form, "global_step": self.state.global_step}
        tmp = out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, out / STATE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt = Path(resume_from_checkpoint)
        path = ckpt / PRECISION_FILE
        if not path.is_file():
            if self.regularizer is None:
                raise ValueError(f"checkpoint {str(ckpt)!r} has no {PRECISION_FILE} and LaLoRATrainer got no "
                                 "precision=: pass the precision the run was started with")
            warnings.warn(f"checkpoint {str(ckpt)!r} has no {PRECISION_FILE}; continuing with the precision given "
                          "to LaLoRATrainer", stacklevel=2)
            self._rebuild_after_load()
            return
        saved = Precision.load(path, self.model, adapter_name=self._lalora_options["adapter_name"])
        state_path = ckpt / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if self.regularizer is None:
            if "strength" not in state:
                raise ValueError(f"{state_path} is missing or has no 'strength'; pass strength= to LaLoRATrainer")
            if self._lalora_options["prior_precision"] is None and "prior_precision" in state:
                self._lalora_options["prior_precision"] = float(state["prior_precision"])
            if "form" in state:
                self._lalora_options["form"] = state["form"]
            self._build_regularizer(saved, float(state["strength"]), check_anchor=False)
            return
        diff = _same_precision(self.regularizer.precision, saved)
        if diff is not None:
            raise AnchorMismatchError(
                f"the precision given to LaLoRATrainer differs from the one saved in {str(path)!r} ({diff}): resuming "
                "would regularize towards another anchor. Pass precision=None to continue with the checkpoint's")
        if "strength" in state and float(state["strength"]) != self.regularizer.strength:
            warnings.warn(f"strength={self.regularizer.strength:g} differs from the checkpoint's "
                          f"{float(state['strength']):g} ({state_path}); using {self.regularizer.strength:g}",
                          stacklevel=2)
        self._rebuild_after_load()

    def _rebuild_after_load(self) -> None:
        """Loading adapter weights may replace the Parameter objects: re-resolve them."""
        reg = self.regularizer
        self._lalora_options["prior_precision"] = reg.prior_precision
        # coverage was reported when the regularizer was first built on this model
        self._build_regularizer(reg.precision, reg.strength, check_anchor=False, uncovered="ignore")


class LaLoRATrainer(LaLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` with the LaLoRA penalty; see the module docstring."""
