"""Model shapes from a config alone (no weights, no download): what ``lalora fit --dry-run --config`` reads.

``model_config(spec)`` takes a ``config.json`` path, a directory holding one, or a preset name
(``PRESETS``: the shapes of Llama-3.1-8B and Llama-3.1-70B, copied from their published ``config.json``);
``lora_layout(config, targets, rank)`` lists the LoRA adapters peft would add, with their shapes and the
input each one reads (q/k/v read the same normed hidden state, gate/up another): ``ShapeAdapter``s, which
the backends' ``stored_bytes`` / ``accumulator_bytes`` accept like real adapters (``A``, ``B`` are
``meta`` tensors: shapes without memory).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PRESETS", "ModelShape", "ShapeAdapter", "lora_layout", "model_config"]

_LLAMA_31 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "head_dim": 128,
             "tie_word_embeddings": False}
#: the shape fields of the published config.json of each model (meta-llama/Llama-3.1-8B, -70B)
PRESETS = {
    "llama-3.1-8b": {**_LLAMA_31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32},
    "llama-3.1-70b": {**_LLAMA_31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64},
}
#: model types whose decoder layers have the Llama projections (q/k/v/o, gate/up/down)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linear(self, proj: str) -> tuple[int, int, str]:
        """``(d_in, d_out, input)`` of projection ``proj``; ``input`` names what it reads (shared by q/k/v)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q, "attn_in"), "k_proj": (h, kv, "attn_in"), "v_proj": (h, kv, "attn_in"),
                "o_proj": (q, h, "o_in"), "gate_proj": (h, i, "mlp_in"), "up_proj": (h, i, "mlp_in"),
                "down_proj": (i, h, "down_in")}[proj]

    @property
    def num_params(self) -> int:
        """Parameters of the base model (embeddings, the output layer unless tied, projections, norms)."""
        per_layer = sum(self.linear(p)[0] * self.linear(p)[1] for p in PROJECTIONS) + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


@dataclass
class ShapeAdapter:
    """A LoRA adapter known by its shapes only (``A`` (r, d_in), ``B`` (d_out, r) on the ``meta`` device)."""

    key: str
    layer: int
    proj: str
    input: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 2.0
    embedding: bool = False  # a config's estimate puts LoRA on linear layers only
    magnitude: None = None  # no DoRA


def _read(spec) -> tuple[str, dict]:
    name = str(spec)
    if name.lower() in PRESETS:
        return name.lower(), dict(PRESETS[name.lower()])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model config {name!r} is neither a config.json file, a directory with one, nor a preset "
                         f"({', '.join(sorted(PRESETS))})")
    try:
        return str(path), json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model config {str(path)!r} is not valid JSON ({e})") from None


def model_config(spec) -> ModelShape:
    """The shapes of a model from its config (a ``config.json`` path, a directory, or a ``PRESETS`` name)."""
    name, cfg = _read(spec)
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") not in LLAMA_LIKE else cfg
    kind = cfg.get("model_type")
    if kind not in LLAMA_LIKE:
        raise ValueError(f"model config {name!r}: model_type {kind!r} is not supported by the shape estimate "
                         f"(supported: {', '.join(LLAMA_LIKE)}); run the dry run on the model itself (--model)")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"model config {name!r}: missing integer field(s) {missing}")
    heads = cfg["num_attention_heads"]
    return ModelShape(name=name, model_type=kind, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                      layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                      tied=bool(cfg.get("tie_word_embeddings", False)))


def lora_layout(shape: ModelShape, targets="all-linear", rank: int = 8, alpha: float | None = None) -> list[ShapeAdapter]:
    """The adapters of LoRA rank ``rank`` on ``targets`` ("all-linear" or projection names), in model order."""
    if isinstance(targets, str):
        targets = PROJECTIONS if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"targets {list(unknown or targets)} are not projections of a {shape.model_type} layer; "
                         f"use all-linear or some of {', '.join(PROJECTIONS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    scaling = (2.0 * rank if alpha is None else alpha) / rank
    out = []
    for layer in range(shape.layers):
        for proj in (p for p in PROJECTIONS if p in targets):
            d_in, d_out, source = shape.linear(proj)
            part = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            out.append(ShapeAdapter(f"model.layers.{layer}.{part}.{proj}", layer, proj, source,
                                    torch.empty(rank, d_in, device="meta"), torch.empty(d_out, rank, device="meta"),
                                    scaling))
    return out
