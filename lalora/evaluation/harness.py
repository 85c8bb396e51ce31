"""``lalora.evaluate``: a base model, with or without a peft adapter, through lm-evaluation-harness.

lm-eval (``pip install "lalora[eval]"``) does the evaluating: ``lm_eval.simple_evaluate`` on an
``HFLM`` wrapping the model (a directory plus ``peft=`` adapter, or a model already in memory), with a
``TaskManager`` that also reads lalora's shipped tasks (``TASKS_DIR``) and any ``include_path``. Any
lm-eval task name works; ``"forgetting"`` stands for the protocol of Biderman et al. 2024 (HellaSwag,
ARC-Challenge, WinoGrande; their mean accuracy is added as ``results["lalora"]["forgetting"]``).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError, LaloraError
from . import data as task_data
from .results import FORGETTING_TASKS, add_token_perplexity, forgetting_score, write_results, write_samples

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LALORA_TASKS = ("lalora_source", "lalora_source_conditional", "lalora_arithmetic")


def require_lm_eval():
    """The ``lm_eval`` module, or a ``LaloraError`` saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (its transformers/accelerate imports)
    except ImportError as e:
        raise LaloraError(f"evaluation needs lm-evaluation-harness: pip install \"lalora[eval]\" (or "
                          f"pip install \"lm-eval==0.4.13\"); importing it failed: {e}") from None
    return lm_eval


def task_names(tasks) -> list[str]:
    """Task names from a list or a comma-separated string; ``"forgetting"`` expands to its three tasks."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for t in tasks or []:
        t = str(t).strip()
        for n in (FORGETTING_TASKS if t == "forgetting" else (t,)):
            if n and n not in names:
                names.append(n)
    if not names:
        raise LaloraError("tasks: name at least one lm-eval task (e.g. lalora_source, lalora_arithmetic, forgetting)")
    return names


def _include_paths(include_path) -> list[str]:
    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    paths = [str(TASKS_DIR)]
    for p in extra:
        if not Path(p).is_dir():
            raise LaloraError(f"include_path {p}: no such directory")
        paths.append(str(Path(p).resolve()))
    return paths


def task_manager(names, include_path=None, metadata=None):
    """An lm-eval ``TaskManager`` over lalora's tasks and ``include_path``; lm-eval's own task index
    (~10 s to build) is added only when a name is not found in those folders."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise LaloraError(f"tasks: unknown lm-eval task {unknown[0]!r} (lalora's own: {', '.join(LALORA_TASKS)}; "
                          "'forgetting' = hellaswag,arc_challenge,winogrande; `lm_eval ls tasks` lists lm-eval's)")
    return tm


def load_tasks(tm, names) -> list:
    """The task objects, one name at a time, so a dataset that cannot be loaded is named with its task."""
    out = []
    for name in names:
        try:
            loaded = tm.load([name])
        except LaloraError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets/hub raise many types; each is reported with the task
            path = _dataset_path(tm, name)
            where = f" (dataset {path!r})" if path else ""
            raise LaloraError(
                f"lm-eval task {name!r}{where} could not be loaded: {type(e).__name__}: {e}. Standard tasks read "
                "their dataset from the Hugging Face hub or its local cache: run once with network access (or "
                "copy a filled HF_DATASETS_CACHE); offline (HF_DATASETS_OFFLINE=1) only cached datasets load. "
                f"lalora's own tasks ({', '.join(LALORA_TASKS)}) need no network") from e
        out.extend(loaded["groups"].values() if loaded.get("groups") else loaded["tasks"].values())
    return out


def _dataset_path(tm, name) -> str | None:
    entry = tm.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None) if entry is not None else None
    if not yaml_path:
        return None
    try:  # the YAML with its includes (arc_challenge takes dataset_path from arc_easy.yaml)
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(yaml_path, resolve_func=False).get("dataset_path")
    except Exception:  # noqa: BLE001 - only an addition to the message
        return None


def make_lm(model, adapter=None, tokenizer=None, *, batch_size=8, device=None, dtype="float32", max_length=None):
    """lm-eval's ``HFLM``: from a directory (``adapter``: a peft adapter directory, loaded by lm-eval's
    ``peft=``) or from a model already in memory (a ``transformers`` model or a ``peft.PeftModel``, as it is)."""
    require_lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not (p / "config.json").is_file():
            raise LaloraError(f"model {model}: not a model directory (no config.json)")
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise LaloraError(f"adapter {adapter}: not a peft adapter directory (no adapter_config.json)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # absolute paths: lm-eval asks the hub for a model's revision only for names that look like repo ids
        return HFLM(pretrained=str(p.resolve()), peft=str(Path(adapter).resolve()) if adapter else None,
                    tokenizer=tokenizer, dtype=dtype, device=device, batch_size=batch_size, max_length=max_length)
    if adapter is not None:
        raise LaloraError("adapter= goes with a model directory; for a model in memory pass the PeftModel itself "
                          "(peft.PeftModel.from_pretrained(model, adapter_dir))")
    if tokenizer is None:
        raise LaloraError("tokenizer= is needed with a model in memory (lm-eval cannot find it from the model)")
    if device is not None:
        model.to(device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


_TASK_FILES = {"lalora_source": task_data.SOURCE_FILE, "lalora_source_conditional": task_data.CONDITIONAL_FILE,
               "lalora_arithmetic": task_data.ARITHMETIC_FILE}


@contextmanager
def _task_data_dir(names, data_dir, tokenizer, task_data_options=None):
    """``(folder, what was written)`` for lalora's tasks: ``data_dir`` as it is when it holds their files;
    the benchmark's data (``benchmark_task_data(**task_data_options)``) written into ``data_dir`` when it
    holds none of them, or into a temporary folder (deleted afterwards) when ``data_dir`` is None."""
    need = [_TASK_FILES[n] for n in names if n in _TASK_FILES]
    if not need:
        yield (str(Path(data_dir).resolve()) if data_dir is not None else None), None
        return
    opts = dict(task_data_options or {})
    if data_dir is None:
        with tempfile.TemporaryDirectory(prefix="lalora-eval-data-") as tmp:
            yield tmp, task_data.benchmark_task_data(tmp, tokenizer=tokenizer, **opts)
        return
    d = Path(data_dir)
    if d.exists() and not d.is_dir():
        raise DataError(f"data_dir {data_dir}: not a directory")
    present = [f for f in need if (d / f).is_file()]
    if len(present) == len(need):
        yield str(d.resolve()), None
    elif not present and not any((d / f).is_file() for f in _TASK_FILES.values()):
        yield str(d.resolve()), task_data.benchmark_task_data(d, tokenizer=tokenizer, **opts)
    else:
        missing = [f for f in need if f not in present]
        raise DataError(f"data_dir {data_dir} holds some of lalora's task files but not {missing[0]}: add it "
                        "(lalora.evaluation.write_task_data), or name an empty folder to get the benchmark's data")


class TaskSet:
    """lm-eval tasks loaded once (names resolved, datasets read) and evaluated on any number of models:
    what ``evaluate`` does once and ``lalora bench --eval lm-eval`` after every training run."""

    def __init__(self, tasks, include_path=None, data_dir=None):
        require_lm_eval()
        self.names = task_names(tasks)
        self.include_path = _include_paths(include_path)
        self.data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None
        meta = {task_data.DATA_DIR_KEY: self.data_dir} if self.data_dir else None
        self.manager = task_manager(self.names, include_path, meta)
        self.tasks = load_tasks(self.manager, self.names)

    def run(self, lm, **lm_eval_kwargs) -> dict:
        """``lm_eval.simple_evaluate`` on ``lm`` (an ``HFLM``), with ``token_perplexity`` added."""
        import lm_eval

        results = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.manager, log_samples=True,
                                          **lm_eval_kwargs)
        add_token_perplexity(results, lm)
        return results

    def run_lean(self, lm, limit=None) -> dict:
        """``lm_eval.evaluator.evaluate`` (what ``simple_evaluate`` calls after its set-up) with the set-up this
        needs: each task's few-shot count (0 where the task names none) and few-shot seed, no reseeding of the
        global random state, no bootstrap, and none of the run's environment report (~1.5 s per call spent
        listing pip packages): the per-run evaluations of ``lalora bench --eval lm-eval``."""
        from lm_eval.evaluator import evaluate as lm_evaluate

        loaded = self.manager.load(self.tasks)
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)  # simple_evaluate's default fewshot_random_seed
        results = lm_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True)
        add_token_perplexity(results, lm)
        return results


def evaluate(model, adapter=None, *, tasks, tokenizer=None, include_path=None, data_dir=None, task_data_options=None,
             output=None, batch_size: int = 8, device=None, dtype: str = "float32", max_length: int | None = None,
             log_samples: bool = False, **lm_eval_kwargs) -> dict:
    """Evaluate ``model`` on lm-eval ``tasks``; returns lm-eval's results dict (and writes it to ``output``).

    ``model``: a model directory (``save_pretrained`` layout; ``adapter``: a peft adapter directory), or a
    model in memory (``transformers`` model or ``PeftModel``) with its ``tokenizer``. ``tasks``: lm-eval
    task names (list or comma-separated); lalora ships ``lalora_source`` (rolling log-likelihood of held-out
    source text), ``lalora_source_conditional`` (the same texts in the benchmark's convention: each
    text's first token is context) and ``lalora_arithmetic`` (the benchmark's target task), which read from
    ``data_dir`` (``lalora.evaluation.write_task_data``); a ``data_dir`` without them (or None: a temporary
    folder) gets the benchmark's data, ``benchmark_task_data(**task_data_options)``, cut with the model's
    tokenizer;
    ``"forgetting"`` = hellaswag, arc_challenge, winogrande. ``include_path``: more task folders.
    ``lm_eval_kwargs`` go to ``lm_eval.simple_evaluate`` (``limit``, ``num_fewshot``, ``bootstrap_iters``, ...).

    Added to lm-eval's results: ``token_perplexity`` for rolling log-likelihood tasks, and
    ``results["lalora"]`` (task data, the forgetting mean when its three tasks ran).
    """
    names = task_names(tasks)
    lm = make_lm(model, adapter, tokenizer, batch_size=batch_size, device=device, dtype=dtype, max_length=max_length)
    with _task_data_dir(names, data_dir, lm.tokenizer, task_data_options) as (ddir, written):
        taskset = TaskSet(names, include_path, ddir)
        results = taskset.run(lm, **lm_eval_kwargs)
    extra = {"tasks": names, "include_path": taskset.include_path, "data_dir": ddir if data_dir is not None else None,
             "task_data": written or _read_info(ddir),
             "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
             "adapter": str(adapter) if adapter else None}
    score = forgetting_score(results)
    if score is not None:
        extra["forgetting"] = score
    results["lalora"] = extra
    if output is not None:
        write_results(results, output)
        if log_samples:
            write_samples(results, output)
    if not log_samples:
        results.pop("samples", None)
    return results


def _read_info(ddir) -> dict | None:
    if not ddir:
        return None
    p = Path(ddir) / task_data.INFO_FILE
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
