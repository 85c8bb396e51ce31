"""Backend `diag` (per-example diagonal empirical Fisher) against a per-example autograd loop."""
import pytest
import torch

import lalora
from models import randomize_lora_B, tiny_lora_llama, token_batches
from reference import dense_empirical_fisher, rel_err
from numerics import F32, rel_close

TOL = 1e-5  # relative error, float32 model vs float64-accumulated reference


def _fit(model, batches, **kw):
    return lalora.fit_precision(model, batches, backend="diag", progress=False, **kw)


@pytest.mark.parametrize("b_nonzero", [False, True], ids=["B=0", "B!=0"])
@pytest.mark.parametrize("init", ["orthogonal", True])
def test_diag_matches_per_example_loop(init, b_nonzero):
    model = tiny_lora_llama(init=init, targets=("q_proj", "v_proj", "down_proj"))
    if b_nonzero:
        randomize_lora_B(model)
    batches = token_batches(n_batches=2, batch_size=4, pad=True, mask_prompt=True)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", lalora.ZeroCurvatureWarning)
        precision = _fit(model, batches)
    ref = dense_empirical_fisher(model, batches)
    got = torch.diagonal(precision.to_dense())
    assert rel_err(got, torch.diagonal(ref)) <= TOL
    assert precision.metadata["num_examples"] == 8
    # the diag structure is exactly the diagonal: off-diagonals are zero
    assert torch.count_nonzero(precision.to_dense() - torch.diag(got)) == 0


def test_padding_does_not_change_the_result():
    """The same sequences, once right-padded inside a longer batch and once unpadded one by one."""
    model = tiny_lora_llama()
    randomize_lora_B(model)
    (padded,) = token_batches(n_batches=1, batch_size=4, pad=True, mask_prompt=True)
    singles = []
    for n in range(4):
        L = int(padded["attention_mask"][n].sum())
        singles.append({k: v[n:n + 1, :L] for k, v in padded.items()})
    a = _fit(model, [padded]).to_dense()
    b = _fit(model, singles).to_dense()
    assert rel_err(a, b) <= TOL


def test_examples_without_labels_are_not_counted():
    model = tiny_lora_llama()
    randomize_lora_B(model)
    (batch,) = token_batches(n_batches=1, batch_size=3, pad=False, mask_prompt=False)
    masked = {k: v.clone() for k, v in batch.items()}
    masked["labels"][1] = -100
    p = _fit(model, [masked])
    assert p.metadata["num_examples"] == 2 and p.metadata["skipped_examples"] == 1
    keep = {k: v[[0, 2]] for k, v in batch.items()}
    assert rel_err(p.to_dense(), _fit(model, [keep]).to_dense()) <= TOL


def test_two_adapters_each_fitted_on_its_own():
    model = tiny_lora_llama(adapter_name="first")
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["k_proj"], init_lora_weights="orthogonal"))
    randomize_lora_B(model)
    batches = token_batches()
    model.set_adapter("second")
    p2 = _fit(model, batches)
    assert all("k_proj" in n for n in p2.param_names)
    assert rel_err(torch.diagonal(p2.to_dense()), torch.diagonal(dense_empirical_fisher(model, batches))) <= TOL
    model.set_adapter("first")
    p1 = _fit(model, batches)
    assert all(("q_proj" in n or "v_proj" in n) for n in p1.param_names)
    assert rel_err(torch.diagonal(p1.to_dense()), torch.diagonal(dense_empirical_fisher(model, batches))) <= TOL


def test_bf16_model_fp32_accumulation():
    """bf16 base + bf16 LoRA: factors are float32 and close to the float32-model reference."""
    model = tiny_lora_llama(dtype=torch.bfloat16)
    randomize_lora_B(model)
    batches = token_batches()
    p = _fit(model, batches)
    assert all(b.values.dtype == torch.float32 for b in p.blocks)
    ref_model = tiny_lora_llama()
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref = torch.diagonal(dense_empirical_fisher(ref_model, batches))
    assert rel_err(torch.diagonal(p.to_dense()), ref) <= 0.1  # bf16 forward: ~3 significant digits


def test_zero_curvature_warning_explains_default_init():
    model = tiny_lora_llama(init=True)  # peft default: B = 0
    with pytest.warns(lalora.ZeroCurvatureWarning, match="orthogonal"):
        p = _fit(model, token_batches())
    assert sorted(p.zero_params()) == sorted(n for n in p.param_names if n.endswith("lora_A"))


def test_tensor_and_tuple_batches():
    model = tiny_lora_llama()
    randomize_lora_B(model)
    (batch,) = token_batches(n_batches=1, pad=False, mask_prompt=False)
    a = _fit(model, batch["input_ids"])  # a bare tensor: causal LM on the ids
    b = _fit(model, [{"input_ids": batch["input_ids"]}])
    assert rel_close(a.to_dense(), b.to_dense(), F32)  # separate fits of the same batch: round-off only


def test_dropout_is_off_and_training_mode_restored():
    model = tiny_lora_llama(lora_dropout=0.5)
    randomize_lora_B(model)
    model.train()
    batches = token_batches()
    a = _fit(model, batches).to_dense()
    b = _fit(model, batches).to_dense()
    assert rel_close(a, b) and model.training  # dropout on would move it by ~1, round-off by 1e-7


class _TwiceMLP(torch.nn.Module):
    """fc1 is called twice per forward (weight sharing): per-example gradients must be summed over calls."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(x)))))


def _classifier_reference(model, batches):
    """(1/N) sum_n diag(g_n g_n^T) from a loop over examples (cross-entropy summed per example)."""
    from lalora.adapters import find_lora_adapters, lora_parameters

    params = lora_parameters(find_lora_adapters(model))
    rows = []
    for x, y in batches:
        for n in range(x.shape[0]):
            loss = torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
            g = torch.autograd.grad(loss, list(params.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]).double())
    return torch.stack(rows).square().mean(0)


@pytest.mark.parametrize("net", ["mlp", "shared-layer"])
def test_classifier_squared_sums_match_per_example_loop(net):
    """One output row per example: the squared sums come from the GEMM (g^2)^T (x^2) (mlp) or, for a
    layer called twice, from the summed per-example gradients (shared-layer). Tolerance 1e-5."""
    from peft import LoraConfig, get_peft_model

    from models import lora_mlp

    if net == "mlp":
        model = lora_mlp()
    else:
        torch.manual_seed(0)
        model = get_peft_model(_TwiceMLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                                       init_lora_weights="orthogonal"))
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    precision = _fit(model, batches)
    ref = _classifier_reference(model.eval(), batches)
    assert rel_err(torch.diagonal(precision.to_dense()), ref) <= TOL
