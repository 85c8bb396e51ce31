"""The local data of lalora's lm-eval tasks, and the functions their YAML files name.

The shipped tasks (``lalora/evaluation/tasks/*.yaml``) read two JSON-lines files from one folder,
the *task data folder*:

- ``source.jsonl``: ``{"text": ...}`` per held-out source text (task ``lalora_source``, rolling
  log-likelihood: perplexity and bits per byte);
- ``source_conditional.jsonl``: the same texts split for one tokenizer into ``context`` (the first
  token) and ``continuation`` (the rest, with ``num_tokens``): task ``lalora_source_conditional``, the
  benchmark's own convention (its first token is context only, nothing is prepended), so its token
  perplexity is the one ``lalora bench`` reports;
- ``arithmetic.jsonl``: ``{"prompt": ..., "completion": ..., "answer": int}`` per problem (task
  ``lalora_arithmetic``, greedy generation, exact match of the stated final number).

The folder reaches the tasks through lm-eval's task metadata (``lalora_data_dir``): ``lalora.evaluate``
and ``lalora eval`` pass it; with lm-eval's own command line use
``--metadata '{"lalora_data_dir": "DIR"}'``. The files are read with ``json`` and turned into
``datasets.Dataset`` objects in memory: nothing is downloaded, no hub is asked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic_file import atomic_write_text
from ..errors import DataError

SOURCE_FILE = "source.jsonl"
CONDITIONAL_FILE = "source_conditional.jsonl"
ARITHMETIC_FILE = "arithmetic.jsonl"
INFO_FILE = "lalora-task-data.json"
DATA_DIR_KEY = "lalora_data_dir"


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def fingerprint(texts) -> str:
    """SHA-256 (first 16 hex digits) over the texts in order (each length-prefixed)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def truncate_texts(texts, tokenizer, max_length: int) -> list[str]:
    """Each text cut to what ``tokenizer(text, truncation=True, max_length=max_length)`` keeps, as text:
    the benchmark scores exactly those tokens (``lalora.textdata.text_batches``). The cut text is the
    decoded token prefix, and only when re-encoding it gives the same tokens back (else the shortest
    longer character prefix that does; the full text if none does)."""
    out = []
    for t in texts:
        full = tokenizer(t)["input_ids"]
        ids = tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= len(full):
            out.append(t)
            continue
        cut = tokenizer.decode(ids, skip_special_tokens=True)
        if tokenizer(cut)["input_ids"] != ids:
            cut = t  # decoding then encoding does not give the same tokens: keep the text whole
        out.append(cut)
    return out


def conditional_records(texts, tokenizer) -> tuple[list[dict], int]:
    """``{"context", "continuation", "num_tokens"}`` per text: the benchmark scores every token of
    ``tokenizer(text)`` but the first (a BOS the tokenizer adds, or the text's first token), given the
    tokens before it. As text: the context is the first token's text ("" when it is a special token:
    lm-eval then puts the tokenizer's BOS/EOS there), the continuation the rest; kept only where
    lm-eval's split (encode context + continuation, then the context) gives back exactly those tokens.
    Returns the records and how many texts could not be split so (left out)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out, dropped = [], 0
    for t in texts:
        ids = list(tokenizer(t)["input_ids"])
        if len(ids) < 2:
            dropped += 1
            continue
        if ids[0] in special:
            ctx, cont = "", t
            ok = list(tokenizer(t, add_special_tokens=False)["input_ids"]) == ids[1:]
        else:
            ctx = tokenizer.decode(ids[:1])
            cont = t[len(ctx):]
            ok = t.startswith(ctx) and ctx == ctx.rstrip() and list(tokenizer(ctx)["input_ids"]) == ids[:1]
        if ok:
            out.append({"context": ctx, "continuation": cont, "num_tokens": len(ids) - 1})
        else:
            dropped += 1
    return out, dropped


def write_task_data(directory, source_texts=None, problems=None, tokenizer=None, info: dict | None = None) -> dict:
    """Write the task data folder: ``source.jsonl`` from ``source_texts`` (strings), with a ``tokenizer`` also
    ``source_conditional.jsonl`` (``conditional_records``), and ``arithmetic.jsonl`` from ``problems``
    (``(prompt, completion, answer)`` as ``lalora.bench.tasks.arithmetic_set`` makes them), each written
    atomically; a file whose argument is None is left as it is. Returns (and writes as
    ``lalora-task-data.json``) what was written: counts, fingerprints and ``info``."""
    d = Path(directory)
    summary = {"dir": str(d.resolve()), **(info or {})}
    if source_texts is not None:
        texts = [str(t) for t in source_texts]
        if not texts:
            raise DataError("write_task_data: source_texts is empty")
        atomic_write_text(d / SOURCE_FILE, _jsonl({"text": t} for t in texts))
        summary["source"] = {"file": SOURCE_FILE, "n": len(texts), "text_fingerprint": fingerprint(texts)}
        if tokenizer is not None:
            recs, dropped = conditional_records(texts, tokenizer)
            if not recs:
                raise DataError("write_task_data: no source text splits into first token + rest for this tokenizer")
            atomic_write_text(d / CONDITIONAL_FILE, _jsonl(recs))
            summary["source_conditional"] = {"file": CONDITIONAL_FILE, "n": len(recs), "left_out": dropped,
                                             "tokenizer": getattr(tokenizer, "name_or_path", None) or None,
                                             "num_tokens": sum(r["num_tokens"] for r in recs)}
    if problems is not None:
        recs = [{"prompt": p, "completion": c, "answer": int(a)} for p, c, a in problems]
        if not recs:
            raise DataError("write_task_data: problems is empty")
        atomic_write_text(d / ARITHMETIC_FILE, _jsonl(recs))
        summary["arithmetic"] = {"file": ARITHMETIC_FILE, "n": len(recs),
                                 "text_fingerprint": fingerprint(r["prompt"] for r in recs)}
    atomic_write_text(d / INFO_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def benchmark_task_data(directory, *, source: str = "fortunes", seed: int = 0, n_source_eval: int = 48,
                        n_source_fit: int = 32, n_target_eval: int = 32, tokenizer=None,
                        max_length: int | None = 64) -> dict:
    """Write the evaluation data of ``lalora bench`` (the same held-out source texts and test problems as
    ``run_benchmark`` with these settings: ``BenchConfig`` names them alike) into ``directory``. With a
    ``tokenizer``, each source text is cut to the ``max_length`` tokens the benchmark scores, and the
    conditional source file is written too."""
    from ..bench import tasks

    texts = tasks.source_texts(source, seed)
    _, eval_texts = tasks.split_source(texts, n_source_fit, n_source_eval)
    if tokenizer is not None and max_length:
        eval_texts = truncate_texts(eval_texts, tokenizer, max_length)
    problems = tasks.arithmetic_set(n_target_eval, seed + 2)
    info = {"made_by": "lalora.evaluation.benchmark_task_data", "source_name": source, "seed": seed,
            "n_source_eval": n_source_eval, "n_source_fit": n_source_fit, "n_target_eval": n_target_eval,
            "max_length": max_length if tokenizer is not None else None,
            "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    return write_task_data(directory, eval_texts, problems, tokenizer=tokenizer, info=info)


# --- what the task YAML files call (lm-eval passes the task metadata as keyword arguments) -------------


def _data_file(name: str, task: str, kwargs: dict) -> Path:
    d = kwargs.get(DATA_DIR_KEY)
    if not d:
        raise DataError(f"lm-eval task {task!r} needs its data folder: pass data_dir= to lalora.evaluate, "
                        f"--data-dir to `lalora eval`, or --metadata '{{\"{DATA_DIR_KEY}\": \"DIR\"}}' to lm_eval "
                        f"(write one with lalora.evaluation.benchmark_task_data)")
    p = Path(d) / name
    if not p.is_file():
        raise DataError(f"lm-eval task {task!r}: no data file {p} (write it with lalora.evaluation.write_task_data "
                        f"or benchmark_task_data)")
    return p


def _read_jsonl(path: Path, fields: tuple, task: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"lm-eval task {task!r}: {path} line {i} is not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DataError(f"lm-eval task {task!r}: {path} line {i} lacks the field {missing[0]!r}")
            out.append({k: rec[k] for k in fields})
    if not out:
        raise DataError(f"lm-eval task {task!r}: {path} holds no records")
    return out


def _as_dataset(records):
    import datasets

    return {"test": datasets.Dataset.from_list(records)}


def load_source(**kwargs):
    """``custom_dataset`` of ``lalora_source``: the ``text`` records of ``source.jsonl``."""
    return _as_dataset(_read_jsonl(_data_file(SOURCE_FILE, "lalora_source", kwargs), ("text",), "lalora_source"))


def load_conditional(**kwargs):
    """``custom_dataset`` of ``lalora_source_conditional``: the records of ``source_conditional.jsonl``."""
    name = "lalora_source_conditional"
    recs = _read_jsonl(_data_file(CONDITIONAL_FILE, name, kwargs), ("context", "continuation", "num_tokens"), name)
    return _as_dataset(recs)


def conditional_results(doc, results) -> dict:
    """``process_results`` of ``lalora_source_conditional``: per-token perplexity over the ``num_tokens``
    scored tokens (written with the tokenizer) and bits per byte of the continuation."""
    ll, _ = results[0] if isinstance(results[0], (tuple, list)) else (results[0], None)
    return {"token_perplexity": (ll, int(doc["num_tokens"])),
            "bits_per_byte": (ll, max(1, len(doc["continuation"].encode("utf-8"))))}


def load_arithmetic(**kwargs):
    """``custom_dataset`` of ``lalora_arithmetic``: the problems of ``arithmetic.jsonl``."""
    recs = _read_jsonl(_data_file(ARITHMETIC_FILE, "lalora_arithmetic", kwargs), ("prompt", "answer"),
                       "lalora_arithmetic")
    return _as_dataset([{"prompt": r["prompt"], "answer": int(r["answer"])} for r in recs])


def arithmetic_results(doc, results) -> dict:
    """``process_results`` of ``lalora_arithmetic``: the benchmark's own answer parsing
    (``lalora.bench.tasks.parse_answer``: the first "The answer is N")."""
    from ..bench.tasks import parse_answer

    (generation,) = results
    return {"exact_match": float(parse_answer(generation) == int(doc["answer"]))}
