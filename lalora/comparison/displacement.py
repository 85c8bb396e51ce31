"""A real fine-tuning displacement ``d = theta_T - theta0`` in the reference's flat parameter order."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import LaloraError, PrecisionFileError


def load_finetuned_weights(spec, names: Sequence[str]) -> dict[str, Tensor]:
    """theta_T (name -> tensor) from a peft adapter directory (``adapter_model.safetensors``), a
    safetensors adapter file, a precision file or ``Precision`` (its anchor) or a dict."""
    from ..precision import Precision

    if isinstance(spec, Precision):
        return dict(spec.anchor)
    if isinstance(spec, Mapping):
        return {k: torch.as_tensor(v) for k, v in spec.items()}
    path = Path(spec)
    if path.is_dir():
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise LaloraError(f"displacement: {str(path)!r} has no adapter_model.safetensors (only safetensors adapters "
                              "are read; pickle files are not loaded)")
        path = file
    if not path.is_file():
        raise LaloraError(f"displacement: {str(path)!r} does not exist")
    from ..fileformat import read_header

    with contextlib.suppress(PrecisionFileError):
        read_header(path)
        return dict(Precision.load(path).anchor)
    from safetensors.torch import load_file

    from ..adapters import canonical_module_path

    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        key = canonical_module_path(k)
        key = key[:-len(".weight")] if key.endswith(".weight") else key
        out[key] = v
    # peft drops the adapter name when saving; with several adapters canonical names end in ".<adapter>"
    for n in names:
        if n not in out:
            stem = n.rsplit(".", 1)[0]
            if stem in out and (stem.endswith(".lora_A") or stem.endswith(".lora_B")):
                out[n] = out[stem]
    return out


def displacement_vector(spec, names, shapes, anchor) -> Tensor | None:
    """``(P,)`` float64 ``theta_T - anchor`` in ``names`` order (None without ``spec``)."""
    if spec is None:
        return None
    theta = load_finetuned_weights(spec, names)
    parts = []
    for n in names:
        if n not in theta:
            raise LaloraError(f"displacement: no weight for LoRA parameter {n!r} (has {sorted(theta)[:3]}...)")
        t = theta[n].detach().double().cpu()
        if tuple(t.shape) != tuple(shapes[n]):
            raise LaloraError(f"displacement: {n!r} has shape {tuple(t.shape)}, expected {tuple(shapes[n])}")
        parts.append((t - anchor[n].double().cpu()).reshape(-1))
    return torch.cat(parts)
