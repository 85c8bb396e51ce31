"""``lalora sweep``: choose the strength (``lalora.sweep.sweep_strengths``, docs/strength.md).

Trains briefly (``--steps``) at each of ``--strengths`` from the precision's theta0 on ``--data``, measures the
held-out target loss (``--target-eval``) and source loss (``--source-eval``) after each run, prints the table,
writes the report as JSON (``--out``) and a plot (``--plot``, default next to ``--out``), and names the largest
target gain whose source loss rose by at most ``--max-source-increase`` nats per token.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from .common import EXIT_OK, UsageError, add_command, data_flags, form_flag, lora_flags
from .finetune import _load_precision, _regularizer, normalization
from .inputs import add_lora, check_out, check_precision_model, load_model, make_batches, read_records
from .output import jemalloc_hint

EXAMPLES = """
    lalora sweep --model ./base --precision p.lalora --data task.jsonl --target-eval task_heldout.jsonl --source-eval source_heldout.jsonl --out sweep.json
    lalora sweep --model ./base --precision p.lalora --data task.jsonl --target-eval t.jsonl --source-eval s.jsonl --strengths 10,100,1000 --normalize none --max-source-increase 0.02 --out raw.json
"""


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "sweep", run, fmt, EXAMPLES, check=check,
                    help="pick the strength: short runs at a few strengths, the learning-forgetting front",
                    description="Train LoRA briefly at each strength from the precision's theta0 (the same data, "
                                "order and seed), measure the held-out target and source losses (mean per labelled "
                                "token, nats), and report the front and the largest target gain within "
                                "--max-source-increase. Writes the report (JSON) and a plot (PNG).")
    p.add_argument("--model", required=True, help="local model directory (with tokenizer)")
    p.add_argument("--precision", required=True, help="precision file from `lalora fit`")
    p.add_argument("--data", required=True, help="target training data (.jsonl/.json)")
    p.add_argument("--target-eval", required=True, help="held-out target data (.jsonl/.json): its loss is the target axis")
    p.add_argument("--source-eval", required=True,
                   help="held-out source data (.jsonl/.json; not the data the precision was fitted on)")
    p.add_argument("--strengths", default="0,0.01,0.1,1,10",
                   help="comma-separated strengths (default 0,0.01,0.1,1,10; 0 = plain LoRA, the reference)")
    p.add_argument("--normalize", choices=["none", "mean-diagonal"], default="mean-diagonal",
                   help="mean-diagonal (default): strengths in multiples of the precision's mean diagonal; none: raw "
                        "lambdas")
    p.add_argument("--max-source-increase", type=float, default=0.05,
                   help="tolerated increase of the held-out source loss in nats per token (default 0.05, i.e. "
                        "source perplexity +5%%)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per strength (default 50)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    form_flag(p)
    p.add_argument("--prior-precision", type=float, help="delta added to the precision (default: the precision's own)")
    p.add_argument("--out", required=True, help="the report (JSON)")
    p.add_argument("--plot", help="the plot (PNG; default: --out with .png; needs matplotlib)")
    lora_flags(p)
    data_flags(p)
    p.set_defaults(non_strict=False, uncovered="warn", strength=1.0)  # what finetune's _regularizer reads


def _strengths(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--strengths {text!r}: give comma-separated numbers, e.g. 0,0.1,1,10") from None
    bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
    if not values or bad:
        raise UsageError(f"--strengths {text!r}: give finite numbers >= 0" + (f" ({bad[0]:g} is not)" if bad else ""))
    return values


def check(args) -> None:
    """The checks that need no file (run before anything is loaded)."""
    args.strength_values = _strengths(args.strengths)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    tol = args.max_source_increase
    if not (tol >= 0 and math.isfinite(tol)):
        raise UsageError(f"--max-source-increase must be a finite number >= 0 (nats per token), got {tol}")
    if args.prior_precision is not None and not (args.prior_precision >= 0 and math.isfinite(args.prior_precision)):
        raise UsageError(f"--prior-precision must be a finite number >= 0, got {args.prior_precision}")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a directory; name the report file (.json)")
    if args.plot is not None and Path(args.plot).is_dir():
        raise UsageError(f"--plot {args.plot} is a directory; name the image file (.png)")


def _plot_path(args):
    """The plot's path, or None with a note when matplotlib is missing and --plot was not asked for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if args.plot is not None:
            raise UsageError("--plot needs matplotlib: pip install \"lalora[plot]\"") from None
        print("lalora sweep: no plot written (matplotlib is not installed: pip install \"lalora[plot]\")",
              file=sys.stderr)
        return None
    return check_out(args.plot, "--plot") if args.plot else Path(args.out).with_suffix(".png")


def run(args) -> int:
    from ..sweep import format_sweep, plot_sweep, save_sweep, sweep_strengths

    out = check_out(args.out)
    plot = _plot_path(args)
    sets = {flag: read_records(path, flag) for flag, path in
            (("--data", args.data), ("--target-eval", args.target_eval), ("--source-eval", args.source_eval))}
    precision = _load_precision(args.precision)
    jemalloc_hint(not args.quiet)
    model, tok = load_model(args.model, args.dtype)
    check_precision_model(precision, model, f"--precision {args.precision}", args.model)
    model = add_lora(model, args, (precision.metadata.get("lora_config") or {}).get("default"))
    reg = _regularizer(model, precision, args, caller="lalora sweep")
    reg.reset_to_anchor()  # every run starts from theta0
    batches = {flag: make_batches(tok, recs, args.batch_size, args.max_length, flag) for flag, recs in sets.items()}
    report = sweep_strengths(model, reg.precision, batches["--data"], source_eval=batches["--source-eval"],
                             target_eval=batches["--target-eval"], strengths=args.strength_values, steps=args.steps,
                             lr=args.lr, normalize=normalization(args), form=args.form,
                             prior_precision=args.prior_precision, max_source_increase=args.max_source_increase,
                             seed=args.seed, progress=not args.quiet, uncovered="ignore")  # reported above
    report["inputs"] = {"model": str(args.model), "precision": str(args.precision), "data": str(args.data),
                        "target_eval": str(args.target_eval), "source_eval": str(args.source_eval)}
    save_sweep(report, out)
    print(format_sweep(report))
    print(f"wrote {out}")
    if plot is not None:
        plot_sweep(report, plot)
        print(f"wrote {plot}")
    return EXIT_OK
