"""Backend `block` against brute-force dense EF/GGN (lalora.reference: batch-of-one autograd loops)."""
import warnings

import pytest
import torch

import lalora
from lalora.blocks.factored import FactoredBlock
from lalora.reference import dense_empirical_fisher, dense_ggn, rel_err
from models import lora_mlp, randomize_lora_B, tiny_lora_llama, token_batches
from numerics import F32, rel_close

TOL = 1e-5  # relative error, float32 model vs float64 reference


def _fit(model, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, batches, backend="block", progress=False, **kw)


def _block_mask(precision):
    """Boolean (P, P) mask of the diagonal blocks (blocks are non-overlapping and in param order)."""
    P = precision.num_params
    mask = torch.zeros(P, P, dtype=torch.bool)
    i = 0
    for b in precision.blocks:
        n = sum(torch.Size(precision.shapes[p]).numel() for p in b.params)
        mask[i:i + n, i:i + n] = True
        i += n
    assert i == P
    return mask


@pytest.mark.parametrize("b_nonzero", [False, True], ids=["B=0", "B!=0"])
def test_block_ef_matches_dense_reference(b_nonzero):
    model = tiny_lora_llama(init="orthogonal" if b_nonzero else True, targets=("q_proj", "v_proj"))
    if b_nonzero:
        randomize_lora_B(model)
    batches = token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)
    p = _fit(model, batches)
    ref = dense_empirical_fisher(model, batches)
    mask = _block_mask(p)
    assert len(p.blocks) == 4 and all(len(b.params) == 2 for b in p.blocks)  # one block per adapter
    assert rel_err(p.to_dense(), ref * mask) <= TOL
    assert torch.count_nonzero(p.to_dense()[~mask]) == 0
    assert p.metadata["curvature"] == "ef" and p.metadata["num_examples"] == 6
    # the A-B cross terms are there (and vanish exactly with B = 0, where all of A's gradients vanish)
    cross = p.blocks[0].to_dense()[:32, 32:]
    assert bool(cross.abs().max() > 0) == b_nonzero


def test_block_ggn_matches_dense_reference():
    model = tiny_lora_llama(targets=("v_proj",))
    randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=2, seq_len=6, pad=True, mask_prompt=True)
    ref = dense_ggn(model, batches)
    for granularity in ("adapter", "matrix"):
        p = _fit(model, batches, options={"curvature": "ggn", "granularity": granularity})
        assert rel_err(p.to_dense(), ref * _block_mask(p)) <= TOL, granularity
    assert p.metadata["curvature"] == "ggn" and len(p.blocks) == 4 and p.metadata["num_examples"] == 2


def test_block_ggn_mse_mlp():
    """Regression (Gaussian likelihood, H = 2I) on an MLP: GGN of the one-block-per-adapter structure."""
    model = lora_mlp()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(2)]
    p = _fit(model, batches, loss="mse", options={"curvature": "ggn"})
    ref = dense_ggn(model, batches, loss="mse")
    assert rel_err(p.to_dense(), ref * _block_mask(p)) <= TOL


def test_factored_equals_dense_and_penalty():
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    randomize_lora_B(model)
    batches = token_batches(n_batches=2, batch_size=3)
    dense = _fit(model, batches, options={"storage": "dense"})
    fact = _fit(model, batches, options={"storage": "factored"})
    assert all(isinstance(b, FactoredBlock) and b.factor.shape[0] == 6 for b in fact.blocks)  # rank <= N = 6
    assert rel_err(fact.to_dense(), dense.to_dense()) <= TOL
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(s, generator=g) for n, s in fact.shapes.items()}
    v = torch.cat([delta[n].reshape(-1) for n in fact.param_names]).double()
    D = dense.to_dense()
    assert rel_err(fact.quadratic(delta), v @ D @ v) <= TOL
    mv = fact.matvec(delta)
    assert rel_err(torch.cat([mv[n].reshape(-1) for n in fact.param_names]), D @ v) <= TOL
    for n, d in fact.diagonal().items():
        assert rel_err(d, dense.diagonal()[n]) <= TOL
    # scaling and the regulariser's gradient go through the factors (never densified)
    assert rel_err((fact * 2.5).quadratic(delta), 2.5 * (v @ D @ v)) <= TOL
    dq = {n: t.clone().requires_grad_(True) for n, t in delta.items()}
    fact.quadratic(dq).backward()
    grad = torch.cat([dq[n].grad.reshape(-1) for n in fact.param_names]).double()
    assert rel_err(grad, 2 * D @ v) <= TOL


def test_memory_budget_chooses_form_and_summary_reports_it(tmp_path):
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=3)
    # adapter blocks have 64 (q) and 48 (v) weights: dense 16 KiB and 9 KiB; budget 12 KiB splits them
    p = _fit(model, batches, options={"memory_budget_mb": 12 / 1024})
    forms = p.metadata["block_forms"]
    assert sorted(set(forms.values())) == ["dense", "factored"]
    assert [type(b).__name__ for b in p.blocks] == ["FactoredBlock", "DenseBlock"] * 2
    text = p.summary()
    assert "factored (EF rows): factor(3, 64)" in text and "dense: matrix(48, 48)" in text
    p.save(tmp_path / "p.safetensors")
    q = lalora.Precision.load(tmp_path / "p.safetensors", model)
    assert [b.kind for b in q.blocks] == [b.kind for b in p.blocks]
    assert all(torch.equal(tq, tp) for bq, bp in zip(q.blocks, p.blocks)
               for tq, tp in zip(bq.tensors().values(), bp.tensors().values()))  # stored tensors: a copy
    assert rel_close(q.to_dense(), p.to_dense(), F32)  # factored blocks compute F^T F: round-off only


def test_bf16_model_ef_in_float32():
    model = tiny_lora_llama(dtype=torch.bfloat16, targets=("v_proj",))
    randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=3)
    p = _fit(model, batches)
    assert all(b.matrix.dtype == torch.float32 for b in p.blocks)
    ref_model = tiny_lora_llama(targets=("v_proj",))
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref = dense_empirical_fisher(ref_model, batches)
    assert rel_err(p.to_dense(), ref * _block_mask(p)) <= 0.1  # bf16 forward: ~3 significant digits


def test_option_errors():
    with pytest.raises(lalora.BackendError, match="granularity"):
        lalora.get_backend("block")(granularity="layer")
    with pytest.raises(lalora.BackendError, match="factored"):
        lalora.get_backend("block")(curvature="ggn", storage="factored")
    model = tiny_lora_llama(targets=("v_proj",))
    with pytest.raises(lalora.BackendError, match="memory_budget_mb"):
        _fit(model, token_batches(n_batches=1), options={"curvature": "ggn", "memory_budget_mb": 1e-6})
