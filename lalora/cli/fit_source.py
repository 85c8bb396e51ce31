"""The source-data flags of ``lalora fit``: ``--data FILE`` (a user corpus) or ``--source-from-model N``
(text the base model generates itself, ``lalora.surrogate.generate_source``). Either way the precision's
``metadata["source"]`` says where its data came from."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..atomic_file import atomic_write_text
from ..errors import DataError
from .common import UsageError
from .inputs import make_batches

GEN_FLAGS = ("--source-prompts", "--temperature", "--source-length", "--source-seed", "--save-source")


def add_source_flags(p) -> None:
    """Add the surrogate-source flags to the ``fit`` parser (``--data`` stays where it is)."""
    g = p.add_argument_group("surrogate source data (instead of --data)")
    g.add_argument("--source-from-model", type=int, metavar="N",
                   help="fit on N texts the base model generates itself (adapters disabled); see docs/evaluation.md")
    g.add_argument("--source-prompts", metavar="FILE",
                   help="prompts to continue, cycled over the N texts: .txt (one per line) or .jsonl ('prompt' "
                        "or 'text'); default: start from the BOS token")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 1.0; 0 = greedy, needs N prompts)")
    g.add_argument("--source-length", type=int, metavar="L", help="new tokens per text at most (default 64)")
    g.add_argument("--source-seed", type=int, help="seed of the sampling (default: --seed)")
    g.add_argument("--save-source", metavar="FILE", help="also write the generated texts as .jsonl (reusable with --data)")


def check_source_flags(args) -> None:
    """Exactly one of --data / --source-from-model; generation flags only with --source-from-model."""
    n = getattr(args, "source_from_model", None)
    if args.data is None and n is None:
        raise UsageError("give the source data: --data FILE or --source-from-model N")
    if args.data is not None and n is not None:
        raise UsageError("--data and --source-from-model exclude each other")
    if n is None:
        given = [f for f in GEN_FLAGS if getattr(args, f[2:].replace("-", "_"), None) is not None]
        if given:
            raise UsageError(f"{given[0]} needs --source-from-model N")
        return
    if n < 1:
        raise UsageError(f"--source-from-model must be >= 1, got {n}")
    t = args.temperature
    if t is not None and not (t >= 0 and math.isfinite(t)):
        raise UsageError(f"--temperature must be a finite number >= 0, got {t}")
    if args.source_length is not None and args.source_length < 1:
        raise UsageError(f"--source-length must be >= 1, got {args.source_length}")
    if args.source_prompts is not None and not Path(args.source_prompts).is_file():
        raise UsageError(f"--source-prompts {args.source_prompts}: no such file")


def read_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ('prompt' or 'text' per record)."""
    p = Path(path)
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix.lower() != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise UsageError(f"--source-prompts {path}: line {i} is not valid JSON ({e.msg})") from None
            value = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(value, str):
                raise UsageError(f"--source-prompts {path}: record {i} needs a string 'prompt' or 'text' field")
            prompts.append(value)
    if not prompts:
        raise UsageError(f"--source-prompts {path}: no prompts")
    return prompts


def file_source(path, records) -> dict:
    """``metadata["source"]`` of a user corpus: the file, its SHA-256 and its record count."""
    p = Path(path)
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return {"kind": "file", "path": str(p.resolve()), "sha256": h, "records": len(records)}


def source_batches(args, model, tokenizer, records):
    """``(batches, metadata["source"])``: of the ``--data`` records, or generated (``--source-from-model``)."""
    if records is not None:
        return make_batches(tokenizer, records, args.batch_size, args.max_length), file_source(args.data, records)
    return generated_source_batches(args, model, tokenizer)


def generated_source_batches(args, model, tokenizer):
    """``(batches, metadata["source"])`` for ``--source-from-model N``; writes ``--save-source`` if given."""
    from ..surrogate import generate_source

    prompts = read_prompts(args.source_prompts) if args.source_prompts else None
    try:
        src = generate_source(model, tokenizer, args.source_from_model, prompts,
                              temperature=1.0 if args.temperature is None else args.temperature,
                              max_new_tokens=args.source_length or 64,
                              seed=args.seed if args.source_seed is None else args.source_seed,
                              batch_size=args.batch_size)
    except DataError as e:
        raise UsageError(str(e).replace("generate_source: ", "--source-from-model: ")) from None
    batches = src.batches(args.batch_size, max_length=args.max_length)
    if not batches:
        raise UsageError("--source-from-model: every generated text is empty (the model ended at once); "
                          "try --source-prompts or another --temperature")
    info = dict(src.provenance)
    if args.source_prompts:
        info["prompts_file"] = str(Path(args.source_prompts).resolve())
    if args.save_source:
        out = Path(args.save_source)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in src.records()))
        info["saved_to"] = str(out.resolve())
    return batches, info
