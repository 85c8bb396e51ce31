"""``lalora eval``: a model directory, with or without a peft adapter, through lm-evaluation-harness
(``lalora.evaluation.evaluate``); writes lm-eval's results JSON and prints its table. lm-eval (the ``eval``
extra) is imported only when the command runs.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError, LaloraError
from .common import EXIT_OK, UsageError, add_command

EXAMPLES = """
    lalora eval --model ./base --tasks lalora_source,lalora_arithmetic          # offline: the benchmark's data
    lalora eval --model ./base --adapter ./adapter --tasks lalora_source --data-dir ./eval-data
    lalora eval --model ./base --adapter ./adapter --tasks forgetting --limit 200   # HellaSwag, ARC-C, WinoGrande
    lalora eval --model ./base --tasks my_task --include-path ./my_tasks --out results.json
"""


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "eval", run, fmt, EXAMPLES, check=check,
                    help="evaluate a model (+ peft adapter) with lm-evaluation-harness tasks",
                    description="Run lm-evaluation-harness (pip install \"lalora[eval]\") on a base model, with or "
                                "without a peft adapter: lalora's own offline tasks (lalora_source: perplexity of "
                                "held-out source text; lalora_arithmetic: the benchmark's target task), any lm-eval "
                                "task by name, or 'forgetting' (hellaswag, arc_challenge, winogrande: Biderman et "
                                "al. 2024). Writes lm-eval's results JSON.")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--adapter", help="peft adapter directory to evaluate on top of --model")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names; 'forgetting' = "
                                                  "hellaswag,arc_challenge,winogrande")
    p.add_argument("--include-path", action="append", metavar="DIR", help="folder of more lm-eval task YAMLs (repeatable)")
    p.add_argument("--data-dir", help="data folder of lalora's tasks (source.jsonl, arithmetic.jsonl); an empty or new "
                                      "folder gets the benchmark's data (default: a temporary folder)")
    p.add_argument("--source", default="fortunes", choices=["fortunes", "pydoc"],
                   help="source text of the benchmark's data (default fortunes)")
    p.add_argument("--n-source-eval", type=int, default=48, help="held-out source texts in the benchmark's data (48)")
    p.add_argument("--n-target-eval", type=int, default=32, help="arithmetic problems in the benchmark's data (32)")
    p.add_argument("--source-max-length", type=int, default=64, help="tokens kept per source text (64, as the benchmark)")
    p.add_argument("--seed", type=int, default=0, help="seed of the benchmark's data (default 0)")
    p.add_argument("--out", default="lalora-eval.json", help="results JSON (default ./lalora-eval.json)")
    p.add_argument("--log-samples", action="store_true", help="also write every sample (<out>_samples_<task>.jsonl)")
    p.add_argument("--limit", type=float, help="at most this many examples per task (< 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no info logs")


def check(args) -> None:
    """The checks that need no file (run before anything is loaded)."""
    from ..evaluation.harness import task_names

    try:
        task_names(args.tasks)
    except LaloraError as e:
        raise UsageError(_cli_words(str(e))) from None
    for flag, v in (("--batch-size", args.batch_size), ("--n-source-eval", args.n_source_eval),
                    ("--n-target-eval", args.n_target_eval), ("--source-max-length", args.source_max_length),
                    ("--max-length", args.max_length)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")


@contextmanager
def _quiet_lm_eval(enabled: bool):
    """With ``-q``: lm-eval's logs at error level and tqdm bars off (``TQDM_DISABLE``); restored after."""
    if not enabled:
        yield
        return
    log = logging.getLogger("lm_eval")
    level, bars = log.level, os.environ.get("TQDM_DISABLE")
    log.setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        log.setLevel(level)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars


def check_paths(args) -> None:
    """The model, adapter, task folders and output path exist where they must."""
    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such directory")
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model}: not a model directory (no config.json); save one with save_pretrained")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {args.adapter}: not a peft adapter directory (no adapter_config.json)")
    for d in args.include_path or []:
        if not Path(d).is_dir():
            raise UsageError(f"--include-path {d}: no such directory")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a directory; name the results file")
    if not out.parent.exists():
        raise UsageError(f"--out {args.out}: folder {out.parent} does not exist")


def run(args) -> int:
    from ..evaluation.harness import evaluate, require_lm_eval

    check_paths(args)
    try:
        require_lm_eval()
    except LaloraError as e:
        raise UsageError(str(e)) from None
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    kwargs = {k: v for k, v in (("limit", limit), ("num_fewshot", args.num_fewshot)) if v is not None}
    options = {"source": args.source, "seed": args.seed, "n_source_eval": args.n_source_eval,
               "n_target_eval": args.n_target_eval, "max_length": args.source_max_length}
    with _quiet_lm_eval(args.quiet):
        try:
            results = evaluate(args.model, args.adapter, tasks=args.tasks, include_path=args.include_path,
                               data_dir=args.data_dir, task_data_options=options, output=args.out,
                               log_samples=args.log_samples, batch_size=args.batch_size, device=args.device,
                               dtype=args.dtype, max_length=args.max_length, **kwargs)
        except (DataError, LaloraError) as e:
            raise UsageError(_cli_words(str(e))) from None
    from lm_eval.utils import make_table

    print(make_table(results))
    score = results.get("lalora", {}).get("forgetting")
    if score:
        print(f"forgetting protocol (Biderman et al. 2024): mean {score['metric']} {score['mean']:.4f} over "
              + ", ".join(f"{t} {v:.4f}" for t, v in score["tasks"].items()))
    print(f"wrote {args.out}")
    return EXIT_OK


_FLAGS = {"data_dir": "--data-dir", "include_path": "--include-path", "tasks": "--tasks", "adapter": "--adapter",
          "model": "--model", "batch_size": "--batch-size", "max_length": "--max-length"}


def _cli_words(msg: str) -> str:
    """lalora.evaluate's argument names (``data_dir``, ``include_path=``, ...) at the start of the message or
    of a clause, as this command's flags."""
    return re.sub(r"(^|; |: )(" + "|".join(_FLAGS) + r")=?(?=[ :])", lambda m: m.group(1) + _FLAGS[m.group(2)], msg)
