"""What the ``lalora`` commands read: data files, model directories, LoRA setups, backend options, output
paths, and whether a precision belongs to the model at hand. Every problem is a ``UsageError`` naming the
flag or file at fault (exit code 2)."""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from .common import UsageError


def read_records(path, flag: str = "--data") -> list[dict]:
    """Records of a local ``.jsonl`` / ``.json`` file (a list of objects, or ``{"data": [...]}``);
    other extensions are read with ``datasets`` when it is installed. Errors name ``flag``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{flag} {path}: line {i} is not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{flag} {path}: not valid JSON ({e})") from None
        records = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(records, list):
            raise UsageError(f"{flag} {path}: expected a list of objects or {{\"data\": [...]}}")
    else:
        try:
            import datasets
        except ImportError:
            raise UsageError(f"{flag} {path}: use a .jsonl or .json file (install 'datasets' for {suffix} files)") from None
        kind = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(suffix)
        if kind is None:
            raise UsageError(f"{flag} {path}: unsupported extension {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
        records = list(datasets.load_dataset(kind, data_files=str(p), split="train"))
    if not records:
        raise UsageError(f"{flag} {path}: no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or not ("text" in r or ("prompt" in r and "completion" in r)):
            raise UsageError(f"{flag} {path}: record {i} needs a 'text' field or 'prompt' and 'completion' fields")
        for k in ("text", "prompt", "completion"):
            if k in r and not isinstance(r[k], str):
                raise UsageError(f"{flag} {path}: record {i} field {k!r} must be a string")
    return records


def make_batches(tokenizer, records: list[dict], batch_size: int, max_length: int, flag: str = "--data") -> list[dict]:
    """``text`` records: every token labelled; ``prompt``/``completion``: completion tokens only."""
    from ..textdata import completion_batches, text_batches

    texts = [r["text"] for r in records if "text" in r]
    pairs = [(r["prompt"], r["completion"]) for r in records if "text" not in r]
    out = []
    if texts:
        out += text_batches(tokenizer, texts, batch_size, max_length)
    if pairs:
        out += completion_batches(tokenizer, pairs, batch_size, max_length)
    if not out:
        raise UsageError(f"{flag}: every record tokenized to fewer than 2 tokens")
    return out


def load_model(path, dtype="float32"):
    from ..errors import LaloraError
    from ..local_model import load_model as _load

    try:
        model, tok = _load(path, dtype)
    except LaloraError as e:
        raise UsageError(str(e)) from None
    if tok is None:
        raise UsageError(f"--model {path}: no tokenizer in the model directory (save one with tokenizer.save_pretrained)")
    return model, tok


@contextmanager
def _peft_wrapping():
    """peft (0.21) reads ``model.is_gradient_checkpointing``, deprecated in transformers 5: a FutureWarning a
    CLI user can do nothing about, shown on every command. Only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, args, lora_config: dict | None = None):
    """Wrap ``model`` with LoRA: an existing ``--adapter`` dir, else the flags (or ``lora_config``)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if getattr(args, "adapter", None):
        a = Path(args.adapter)
        if not (a / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {args.adapter}: not a peft adapter directory (no adapter_config.json)")
        with _peft_wrapping():
            return PeftModel.from_pretrained(model, a, is_trainable=True)
    cfg = dict(lora_config or {})
    r = args.rank if args.rank is not None else cfg.get("r", 8)
    alpha = args.alpha if args.alpha is not None else cfg.get("lora_alpha", 2 * r)
    targets = args.targets.split(",") if args.targets else cfg.get("target_modules", "all-linear")
    init = args.init if args.init is not None else cfg.get("init_lora_weights", "orthogonal")
    if init in ("true", "True"):
        init = True
    if r < 1:
        raise UsageError(f"--rank must be >= 1, got {r}")
    if init == "orthogonal" and r % 2:
        raise UsageError(f"--rank {r}: the orthogonal init needs an even rank (or pass --init gaussian)")
    torch.manual_seed(args.seed)
    try:
        with _peft_wrapping():
            return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                    init_lora_weights=init, task_type="CAUSAL_LM"))
    except ValueError as e:
        source = "--targets" if args.targets or not cfg.get("target_modules") else "the precision's target modules"
        raise UsageError(f"{source} {targets}: {e}") from None


def model_with_lora(args, precision, precision_flag: str | None):
    """The model of ``--model`` (``--dtype``) with LoRA from the flags, defaulting to ``precision``'s LoRA setup
    (checked against the model first; ``precision_flag`` names it in errors), and its tokenizer."""
    model, tok = load_model(args.model, args.dtype)
    lora_config = None
    if precision is not None:
        check_precision_model(precision, model, precision_flag, args.model)
        lora_config = (precision.metadata.get("lora_config") or {}).get("default")
    return add_lora(model, args, lora_config), tok


def _module_of(param: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A[.adapter]`` -> ``model.layers.0.self_attn.q_proj``."""
    return re.sub(r"\.lora_[AB](\.[^.]+)?$", "", param)


def check_precision_model(precision, model, precision_flag: str, model_path) -> None:
    """Refuse a precision fitted on another base model (config hash or layer names differ) before the model is
    wrapped with the precision's LoRA setup, where it would show up as target modules that are not found."""
    from ..validation import config_hash

    meta = precision.metadata
    modules = {name for name, _ in model.named_modules()}
    missing = next((n for n in precision.param_names if _module_of(n) not in modules), None)
    want, have = meta.get("config_hash"), config_hash(model)
    if missing is None and not (want and have and want != have):
        return
    this = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    msg = (f"{precision_flag} was fitted on another base model than --model {model_path}: the precision's base model is "
           f"{meta.get('base_model')!r} (config hash {want}), this one is {this!r} (config hash {have})")
    if missing is not None:
        msg += f"; the precision's parameter {missing!r} has no layer {_module_of(missing)!r} in this model"
    raise UsageError(msg + ". Fit a precision on this model with `lalora fit`")


def parse_options(items) -> dict:
    """``--option key=value`` pairs; each value is read by the option's declared type (``lalora.options``)."""
    from ..options import parse_option_items

    try:
        return parse_option_items(items)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_out(path, what="--out") -> Path:
    p = Path(path)
    if not p.parent.exists() if p.parent != Path("") else False:
        raise UsageError(f"{what} {path}: directory {p.parent} does not exist")
    return p
