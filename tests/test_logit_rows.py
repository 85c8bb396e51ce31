"""Logit rows in chunks (lalora.logit_rows) give the numbers of the unchunked float32 computation.

References: ``F.cross_entropy`` on all rows upcast to float32 at once and its autograd gradient (the loss
path before chunking), ``lalora.sampling.sample_row_targets`` on all rows at once. Tolerances: the same
float32 operations row by row, so the differences are float32 round-off of a softmax (1e-6 absolute on
entries in [-1, 1], 1e-6 relative on losses); MC labels are discrete: the same uniforms and the same
per-row probabilities pick the same classes (a difference needs a uniform within round-off of a CDF step).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lalora import fit_precision
from lalora.logit_rows import (categorical_labels, causal_lm_loss, finite_rows, row_cross_entropy, row_gradients,
                               sample_rows)
from lalora.losses import CausalLMLoss
from lalora.sampling import mc_generator, sample_row_targets
from models import labelled_sequences, pad_batch, randomize_lora_B, tiny_lora_llama, token_batches
from numerics import assert_same_precision, rel_diff


def _rows(R=37, C=53, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = (3 * torch.randn(R, C, generator=g)).to(dtype)
    targets = torch.randint(0, C, (R,), generator=g)
    targets[::4] = -100
    return rows, targets


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_cross_entropy_equals_the_float32_cross_entropy_and_its_gradient(chunk, dtype):
    rows, targets = _rows(dtype=dtype)
    a = rows.clone().requires_grad_()
    want = F.cross_entropy(a.float(), targets, reduction="none")
    w = torch.linspace(0.5, 2.0, rows.shape[0])  # a non-uniform upstream gradient
    (gw,) = torch.autograd.grad((want * w).sum(), a)
    b = rows.clone().requires_grad_()
    got = row_cross_entropy(b, targets, chunk=chunk)
    (gg,) = torch.autograd.grad((got * w).sum(), b)
    assert got.dtype == torch.float32 and rel_diff(got, want) <= 1e-6
    assert gg.dtype == dtype
    assert bool((got[targets == -100] == 0).all()) and bool((gg[targets == -100] == 0).all())
    # entries of |w (p - onehot)| <= 2: float32 round-off 2e-6; in bf16 both round (nearly) the same float32
    # value to bf16, so they differ by at most one bf16 step at magnitude <= 2 (2^-7)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2e-6
    assert float((gg.float() - gw.float()).abs().max()) <= tol


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_row_gradients_and_sampled_labels_match_the_unchunked_ones(chunk):
    rows, targets = _rows()
    keep = targets != -100
    loss = CausalLMLoss()
    want = loss.row_gradient(torch.softmax(rows, -1), targets, keep)
    got = row_gradients(rows, keep, categorical_labels(targets, None, rows.shape[0]), chunk=chunk)
    assert float((got - want).abs().max()) <= 1e-6
    # MC labels: the same draws from the same generator as all rows at once
    assert torch.equal(sample_rows("categorical", rows, mc_generator(3), chunk=chunk),
                       sample_row_targets("categorical", rows, mc_generator(3)))
    g1, g2 = mc_generator(3), mc_generator(3)
    mc = row_gradients(rows, keep, categorical_labels(None, g1, rows.shape[0]), chunk=chunk)
    y = sample_row_targets("categorical", rows, g2)
    assert float((mc - loss.row_gradient(torch.softmax(rows, -1), y, keep)).abs().max()) <= 1e-6
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # the generators moved alike


def test_causal_lm_loss_in_chunks_equals_one_chunk(monkeypatch):
    """``CausalLMLoss.per_example`` and its gradient do not depend on the chunk size (one chunk = the whole
    float32 copy of before)."""
    model = tiny_lora_llama()
    randomize_lora_B(model)
    loss = CausalLMLoss()
    b = loss.prepare(pad_batch(labelled_sequences()[:4], "left"))
    with torch.no_grad():
        logits = model(**b.inputs).logits
    out = {}
    for chunk in (10**9, 3):
        monkeypatch.setattr("lalora.logit_rows.CHUNK_ROWS", chunk)
        z = logits.clone().requires_grad_()
        value = loss.per_example(z, b)
        out[chunk] = value, torch.autograd.grad(value.sum(), z)[0]
    assert rel_diff(out[3][0], out[10**9][0]) <= 1e-6
    assert float((out[3][1] - out[10**9][1]).abs().max()) <= 1e-6


@pytest.mark.parametrize("backend,options", [("kfac", {"curvature": "ef"}), ("kfac", {"curvature": "mc", "mc_samples": 2}),
                                             ("diag", {})])
def test_fits_do_not_depend_on_the_chunk_size(monkeypatch, backend, options):
    """A fit with 2 rows per chunk equals the fit with all rows in one chunk (the unchunked path) to float32
    round-off (``assert_same_precision``: 1e-6 relative, norm-wise)."""
    data = token_batches(n_batches=2, batch_size=3, seq_len=7)
    fits = []
    for chunk in (10**9, 2):
        monkeypatch.setattr("lalora.logit_rows.CHUNK_ROWS", chunk)
        model = tiny_lora_llama(targets=("q_proj", "v_proj"))
        randomize_lora_B(model)
        fits.append(fit_precision(model, data, backend=backend, options=options, progress=False))
    assert_same_precision(fits[0], fits[1])


@pytest.mark.parametrize("num_items", [None, 11])
def test_trainer_loss_equals_transformers_causal_lm_loss(num_items):
    """``causal_lm_loss`` (a Trainer ``compute_loss_func``) = ``model(**batch).loss`` (transformers'
    ``ForCausalLMLoss``) and its gradient w.r.t. the LoRA weights, float32 round-off (1e-6 relative)."""
    model = tiny_lora_llama()
    randomize_lora_B(model)
    batch = pad_batch(labelled_sequences()[:4], "right")
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = model(**batch, **kw).loss
    gw = torch.autograd.grad(want, params)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    got = causal_lm_loss(model(**inputs), batch["labels"], chunk=5, **kw)
    gg = torch.autograd.grad(got, params)
    assert rel_diff(got, want) <= 1e-6
    assert max(rel_diff(a, b) for a, b in zip(gg, gw)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_is_exactly_a_finite_softmax(dtype):
    """``finite_rows`` (one max per row) agrees with its definition, the softmax sum of each kept row being finite,
    on every kind of row: finite, huge, with NaN, +inf, some -inf (masked tokens: fine), all -inf."""
    inf, nan = float("inf"), float("nan")
    kinds = [[0.0, 1.0, 2.0], [3e38, -3e38, 0.0], [nan, 0.0, 1.0], [inf, 0.0, 1.0], [-inf, 0.0, 1.0],
             [-inf, -inf, -inf], [-inf, inf, 0.0]]
    rows = torch.tensor(kinds).to(dtype)
    for keep_bits in range(1 << len(kinds)):
        keep = torch.tensor([bool(keep_bits >> i & 1) for i in range(len(kinds))])
        reference = bool((torch.isfinite(torch.softmax(rows.float(), -1).sum(-1)) | ~keep).all())
        for chunk in (1, 3, None):
            assert finite_rows(rows, keep, chunk) == reference, (keep_bits, chunk)
