"""``lalora finetune``: LoRA training with the LaLoRA penalty in a plain PyTorch loop.

Where training starts (``--anchor``, like ``LaLoRATrainer(anchor=...)``): the penalty always pulls towards
the precision's anchor theta0 (the LoRA weights the precision was fitted at); the model starts

- ``reset`` (the default without ``--adapter``): at theta0;
- ``keep`` (the default with ``--adapter``, ``anchor="ignore"`` in the Trainer): at the loaded adapter's
  weights, e.g. to continue training an adapter whose precision was fitted at its start;
- ``check``: at the loaded weights, which must equal theta0 (else exit code 2).

Whenever the start differs from theta0, or loaded weights are replaced, the command says so.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import BackendError, ModelMismatchError, PrecisionFileError
from ..precision import Precision
from ..regularizer import LaLoRARegularizer
from ..validation import match_to_model
from .common import EXIT_OK, UsageError, add_command, data_flags, form_flag, lora_flags
from .inputs import check_out, make_batches, model_with_lora, read_records
from .output import jemalloc_hint
from .vocab import to_cli

ANCHOR_MODES = ("keep", "reset", "check")


EXAMPLES = """
    lalora finetune --model ./base --data task.jsonl --precision p.lalora --strength 1e3 --out adapter/
    lalora finetune --model ./base --data task.jsonl --out adapter/ --steps 200   # plain LoRA
    lalora finetune --model ./base --data more.jsonl --precision p.lalora --adapter adapter/ --out adapter2/   # train on
"""


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "finetune", run, fmt, EXAMPLES, check=check,
                    help="LoRA fine-tuning with the LaLoRA penalty (plain PyTorch loop)",
                    description="Train LoRA on the target data with loss = task + (strength/2) d^T P d, starting "
                                "from the precision's theta0 (or, with --adapter, from the adapter: see --anchor); "
                                "saves the peft adapter. Without --precision: plain LoRA.")
    p.add_argument("--model", required=True, help="local model directory (with tokenizer)")
    p.add_argument("--data", required=True, help="target data file (.jsonl/.json)")
    p.add_argument("--precision", help="precision file from `lalora fit` (LoRA settings default to the ones it was fitted with)")
    p.add_argument("--strength", type=float, default=1e3,
                   help="penalty strength (default 1e3): lambda, or with --normalize mean-diagonal multiples of the "
                        "precision's mean diagonal (docs/strength.md; `lalora sweep` picks one)")
    p.add_argument("--normalize", choices=["none", "mean-diagonal"], default="none",
                   help="none (default): --strength is lambda; mean-diagonal: lambda = strength / mean diagonal of "
                        "the precision (+ prior), comparable across backends")
    form_flag(p)
    p.add_argument("--factor-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the Kronecker factors are stored and multiplied in: auto (default) = the LoRA "
                        "weights' dtype if 16-bit, else float32; bfloat16 halves the penalty's memory traffic "
                        "(~2e-3-1e-2 relative error; docs/training.md#factor-dtype)")
    p.add_argument("--anchor", choices=ANCHOR_MODES,
                   help="where training starts (the penalty always pulls towards the precision's theta0): keep: the "
                        "loaded weights (default with --adapter), reset: theta0 (default without), check: refuse "
                        "loaded weights that are not theta0")
    p.add_argument("--non-strict", action="store_true",
                   help="apply the precision to the LoRA matrices that match the model and leave the others "
                        "unconstrained (default: refuse any mismatch)")
    p.add_argument("--prior-precision", type=float,
                   help="delta added to the precision in the penalty (default: the precision's own)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--uncovered", choices=["warn", "error", "ignore"], default="warn",
                   help="trainable tensors the precision does not cover (embedding LoRA, modules_to_save, ...): "
                        "warn naming them (default), stop with an error, or ignore them")
    lora_flags(p)
    data_flags(p)


def check(args) -> None:
    """The checks that need no file (run before anything is loaded)."""
    if not (args.strength >= 0 and math.isfinite(args.strength)):
        raise UsageError(f"--strength must be a finite number >= 0, got {args.strength}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.prior_precision is not None and not (args.prior_precision >= 0 and math.isfinite(args.prior_precision)):
        raise UsageError(f"--prior-precision must be a finite number >= 0, got {args.prior_precision}")
    if not args.precision:
        given = [f for f, v in (("--anchor", args.anchor), ("--non-strict", args.non_strict),
                                ("--prior-precision", args.prior_precision),
                                ("--normalize", None if args.normalize == "none" else args.normalize))
                 if v not in (None, False)]
        if given:
            raise UsageError(f"{given[0]} needs --precision (without it the command trains plain LoRA)")


def _load_precision(path):
    if not Path(path).is_file():
        raise UsageError(f"--precision {path}: no such file")
    try:
        return Precision.load(path)
    except (PrecisionFileError, ValueError, OSError) as e:
        raise UsageError(f"--precision {path}: not a readable precision file ({to_cli(e)})") from None


def _regularizer(model, precision, args, caller="lalora finetune"):
    try:
        if args.non_strict:  # keep the blocks that match; lalora warns what is left out
            precision = match_to_model(precision, model, strict=False)
        return LaLoRARegularizer(model, precision, strength=args.strength, form=args.form,
                                 prior_precision=args.prior_precision, check_anchor=False, uncovered=args.uncovered,
                                 normalize=normalization(args), factor_dtype=getattr(args, "factor_dtype", "auto"),
                                 _caller=caller)
    except (ModelMismatchError, BackendError, ValueError) as e:
        raise UsageError(f"--precision {args.precision} does not fit this model/LoRA setup: {to_cli(e)}") from None


def normalization(args) -> str | None:
    """``--normalize`` as ``LaLoRARegularizer(normalize=...)`` takes it."""
    return None if args.normalize == "none" else args.normalize


def _distance(reg) -> tuple[float, float, str | None, float]:
    """(|theta - theta0|, |theta0|, the weight that differs most (None: theta = theta0), its max abs difference)."""
    import torch

    with torch.no_grad():
        delta = reg.delta()
        diffs = {n: float(d.abs().max()) for n, d in delta.items() if d.numel()}
        worst = max(diffs, key=diffs.get, default=None)
        dist = math.sqrt(sum(float(d.double().square().sum()) for d in delta.values()))
        norm = math.sqrt(sum(float(a.double().square().sum()) for a in reg.precision.anchor.values()))
    if worst is None or diffs[worst] == 0:
        return dist, norm, None, 0.0
    return dist, norm, worst, diffs[worst]


def start_point(reg, precision, args) -> str | None:
    """Apply ``--anchor``; return what to tell the user about the starting point (None: it is theta0)."""
    mode = args.anchor or ("keep" if args.adapter else "reset")
    dist, norm, worst, diff = _distance(reg)
    if worst is None:  # the weights are the anchor: every mode starts there
        return None
    loaded = f"adapter {args.adapter}" if args.adapter else f"the fresh LoRA init (--seed {args.seed})"
    created = precision.metadata.get("created")
    anchor = "the precision's anchor theta0 (the LoRA weights it was fitted at" + (f" on {created})" if created else ")")
    where = (f"at distance {dist:.4g} from theta0 (|theta0| = {norm:.4g}; largest difference {diff:.3g}, "
             f"in {worst!r})")
    if mode == "check":
        raise UsageError(f"--anchor check: the weights of {loaded} are not {anchor}: they are {where}. Pass --anchor "
                         "keep to train on from them (the penalty still pulls towards theta0) or --anchor reset to "
                         "start from theta0")
    if mode == "reset":
        reg.reset_to_anchor()
        if not args.adapter:
            return None
        return (f"starting from {anchor}, not from the weights of {loaded} (they are {where}); pass --anchor keep "
                "to train on from them")
    return (f"continuing from {loaded}; the penalty pulls towards {anchor}; the start is {where}. "
            "Pass --anchor reset to start from theta0 instead")


def run(args) -> int:
    import torch

    from ..training import train_lora

    out = check_out(args.out)
    records = read_records(args.data)
    precision = _load_precision(args.precision) if args.precision else None
    jemalloc_hint(not args.quiet)
    model, tok = model_with_lora(args, precision, f"--precision {args.precision}")
    reg = None
    if precision is not None:
        reg = _regularizer(model, precision, args)
        note = start_point(reg, precision, args)
        if note:
            print(f"lalora finetune: {note}", file=sys.stderr)
    torch.manual_seed(args.seed)
    batches = make_batches(tok, records, args.batch_size, args.max_length)
    losses = train_lora(model, batches, args.steps, args.lr, reg=reg, progress=not args.quiet, desc="lalora finetune")
    model.save_pretrained(out)
    msg = f"task loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
    if reg is not None:
        with torch.no_grad():
            msg += f"; penalty {float(reg()):.4g}"
        if reg.normalize:
            msg += f" (lambda = {reg.strength:g} / mean diagonal {reg.scale:.4g} = {reg.raw_strength:.4g})"
    print(msg)
    print(f"wrote adapter to {out}")
    return EXIT_OK

