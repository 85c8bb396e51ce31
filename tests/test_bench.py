"""Benchmark pieces on a tiny Llama (the SmolLM2 run itself is too slow for the test suite)."""
from __future__ import annotations

import random

import pytest
import torch

from lalora.bench import tasks
from lalora.bench.plot import pareto_plot
from lalora.bench.precisions import identity_precision
from lalora.bench.run import BenchConfig, format_table, make_lora_model, run_benchmark
from lalora.textdata import completion_batches, text_batches
from models import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_byte_tokenizer_ids_are_byte_values(tok):
    text = "Answer: 5 * 12 = 60. é"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text and tok.eos_token_id == 256


def test_arithmetic_problems_are_consistent_and_seeded():
    probs = tasks.arithmetic_set(200, seed=5)
    assert probs == tasks.arithmetic_set(200, seed=5) and probs != tasks.arithmetic_set(200, seed=6)
    for prompt, completion, ans in probs:
        assert prompt.endswith("Answer:") and tasks.parse_answer(completion) == ans
        a, b, prod = map(int, __import__("re").match(r" (\d+) \* (\d+) = (\d+)\.", completion).groups())
        assert a * b == prod and ans == eval(completion.split(". ")[1].split(" =")[0])
    assert tasks.parse_answer("blah The answer is -3.") == -3 and tasks.parse_answer("no number") is None


def test_source_split_is_disjoint():
    texts = tasks.source_texts("pydoc", seed=1)
    fit, ev = tasks.split_source(texts, 30, 20)
    assert len(fit) == 30 and len(ev) == 20 and not set(fit) & set(ev)
    with pytest.raises(Exception, match="fewer"):
        tasks.split_source(texts[:10], 8, 8)


def test_completion_batches_label_only_the_completion(tok):
    pairs = [("Q: 1+1?\nAnswer:", " 2"), ("Q: 10+20?\nAnswer:", " 30")]
    (b,) = completion_batches(tok, pairs, batch_size=2, max_length=64)
    for i, (p, c) in enumerate(pairs):
        n_p, n_c = len(tok(p)["input_ids"]), len(tok(c)["input_ids"]) + 1  # + eos
        lab = b["labels"][i]
        assert (lab[:n_p] == -100).all() and (lab[n_p:n_p + n_c] != -100).all() and (lab[n_p + n_c:] == -100).all()
        assert int(b["attention_mask"][i].sum()) == n_p + n_c
        assert tok.decode(lab[n_p:n_p + n_c - 1]) == c


def test_source_metrics_match_hf_loss(tok):
    model = tiny_llama(vocab_size=257, max_position_embeddings=128)
    batches = text_batches(tok, ["short text", "a somewhat longer text with padding"], 2, 64)
    m = tasks.source_metrics(model, batches)
    b = batches[0]
    with torch.no_grad():
        out = model(**b)
    # HF's loss is the mean over labelled next-token positions: ppl = exp(loss), tolerance 1e-4 relative
    assert m["source_ppl"] == pytest.approx(float(torch.exp(out.loss)), rel=1e-4)
    tgt = b["labels"][:, 1:]
    mask = tgt != -100
    acc = float((out.logits[:, :-1].argmax(-1)[mask] == tgt[mask]).float().mean())
    assert m["source_acc"] == pytest.approx(acc, abs=1e-9)


def test_identity_precision_is_squared_distance():
    model = make_lora_model(tiny_llama(), rank=2, targets=("q_proj", "v_proj"), seed=0)
    P = identity_precision(model)
    g = torch.Generator().manual_seed(0)
    d = {n: torch.randn(a.shape, generator=g) for n, a in P.anchor.items()}
    assert float(P.quadratic(d)) == pytest.approx(sum(float((v ** 2).sum()) for v in d.values()), rel=1e-5)


def test_run_benchmark_end_to_end_on_tiny_model(tok, tmp_path):
    model = tiny_llama(vocab_size=257, max_position_embeddings=256)
    cfg = BenchConfig.quick(source="pydoc", methods=("lora", "l2", "diag", "kfac", "kfac-ew"), strengths=(1.0, 100.0),
                            steps=3, n_train=8, batch_size=4, n_target_eval=2, n_source_fit=8, n_source_eval=4,
                            max_length=32, rank=2, targets=("q_proj", "v_proj"), progress=False)
    report = run_benchmark(cfg, model=model, tokenizer=tok)
    rows = report["results"]
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["lora", "l2", "diag"] and methods.count("l2") == methods.count("diag") == 2
    # kfac rows exist iff the backend is available; otherwise a note says why
    from lalora.bench.precisions import backend_status

    if backend_status("kfac")[0]:
        assert "kfac" in methods and "kfac-ew" in methods
    else:
        assert any("kfac" in n for n in report["notes"]) and "kfac" not in methods
    for r in rows:
        assert 0 <= r["target_em"] <= 1 and r["source_ppl"] > 1 and 0 <= r["source_acc"] <= 1
    # the regulariser works: a huge strength keeps the source perplexity closer to the base model's
    base = report["baseline"]["source_ppl"]
    lora = rows[0]["source_ppl"]
    strong_l2 = [r for r in rows if r["method"] == "l2" and r["strength"] == 100.0][0]["source_ppl"]
    assert abs(strong_l2 - base) <= abs(lora - base)
    table = format_table(report)
    assert "| base model |" in table and table.count("\n| ") == len(rows) + 1
    pareto_plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_generation_stops_once_the_answer_is_stated_and_the_metric_is_unchanged(tok):
    """Rows stop after "The answer is N<non-digit>"; the parsed answer of the truncated text equals the
    full text's (first statement wins), and a row without a statement keeps generating."""
    prompt = "Q: x\nAnswer:"
    texts = [" 2 * 3 = 6. The answer is 61. The answer is 7.", " 2 * 3 = 6. The answer is 6", " no answer here"]
    stop = tasks._AnswerStated(tok, len(tok(prompt)["input_ids"]))
    done = [bool(stop(torch.tensor([tok(prompt + t)["input_ids"]]), None)[0]) for t in texts]
    assert done == [True, False, False]  # row 2: "6" may continue ("61")
    full = tasks.parse_answer(texts[0])
    cut = texts[0][:texts[0].index("61.") + 3]
    assert tasks.parse_answer(cut) == full == 61


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_labelled_head_loss_equals_the_models_loss(tok, dtype):
    """lm_head on the labelled positions only gives model(**batch).loss (padded, prompt masked),
    value and LoRA gradients; rel. err 1e-5 (float32) / 1e-2 (bf16)."""
    from lalora.training import _labelled_head_loss

    model = make_lora_model(tiny_llama(dtype=dtype, vocab_size=257, max_position_embeddings=256), 2,
                            ("q_proj", "v_proj", "down_proj"), 0)
    pairs = [(p, c) for p, c, _ in tasks.arithmetic_set(5, 0)]
    (batch,) = completion_batches(tok, pairs, 5, 128)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    got = _labelled_head_loss(model, batch)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(got.detach()) - float(ref.detach())) <= tol * abs(float(ref.detach()))
    g_ref = torch.autograd.grad(ref, params)
    g_got = torch.autograd.grad(got, params)
    for a, b in zip(g_got, g_ref):
        assert float((a.float() - b.float()).norm()) <= 10 * tol * float(b.float().norm()) + 1e-12
