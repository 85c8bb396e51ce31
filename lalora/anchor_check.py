"""The message of ``AnchorMismatchError``: which weight differs, which adapters are involved, whether
the weights look trained (a reset would erase that), and what to do in the caller's vocabulary
(``LaLoRARegularizer`` arguments, a Trainer's ``anchor=``, or CLI flags)."""
from __future__ import annotations

import math

from torch import Tensor

from .errors import caller_option

#: relative distance |theta - theta0| / |theta0| below which a difference is round-off (e.g. a dtype
#: round trip), not another starting point
ROUND_OFF = 1e-3


def fitted_adapters(metadata: dict) -> list[str]:
    """The peft adapter names a precision was fitted on (``metadata["adapters"]``, else the keys of
    ``metadata["lora_config"]``); empty when the precision does not record them."""
    names = {v.get("adapter_name") for v in (metadata.get("adapters") or {}).values()
             if isinstance(v, dict) and v.get("adapter_name")}
    if not names and isinstance(metadata.get("lora_config"), dict):
        names = set(metadata["lora_config"])
    return sorted(names)


#: ``context=`` values: why the LoRA weights may differ from theta0 (set by the caller, e.g. a TRL trainer)
CONTEXTS = {
    "peft_config": "the trainer built the LoRA adapters itself from peft_config=, with a new random initialisation, "
                   "so they are not the weights the precision was fitted at",
}


def _is_trainer(caller: str) -> bool:
    return caller != "LaLoRARegularizer" and not caller.startswith("lalora ")


def _refit(caller: str) -> str:
    """How the caller fits a precision at the weights it trains."""
    if _is_trainer(caller):
        return (f"let the trainer fit the precision on the model it trains, at the start of training: "
                f"{caller}(..., source_data=..., backend=...) instead of precision=")
    return "fit a new precision at the current weights (lalora.fit_precision(model, source_data))"


def _advice(caller: str) -> tuple[str, str]:
    """(how to start from theta0, how to keep the current weights) for ``caller``."""
    if caller == "LaLoRARegularizer":
        return ("build the regularizer with check_anchor=False and call reg.reset_to_anchor()",
                "pass check_anchor=False")
    return caller_option(caller, "anchor", "reset"), caller_option(caller, "anchor", "ignore")


def anchor_mismatch_message(current: dict[str, Tensor], anchor: dict[str, Tensor], *, caller: str,
                            fitted: list[str], in_use: list[str], active: list[str] | None,
                            context: str | None = None) -> str:
    """``current``/``anchor``: canonical name -> float tensors on one device (the LoRA weights, theta0);
    ``context``: a key of ``CONTEXTS``."""
    if context is not None and context not in CONTEXTS:
        raise ValueError(f"context={context!r} is unknown; use one of {sorted(CONTEXTS)}")
    differ = [n for n in current if not bool((current[n] == anchor[n]).all())]
    first = differ[0]
    max_diff = float((current[first] - anchor[first]).abs().max())
    dist = math.sqrt(sum(float((current[n] - anchor[n]).square().sum()) for n in current))
    norm = math.sqrt(sum(float(anchor[n].square().sum()) for n in current))
    rel = dist / norm if norm > 0 else math.inf
    msg = (f"LoRA weight {first!r} differs from the precision's anchor theta0 (max abs diff {max_diff:.3g}; "
           f"{len(differ)} of {len(current)} LoRA matrices differ, |theta - theta0| / |theta0| = {rel:.3g}): "
           "the precision was fitted at another point.")
    if fitted and fitted != in_use:
        msg += (f" The precision was fitted on adapter(s) {fitted}, but the weights checked belong to adapter(s) "
                f"{in_use}" + (f" (active: {active})" if active is not None else "") +
                f": select the adapter it was fitted on with {caller_option(caller, 'adapter_name', fitted[0])} "
                f"or model.set_adapter({fitted[0]!r}).")
    elif fitted:
        msg += f" The precision was fitted on adapter(s) {fitted}, the ones in use."
    reset, keep = _advice(caller)
    if context == "peft_config":
        return msg + (f" Here {CONTEXTS[context]}. Either {_refit(caller)}, or, if the precision was fitted on the "
                      f"same base model with the same LoraConfig, start from its theta0: {reset}.")
    trained_b = [n for n in differ if ".lora_B" in n and not bool(anchor[n].any()) and bool(current[n].any())]
    if trained_b or rel > ROUND_OFF:
        refit = f"{_refit(caller)}, or, for a sequence of tasks, consolidate (docs/training.md#continual-learning)"
        if trained_b:
            msg += (f" The weights look trained ({len(trained_b)} lora_B matrices are non-zero where theta0's are all "
                    f"zero, e.g. {trained_b[0]!r}): resetting them to theta0 ERASES that training. To continue "
                    f"from them, {refit}.")
        else:
            msg += (" If these weights are the result of training (e.g. you continue fine-tuning a saved adapter), "
                    f"resetting them to theta0 erases that training: {refit}.")
        msg += f" If they are just another initialisation (e.g. another seed), start from theta0: {reset}."
    else:
        msg += f" To start from theta0: {reset}."
    return msg + f" To keep the current weights with this precision anyway (you know what you are doing): {keep}."
