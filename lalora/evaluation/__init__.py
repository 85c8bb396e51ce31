"""Evaluation through lm-evaluation-harness (docs/evaluation.md): ``lalora.evaluate``, ``lalora eval``,
and lalora's own lm-eval tasks (``TASKS_DIR``): held-out source text and the benchmark's arithmetic.

lm-eval is an optional dependency (``pip install "lalora[eval]"``); it is imported only when used.
"""
from .data import benchmark_task_data, truncate_texts, write_task_data
from .harness import FORGETTING_TASKS, LALORA_TASKS, TASKS_DIR, evaluate, forgetting_score

__all__ = ["FORGETTING_TASKS", "LALORA_TASKS", "TASKS_DIR", "benchmark_task_data", "evaluate", "forgetting_score",
           "truncate_texts", "write_task_data"]
