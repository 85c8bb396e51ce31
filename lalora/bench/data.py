"""The benchmark's batches (``BenchData``): source texts (a slice that fits the precisions, a disjoint slice that
is evaluated) and the arithmetic target; with ``--eval lm-eval``, the evaluator that computes the columns.

``fit_on`` chooses what the precisions are fitted on, at ``n_source_fit`` examples each (the study of
docs/benchmark.md#which-source-data-and-how-much):
- ``"source"``: the real source (the fit slice of the evaluated corpus, disjoint from the evaluation slice);
- ``"generated"``: text the *base* model samples itself from its BOS token (``lalora.surrogate``; temperature 1,
  as many new tokens as ``max_length``), the surrogate for when the pretraining data is not available;
- ``"unrelated"``: the other corpus that installs offline (Python's help topics for fortunes, and back).
The evaluation slice and the target data do not depend on ``fit_on`` or ``n_source_fit``, and the fit slices are
nested (the first 8 of the 32, ...), so the rows of one study differ only in what the precision saw.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LaloraError

FIT_ON = ("source", "generated", "unrelated")
_OTHER_CORPUS = {"fortunes": "pydoc", "pydoc": "fortunes"}


@dataclass
class BenchData:
    tokenizer: object
    src_fit: list
    src_eval: list
    train_batches: list
    test: list
    fit_provenance: dict
    evaluator: object = None

    @classmethod
    def of(cls, cfg, tokenizer, model=None) -> "BenchData":
        """The batches of ``cfg`` (a ``BenchConfig``); ``model`` (the base model) samples ``fit_on="generated"``."""
        from ..textdata import completion_batches, text_batches
        from . import tasks

        texts = tasks.source_texts(cfg.source, cfg.seed)
        fit_texts, eval_texts = tasks.split_source(texts, cfg.n_source_fit, cfg.n_source_eval)
        train = tasks.arithmetic_set(cfg.n_train, cfg.seed + 1)
        test = tasks.arithmetic_set(cfg.n_target_eval, cfg.seed + 2)
        src_fit, provenance = fit_batches(cfg, tokenizer, model, fit_texts)
        evaluator = None
        if cfg.evaluator == "lm-eval":
            from ..evaluation.bench import BenchEvaluator

            evaluator = BenchEvaluator(tokenizer, eval_texts, test, cfg.max_length, extra_tasks=cfg.eval_tasks,
                                       limit=cfg.eval_limit)
        return cls(tokenizer, src_fit, text_batches(tokenizer, eval_texts, 16, cfg.max_length),
                   completion_batches(tokenizer, [(p, c) for p, c, _ in train], cfg.batch_size, 128), test,
                   provenance, evaluator)

    def evaluate(self, model) -> dict:
        """``{"target_em", "source_ppl", "source_acc"}`` (+ ``"extra"`` from lm-eval) of ``model``."""
        if self.evaluator is not None:
            return self.evaluator(model)
        from . import tasks

        r = tasks.source_metrics(model, self.src_eval)
        r["target_em"] = tasks.target_exact_match(model, self.tokenizer, self.test)
        return r

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def fit_batches(cfg, tokenizer, model, fit_texts: list[str]) -> tuple[list, dict]:
    """``(batches, provenance)`` of the data the precisions are fitted on (``cfg.fit_on``)."""
    from ..textdata import text_batches
    from . import tasks

    if cfg.fit_on == "source":
        return (text_batches(tokenizer, fit_texts, cfg.batch_size, cfg.max_length),
                {"kind": "source", "corpus": cfg.source, "n": len(fit_texts)})
    if cfg.fit_on == "unrelated":
        other = _OTHER_CORPUS[cfg.source]
        texts = tasks.source_texts(other, cfg.seed)[:cfg.n_source_fit]
        if len(texts) < cfg.n_source_fit:
            raise LaloraError(f"--n-source-fit {cfg.n_source_fit}: the unrelated corpus {other!r} has only {len(texts)} texts")
        return text_batches(tokenizer, texts, cfg.batch_size, cfg.max_length), {"kind": "unrelated", "corpus": other,
                                                                                 "n": len(texts)}
    if cfg.fit_on == "generated":
        if model is None:
            raise LaloraError("fit_on='generated' needs the base model to sample from")
        from ..surrogate import generate_source

        src = generate_source(model, tokenizer, cfg.n_source_fit, temperature=1.0, max_new_tokens=cfg.max_length,
                              seed=cfg.seed, batch_size=cfg.batch_size)
        # the start token is input only: the labelled tokens are the sampled ones, as many as a source text has
        return src.batches(cfg.batch_size, cfg.max_length + 1), dict(src.provenance)
    raise LaloraError(f"--fit-on {cfg.fit_on!r}: use one of {', '.join(FIT_ON)}")
