"""``lalora compare``: stored precisions (``lalora compare a.lalora b.lalora``) or backends fitted now
(``--model DIR --data FILE --backends diag,kfac``), against an exact dense reference when affordable.

Shares the model, LoRA and data flags of the other commands and their exit codes (0 ok, 1 every method
failed, 2 bad arguments/paths/files).
"""
from __future__ import annotations

from pathlib import Path

from ..backend import get_backend
from ..comparison import DEFAULT_MAX_REFERENCE_PARAMS, compare, compare_precisions
from ..errors import BackendError, LaloraError
from ..precision import Precision
from .common import EXIT_FAIL, EXIT_OK, UsageError, add_command, data_flags, lora_flags
from .inputs import check_out, make_batches, model_with_lora, parse_options, read_records
from .vocab import Vocabulary, to_cli

EXAMPLES = """
    lalora compare diag.lalora kfac.lalora                                   # cost and storage only
    lalora compare diag.lalora kfac.lalora --reference reference-ef.lalora --out res.json --plot res.png
    lalora compare --model ./base --data source.jsonl --backends diag,kfac,tri-kfac,block \\
                   --rank 2 --targets q_proj,v_proj --reference ef --save-dir runs/cmp --out res.md
    lalora compare --model ./base --data source.jsonl --backends diag kfac --option kfac:curvature=ef \\
                   --rank 2 --targets q_proj --displacement ./adapter-after-finetuning
"""


def add_parser(sub, fmt) -> None:
    """Add the ``compare`` subcommand to ``lalora``'s subparsers."""
    p = add_command(sub, "compare", run, fmt, EXAMPLES, vocabulary=vocabulary, check=check,
                    help="compare curvature approximations: cost, storage, error vs the exact curvature",
                    description="Per method: wall time, peak memory, stored bytes and file size, and against an "
                                "exact dense GGN/EF (when #LoRA weights <= --max-reference-params) the relative "
                                "error of d'Pd along random directions, the reference's top eigenvectors and a "
                                "real displacement, the relative Frobenius error per LoRA matrix and the |cos| "
                                "between top eigenvectors.",
                    extra="exit codes: 0 ok, 1 every method failed, 2 bad arguments/paths/files")
    p.add_argument("precisions", nargs="*", help="precision files to compare without recomputing")
    p.add_argument("--model", help="local model directory (with tokenizer): fit --backends on it now")
    p.add_argument("--data", help="source data file (.jsonl/.json records with 'text' or 'prompt'+'completion')")
    p.add_argument("--backends", nargs="+", metavar="NAME", help="backends to fit (comma- or space-separated; default diag)")
    p.add_argument("--option", action="append", default=[], metavar="BACKEND:KEY=VALUE",
                   help="backend option, value parsed as JSON when possible (repeatable)")
    p.add_argument("--reference", default="auto",
                   help="ggn, ef, auto (default: with --model the EF if every backend estimates one, else the GGN; "
                        "with precision files none), none, or a precision file holding the exact curvature")
    p.add_argument("--max-reference-params", type=int, default=DEFAULT_MAX_REFERENCE_PARAMS,
                   help=f"compute a dense reference only up to this many LoRA weights (default "
                        f"{DEFAULT_MAX_REFERENCE_PARAMS}; 0: no limit)")
    p.add_argument("--directions", type=int, default=16, help="number of random directions (default 16)")
    p.add_argument("--top-k", type=int, default=8, help="top eigenvectors of the reference to test (default 8)")
    p.add_argument("--displacement", help="theta_T as a peft adapter directory or a precision file (its anchor): "
                                          "d = theta_T - theta0")
    p.add_argument("--max-batches", type=int, help="use at most this many batches")
    p.add_argument("--save-dir", help="keep the fitted precisions (and the reference) here as .lalora files")
    p.add_argument("--out", help="write the result as .json or .md")
    p.add_argument("--plot", help="PNG of the errors per method; the spectra go to <stem>_spectra.png")
    lora_flags(p)
    data_flags(p)
    for action in p._actions:
        if action.dest == "seed":
            action.help = "seed of the LoRA init and of the random directions (default 0)"


def parse_backend_options(items, names) -> dict[str, dict]:
    """``BACKEND:KEY=VALUE`` items -> {backend: {key: value}}; values parsed as JSON when possible."""
    out: dict[str, dict] = {}
    for item in items:
        backend, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise UsageError(f"--option {item!r}: use BACKEND:KEY=VALUE, e.g. kfac:curvature=ef")
        if backend not in names:
            raise UsageError(f"--option {item!r}: backend {backend!r} is not in --backends ({', '.join(names)})")
        out.setdefault(backend, {}).update(parse_options([kv]))
    return out


def _backend_names(args) -> list[str]:
    return [n for item in (args.backends or ["diag"]) for n in item.split(",") if n]


def vocabulary(args, flags) -> Vocabulary:
    """Library messages name options as ``--option BACKEND:KEY=VALUE`` of the backends compared."""
    return Vocabulary("compare", flags, backends=_backend_names(args), option_form="backend:key")


def check(args) -> None:
    """The checks that need no file: flag values, backend names and options (run before anything is loaded)."""
    if args.out and Path(args.out).suffix.lower() not in (".json", ".md"):
        raise UsageError(f"--out {args.out}: use a .json or .md file name")
    for flag in ("directions", "top_k"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.precisions:
        if args.backends:
            raise UsageError("give either precision files or --backends, not both")
        return
    names = _backend_names(args)
    if len(set(names)) != len(names):
        raise UsageError(f"--backends {' '.join(names)}: a backend is named twice")
    options = parse_backend_options(args.option, names)
    for name in names:  # an unknown or unavailable backend is a row of the table; wrong options are refused now
        try:
            cls = get_backend(name)
        except BackendError:
            continue
        try:
            cls(**options.get(name, {}))
        except BackendError as e:
            raise UsageError(f"--option: {to_cli(e, backend=name)}") from None


def _check_inputs(args) -> None:
    for f in args.precisions:
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such precision file")
    if args.displacement and not Path(args.displacement).exists():
        raise UsageError(f"--displacement {args.displacement}: no such file or directory")
    if args.out:
        check_out(args.out)
    if args.plot:
        check_out(args.plot, "--plot")


def _model_and_data(args, precision=None):
    """The model with LoRA (the flags, defaulting to ``precision``'s LoRA setup) and the batches."""
    records = read_records(args.data)
    model, tok = model_with_lora(args, precision, f"precision {args.precisions[0]}" if precision is not None else None)
    return model, make_batches(tok, records, args.batch_size, args.max_length)


def _compare(args):
    max_ref = args.max_reference_params or None
    ref = str(args.reference)
    ref = None if ref.lower() == "none" else ref
    common = dict(directions=args.directions, top_k=args.top_k, displacement=args.displacement, seed=args.seed,
                  max_batches=args.max_batches, max_reference_params=max_ref)
    if args.precisions:
        model = data = None
        if ref in ("ggn", "ef"):
            if not (args.model and args.data):
                raise UsageError(f"--reference {ref} with precision files needs --model and --data "
                                      "(the same model and LoRA setup the precisions were fitted on)")
            model, data = _model_and_data(args, Precision.load(args.precisions[0]))  # its LoRA setup by default
        elif ref == "auto":
            ref = None
        elif ref is not None and not Path(ref).is_file():
            raise UsageError(f"--reference {ref}: use ggn, ef, auto, none or an existing precision file")
        return compare_precisions(args.precisions, reference=ref, model=model, data=data, **common)
    if not (args.model and args.data):
        raise UsageError("give precision files, or --model and --data (with --backends)")
    if ref not in ("ggn", "ef", "auto", None):
        raise UsageError(f"--reference {ref!r}: with --model use ggn, ef, auto or none")
    names = _backend_names(args)
    options = parse_backend_options(args.option, names)
    model, data = _model_and_data(args)
    return compare(model, data, backends=[(n, n, options.get(n, {})) for n in names], reference=ref,
                   save_dir=args.save_dir, progress=not args.quiet, **common)


def run(args) -> int:
    """Run the comparison, print the table, write --out / --plot."""
    _check_inputs(args)
    try:
        result = _compare(args)
    except LaloraError as e:  # mismatched precisions, unreadable displacement, ...: the input is at fault
        raise UsageError(to_cli(e)) from None
    for row in result.rows:  # a backend's failure, in CLI words (table and --out)
        if row.get("error"):
            row["error"] = to_cli(row["error"], backend=row.get("backend"))
    if result.settings.get("reference_note"):
        result.settings["reference_note"] = to_cli(result.settings["reference_note"])
    print(result.table())
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".md":
            out.write_text(result.to_markdown())
        else:
            result.to_json(out)
        print(f"wrote {out}")
    if args.plot:
        from ..comparison.plot import plot_result

        for path in plot_result(result, args.plot):
            print(f"wrote {path}")
    return EXIT_OK if any(r.get("status", "ok") == "ok" for r in result.rows) else EXIT_FAIL

