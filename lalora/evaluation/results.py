"""What lalora adds to lm-eval's results, and how it writes them: per-token perplexity of rolling
log-likelihood tasks, the forgetting mean of Biderman et al. 2024, the results JSON and the samples."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic_file import atomic_write_text

FORGETTING_TASKS = ("hellaswag", "arc_challenge", "winogrande")
FORGETTING_METRIC = "acc"


def add_token_perplexity(results: dict, lm) -> None:
    """lm-eval reports word and byte perplexity for rolling log-likelihood tasks; add the per-token
    perplexity ``exp(-sum ll / sum n)``, with n the tokens lm-eval scored (``lm.tok_encode`` of each text:
    its rolling windows predict every one of them)."""
    for name, samples in (results.get("samples") or {}).items():
        cfg = (results.get("configs") or {}).get(name, {})
        if cfg.get("output_type") != "loglikelihood_rolling" or name not in results.get("results", {}) \
                or "token_perplexity,none" in results["results"][name]:
            continue
        ll = n = 0
        for s in samples:
            (text,) = s["arguments"][0] if isinstance(s["arguments"][0], (list, tuple)) else s["arguments"]
            ll += float(s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"])
            n += len(lm.tok_encode(text))
        if n:
            results["results"][name]["token_perplexity,none"] = math.exp(-ll / n)
            results["results"][name]["num_tokens,none"] = n
            results.setdefault("higher_is_better", {}).setdefault(name, {})["token_perplexity"] = False


def forgetting_score(results: dict, metric: str = FORGETTING_METRIC) -> dict | None:
    """Mean of ``metric`` over HellaSwag, ARC-Challenge and WinoGrande (Biderman et al. 2024), when all ran."""
    res = results.get("results", {})
    vals = {t: res[t].get(f"{metric},none") for t in FORGETTING_TASKS if t in res}
    if len(vals) < len(FORGETTING_TASKS) or any(v is None for v in vals.values()):
        return None
    return {"metric": metric, "mean": sum(vals.values()) / len(vals), "tasks": vals}


def write_results(results: dict, path) -> Path:
    """lm-eval's results JSON (samples left out), written to a temp file and renamed."""
    from lm_eval.utils import handle_non_serializable

    p = Path(path)
    out = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_text(p, json.dumps(out, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return p


def write_samples(results: dict, path) -> list[Path]:
    """Per-task samples as JSON lines next to ``path`` (``<stem>_samples_<task>.jsonl``), as lm-eval writes them."""
    from lm_eval.utils import handle_non_serializable

    p = Path(path)
    out = []
    for name, samples in (results.get("samples") or {}).items():
        q = p.with_name(f"{p.stem}_samples_{name}.jsonl")
        atomic_write_text(q, "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                                for s in samples))
        out.append(q)
    return out
