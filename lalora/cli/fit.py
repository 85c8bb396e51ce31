"""``lalora fit``: fit a precision on source data and save it (``--dry-run``: estimate the cost, write nothing)."""
from __future__ import annotations

import math

from ..backend import get_backend
from ..errors import BackendError
from ..fit import fit_precision
from . import fit_source
from .common import EXIT_OK, UsageError, add_command, data_flags, lora_flags
from .fit_config import add_config_flags, check_config_mode, run_config_dry_run
from .inputs import add_lora, check_out, load_model, parse_options, read_records
from .output import jemalloc_hint
from .vocab import Vocabulary, to_cli

EXAMPLES = """
    lalora fit --model ./base --data source.jsonl --backend diag --out p.lalora
    lalora fit --model ./base --data source.jsonl --backend kfac --rank 16 --targets q_proj,v_proj --out p.lalora
    lalora fit --model ./base --adapter ./my-adapter --data source.jsonl --out p.lalora --backend kfac --option curvature=ef
    lalora fit --model ./base --data source.jsonl --backend kfac --option max_rank=256 --out p.lalora --dry-run
    lalora fit --model ./base --source-from-model 256 --temperature 1.0 --source-length 64 --backend kfac --out p.lalora
    lalora fit --dry-run --config llama-3.1-8b --backend kfac --rank 16 --dtype bfloat16 --batch-size 2 --max-length 2048 \
        --option max_rank=1024 --option max_memory=32GiB
"""


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "fit", run, fmt, EXAMPLES, help="fit a precision on source data", check=check,
                    vocabulary=lambda args, flags: Vocabulary("fit", flags, backends=[args.backend]),
                    description="Fit the curvature of the source loss w.r.t. the LoRA weights at their init "
                                "(theta0) and save it as a precision file.",
                    extra="data: .jsonl/.json records with 'text' (all tokens labelled) or 'prompt'+'completion' "
                          "(completion labelled)")
    p.add_argument("--model", help="local model directory (save_pretrained layout, with tokenizer); required unless "
                                   "--dry-run --config")
    p.add_argument("--data", help="source data file (.jsonl/.json; .csv/.parquet/.txt via datasets); required unless "
                                  "--source-from-model or --dry-run --config")
    p.add_argument("--backend", default="diag", help="curvature backend (see `lalora backends`; default diag)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="backend option, value read by its declared type (repeatable; `lalora backends NAME` lists them)")
    p.add_argument("--out", help="output precision file (e.g. precision.lalora); required unless --dry-run --config")
    p.add_argument("--uncovered", choices=["warn", "error", "ignore"], default="warn",
                   help="trainable tensors the precision does not cover (embedding LoRA, modules_to_save, ...): "
                        "warn naming them (default), stop with an error, or ignore them")
    p.add_argument("--others", choices=["diag", "none"], default="diag",
                   help="trainable tensors beside the LoRA matrices (modules_to_save, trainable tokens, DoRA magnitudes, "
                        "biases, ...): cover them with their per-example EF diagonal (default) or leave them out "
                        "(docs/variants.md)")
    p.add_argument("--max-batches", type=int, help="use at most this many batches")
    p.add_argument("--prior-precision", type=float, default=0.0, help="delta added to the precision (default 0)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave out source batches with a non-finite loss or gradient (default: stop and name the batch)")
    p.add_argument("--dry-run", nargs="?", type=int, const=2, metavar="N",
                   help="fit only N batches (default 2) and print the stored bytes, time and peak-memory estimates; "
                        "writes nothing")
    fit_source.add_source_flags(p)
    add_config_flags(p)
    lora_flags(p)
    data_flags(p)


def check(args) -> None:
    """The checks that need no file: the backend, its options, the numbers (run before anything is loaded)."""
    try:
        cls = get_backend(args.backend)
    except BackendError as e:
        raise UsageError(f"--backend: {to_cli(e)}") from None
    if check_config_mode(args):  # a dry run from a model config: no model, data or output
        return
    try:
        cls(**parse_options(args.option))
    except BackendError as e:
        raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
    fit_source.check_source_flags(args)
    if args.skip_nonfinite and not cls.supports_skip_nonfinite:
        raise UsageError(f"--skip-nonfinite: backend {args.backend!r} does not support skipping batches")
    if not (args.prior_precision >= 0 and math.isfinite(args.prior_precision)):
        raise UsageError(f"--prior-precision must be a finite number >= 0, got {args.prior_precision}")
    for flag, value in (("--max-batches", args.max_batches), ("--dry-run", args.dry_run), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def run(args) -> int:
    if args.config is not None:
        return run_config_dry_run(args)
    out = check_out(args.out)
    records = read_records(args.data) if args.data is not None else None
    jemalloc_hint(not args.quiet)
    model, tok = load_model(args.model, args.dtype)
    model = add_lora(model, args)
    batches, source = fit_source.source_batches(args, model, tok, records)  # --data or --source-from-model
    options = parse_options(args.option)
    if args.dry_run is not None:  # estimate from a few batches, write nothing (lalora/estimate.py)
        from ..estimate import estimate_fit

        total = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
        try:
            est = estimate_fit(model, batches, args.backend, num_batches=min(args.dry_run, total), total_batches=total,
                               options=options)
        except BackendError as e:
            raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
        print(est.format())
        return EXIT_OK
    try:
        precision = fit_precision(model, batches, backend=args.backend, progress=not args.quiet,
                                  max_batches=args.max_batches, prior_precision=args.prior_precision,
                                  skip_nonfinite=args.skip_nonfinite, options=options, uncovered=args.uncovered,
                                  source=source, others=args.others, _caller="lalora fit")
    except BackendError as e:
        raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
    precision.save(out)
    print(precision.summary())
    print(f"wrote {out}")
    return EXIT_OK
