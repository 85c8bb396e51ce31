"""Benchmark data and metrics (the batches are built by ``lalora.textdata``).

Source domain (what must not be forgotten): real text that installs offline, split into a
*surrogate* slice (fits the precision) and a disjoint *evaluation* slice. Metrics: per-token
perplexity and next-token accuracy on the evaluation slice.
Target domain: generated two-step arithmetic word problems with a worked answer; metric:
exact match of the final number after greedy decoding.
"""
from __future__ import annotations

import glob
import os
import random
import re

import torch

from ..errors import DataError

FORTUNES_DIR = "/usr/share/games/fortunes"
SOURCES = ("fortunes", "pydoc")

# --- source text -----------------------------------------------------------------------


def fortunes(directory: str = FORTUNES_DIR) -> list[str]:
    """All quotes of Debian's ``fortunes`` package (split on ``%`` lines), in file order."""
    files = sorted(f for f in glob.glob(os.path.join(directory, "*")) if os.path.isfile(f) and "." not in os.path.basename(f))
    if not files:
        raise DataError(f"no fortune files in {directory}: install Debian's 'fortunes' package "
                        "(apt-get install -y fortunes) or use --source pydoc")
    out = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for q in re.split(r"^%$", fh.read(), flags=re.M):
                q = " ".join(q.split())
                if 40 <= len(q) <= 600:
                    out.append(q)
    return out


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of Python's own help topics (``pydoc_data.topics``): a fallback source text."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if 80 <= len(para) <= 600:
                out.append(para)
    return out


def source_texts(source: str = "fortunes", seed: int = 0) -> list[str]:
    """The source texts shuffled with ``seed`` (deterministic)."""
    if source == "fortunes":
        texts = fortunes()
    elif source == "pydoc":
        texts = pydoc_paragraphs()
    else:
        raise DataError(f"--source {source!r}: use one of {SOURCES}")
    texts = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(texts)
    return texts


def split_source(texts: list[str], n_fit: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint (surrogate, evaluation) slices: evaluation first, surrogate after it."""
    if len(texts) < n_fit + n_eval:
        raise DataError(f"the source has {len(texts)} texts, fewer than the {n_fit} + {n_eval} requested")
    return texts[n_eval:n_eval + n_fit], texts[:n_eval]


# --- target task -----------------------------------------------------------------------

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Eva", "Ken", "Zoe"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
HOLDERS = ["boxes", "bags", "shelves", "jars", "packs"]


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
    """``(prompt, completion, answer)``: e.g. ``"Question: Tom has 5 boxes with 12 apples each.
    He gives away 7 apples. How many apples does he have now?\\nAnswer:"`` and
    ``" 5 * 12 = 60. 60 - 7 = 53. The answer is 53."``."""
    name, item, holder = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(HOLDERS)
    a, b = rng.randint(2, 9), rng.randint(3, 15)
    prod = a * b
    if rng.random() < 0.5:
        c = rng.randint(1, prod - 1)
        ans = prod - c
        q = f"{name} has {a} {holder} with {b} {item} each. {name} gives away {c} {item}."
        work = f"{a} * {b} = {prod}. {prod} - {c} = {ans}."
    else:
        c = rng.randint(1, 30)
        ans = prod + c
        q = f"{name} has {a} {holder} with {b} {item} each. {name} finds {c} more {item}."
        work = f"{a} * {b} = {prod}. {prod} + {c} = {ans}."
    prompt = f"Question: {q} How many {item} does {name} have now?\nAnswer:"
    return prompt, f" {work} The answer is {ans}.", ans


def arithmetic_set(n: int, seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng) for _ in range(n)]


ANSWER_RE = re.compile(r"The answer is (-?\d+)")


def parse_answer(text: str) -> int | None:
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


# --- metrics ---------------------------------------------------------------------------


@torch.no_grad()
def source_metrics(model, batches: list[dict]) -> dict:
    """Per-token perplexity and next-token accuracy over the labelled tokens of ``batches``."""
    nll, correct, count = 0.0, 0, 0
    was = model.training
    model.eval()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        m = tgt != -100
        lp = torch.log_softmax(logits[m], -1)
        t = tgt[m]
        nll += float(-lp.gather(1, t[:, None]).sum())
        correct += int((lp.argmax(-1) == t).sum())
        count += int(m.sum())
    model.train(was)
    if count == 0:
        raise DataError("no labelled source tokens to evaluate")
    return {"source_ppl": float(torch.exp(torch.tensor(nll / count))), "source_acc": correct / count}


_ANSWER_DONE_RE = re.compile(r"The answer is -?\d+\D")


class _AnswerStated:
    """Generation stopping criterion: a row is done once its new text states the final number
    ("The answer is 53" followed by a non-digit). ``parse_answer`` reads the first such statement,
    so stopping there leaves the metric unchanged and saves the rest of the 40 tokens."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(_ANSWER_DONE_RE.search(t)) for t in texts], device=input_ids.device)


@torch.no_grad()
def target_exact_match(model, tokenizer, problems: list[tuple[str, str, int]], batch_size: int = 32,
                       max_new_tokens: int = 40) -> float:
    """Fraction of problems whose greedy completion states the right final number."""
    was = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits = 0
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i:i + batch_size]
            enc = tokenizer([p for p, _, _ in chunk], return_tensors="pt", padding=True)
            stop = _AnswerStated(tokenizer, enc["input_ids"].shape[1])
            # only ids and mask: tokenizers may add token_type_ids, which transformers 4.x generate() refuses
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=[stop],
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            hits += sum(parse_answer(t) == ans for t, (_, _, ans) in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return hits / max(1, len(problems))


def __getattr__(name):
    # the batch builders moved to lalora.textdata (the CLI uses them too); docs of 0.1 imported them from here
    if name in ("text_batches", "completion_batches"):
        from .. import textdata
        from ..errors import warn_deprecated

        warn_deprecated(f"lalora.bench.tasks.{name} is deprecated: it moved to lalora.textdata.{name}")
        return getattr(textdata, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
