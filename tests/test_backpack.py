"""Backend `backpack` (diagonal GGN / MC Fisher) against dense GGN references on LoRA MLPs."""
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora
from lalora.reference import dense_ggn, rel_err
from models import randomize_lora_B, tiny_lora_llama, token_batches

TOL = 1e-5


def seq_lora_mlp(seed=0, init="orthogonal"):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=init))


def class_batches(n_batches=2, n=6, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x, y = torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)
        if masked:
            y[1] = -100
        out.append((x, y))
    return out


def _fit(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend="backpack", progress=False, **kw)


def curvlinops_ggn_diag(model, data):
    """Diagonal of curvlinops' dense GGN (sum over examples) / N, LoRA params in lalora's order."""
    from curvlinops import GGNLinearOperator

    params = list(lalora.adapters.lora_parameters(lalora.adapters.find_lora_adapters(model)).values())
    data = [(x[y != -100], y[y != -100]) for x, y in data]
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, data, check_deterministic=False)
    P = sum(p.numel() for p in params)
    dense = op @ torch.eye(P)
    return torch.diagonal(torch.as_tensor(dense)).double() / sum(len(y) for _, y in data)


@pytest.mark.parametrize("b_nonzero", [False, True], ids=["B=0", "B!=0"])
def test_diag_ggn_exact_matches_curvlinops_dense(b_nonzero):
    model = seq_lora_mlp(init="orthogonal" if b_nonzero else True)
    if b_nonzero:
        randomize_lora_B(model)
    data = class_batches()
    p = _fit(model, data, loss="classification")
    got = torch.diagonal(p.to_dense())
    ref = curvlinops_ggn_diag(model, data)
    assert rel_err(got, ref) <= TOL
    assert rel_err(got, torch.diagonal(dense_ggn(model, data, loss="classification"))) <= TOL
    assert p.metadata["backpack_route"] == "DiagGGNExact" and p.metadata["num_examples"] == 10
    # the model structure and parameters are restored, and no BackPACK hook is left behind
    from peft.tuners.lora import Linear as LoraLinear

    base = model.get_base_model()
    assert isinstance(base[0], LoraLinear) and isinstance(base[2], LoraLinear)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "_backpack_extend") for m in model.modules())


def test_mse_sequential():
    model = seq_lora_mlp()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(5, 5, generator=g), torch.randn(5, 4, generator=g))]
    p = _fit(model, data, loss="mse")
    assert rel_err(torch.diagonal(p.to_dense()), torch.diagonal(dense_ggn(model, data, loss="mse"))) <= TOL


def test_mc_diagonal_converges():
    """DiagGGNMC and the SumGradSquared route: error shrinks with samples (1 -> 400), unbiased."""
    model = seq_lora_mlp()
    randomize_lora_B(model)
    data = class_batches(n_batches=1, n=8, masked=False)
    exact = torch.diagonal(dense_ggn(model, data, loss="classification"))
    errs = [rel_err(torch.diagonal(_fit(model, data, loss="classification", curvature="mc_fisher", mc_samples=s).to_dense()), exact)
            for s in (1, 400)]
    assert errs[1] < 0.1 and errs[1] < errs[0] / 3, errs


def test_sum_grad_squared_route_on_transformer():
    model = tiny_lora_llama(targets=("v_proj",))
    randomize_lora_B(model)
    batches = token_batches(n_batches=1, batch_size=3, seq_len=5)
    exact = torch.diagonal(dense_ggn(model, batches))
    p1 = _fit(model, batches, curvature="mc_fisher", mc_samples=1)
    p2 = _fit(model, batches, curvature="mc_fisher", mc_samples=30)
    assert p2.metadata["backpack_route"] == "SumGradSquared"
    e1, e2 = rel_err(torch.diagonal(p1.to_dense()), exact), rel_err(torch.diagonal(p2.to_dense()), exact)
    assert e2 < 0.2 and e2 < e1 / 2, (e1, e2)  # measured (seed 0): 0.38 -> 0.084
    # hooks removed: another backend (torch.func based) still works in the same process
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    lalora.fit_precision(model, batches, backend="block", curvature="ggn", progress=False)


def test_transformer_without_mc_route_is_a_clear_error():
    model = tiny_lora_llama(targets=("v_proj",))
    with pytest.raises(lalora.BackendError, match=r"LlamaForCausalLM.*mc_fisher.*'block'"):
        _fit(model, token_batches(n_batches=1))
    with pytest.raises(lalora.BackendError, match="mc_samples"):
        lalora.get_backend("backpack")(curvature="mc_fisher", mc_samples=0)
