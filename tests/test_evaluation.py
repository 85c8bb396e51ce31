"""lm-evaluation-harness on lalora's shipped tasks, on a tiny random Llama with a byte tokenizer.

References that do not share lm-eval's code: unpadded singleton forward passes for the rolling
log-likelihood, the benchmark's own loops (``lalora.bench.tasks``) for the generations and the metric.
Nothing reaches a network: the shipped tasks read local files; standard tasks are checked offline.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the 'eval' extra: pip install 'lalora[eval]')")

import lalora.evaluation as ev  # noqa: E402
from lalora.bench import tasks as bt  # noqa: E402
from lalora.cli import main  # noqa: E402
from lalora.errors import DataError, LaloraError  # noqa: E402
from lalora.evaluation import data as task_data  # noqa: E402
from lalora.textdata import text_batches  # noqa: E402
from models import byte_tokenizer, randomize_lora_B, tiny_llama  # noqa: E402

# eos = pad = 256 in the model's config too: lm-eval stops a generated row at generation_config.eos_token_id
MODEL_KW = dict(vocab_size=257, max_position_embeddings=160, eos_token_id=256, pad_token_id=256, bos_token_id=None)
N_TEXTS, N_PROBLEMS, MAX_LEN = 5, 2, 40


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(**MODEL_KW)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("task_data")
    ev.benchmark_task_data(d, source="pydoc", n_source_eval=N_TEXTS, n_source_fit=2, n_target_eval=N_PROBLEMS,
                           tokenizer=tok, max_length=MAX_LEN)
    return d


@pytest.fixture(scope="module")
def results(model, tok, data_dir):
    return ev.evaluate(model, tokenizer=tok, tasks="lalora_source,lalora_source_conditional,lalora_arithmetic",
                       data_dir=data_dir, batch_size=2, bootstrap_iters=0, log_samples=True)


def _texts(data_dir):
    return [json.loads(line)["text"] for line in (data_dir / task_data.SOURCE_FILE).read_text().splitlines()]


def _reference_loglik(model, ids, prefix):
    """sum_i log p(t_i | prefix, t_<i) from one unpadded forward pass of [prefix] + ids (float64 sum)."""
    x = torch.tensor([[prefix] + ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return lp.gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def test_source_task_is_rolling_loglikelihood_of_every_token(model, tok, data_dir, results):
    """lm-eval's per-text log-likelihood = the singleton reference scoring every token given the prefix
    (the tokenizer has no BOS, so lm-eval's prefix is EOS); token perplexity and bits per byte follow.
    Tolerance 1e-5 relative: float32 logits, lm-eval batches (right padding) vs singletons."""
    texts = _texts(data_dir)
    samples = {s["doc"]["text"]: float(s["filtered_resps"][0]) for s in results["samples"]["lalora_source"]}
    ref_ll, n_tok, n_bytes = 0.0, 0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        ref = _reference_loglik(model, ids, tok.eos_token_id)
        assert samples[t] == pytest.approx(float(ref.sum()), rel=1e-5)
        ref_ll, n_tok, n_bytes = ref_ll + float(ref.sum()), n_tok + len(ids), n_bytes + len(t.encode())
    res = results["results"]["lalora_source"]
    assert res["num_tokens,none"] == n_tok
    assert res["token_perplexity,none"] == pytest.approx(math.exp(-ref_ll / n_tok), rel=1e-5)
    assert res["bits_per_byte,none"] == pytest.approx(-ref_ll / n_bytes / math.log(2), rel=1e-5)


def test_conditional_source_task_is_the_benchmarks_perplexity(model, tok, data_dir, results):
    """``lalora_source_conditional``: each text's first token is context only, nothing is prepended: per text
    the singleton reference over tokens 2..n, and in total the benchmark's own ``source_metrics`` (which
    scores the same tokens: the texts were cut to them). 1e-5 relative: float32 logits, other batching."""
    texts = _texts(data_dir)
    samples = {s["doc"]["context"] + s["doc"]["continuation"]: float(s["filtered_resps"][0][0])
               for s in results["samples"]["lalora_source_conditional"]}
    assert sorted(samples) == sorted(texts)
    ll = n = 0
    for t in texts:
        ids = tok(t)["input_ids"]
        ref = _reference_loglik(model, ids[1:], ids[0])
        assert samples[t] == pytest.approx(float(ref.sum()), rel=1e-5)
        ll, n = ll + float(ref.sum()), n + len(ref)
    res = results["results"]["lalora_source_conditional"]
    bench = bt.source_metrics(model, text_batches(tok, texts, 16, MAX_LEN))["source_ppl"]
    assert res["token_perplexity,none"] == pytest.approx(math.exp(-ll / n), rel=1e-5)
    assert res["token_perplexity,none"] == pytest.approx(bench, rel=1e-5)


def test_conditional_records_split_at_the_first_token(tok):
    """The split lm-eval makes (encode context + continuation, then the context) gives the benchmark's
    tokens; a text of one token, or whose first token is half a character (byte tokenizer, "é"), is left out."""
    recs, dropped = task_data.conditional_records(["Hello world", "x", "é tout", "Ok."], tok)
    assert dropped == 2 and [(r["context"], r["continuation"], r["num_tokens"]) for r in recs] == \
        [("H", "ello world", 10), ("O", "k.", 2)]


def test_arithmetic_task_generates_what_the_benchmark_generates(model, tok, data_dir, results, monkeypatch):
    """The generations lm-eval scores are the benchmark's greedy generations (captured through
    ``parse_answer``, which both paths call), so exact match agrees on any model."""
    problems = bt.arithmetic_set(N_PROBLEMS, 0 + 2)
    seen = []
    real = bt.parse_answer
    monkeypatch.setattr(bt, "parse_answer", lambda text: seen.append(text) or real(text))
    em = bt.target_exact_match(model, tok, problems)
    lm_gen = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in results["samples"]["lalora_arithmetic"]}
    assert [lm_gen[p] for p, _, _ in problems] == seen and len(set(seen)) > 1
    assert results["results"]["lalora_arithmetic"]["exact_match,none"] == em
    # the metric is the benchmark's parsing of the first "The answer is N"
    assert task_data.arithmetic_results({"answer": 53}, [" 5 * 12 = 60. The answer is 53. The answer is 4."]) == \
        {"exact_match": 1.0}
    assert task_data.arithmetic_results({"answer": 53}, [" The answer is 54."]) == {"exact_match": 0.0}


def test_data_folder_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="lalora_data_dir"):
        task_data.load_source()
    with pytest.raises(DataError, match="no data file .*source.jsonl"):
        task_data.load_source(lalora_data_dir=str(tmp_path))
    (tmp_path / task_data.SOURCE_FILE).write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(DataError, match="line 2 lacks the field 'text'"):
        task_data.load_source(lalora_data_dir=str(tmp_path))
    (tmp_path / task_data.SOURCE_FILE).write_text("")
    (tmp_path / "only-other.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no records"):
        task_data.load_source(lalora_data_dir=str(tmp_path))
    # a folder with one of the two files, asked for both: the missing one is named
    with pytest.raises(DataError, match="not arithmetic.jsonl"):
        with ev.harness._task_data_dir(["lalora_source", "lalora_arithmetic"], tmp_path, None):
            pass


def test_standard_task_offline_fails_with_a_clear_message(monkeypatch):
    """hellaswag's dataset is not cached and the hub is offline: the error names the task, its dataset and
    what to do. lm-eval's hellaswag folder is the include path, so its full index (~10 s) is not built."""
    import lm_eval.tasks

    _offline(monkeypatch)
    hellaswag = __import__("pathlib").Path(lm_eval.tasks.__file__).parent / "hellaswag"
    with pytest.raises(LaloraError) as e:
        ev.harness.TaskSet(["hellaswag"], include_path=hellaswag)
    msg = str(e.value)
    assert "'hellaswag'" in msg and "Rowan/hellaswag" in msg and "network" in msg and "HF_DATASETS_OFFLINE" in msg


def test_forgetting_score_is_the_mean_accuracy_of_the_three_tasks():
    res = {"results": {"hellaswag": {"acc,none": 0.3}, "arc_challenge": {"acc,none": 0.2},
                       "winogrande": {"acc,none": 0.55}}}
    score = ev.forgetting_score(res)
    assert score["mean"] == pytest.approx(0.35) and set(score["tasks"]) == set(ev.FORGETTING_TASKS)
    del res["results"]["winogrande"]
    assert ev.forgetting_score(res) is None
    assert ev.harness.task_names("forgetting,lalora_source") == [*ev.FORGETTING_TASKS, "lalora_source"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """A base model directory and a peft adapter directory (lora_B non-zero: the adapter changes the model)."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("eval_cli")
    base = tiny_llama(**MODEL_KW)
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_llama(**MODEL_KW), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(peft_model, scale=2.0)
    peft_model.save_pretrained(d / "adapter")
    return d, peft_model


def _offline(monkeypatch):
    """What HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 set (both libraries read them at import)."""
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def test_eval_cli_with_adapter_writes_results_json(capsys, tmp_path, saved, data_dir, tok, results, monkeypatch):
    """`lalora eval --model --adapter` (lm-eval loads the adapter with peft=), offline, writes lm-eval's JSON;
    its number equals evaluating the same PeftModel in memory, and differs from the base model's."""
    d, peft_model = saved
    _offline(monkeypatch)
    out = tmp_path / "res.json"
    code = main(["eval", "--model", str(d / "base"), "--adapter", str(d / "adapter"), "--tasks", "lalora_source",
                 "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "2", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0 and "lalora_source" in stdout and f"wrote {out}" in stdout
    written = json.loads(out.read_text())
    assert "samples" not in written and written["lalora"]["adapter"] == str(d / "adapter")
    with_adapter = written["results"]["lalora_source"]["token_perplexity,none"]
    in_memory = ev.evaluate(peft_model, tokenizer=tok, tasks=["lalora_source"], data_dir=data_dir, batch_size=2,
                            bootstrap_iters=0)["results"]["lalora_source"]["token_perplexity,none"]
    base = results["results"]["lalora_source"]["token_perplexity,none"]  # the same base model and data
    assert with_adapter == pytest.approx(in_memory, rel=1e-5)  # float32 round-off between two loads
    assert abs(with_adapter - base) > 1e-3 * base


def test_eval_cli_errors_name_the_flag(capsys, tmp_path, saved):
    d, _ = saved
    cases = [(["--model", str(tmp_path / "none"), "--tasks", "lalora_source"], "--model"),
             (["--model", str(d / "base"), "--adapter", str(tmp_path), "--tasks", "lalora_source"], "--adapter"),
             (["--model", str(d / "base"), "--tasks", ","], "--tasks"),
             (["--model", str(d / "base"), "--tasks", "lalora_source", "--include-path", str(tmp_path / "x")],
              "--include-path"),
             (["--model", str(d / "base"), "--tasks", "lalora_source", "--out", str(tmp_path)], "--out")]
    for argv, flag in cases:
        assert main(["eval", *argv, "-q"]) == 2
        assert f"lalora eval: error: {flag}" in capsys.readouterr().err


def test_benchmark_through_lm_eval(tok):
    """`lalora bench --eval lm-eval` on the tiny model: the base model's source perplexity is the default
    path's (``source_metrics``; 1e-5 relative: float32 round-off); no token accuracy. (That the target EM
    agrees follows from the generations being the benchmark's, tested above.)"""
    from lalora.bench.run import BenchConfig, format_table, run_benchmark

    cfg = BenchConfig.quick(evaluator="lm-eval", source="pydoc", methods=("lora",), steps=2, n_train=4, batch_size=2,
                            n_target_eval=2, n_source_fit=2, n_source_eval=3, max_length=24, rank=2,
                            targets=("q_proj",), progress=False)
    report = run_benchmark(cfg, model=tiny_llama(**MODEL_KW), tokenizer=tok)
    base = tiny_llama(**MODEL_KW)
    texts = bt.split_source(bt.source_texts("pydoc", 0), 2, 3)[1]
    expected = bt.source_metrics(base, text_batches(tok, texts, 16, 24))["source_ppl"]
    assert report["baseline"]["source_ppl"] == pytest.approx(expected, rel=1e-5)
    (row,) = report["results"]
    assert row["source_acc"] is None and row["source_ppl"] > 1 and "lm_eval_source" in row["extra"]
    assert any("lm-eval" in note for note in report["notes"]) and "| - |" in format_table(report)
