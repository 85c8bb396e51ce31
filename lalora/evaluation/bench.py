"""``lalora bench --eval lm-eval``: the benchmark's source and target columns computed by lm-eval.

The benchmark's held-out source texts (cut to the tokens the benchmark scores) and its test problems
are written once as lalora's task data (for the model's tokenizer); after every run the model
in memory (base or peft) is evaluated by lm-eval (``TaskSet.run_lean``: ``lm_eval.evaluator.evaluate``
without the global reseeding and environment report of ``simple_evaluate``). Columns:

- ``target_em``: lm-eval's ``exact_match`` of ``lalora_arithmetic`` (greedy, 40 new tokens, the
  benchmark's answer parsing): the same generations as the default path, so the same number;
- ``source_ppl``: token perplexity of ``lalora_source_conditional``: the benchmark's convention (each
  text's first token is context only), so the default path's number. The standard rolling measurement
  (``lalora_source``: every token scored after a prepended BOS/EOS; bits per byte) is one
  ``extra_tasks`` entry away;
- ``source_acc``: not available through lm-eval (None; the table shows "-").

``extra_tasks`` (e.g. ``("forgetting",)``) are evaluated too (``limit`` examples each) and land in
each row's ``extra``, with the forgetting mean of Biderman et al. 2024 when its three tasks ran.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager

from .data import truncate_texts, write_task_data
from .harness import TaskSet, make_lm
from .results import forgetting_score

@contextmanager
def _stop_at_tokenizer_eos(model, tokenizer):
    """lm-eval's generate() stops a row at the model's ``generation_config.eos_token_id``; the benchmark
    passes the tokenizer's EOS. Add it to the generation config while lm-eval runs (restored after)."""
    cfg = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    old = getattr(cfg, "eos_token_id", None)
    ids = old if isinstance(old, list) else ([] if old is None else [old])
    if cfg is None or eos is None or eos in ids:
        yield
        return
    cfg.eos_token_id = ids + [eos]
    try:
        yield
    finally:
        cfg.eos_token_id = old


class BenchEvaluator:
    """``evaluate(model) -> {"target_em", "source_ppl", "source_acc": None, "extra": {...}}`` through lm-eval."""

    def __init__(self, tokenizer, eval_texts, problems, max_length: int, batch_size: int = 32, extra_tasks=(),
                 limit: int | None = None):
        self.tokenizer, self.batch_size, self.limit = tokenizer, batch_size, limit
        self._tmp = tempfile.TemporaryDirectory(prefix="lalora-bench-lm-eval-")
        self.data = write_task_data(self._tmp.name, truncate_texts(eval_texts, tokenizer, max_length), problems,
                                    tokenizer=tokenizer,
                                    info={"made_by": "lalora bench --eval lm-eval", "max_length": max_length})
        self.tasks = TaskSet(["lalora_source_conditional", "lalora_arithmetic"], data_dir=self._tmp.name)
        self.extra = TaskSet(list(extra_tasks), data_dir=self._tmp.name) if extra_tasks else None

    def __call__(self, model) -> dict:
        was = model.training
        lm = make_lm(model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        try:
            with _stop_at_tokenizer_eos(model, self.tokenizer):
                r = self.tasks.run_lean(lm)
                more = self.extra.run_lean(lm, limit=self.limit) if self.extra else None
        finally:
            model.train(was)
        src, tgt = r["results"]["lalora_source_conditional"], r["results"]["lalora_arithmetic"]
        extra = {"lm_eval_source": {k.split(",")[0]: v for k, v in src.items() if k.endswith(",none")},
                 "lm_eval_version": _lm_eval_version()}
        if more is not None:
            extra["lm_eval_tasks"] = {t: {k.split(",")[0]: v for k, v in res.items() if k.endswith(",none")}
                                      for t, res in more["results"].items()}
            score = forgetting_score(more)
            if score is not None:
                extra["forgetting"] = score["mean"]
        return {"target_em": tgt["exact_match,none"], "source_ppl": src["token_perplexity,none"], "source_acc": None,
                "extra": extra}

    def close(self) -> None:
        self._tmp.cleanup()


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None
