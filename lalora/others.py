"""The trainable tensors beside the linear LoRA matrices ("others") and their canonical names.

The structured backends model the ``lora_A``/``lora_B`` weights of linear LoRA layers. A peft model
may train more: ``modules_to_save`` copies, ``trainable_token_indices`` rows, DoRA's
``lora_magnitude_vector``, LoRA biases (``lora_bias=True``), base biases (``bias="lora_only"/"all"``),
LoRA on parameters (``target_parameters``, peft's ``ParamWrapper``: its lora_A/lora_B are never called
as modules) and any weight the user unfroze. ``fit_precision(others="diag")`` covers them with the
generic per-example empirical-Fisher diagonal (``lalora.pergrad``); see docs/variants.md.

Not "others": LoRA on embeddings (``lora_embedding_A/B``, left to its own forms) and LoRA weights of
adapters that are not selected (``adapter_name=``): those stay reported by ``lalora.coverage``.

Canonical name of an other tensor: its path in the base model (``canonical_module_path``) without the
peft adapter name after peft's per-adapter containers (``modules_to_save.default.weight`` ->
``modules_to_save.weight``) when one adapter is selected, as for the LoRA matrices.
"""
from __future__ import annotations

from torch import nn

from .adapters import LoraAdapter, base_model_of, canonical_module_path, trainable_kind
from .errors import BackendError

#: peft's per-adapter containers: the path segment after one of them is an adapter name
CONTAINERS = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save", "trainable_tokens_delta",
              "lora_embedding_A", "lora_embedding_B")
OTHERS_MODES = ("diag", "none")


def check_others_mode(others: str, caller: str) -> None:
    if others not in OTHERS_MODES:
        raise ValueError(f"{caller}: others={others!r} is unknown; use one of {OTHERS_MODES}")


def _adapter_segment(parts: list[str]) -> int | None:
    """Index of the adapter-name segment in a parameter path (after a peft container), or None."""
    for i, p in enumerate(parts[:-1]):
        if p in CONTAINERS:
            return i + 1
    return None


def other_canonical_name(path: str, drop_adapter: str | None) -> str:
    """Canonical name of the base-model parameter ``path``; ``drop_adapter``: the one selected adapter's name
    (removed after a peft container), or None with several adapters (the name is kept)."""
    parts = canonical_module_path(path).split(".")
    i = _adapter_segment(parts)
    if drop_adapter is not None and i is not None and parts[i] == drop_adapter:
        del parts[i]
    return ".".join(parts)


def _selected(adapters: list[LoraAdapter]) -> tuple[set[str], str | None]:
    names = {a.adapter_name for a in adapters}
    return names, (next(iter(names)) if len(names) == 1 else None)


def named_others(model: nn.Module, adapters: list[LoraAdapter], *, trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter of every tensor of ``model`` beside the adapters' linear LoRA matrices
    (``trainable_only``: those that require grad now, and not LoRA on embeddings nor LoRA weights of
    adapters that are not selected; ``False``: every parameter, to resolve a precision's names)."""
    lora = {id(p) for a in adapters for p in (a.A, a.B)}
    names, drop = _selected(adapters)
    out: dict[str, nn.Parameter] = {}
    for path, p in base_model_of(model).named_parameters():
        if id(p) in lora:
            continue
        if trainable_only:
            if not p.requires_grad:
                continue
            kind = trainable_kind(path)
            parts = path.split(".")
            i = _adapter_segment(parts)
            if kind == "embedding_lora" or (kind == "lora" and (i is None or parts[i] not in names)):
                continue
        out[other_canonical_name(path, drop)] = p
    return out


def resolve_others(model: nn.Module, adapters: list[LoraAdapter], names) -> dict[str, nn.Parameter]:
    """The model's parameters for those of ``names`` that are not LoRA matrices of ``adapters`` and that the model
    has (by canonical name); the caller reports the missing ones."""
    lora = {n for a in adapters for n in (a.a_name, a.b_name)}
    wanted = [n for n in names if n not in lora]
    if not wanted:
        return {}
    everything = named_others(model, adapters, trainable_only=False)
    return {n: everything[n] for n in wanted if n in everything}


def check_variants(backend, adapters: list[LoraAdapter], caller: str = "fit_precision") -> None:
    """Refuse DoRA adapters for a backend that does not model them (``supports_dora``), naming the layer."""
    dora = [a for a in adapters if a.magnitude is not None]
    if dora and not getattr(backend, "supports_dora", False):
        a = dora[0]
        raise BackendError(
            f"{caller}: backend {backend.name!r} does not support DoRA (LoraConfig(use_dora=True)); adapter "
            f"{a.adapter_name!r} on layer {a.name!r}" + (f" and {len(dora) - 1} more" if len(dora) > 1 else "")
            + " uses it. DoRA rescales each output channel by magnitude / ||W0 + s B A||, and its forward calls "
            "lora_B(lora_A(eye)) for that norm, so the layer-input and output-gradient factors a Kronecker or "
            "second-order backend builds from hooks do not describe the weights' curvature. Use backend 'diag' or "
            "'block' (exact per-example gradients, the magnitude vector included)")


def other_kinds(others: dict[str, nn.Parameter]) -> dict[str, str]:
    """Canonical name -> what it is (``lalora.adapters.trainable_kind``), for the precision's metadata."""
    return {n: trainable_kind(n) for n in others}
