"""The ``lalora`` command line: ``backends``, ``fit``, ``inspect``, ``compare``, ``finetune``, ``bench``, ``eval``.

Exit codes: 0 success; 2 bad arguments, paths or input files (the message names the one at
fault); 1 a failure while running; 130 interrupted; 141 stdout closed by the reader (``| head``).
Library messages are shown in CLI words (``lalora.cli_vocab``): flags, not Python arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path

from .cli_bench import add_bench_parser
from .cli_finetune import add_finetune_flags, check_finetune_args, cmd_finetune
# the input helpers live in lalora.cli_inputs; re-exported for lalora.compare.cli and scripts
from .cli_inputs import (UsageError, add_lora, check_out, check_precision_model, load_model,  # noqa: F401
                         make_batches, parse_options, read_records)
from .cli_output import EXIT_PIPE, jemalloc_hint, quiet_libraries, stdout_closed  # noqa: F401 (EXIT_PIPE: exit codes)
from .cli_vocab import Vocabulary, speaking, to_cli
from .evaluation import command as eval_command
from .surrogate import fit_flags

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


# --- commands --------------------------------------------------------------------------


def cmd_backends(args) -> int:
    from .backend import get_backend, list_backends
    from .errors import BackendError

    rows = []
    for name in list_backends():
        try:
            cls = get_backend(name)
        except BackendError as e:
            rows.append({"name": name, "available": False, "status": str(e), "curvature": None, "options": {}})
            continue
        ok, status = cls.available()
        rows.append({"name": name, "available": ok, "status": status, "curvature": cls.curvature,
                     "options": dict(cls.default_options), "option_help": dict(getattr(cls, "option_help", {}))})
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    for r in rows:
        mark = "yes" if r["available"] else "no "
        print(f"{r['name']:<10} available={mark} curvature={r['curvature'] or '-'}"
              + ("" if r["available"] else f"  ({r['status']})"))
        for k, v in r["options"].items():
            h = r.get("option_help", {}).get(k, "")
            print(f"    {k}={v!r}" + (f"  {h}" if h else ""))
    return EXIT_OK


def check_fit_args(args) -> None:
    """The checks that need no file: the backend, its options, the numbers (run before anything is loaded)."""
    from .backend import get_backend
    from .errors import BackendError

    try:
        cls = get_backend(args.backend)
    except BackendError as e:
        raise UsageError(f"--backend: {to_cli(e)}") from None
    try:
        cls(**parse_options(args.option))
    except BackendError as e:
        raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
    fit_flags.check_source_flags(args)
    if args.skip_nonfinite and not cls.supports_skip_nonfinite:
        raise UsageError(f"--skip-nonfinite: backend {args.backend!r} does not support skipping batches")
    if not (args.prior_precision >= 0 and math.isfinite(args.prior_precision)):
        raise UsageError(f"--prior-precision must be a finite number >= 0, got {args.prior_precision}")
    for flag, value in (("--max-batches", args.max_batches), ("--dry-run", args.dry_run), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def cmd_fit(args) -> int:
    import lalora

    out = check_out(args.out)
    records = read_records(args.data) if args.data else None
    jemalloc_hint(not args.quiet)
    model, tok = load_model(args.model, args.dtype)
    model = add_lora(model, args)
    batches, source = fit_flags.source_batches(args, model, tok, records)  # --data or --source-from-model
    options = parse_options(args.option)
    if args.dry_run is not None:  # estimate from a few batches, write nothing (lalora/estimate.py)
        from .estimate import estimate_fit

        total = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
        try:
            est = estimate_fit(model, batches, args.backend, num_batches=min(args.dry_run, total), total_batches=total,
                               **options)
        except lalora.BackendError as e:
            raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
        print(est.format())
        return EXIT_OK
    try:
        precision = lalora.fit_precision(model, batches, backend=args.backend, progress=not args.quiet,
                                         max_batches=args.max_batches, prior_precision=args.prior_precision,
                                         skip_nonfinite=args.skip_nonfinite, source=source, **options)
    except lalora.BackendError as e:
        raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
    precision.save(out)
    print(precision.summary())
    print(f"wrote {out}")
    return EXIT_OK


def spectrum_summary(precision) -> dict:
    """Quantiles of the diagonal of the precision over all LoRA weights, and its zero fraction."""
    import torch

    d = torch.cat([v.reshape(-1).double() for v in precision.diagonal().values()])
    q = torch.quantile(d[:: max(1, d.numel() // 1_000_000)], torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {"min": q[0].item(), "p10": q[1].item(), "median": q[2].item(), "p90": q[3].item(), "max": q[4].item(),
            "mean": d.mean().item(), "zero_fraction": (d == 0).double().mean().item(), "count": d.numel()}


def cmd_inspect(args) -> int:
    from .errors import PrecisionFileError
    from .precision import Precision

    p = Path(args.path)
    if not p.is_file():
        raise UsageError(f"{args.path}: no such file")
    try:
        precision = Precision.load(p)
    except (PrecisionFileError, ValueError, OSError) as e:
        raise UsageError(f"{args.path}: not a readable lalora precision file ({to_cli(e)})") from None
    spec = spectrum_summary(precision)
    blocks = [{"kind": b.kind, "params": list(b.params), "bytes": b.num_bytes, "describe": b.describe()} for b in precision.blocks]
    if args.json:
        print(json.dumps({"metadata": precision.metadata, "structure": precision.structure, "num_params": precision.num_params,
                          "num_bytes": precision.num_bytes, "prior_precision": precision.prior_precision, "blocks": blocks,
                          "diagonal_summary": spec, "zero_params": precision.zero_params()}, indent=1, default=str))
        return EXIT_OK
    print(f"file: {p} ({p.stat().st_size / 2**20:.2f} MiB)")
    print(precision.summary())
    print("diagonal spectrum: " + "  ".join(f"{k}={v:.3g}" for k, v in spec.items() if k != "count")
          + f"  (over {spec['count']:,} weights)")
    print("metadata:")
    for k, v in precision.metadata.items():
        s = json.dumps(v, default=str) if not isinstance(v, str) else v
        print(f"  {k}: {s if len(s) < 160 else s[:157] + '...'}")
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------


def _examples(text):
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def add_command(sub, name, func, fmt, examples, *, help, description=None, extra=None, check=None):
    """A subcommand with its ``examples:`` epilog (plus an ``extra`` paragraph) that runs ``func(args)``;
    ``check(args)``, when given, validates the flags before anything is loaded (``main`` runs it first)."""
    epilog = _examples(examples) + (f"\n\n{extra}" if extra else "")
    p = sub.add_parser(name, help=help, description=description, formatter_class=fmt, epilog=epilog)
    p.set_defaults(func=func, check=check)
    return p


def _lora_flags(p):
    g = p.add_argument_group("LoRA (ignored with --adapter)")
    g.add_argument("--adapter", help="existing peft adapter directory to wrap the model with")
    g.add_argument("--rank", type=int, help="LoRA rank r (default 8, or the precision's)")
    g.add_argument("--alpha", type=float, help="lora_alpha (default 2r)")
    g.add_argument("--targets", help="comma-separated target module names (default all-linear)")
    g.add_argument("--init", help="init_lora_weights: orthogonal (default; avoids zero curvature of A), gaussian, true")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init (default 0)")


def _data_flags(p):
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="truncate examples to this many tokens (default 256)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (lalora's, transformers', huggingface_hub's) and no library info logs")


def build_parser() -> argparse.ArgumentParser:
    from .compare import cli as compare_cli

    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="lalora", formatter_class=fmt,
                                 description="LaLoRA: keep what a model knew while fine-tuning it with LoRA.",
                                 epilog=_examples("""
                                     lalora backends
                                     lalora fit --model ./base --data source.jsonl --backend kfac --out p.lalora
                                     lalora inspect p.lalora
                                     lalora compare diag.lalora kfac.lalora --reference reference-ef.lalora
                                     lalora finetune --model ./base --data task.jsonl --precision p.lalora --strength 1e3 --out adapter/
                                     lalora bench --quick
                                     lalora eval --model ./base --adapter adapter/ --tasks lalora_source,lalora_arithmetic
                                 """) + "\n\nexit codes: 0 ok, 1 failure while running, 2 bad arguments/paths/files, 130 interrupted, "
                                        "141 stdout closed by the reader (e.g. | head)")
    ap.add_argument("--version", action="version", version=f"lalora {__import__('lalora').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = add_command(sub, "backends", cmd_backends, fmt, "lalora backends\nlalora backends --json",
                    help="list curvature backends, their options and availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add_command(sub, "fit", cmd_fit, fmt, """
                        lalora fit --model ./base --data source.jsonl --backend diag --out p.lalora
                        lalora fit --model ./base --data source.jsonl --backend kfac --rank 16 --targets q_proj,v_proj --out p.lalora
                        lalora fit --model ./base --adapter ./my-adapter --data source.jsonl --out p.lalora --backend kfac --option fisher_type=empirical
                        lalora fit --model ./base --data source.jsonl --backend kfac --option max_rank=256 --out p.lalora --dry-run
                        lalora fit --model ./base --source-from-model 256 --temperature 1.0 --source-length 64 --backend kfac --out p.lalora
                    """, help="fit a precision on source data", check=check_fit_args,
                    description="Fit the curvature of the source loss w.r.t. the LoRA weights at their init "
                                "(theta0) and save it as a precision file.",
                    extra="data: .jsonl/.json records with 'text' (all tokens labelled) or 'prompt'+'completion' "
                          "(completion labelled)")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--data", help="source data file (.jsonl/.json; .csv/.parquet/.txt via datasets); or --source-from-model")
    p.add_argument("--backend", default="diag", help="curvature backend (see `lalora backends`; default diag)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option (repeatable)")
    p.add_argument("--out", required=True, help="output precision file (e.g. precision.lalora)")
    p.add_argument("--max-batches", type=int, help="use at most this many batches")
    p.add_argument("--prior-precision", type=float, default=0.0, help="delta added to the precision (default 0)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave out source batches with a non-finite loss or gradient (default: stop and name the batch)")
    p.add_argument("--dry-run", nargs="?", type=int, const=2, metavar="N",
                   help="fit only N batches (default 2) and print the stored bytes, time and peak-memory estimates; "
                        "writes nothing")
    fit_flags.add_source_flags(p)
    _lora_flags(p)
    _data_flags(p)

    p = add_command(sub, "inspect", cmd_inspect, fmt, "lalora inspect precision.lalora\nlalora inspect precision.lalora --json",
                    help="show a precision file's metadata, blocks and spectrum")
    p.add_argument("path", help="precision file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    compare_cli.add_parser(sub, fmt)

    p = add_command(sub, "finetune", cmd_finetune, fmt, """
                        lalora finetune --model ./base --data task.jsonl --precision p.lalora --strength 1e3 --out adapter/
                        lalora finetune --model ./base --data task.jsonl --out adapter/ --steps 200   # plain LoRA
                        lalora finetune --model ./base --data more.jsonl --precision p.lalora --adapter adapter/ --out adapter2/   # train on
                    """, help="LoRA fine-tuning with the LaLoRA penalty (plain PyTorch loop)", check=check_finetune_args,
                    description="Train LoRA on the target data with loss = task + (strength/2) d^T P d, starting "
                                "from the precision's theta0 (or, with --adapter, from the adapter: see --anchor); "
                                "saves the peft adapter. Without --precision: plain LoRA.")
    add_finetune_flags(p)
    _lora_flags(p)
    _data_flags(p)

    add_bench_parser(sub, fmt)
    eval_command.add_parser(sub, fmt)
    return ap


def _vocabulary(parser, args) -> Vocabulary:
    """How library messages are worded for this command: its flags, its backends' options."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {s for action in p._actions for s in action.option_strings} for name, p in sub.choices.items()}
    if args.command == "fit":
        return Vocabulary("fit", flags, backends=[args.backend])
    if args.command == "compare":
        names = [n for item in (args.backends or ["diag"]) for n in item.split(",") if n]
        return Vocabulary("compare", flags, backends=names, option_form="backend:key")
    return Vocabulary(args.command, flags, non_strict=bool(getattr(args, "non_strict", False)))


def _run(args) -> int:
    from .errors import DataError, PrecisionFileError

    try:
        with quiet_libraries(bool(getattr(args, "quiet", False))):
            if args.check is not None:
                args.check(args)
            code = args.func(args)
        sys.stdout.flush()  # a closed stdout shows here at the latest
        return code
    except BrokenPipeError:  # the reader went away (| head): stop quietly, like Unix tools
        return stdout_closed()
    except UsageError as e:
        print(f"lalora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, PrecisionFileError) as e:
        print(f"lalora {args.command}: error: {to_cli(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lalora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as e:  # noqa: BLE001 - report, exit 1
        if os.environ.get("LALORA_DEBUG"):
            raise
        print(f"lalora {args.command}: failed: {type(e).__name__}: {to_cli(e)} (set LALORA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAIL


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself ignores a closed stdout for --help (exit 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    with speaking(_vocabulary(parser, args)):
        return _run(args)


if __name__ == "__main__":
    sys.exit(main())
