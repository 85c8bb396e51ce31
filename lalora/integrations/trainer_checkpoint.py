"""Checkpoints of ``LaLoRATrainerMixin``: every save writes the precision (``Precision.save``, no pickle) and
the regularizer's settings next to the adapter weights; resuming reloads them, so training continues with
the same anchor."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import AnchorMismatchError
from ..precision import Precision

PRECISION_FILE = "lalora_precision.safetensors"
STATE_FILE = "lalora_regularizer.json"


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


class CheckpointMixin:
    """``_save`` / ``_load_from_checkpoint`` of a Trainer with a LaLoRA regularizer."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.regularizer is None or not self.args.should_save:
            return
        out = Path(output_dir)
        self.regularizer.precision.save(out / PRECISION_FILE)
        state = {"strength": self.regularizer.strength, "prior_precision": self.regularizer.prior_precision,
                 "form": self.regularizer.form, "normalize": self.regularizer.normalize,
                 "scale": self.regularizer.scale, "global_step": self.state.global_step}
        tmp = out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, out / STATE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt = Path(resume_from_checkpoint)
        path = ckpt / PRECISION_FILE
        name = type(self).__name__
        if not path.is_file():
            if self.regularizer is None:
                raise ValueError(f"checkpoint {str(ckpt)!r} has no {PRECISION_FILE} and {name} got no "
                                 "precision=: pass the precision the run was started with")
            warnings.warn(f"checkpoint {str(ckpt)!r} has no {PRECISION_FILE}; continuing with the precision "
                          f"{name} was given or fitted", stacklevel=2)
            self._rebuild_after_load()
            return
        saved = Precision.load(path, self.model, adapter_name=self._lalora_options["adapter_name"])
        state_path = ckpt / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if self.regularizer is None:  # precision=None, or source_data= (the fit is skipped on resume)
            strength = self._lalora_strength
            if strength is None:
                if "strength" not in state:
                    raise ValueError(f"{state_path} is missing or has no 'strength'; pass strength= to {name}")
                strength = float(state["strength"])
            if self._lalora_options["prior_precision"] is None and "prior_precision" in state:
                self._lalora_options["prior_precision"] = float(state["prior_precision"])
            for key in ("form", "normalize"):  # how the run was started (a checkpoint without "normalize": None)
                if key in state:
                    self._lalora_options[key] = state[key]
            self._build_regularizer(saved, strength, check_anchor=False)
            return
        diff = _same_precision(self.regularizer.precision, saved)
        if diff is not None:
            raise AnchorMismatchError(
                f"the precision given to {name} differs from the one saved in {str(path)!r} ({diff}): resuming "
                "would regularize towards another anchor. Pass precision=None to continue with the checkpoint's")
        if "strength" in state and float(state["strength"]) != self.regularizer.strength:
            warnings.warn(f"strength={self.regularizer.strength:g} differs from the checkpoint's "
                          f"{float(state['strength']):g} ({state_path}); using {self.regularizer.strength:g}",
                          stacklevel=2)
        if "normalize" in state and state["normalize"] != self.regularizer.normalize:
            warnings.warn(f"normalize={self.regularizer.normalize!r} differs from the checkpoint's {state['normalize']!r} "
                          f"({state_path}): the penalty's lambda changes; using {self.regularizer.normalize!r}",
                          stacklevel=2)
        self._rebuild_after_load()

    def _checkpoint_precision(self, resume_from_checkpoint) -> Path | None:
        """The precision file of the checkpoint ``train(resume_from_checkpoint=...)`` will load, if any."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                return None
        path = Path(resume_from_checkpoint) / PRECISION_FILE
        return path if path.is_file() else None

    def _rebuild_after_load(self) -> None:
        """Loading adapter weights may replace the Parameter objects: re-resolve them."""
        reg = self.regularizer
        self._lalora_options["prior_precision"] = reg.prior_precision
        # coverage was reported when the regularizer was first built on this model
        self._build_regularizer(reg.precision, reg.strength, check_anchor=False, uncovered="ignore")


