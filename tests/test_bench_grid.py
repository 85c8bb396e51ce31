"""The benchmark grid (``lalora.bench.grid``: seeds x fit data x examples on one model) on a tiny Llama: what runs
where, the summary and paired statistics against a direct computation from the cells, the fit data, the CLI flags."""
from __future__ import annotations

import statistics

import pytest
import torch

from lalora.bench.grid import Grid, run_grid
from lalora.bench.grid_format import format_grid
from lalora.bench.plot import fit_data_plot, summary_pareto_plot
from lalora.bench.run import BenchConfig
from lalora.cli import main
from lalora.cli.common import EXIT_USAGE
from models import byte_tokenizer, tiny_llama
from numerics import F32, rel_close


def _cfg(**kw):
    base = dict(source="pydoc", methods=("lora", "l2", "diag"), strengths=(1.0,), steps=2, n_train=8, batch_size=4,
                n_target_eval=2, n_source_fit=4, n_source_eval=4, max_length=16, rank=2, targets=("q_proj",),
                progress=False)
    return BenchConfig.quick(**(base | kw))


@pytest.fixture(scope="module")
def grid_report():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=257, max_position_embeddings=256)
    tok = byte_tokenizer()
    x = torch.randint(0, 257, (2, 9))
    before = model(input_ids=x).logits
    names = [n for n, _ in model.named_parameters()]
    # the unrelated corpus of --source pydoc is fortunes, which a CI machine may not have installed: a stand-in
    quotes = [f"Quote number {i}: the {w} is mightier than the sword." for i, w in enumerate(["pen"] * 40)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lalora.bench.tasks.fortunes", lambda: quotes)
        rep = run_grid(_cfg(), Grid(seeds=(0, 1), fit_on=("source", "generated", "unrelated"), n_source_fit=(4, 8)),
                       model=model, tokenizer=tok)
    # the base model is given back as it came: no LoRA layer left, the same function
    assert [n for n, _ in model.named_parameters()] == names
    assert rel_close(model(input_ids=x).logits, before, F32)
    return rep


def test_fit_free_methods_run_once_per_seed_and_fitted_ones_per_cell(grid_report):
    cells = grid_report["cells"]
    assert [(c["seed"], c["fit_on"], c["n_source_fit"]) for c in cells] == [
        (s, f, n) for s in (0, 1) for f in ("source", "generated", "unrelated") for n in (4, 8)]
    for c in cells:
        methods = [r["method"] for r in c["results"]]
        first = c["fit_on"] == "source" and c["n_source_fit"] == 4
        assert methods == (["lora", "l2", "diag"] if first else ["diag"])
    # the fit data: what each cell fitted on
    kinds = {(c["fit_on"], c["fit_data"].get("kind")) for c in cells}
    assert kinds == {("source", "source"), ("generated", "model-generated"), ("unrelated", "unrelated")}
    assert {c["fit_data"]["corpus"] for c in cells if c["fit_on"] == "unrelated"} == {"fortunes"}


def test_summary_and_paired_statistics_match_a_direct_computation(grid_report):
    cells = grid_report["cells"]
    rows = {(r["fit_on"], r["n_source_fit"], r["method"]): r for r in grid_report["summary"]["rows"]}
    assert len(rows) == 2 + 3 * 2  # lora, l2 (no fit data) + diag per (fit_on, n)
    for (fit_on, n) in [("generated", 8), ("unrelated", 4)]:
        vals = [r["source_ppl"] for c in cells if (c["fit_on"], c["n_source_fit"]) == (fit_on, n)
                for r in c["results"] if r["method"] == "diag"]
        s = rows[(fit_on, n, "diag")]["source_ppl"]
        assert len(vals) == 2 and s["n"] == 2
        assert abs(s["mean"] - sum(vals) / 2) <= 1e-12 * abs(s["mean"])
        assert abs(s["sd"] - statistics.stdev(vals)) <= 1e-12 * max(1.0, s["sd"])
        assert abs(s["ci95"] - 12.706 * s["sd"] / 2 ** 0.5) <= 1e-9 * max(1.0, s["ci95"])
    lora = {c["seed"]: r for c in cells for r in c["results"] if r["method"] == "lora"}
    diag = {c["seed"]: r for c in cells for r in c["results"]
            if r["method"] == "diag" and (c["fit_on"], c["n_source_fit"]) == ("source", 8)}
    pair = [p for p in grid_report["paired"] if {p["a"], p["b"]} == {"lora", "diag 1 (source, 8)"}]
    assert len(pair) == 1
    sign = 1 if pair[0]["a"] == "diag 1 (source, 8)" else -1
    d = [sign * (diag[s]["source_ppl"] - lora[s]["source_ppl"]) for s in (0, 1)]
    assert abs(pair[0]["source_ppl"]["mean"] - sum(d) / 2) <= 1e-9 * max(1.0, abs(sum(d)))
    # the same method on other fit data is paired too; methods on different fit data are not
    labels = {(p["a"], p["b"]) for p in grid_report["paired"]}
    assert ("diag 1 (source, 4)", "diag 1 (generated, 4)") in labels
    assert not any("l2" in a and "l2" in b for a, b in labels)


def test_format_and_plots(grid_report, tmp_path):
    text = format_grid(grid_report)
    assert text.startswith("## Summary") and "| source | 8 | diag | 1 |" in text and "±" in text and "nats" in text
    assert text.count("## seed ") == len(grid_report["cells"])
    summary_pareto_plot(grid_report, tmp_path / "p.png")
    fit_data_plot(grid_report, tmp_path / "f.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,x"], "--seeds"), (["--fit-on", "source,web"], "--fit-on"), (["--n-source-fit", "0"], "--n-source-fit"),
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds"), (["--seeds", "1,1"], "must not repeat"),
])
def test_bad_grid_flags_are_usage_errors(flags, message, capsys, tmp_path):
    assert main(["bench", *flags, "--out-dir", str(tmp_path / "never")]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_full_preset_runs_three_seeds():
    import argparse

    from lalora.cli.bench import bench_config, bench_grid

    args = argparse.Namespace(methods=None, strengths=None, steps=None, lr=None, batch_size=None, rank=None, seed=None,
                              threads=None, n_target_eval=None, n_source_eval=None, n_source_fit=None, model=None,
                              source="fortunes", eval="lalora", eval_tasks=None, eval_limit=None, quiet=True,
                              quick=False, full=True, seeds=None, fit_on=None)
    cfg = bench_config(args)
    assert bench_grid(args, cfg) == Grid(seeds=(0, 1, 2), fit_on=("source",), n_source_fit=(64,))
