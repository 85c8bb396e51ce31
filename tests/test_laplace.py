"""Backend `laplace` and the conversions precision_from_laplace / precision_to_laplace: laplace-torch's summed H vs
lalora's mean."""
import warnings

import pytest
import torch
from torch import nn

import lalora
from lalora.backends.laplace_conversion import precision_from_laplace, precision_to_laplace
from lalora.reference import dense_ggn, rel_err
from models import randomize_lora_B, tiny_lora_llama, token_batches
from test_backpack import class_batches, seq_lora_mlp
from numerics import F32, rel_close, rel_diff

TOL = 1e-5


def _fit(model, data, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lalora.fit_precision(model, data, backend=backend, loss="classification", progress=False, **kw)


@pytest.fixture
def model_and_data():
    model = seq_lora_mlp()
    randomize_lora_B(model)
    return model, class_batches(n_batches=2, n=6)  # one masked label per batch: N = 10


def test_laplace_diag_ggn_equals_lalora_diag_ggn(model_and_data):
    model, data = model_and_data
    p = _fit(model, data, "laplace", options={"hessian_structure": "diag"})
    assert p.metadata["num_examples"] == 10 and p.metadata["laplace_backend"] == "CurvlinopsGGN"
    ours = _fit(model, data, "backpack")  # DiagGGNExact, same curvature
    assert rel_err(torch.diagonal(p.to_dense()), torch.diagonal(ours.to_dense())) <= TOL
    assert rel_err(torch.diagonal(p.to_dense()), torch.diagonal(dense_ggn(model, data, loss="classification"))) <= TOL


def test_laplace_kron_equals_curvlinops_kfac_mean(model_and_data):
    """laplace-torch's kron (type-2 KFAC per LoRA matrix, summed) / N == curvlinops' KFAC on the same data / N."""
    from curvlinops import KFACLinearOperator

    model, data = model_and_data
    full = [(torch.cat([x[y != -100] for x, y in data]), torch.cat([y[y != -100] for _, y in data]))]
    p = _fit(model, full, "laplace", options={"hessian_structure": "kron"})  # one batch: laplace's M/N rescaling is 1
    params = list(lalora.adapters.lora_parameters(lalora.adapters.find_lora_adapters(model)).values())
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, full, fisher_type="type-2",
                            check_deterministic=False)
    ref = torch.as_tensor(op @ torch.eye(sum(q.numel() for q in params))).double() / 10
    assert rel_err(p.to_dense(), ref) <= TOL
    assert [b.kind for b in p.blocks] == ["dense"] * 4  # one kron(Q, H) block per LoRA matrix
    # lalora's own B-KFAC with the same curvature (type-2): one output row per example, so
    # laplace's per-matrix factors equal the adapter-level ones (G_A = s^2 B^T G B, X_B = A X A^T)
    ours = _fit(model, data, "kfac", options={"curvature": "ggn"})
    assert rel_err(p.to_dense(), ours.to_dense()) <= TOL


def test_from_laplace_and_to_laplace_round_trip(model_and_data):
    from laplace import Laplace

    model, data = model_and_data
    ours = _fit(model, data, "backpack")
    la = precision_to_laplace(ours, model, prior_precision=2.0)
    assert la.n_data == 10 and torch.allclose(la.H, torch.diagonal(ours.to_dense()).float() * 10)
    back = precision_from_laplace(la, model)
    assert rel_err(back.to_dense(), ours.to_dense()) <= TOL
    assert all(torch.equal(back.anchor[n], ours.anchor[n]) for n in ours.param_names)
    x = data[0][0]
    probs = la(x, pred_type="glm", link_approx="probit")  # predictive uncertainty works
    assert probs.shape == (6, 4) and torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-5)
    # a Laplace object the user fitted with laplace-torch's own loop converts with the sum -> mean scaling
    x_all = torch.cat([x[y != -100] for x, y in data])
    y_all = torch.cat([y[y != -100] for _, y in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=4)
    la2 = Laplace(model.get_base_model(), "classification", subset_of_weights="all", hessian_structure="diag")
    la2.fit(loader)
    from_user = precision_from_laplace(la2, model)
    assert rel_err(from_user.to_dense(), ours.to_dense()) <= TOL


def test_kfac_precision_to_kron_laplace(model_and_data):
    model, data = model_and_data
    ours = _fit(model, data, "kfac", options={"curvature": "ggn"})
    la = precision_to_laplace(ours, model)
    assert type(la).__name__ == "KronLaplace"
    assert rel_err(precision_from_laplace(la, model).to_dense(), ours.to_dense()) <= TOL
    probs = la(data[0][0], pred_type="glm", link_approx="probit")
    assert probs.shape == (6, 4) and bool(torch.isfinite(probs).all())


def test_precision_methods_are_deprecated_aliases_through_the_registry(model_and_data):
    """``Precision.to_laplace`` / ``from_laplace`` (the 0.1 names) warn and reach the backend's conversions
    through the registry: the same Laplace object and precision as the functions (F32: the same computation on
    the same inputs; only the prior and the path differ)."""
    model, data = model_and_data
    ours = _fit(model, data, "backpack")
    assert lalora.get_backend("laplace").to_laplace is precision_to_laplace
    with pytest.warns(lalora.LaloraDeprecationWarning, match="lalora.backends.laplace_conversion.precision_to_laplace"):
        la = ours.to_laplace(model, prior_precision=2.0)
    assert rel_close(la.H, precision_to_laplace(ours, model, prior_precision=2.0).H, F32)
    with pytest.warns(lalora.LaloraDeprecationWarning, match="lalora.backends.laplace_conversion.precision_from_laplace"):
        back = lalora.Precision.from_laplace(la, model)
    assert rel_close(back.to_dense(), precision_from_laplace(la, model).to_dense(), F32)


def test_to_laplace_needs_n_and_lora_only():
    model = seq_lora_mlp()
    p = _fit(model, class_batches(n_batches=1), "backpack")
    p.metadata.pop("num_examples")
    with pytest.raises(lalora.BackendError, match="num_examples"):
        precision_to_laplace(p, model)
    model.get_base_model()[0].base_layer.weight.requires_grad_(True)
    with pytest.raises(lalora.BackendError, match="not a LoRA weight"):
        precision_to_laplace(p, model, num_examples=5)


@pytest.mark.parametrize("b_nonzero", [False, True], ids=["B=0", "B!=0"])
def test_causal_lm_diag_ggn_equals_per_position_ggn(b_nonzero):
    """laplace-torch's per-row GGN diagonal on the labelled positions (padded, prompt-masked tiny Llama),
    summed over tokens, / N examples == lalora's brute-force per-position GGN diagonal."""
    model = tiny_lora_llama(targets=("v_proj",), init="orthogonal" if b_nonzero else True)
    if b_nonzero:
        randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=3, seq_len=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = lalora.fit_precision(model, batches, backend="laplace", progress=False)
    ref = torch.diagonal(dense_ggn(model, batches))
    assert p.metadata["num_examples"] == 3 and p.metadata["curvature"] == "ggn"
    assert rel_err(torch.diagonal(p.to_dense()), ref) <= TOL
    d = p.diagonal()
    a_zero = [bool((d[n] == 0).all()) for n in d if "lora_A" in n]  # 2 layers: 2 adapters
    assert a_zero == [not b_nonzero] * 2  # B = 0: A's GGN is exactly 0
    assert all(bool((d[n] > 0).any()) for n in d if "lora_B" in n)


def test_causal_lm_mc_fisher_is_seeded():
    model = tiny_lora_llama(targets=("v_proj",))
    randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=2, seq_len=5)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    fits = [lalora.fit_precision(model, batches, backend="laplace", options={"curvature": "mc", "seed": s}, progress=False)
            for s in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), before)
    d = [torch.diagonal(f.to_dense()) for f in fits]
    # the same seed twice: equal up to round-off; another seed draws other labels (far beyond round-off)
    assert rel_close(d[0], d[1], F32) and rel_diff(d[0], d[2]) > 1e-3


def test_causal_lm_kron_and_ef_are_refused_with_a_clear_error():
    model = tiny_lora_llama(targets=("v_proj",))
    with pytest.raises(lalora.BackendError, match="tokens as data points"):
        lalora.fit_precision(model, token_batches(n_batches=1), backend="laplace", options={"hessian_structure": "kron"}, progress=False)
    with pytest.raises(lalora.BackendError, match="per-token gradients"):
        lalora.fit_precision(model, token_batches(n_batches=1), backend="laplace", options={"curvature": "ef"},
                             progress=False)
