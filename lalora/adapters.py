"""Find the LoRA adapters of a peft model and give their weights canonical names.

A canonical name is the adapted module's path with wrapper prefixes removed
(``base_model.model.``, ``module.`` from DDP, ``_orig_mod.`` from torch.compile) plus
``.lora_A`` / ``.lora_B``; the peft adapter name is left out when one adapter is
selected, so a precision saved in one process applies to a freshly built model and
survives adapter renames. With several adapters selected the name ends in ``.<adapter>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BackendError, ModelMismatchError

_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")


def canonical_module_path(path: str) -> str:
    """Strip wrapper prefixes (peft, DDP, torch.compile) from a module path."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix):], True
    return path


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One LoRA adapter on one linear layer: ``y = W0 x + scaling * B (A x)``.

    ``A``: (r, d_in), ``B``: (d_out, r). ``a_name``/``b_name`` are the canonical names.
    ``embedding=True``: LoRA on an ``nn.Embedding`` (peft's ``lora_embedding_A/B`` Parameters, no
    ``lora_A``/``lora_B`` modules): the same form with ``x`` the one-hot token (``d_in`` = vocabulary),
    ``A = lora_embedding_A`` (r, vocab), ``B = lora_embedding_B`` (d_out, r), and ``scaling`` including
    the base layer's ``embed_scale`` (Gemma-style scaled embeddings); see ``lalora.capture_embedding``.
    """

    name: str  # canonical path of the adapted layer, e.g. "model.layers.0.self_attn.q_proj" (shared by
    # several adapters on one layer; ``key`` is unique per adapter)
    adapter_name: str  # peft adapter name, e.g. "default"
    module_path: str  # path of the peft layer in the base model
    layer: nn.Module
    lora_A: nn.Linear | None  # None for embedding LoRA
    lora_B: nn.Linear | None
    scaling: float
    a_name: str
    b_name: str
    embedding: bool = False
    #: DoRA (``use_dora=True``): the trainable magnitude vector (d_out,) and its canonical name
    #: (``<layer>.lora_magnitude_vector[.<adapter>].weight``, see ``lalora.others``); None otherwise
    magnitude: nn.Parameter | None = None
    magnitude_name: str | None = None

    @property
    def key(self) -> str:
        """Unique key of this adapter: the layer's canonical path, plus ``.<adapter>`` when several adapters
        are selected (``a_name`` without ``.lora_A``). Several adapters on one layer share ``name`` (the
        layer) but never ``key``: per-adapter state (factor sums, checkpoints) is keyed by it."""
        head, _, tail = self.a_name.rpartition(".lora_A")
        return head + tail

    @property
    def A(self) -> nn.Parameter:
        return self.layer.lora_embedding_A[self.adapter_name] if self.embedding else self.lora_A.weight

    @property
    def B(self) -> nn.Parameter:
        return self.layer.lora_embedding_B[self.adapter_name] if self.embedding else self.lora_B.weight

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def params(self) -> dict[str, nn.Parameter]:
        return {self.a_name: self.A, self.b_name: self.B}


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return None
    return LoraLayer


def find_lora_adapters(model: nn.Module, adapter_name: str | list[str] | None = None) -> list[LoraAdapter]:
    """Every LoRA adapter of ``model`` (in module order).

    ``adapter_name``: a peft adapter name or list of names; default: the active adapters.
    LoRA on embeddings comes as adapters with ``embedding=True`` (only some backends model them:
    ``CurvatureBackend.supports_embedding_lora``). DoRA adapters carry their ``magnitude``; a LoRA bias
    (``lora_bias=True``) and LoRA on parameters (``target_parameters``: peft's ``ParamWrapper``, whose
    lora_A/lora_B are never called as modules) are not adapters here but "others" (``lalora.others``).
    Raises ``BackendError`` for LoRA on convolutions and for a model whose only LoRA is on parameters, and
    ``ModelMismatchError`` when the model has no LoRA adapter.
    """
    LoraLayer = _lora_layer_class()
    found: list[tuple[str, str, nn.Module]] = []
    wrapped: list[str] = []  # LoRA on parameters (target_parameters)
    for path, module in base_model_of(model).named_modules():
        if LoraLayer is None or not isinstance(module, LoraLayer):
            continue
        if type(module).__name__ == "ParamWrapper":
            wrapped.append(path)
            continue
        if adapter_name is None:
            names = list(module.active_adapters)
        elif isinstance(adapter_name, str):
            names = [adapter_name]
        else:
            names = list(adapter_name)
        for name in names:
            if name in module.lora_A or name in getattr(module, "lora_embedding_A", {}):
                found.append((path, name, module))
    if not found:
        raise _no_adapter_error(adapter_name, wrapped)
    several = len({name for _, name, _ in found}) > 1
    adapters = []
    for path, name, module in found:
        if name not in module.lora_A:
            adapters.append(_embedding_adapter(path, name, module, several))
            continue
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        if not isinstance(lora_A, nn.Linear) or not isinstance(lora_B, nn.Linear):
            raise BackendError(f"LoRA adapter {name!r} at {path!r} is not a linear LoRA (found {type(lora_A).__name__}); "
                               "lalora supports LoRA on nn.Linear layers")
        canon = canonical_module_path(path)
        suffix = f".{name}" if several else ""
        magnitude = None
        if getattr(module, "use_dora", {}).get(name, False):
            magnitude = module.lora_magnitude_vector[name].weight
        adapters.append(LoraAdapter(
            name=canon, adapter_name=name, module_path=path, layer=module, lora_A=lora_A, lora_B=lora_B,
            scaling=float(module.scaling[name]), a_name=f"{canon}.lora_A{suffix}", b_name=f"{canon}.lora_B{suffix}",
            magnitude=magnitude, magnitude_name=None if magnitude is None else f"{canon}.lora_magnitude_vector{suffix}.weight",
        ))
    return adapters


def _no_adapter_error(adapter_name, wrapped: list[str]) -> Exception:
    """The error for a model without LoRA adapters: LoRA on parameters only, or none."""
    if wrapped:
        return BackendError(f"LoRA on parameters only (LoraConfig(target_parameters=...): {name_list(wrapped)}) is not "
                            "supported alone: add linear layers to LoraConfig(target_modules=...); the parameter "
                            "adapters are then covered by the generic diagonal (fit_precision(others='diag'))")
    return ModelMismatchError("model has no LoRA adapter" + (f" named {adapter_name!r}" if adapter_name is not None else "")
                              + ": wrap it with peft.get_peft_model(model, LoraConfig(...)) first")


def _embedding_adapter(path: str, name: str, module: nn.Module, several: bool) -> LoraAdapter:
    """The ``embedding=True`` adapter of peft's ``lora.Embedding`` ``module`` (canonical names ``.lora_A``/``.lora_B``
    like a linear adapter's: the same (r, d_in) / (d_out, r) matrices, ``d_in`` = vocabulary)."""
    from .capture_embedding import embedding_scaling  # the checks of the forward lalora's hooks reproduce

    canon = canonical_module_path(path)
    suffix = f".{name}" if several else ""
    return LoraAdapter(name=canon, adapter_name=name, module_path=path, layer=module, lora_A=None, lora_B=None,
                       scaling=embedding_scaling(module, name, path), a_name=f"{canon}.lora_A{suffix}",
                       b_name=f"{canon}.lora_B{suffix}", embedding=True)


def name_list(names: list[str], limit: int = 10) -> str:
    """``'a', 'b', ... (and N more)``: the first ``limit`` names, quoted."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def trainable_kind(name: str) -> str:
    """What a trainable parameter of a peft model is, from its name (peft 0.21 naming):
    ``"embedding_lora"`` (``lora_embedding_A/B``), ``"modules_to_save"`` (the trainable copy
    ``<module>.modules_to_save.<adapter>``), ``"trainable_tokens"`` (``trainable_token_indices``),
    ``"dora_magnitude"`` (``lora_magnitude_vector``), ``"lora_bias"`` (``lora_B``'s bias, ``lora_bias=True``),
    ``"lora"`` (LoRA weights) or ``"other"`` (any other tensor)."""
    parts = name.split(".")
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        return "embedding_lora"
    if "modules_to_save" in parts:
        return "modules_to_save"
    if "token_adapter" in parts or "trainable_tokens_delta" in parts:
        return "trainable_tokens"
    if "lora_magnitude_vector" in parts:
        return "dora_magnitude"
    if "lora_B" in parts and parts[-1] == "bias":
        return "lora_bias"
    if "lora_A" in parts or "lora_B" in parts:
        return "lora"
    return "other"


def uncovered_trainable(model: nn.Module, covered, selected=()) -> list[tuple[str, str]]:
    """``(name, kind)`` of every parameter of ``model`` that requires grad and is not one of
    ``covered`` (parameters, compared by identity), in ``model.named_parameters()`` order and
    naming; ``kind`` from ``trainable_kind``, or ``"lora_partial"`` for the parameters in
    ``selected`` (LoRA weights of the selected adapters that a partial precision leaves out)."""
    ids, partial = {id(p) for p in covered}, {id(p) for p in selected}
    return [(n, "lora_partial" if id(p) in partial else trainable_kind(n)) for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in ids]


def lora_parameters(adapters: list[LoraAdapter]) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter, A before B for each adapter, in module order."""
    out: dict[str, nn.Parameter] = {}
    for a in adapters:
        out.update(a.params())
    return out


def base_model_of(model: nn.Module) -> nn.Module:
    """The underlying base model (with LoRA layers inside), whatever wraps it: PeftModel,
    peft's LoraModel, DDP/DataParallel, torch.compile. Canonical names are paths in it."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover
        BaseTuner = ()
    for _ in range(10):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif BaseTuner and isinstance(model, BaseTuner):
            model = model.model
        else:
            break
    return model


def lora_config_summary(model: nn.Module, adapters: list[LoraAdapter]) -> dict:
    """JSON-able LoRA settings (r, alpha, targets, init) for the precision file's metadata."""
    configs = getattr(model, "peft_config", {}) or {}
    out = {}
    for name in sorted({a.adapter_name for a in adapters}):
        cfg = configs.get(name)
        if cfg is None:
            out[name] = {"r": next(a.rank for a in adapters if a.adapter_name == name)}
            continue
        targets = cfg.target_modules
        if isinstance(targets, (set, frozenset, list, tuple)):
            targets = sorted(targets)
        out[name] = {
            "r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets,
            "init_lora_weights": cfg.init_lora_weights if isinstance(cfg.init_lora_weights, (bool, str)) else str(cfg.init_lora_weights),
            "use_rslora": bool(getattr(cfg, "use_rslora", False)),
        }
    return out


def lora_param_shapes(adapters: list[LoraAdapter]) -> dict[str, tuple[int, ...]]:
    """Canonical name -> full shape (a DeepSpeed ZeRO-3 parameter is empty outside forward: its ``ds_shape``)."""
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in lora_parameters(adapters).items()}


@torch.no_grad()
def lora_state(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    """Canonical name -> detached float32 copy of the current LoRA weights."""
    return {n: p.detach().float().clone() for n, p in lora_parameters(adapters).items()}
