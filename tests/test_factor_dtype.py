"""``LaLoRARegularizer(factor_dtype="bfloat16")``: Kronecker factors stored in bfloat16, everything else float32.

Reference: the same penalty computed in float64 from the *rounded* factors, written out with dense matrices
(not lalora's Kronecker algebra), and the float32 regularizer.
Tolerances: vs the float64 penalty of the rounded factors, what remains is rounding ``theta - theta0`` to
bfloat16 before each product and the products' bfloat16 results, each a relative 2^-9 per entry; vs float32,
the factors' own rounding (2^-9 per entry) adds to that. A gradient passes through up to two such products
(the coupled block), so <= 6 roundings: 3 * 2^-8 norm-wise, and TOL = 4 * 2^-8 (measured here: values
2.5e-3-5.3e-3, gradients 7.8e-3-8.6e-3). A
defect (a factor left out, a wrong scaling, a float32 factor where bfloat16 was asked) moves these by >= 1e-1.
"""
from __future__ import annotations

import pytest
import torch

from lalora import LaLoRARegularizer
from lalora.blocks.kronecker import KroneckerBlock
from models import fit_quiet, randomize_lora_B, tiny_lora_llama, token_batches
from numerics import rel_diff

TOL = 4 * 2.0 ** -8
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=[("kfac", "B!=0"), ("tri-kfac", "B!=0"), ("tri-kfac", "B=0")],
                ids=lambda p: "-".join(p))
def setup(request):
    backend, b = request.param
    model = tiny_lora_llama(targets=ALL, r=2, init=True if b == "B=0" else "orthogonal")
    if b == "B!=0":
        randomize_lora_B(model)  # the anchor products and the coupled block are not trivially zero
    P = fit_quiet(model, token_batches(), backend)
    return model, P


def _params(model):
    from lalora.adapters import find_lora_adapters, lora_parameters

    return lora_parameters(find_lora_adapters(model))


def _rounded_reference(P, params, form):
    """The penalty of P with its factors rounded to bfloat16, in float64, from the definitions written out with
    dense matrices (not ``lalora.blocks``' algebra): B-KFAC ``tr(dA^T s^2 B0^T G B0 dA X) + tr(dB^T s^2 G dB
    A0 X A0^T)``, B-Tri-KFAC ``s^2 tr(D^T G D X)`` with ``D = B0 dA + dB A0``, effective weight
    ``tr(Delta^T G Delta X)`` with ``Delta = s (B A - B0 A0)``."""
    total = torch.zeros((), dtype=torch.float64)
    for b in P.blocks:
        assert isinstance(b, KroneckerBlock)
        X, G = (F.dense().to(torch.bfloat16).double() for F in (b.X, b.G))
        a, bn = b.params
        A0, B0 = P.anchor[a].double(), P.anchor[bn].double()
        A, B = params[a].detach().double(), params[bn].detach().double()
        dA, dB, s = A - A0, B - B0, b.scaling
        if form == "effective-weight":
            D = s * (B @ A - B0 @ A0)
            total = total + torch.trace(D.T @ G @ D @ X)
        elif b.coupled:
            D = B0 @ dA + dB @ A0
            total = total + s ** 2 * torch.trace(D.T @ G @ D @ X)
        else:
            total = total + s ** 2 * (torch.trace(dA.T @ (B0.T @ G @ B0) @ dA @ X)
                                      + torch.trace(dB.T @ G @ dB @ (A0 @ X @ A0.T)))
    return total


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_bfloat16_factors_give_the_penalty_of_the_rounded_factors(setup, form):
    model, P = setup
    regs = {dt: LaLoRARegularizer(model, P, strength=2.0, form=form, factor_dtype=dt) for dt in (None, "bfloat16")}
    bf = regs["bfloat16"]
    assert {t.dtype for k, t in bf.named_buffers() if "_X" in k or "_G" in k} == {torch.bfloat16}
    assert {t.dtype for k, t in bf.named_buffers() if k.startswith("anchor")} == {torch.float32}
    params = _params(model)
    at_anchor = bf()
    assert float(at_anchor.detach()) == 0.0  # theta - theta0 = 0 exactly: no rounding can make it non-zero
    torch.manual_seed(1)
    with torch.no_grad():
        saved = {n: p.clone() for n, p in params.items()}
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    try:
        ref = 0.5 * 2.0 * _rounded_reference(P, params, form)
        vals, grads = {}, {}
        for dt, reg in regs.items():
            v = reg()
            vals[dt] = v
            grads[dt] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, list(params.values()))])
        assert vals["bfloat16"].dtype == torch.float32
        assert rel_diff(vals["bfloat16"].double(), ref) <= TOL
        assert rel_diff(vals["bfloat16"], vals[None]) <= TOL
        assert rel_diff(grads["bfloat16"], grads[None]) <= TOL
        assert rel_diff(vals["bfloat16"], vals[None]) > 0  # it is a bfloat16 computation, not the float32 one
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def test_strength_zero_is_zero_with_a_gradient_path(setup):
    model, P = setup
    reg = LaLoRARegularizer(model, P, strength=0.0)
    params = list(_params(model).values())
    v = reg()
    assert float(v.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(v, params))


@pytest.mark.parametrize("bad", ["bf16", torch.int8, 3])
def test_unknown_factor_dtype_is_refused_by_name(setup, bad):
    model, P = setup
    with pytest.raises(ValueError, match="factor_dtype"):
        LaLoRARegularizer(model, P, strength=1.0, factor_dtype=bad)


def test_trainer_passes_factor_dtype(tmp_path):
    from transformers import default_data_collator

    from lalora import LaLoRATrainer
    from test_trainer import args, examples, make_model

    model = make_model()
    P = fit_quiet(model, token_batches(), "kfac")
    trainer = LaLoRATrainer(model=model, args=args(tmp_path, 2, 1, 1), train_dataset=examples(),
                            data_collator=default_data_collator, precision=P, strength=1.0, factor_dtype="bfloat16")
    assert trainer.regularizer.factor_dtype == torch.bfloat16
    assert {t.dtype for k, t in trainer.regularizer.named_buffers() if "_X" in k} == {torch.bfloat16}
    trainer.train()  # a step with the bfloat16 factors


@pytest.mark.parametrize("lora_dtype, want", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_auto_follows_the_lora_weights_dtype(lora_dtype, want):
    """The default ``factor_dtype="auto"``: bfloat16 LoRA weights (``autocast_adapter_dtype=False``) get bfloat16
    factors, peft's default float32 LoRA weights float32 ones; an explicit "float32" overrides."""
    from peft import LoraConfig, get_peft_model

    from models import tiny_llama

    base = tiny_llama(0, dtype=lora_dtype)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights="orthogonal"), autocast_adapter_dtype=False)
    P = fit_quiet(model, token_batches(), "kfac")
    factors = lambda reg: {t.dtype for k, t in reg.named_buffers() if "_X" in k or "_G" in k}  # noqa: E731
    assert factors(LaLoRARegularizer(model, P, strength=1.0)) == {want}
    assert factors(LaLoRARegularizer(model, P, strength=1.0, factor_dtype="float32")) == {torch.float32}
