"""Benchmark presets and the tri-kfac precision built from kfac factors (no second fit)."""
import warnings

import torch

import lalora
from lalora.bench.precisions import as_tri_kfac
from lalora.bench.run import BenchConfig
from lalora.cli import EXIT_USAGE, main
from models import randomize_lora_B, tiny_lora_llama, token_batches


def test_tri_kfac_from_kfac_factors_equals_a_tri_kfac_fit():
    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora_B(model)
    data = token_batches(n_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        P_k = lalora.fit_precision(model, data, backend="kfac", options={"curvature": "ef"}, progress=False)
        P_t = lalora.fit_precision(model, data, backend="tri-kfac", options={"curvature": "ef"}, progress=False)
    P = as_tri_kfac(P_k)
    assert [b.kind for b in P.blocks] == [b.kind for b in P_t.blocks] == ["tri-kfac"] * len(P_t.blocks)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = {n: torch.randn(t.shape, generator=g) for n, t in P.anchor.items()}
        q, q_ref = float(P.quadratic(d)), float(P_t.quadratic(d))
        # same factors, same float32 arithmetic: equal up to summation order
        assert abs(q - q_ref) <= 1e-6 * abs(q_ref)
    # and it differs from the kfac quadratic (cross terms), so the test can fail
    assert abs(float(P_k.quadratic(d)) - q_ref) > 1e-4 * abs(q_ref)


def test_presets_and_flags():
    default, full, quick = BenchConfig(), BenchConfig.full(), BenchConfig.quick()
    assert len(full.strengths) > len(default.strengths) >= 1 and full.steps > default.steps > quick.steps
    assert BenchConfig.full(steps=7).steps == 7
    assert main(["bench", "--quick", "--full", "--out-dir", "/nonexistent/never-written"]) == EXIT_USAGE
