"""Coverage: every tensor the user trains is covered by the precision, or the user is told by name.

``fit_precision`` and ``LaLoRARegularizer`` compare the LoRA weights they cover with every
parameter that requires grad (``uncovered=``: ``"warn"``, the default, ``"error"`` or
``"ignore"``), and the regularizer refuses to penalise weights nobody trains
(``check_trainable``). See docs/concepts.md#coverage.
"""
from __future__ import annotations

import warnings

from torch import nn

from .adapters import name_list, uncovered_trainable
from .errors import ModelMismatchError, UncoveredParameterError, UncoveredParameterWarning, caller_option

UNCOVERED_MODES = ("warn", "error", "ignore")

# kind -> (why it is not covered, what to do)
_GENERIC = "{generic} (the default) covers them with the per-example EF diagonal"
_REASONS = {
    "embedding_lora": ("LoRA on embedding layers (peft's lora_embedding_A/B) is modelled only by the diag, kfac and "
                       "tri-kfac backends", "fit the precision with one of them, or leave the embedding out of "
                       "LoraConfig(target_modules=...)"),
    "modules_to_save": ("trainable full copies made by LoraConfig(modules_to_save=...) are not in the precision",
                        f"{_GENERIC}; or drop modules_to_save (or freeze these copies)"),
    "trainable_tokens": ("embedding rows trained by LoraConfig(trainable_token_indices=...) are not in the precision",
                         f"{_GENERIC}; or drop trainable_token_indices"),
    "dora_magnitude": ("DoRA magnitude vectors (LoraConfig(use_dora=True)) are not in the precision",
                       f"{_GENERIC}"),
    "lora_bias": ("LoRA biases (LoraConfig(lora_bias=True)) are not in the precision", f"{_GENERIC}"),
    "lora": ("LoRA weights of adapters the precision does not cover",
             "select every trained adapter with adapter_name=[...] when fitting, or freeze the others"),
    "lora_partial": ("LoRA weights of the selected adapter(s) that this precision leaves out (it was matched to the "
                     "model with strict=False)", "fit a precision on the same LoRA targets to cover them"),
    "other": ("trainable tensors that are not LoRA weights (e.g. LoraConfig(bias='all'/'lora_only') or "
              "parameters you unfroze) are not modelled by the backends",
              f"{_GENERIC}; or freeze them (p.requires_grad_(False)) if they should not drift"),
}


def check_uncovered_mode(uncovered: str, caller: str) -> str:
    if uncovered not in UNCOVERED_MODES:
        raise ValueError(f"{caller}: uncovered={uncovered!r} is unknown; use one of {UNCOVERED_MODES}")
    return uncovered


def uncovered_message(found: list[tuple[str, str]], num_trainable: int, caller: str) -> str:
    """The message naming every uncovered tensor (the first 10 of each kind plus a count), why
    it is not covered and what to do, in ``caller``'s vocabulary."""
    lines = [f"{caller}: {len(found)} of {num_trainable} trainable tensors are not covered by the precision, so "
             "they train without the LaLoRA penalty and can forget freely:"]
    for kind, (why, todo) in _REASONS.items():
        names = [n for n, k in found if k == kind]
        if names:
            generic = "lalora fit --others diag" if caller.startswith("lalora ") else "fit_precision(..., others='diag')"
            lines.append(f"  - {why}: {name_list(names)}; {todo.format(generic=generic)}.")
    lines.append(f"To accept this, pass {caller_option(caller, 'uncovered', 'ignore')}; "
                 f"to refuse it, pass {caller_option(caller, 'uncovered', 'error')}. See docs/concepts.md#coverage.")
    return "\n".join(lines)


def check_coverage(model: nn.Module, covered, uncovered: str, *, caller: str, selected=(),
                   stacklevel: int = 3) -> list[str]:
    """Warn (``"warn"``), raise ``UncoveredParameterError`` (``"error"``) or do nothing (``"ignore"``)
    when ``model`` has parameters that require grad and are not in ``covered``; returns their names.
    ``selected``: the LoRA parameters of the selected adapters (to tell a partial precision apart)."""
    covered = list(covered)
    found = uncovered_trainable(model, covered, selected)
    if found and uncovered != "ignore":
        n_covered = sum(1 for p in covered if p.requires_grad)
        msg = uncovered_message(found, len(found) + n_covered, caller)
        if uncovered == "error":
            raise UncoveredParameterError(msg)
        warnings.warn(msg, UncoveredParameterWarning, stacklevel=stacklevel)
    return [n for n, _ in found]


def check_trainable(params: dict, caller: str, *, stacklevel: int = 3) -> None:
    """``params``: canonical name -> the model's LoRA parameter the penalty acts on. Raise when none
    of them requires grad (the penalty would do nothing), warn naming the frozen ones otherwise."""
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if not frozen:
        return
    fix = ("load the adapter with PeftModel.from_pretrained(base, path, is_trainable=True) (its default "
           "is_trainable=False freezes it), or make the adapter active and trainable with model.set_adapter(name)")
    if len(frozen) == len(params):
        raise ModelMismatchError(
            f"{caller}: all {len(params)} LoRA weights the precision covers have requires_grad=False (an inactive "
            f"adapter, or one loaded for inference), so the penalty would do nothing: {fix}")
    warnings.warn(f"{caller}: {len(frozen)} of {len(params)} LoRA weights the precision covers have "
                  f"requires_grad=False and do not train: {name_list(frozen)}; the penalty on them does nothing. "
                  f"If they should train, {fix}", UserWarning, stacklevel=stacklevel)
