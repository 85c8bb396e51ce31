"""State and device hygiene: ``Precision.to`` keeps dtypes unless told; the regularizer's curvature
tensors are buffers (``reg.to`` moves/casts them and the grouped precision is rebuilt, its state dict
holds them and loading one rebuilds it), its parameters stay the model's own LoRA parameters.

References: dense float64 matrices (``Precision.to_dense``: Kronecker products of the stored factors)
against the regularizer's stacked / closed-form paths, and autograd through them for gradients.
"""
from __future__ import annotations

import pytest
import torch

import lalora
from lalora import LaLoRARegularizer
from lalora.adapters import find_lora_adapters, lora_parameters
from lalora.blocks import DenseBlock, DiagBlock
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from models import randomize_lora_B, tiny_lora_llama

STRENGTH = 5.0
TARGETS = ("q_proj", "k_proj", "v_proj")  # q: (16, 16), k/v: (8, 16): stacked kfac groups of 2 and 4


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _psd(n, g):
    M = torch.randn(n, n + 1, generator=g)
    return M @ M.T / n


def _model():
    model = tiny_lora_llama(seed=0, targets=TARGETS)
    randomize_lora_B(model)
    return model


def _mixed_precision(model, effective=False, seed=0):
    """kfac on every adapter (stacked groups), plus tri-kfac, tri-kfac-lowrank and (linearized only) diag
    and dense blocks overlapping them: every kind of state the regularizer keeps."""
    g = torch.Generator().manual_seed(seed)
    adapters = find_lora_adapters(model)
    anchor = {n: p.detach().float().clone() for n, p in lora_parameters(adapters).items()}
    blocks = []
    for i, ad in enumerate(adapters):
        a, b, A0, B0 = ad.a_name, ad.b_name, anchor[ad.a_name], anchor[ad.b_name]
        X, G = _psd(A0.shape[1], g), _psd(B0.shape[0], g)
        blocks.append(KFACBlock((a, b), X, G, ad.scaling))
        if i == 0:
            blocks.append(TriKFACBlock((a, b), _psd(A0.shape[1], g), _psd(B0.shape[0], g), ad.scaling))
        if i == 1:
            tri = TriKFACBlock((a, b), _psd(A0.shape[1], g), _psd(B0.shape[0], g), ad.scaling)
            blocks.append(tri.compressed(3, seed=2))
        if i == 2 and not effective:
            blocks.append(DiagBlock(a, torch.rand(A0.shape, generator=g)))
            n = A0.numel() + B0.numel()
            M = torch.randn(n, n, generator=g)
            blocks.append(DenseBlock((a, b), M @ M.T / n, {a: tuple(A0.shape), b: tuple(B0.shape)}))
    return lalora.Precision(blocks, anchor, metadata={"backend": "test"})


def _move(params, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def _reference(P, params, form):
    """(penalty, gradient) in float64 from dense matrices (densified in float64), autograd."""
    P = P.to(dtype=torch.float64)
    theta = {n: params[n].detach().double().requires_grad_(True) for n in P.param_names}
    if form == "linearized":
        d = torch.cat([(theta[n] - P.anchor[n].double()).reshape(-1) for n in P.param_names])
        q = d @ P.to_dense() @ d
    else:
        q = torch.zeros((), dtype=torch.float64)
        for blk in P.blocks:
            a, b = blk.params
            D = (blk.scaling * (theta[b] @ theta[a] - P.anchor[b].double() @ P.anchor[a].double())).reshape(-1)
            dense = blk.uncompressed() if hasattr(blk, "uncompressed") else blk  # low-rank factors densified
            K = torch.kron(dense.G.dense(), dense.X.dense()).double()
            q = q + D @ K @ D
    penalty = 0.5 * STRENGTH * q
    penalty.backward()
    return penalty.detach(), torch.cat([theta[n].grad.reshape(-1) for n in P.param_names])


def _penalty_and_grad(reg, params, names):
    for p in params.values():
        p.grad = None
    penalty = reg()
    penalty.backward()
    return penalty.detach(), torch.cat([params[n].grad.reshape(-1) for n in names])


def test_precision_to_keeps_dtype_unless_given():
    P = _mixed_precision(_model())
    P64 = P.to(dtype=torch.float64)
    for Q, want in ((P64, torch.float64), (P64.to("cpu"), torch.float64), (P64.to(), torch.float64),
                    (P64.to("cpu", torch.float32), torch.float32), (P.to("cpu"), torch.float32)):
        assert all(t.dtype == want for b in Q.blocks for t in b.tensors().values())
        assert all(t.dtype == want for t in Q.anchor.values())
    assert torch.equal(P64.to("cpu").to_dense(), P64.to_dense())  # a pure copy


def test_buffers_and_parameters():
    model = _model()
    P = _mixed_precision(model)
    reg = LaLoRARegularizer(model, P, STRENGTH)
    assert list(reg.parameters()) == []
    model_params = lora_parameters(find_lora_adapters(model))
    assert all(reg._params[n] is model_params[n] for n in P.param_names)  # the model's own, never copies
    state = reg.state_dict()
    stacked = [k for k in state if k.startswith("group")]
    assert stacked and any(k.startswith("block") for k in state) and sum(k.startswith("anchor") for k in state) == 12
    # the blocks the regularizer evaluates live on its buffers (views of the stacks, no second copy)
    storages = {t.untyped_storage().data_ptr() for t in reg.buffers()}
    assert all(t.untyped_storage().data_ptr() in storages for b in reg.precision.blocks for t in b.tensors().values())


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_dtype_moves_keep_penalty_and_gradient(form):
    model = _model()
    P = _mixed_precision(model, effective=form == "effective-weight")
    params = lora_parameters(find_lora_adapters(model))
    reg = LaLoRARegularizer(model, P, STRENGTH, form=form)
    _move(params)
    want, want_g = _reference(P, params, form)
    got32, g32 = _penalty_and_grad(reg, params, P.param_names)
    # float32 penalty vs float64 reference: 1e-5 relative is float32 round-off
    assert got32.dtype == torch.float32 and rel(got32, want) <= 1e-5 and rel(g32, want_g) <= 1e-5
    assert reg.to(torch.float64) is reg
    assert all(t.dtype == torch.float64 for t in reg.buffers())
    assert all(t.dtype == torch.float64 for b in reg.precision.blocks for t in b.tensors().values())
    got64, g64 = _penalty_and_grad(reg, params, P.param_names)
    # float64 curvature (exact casts of the float32 one), float32 weights cast exactly: 1e-10 is round-off;
    # the gradient is cast back to the float32 weights: 1e-6
    assert got64.dtype == torch.float64 and rel(got64, want) <= 1e-10 and rel(g64, want_g) <= 1e-6
    assert all(reg._params[n] is p for n, p in params.items())
    reg.float()
    again, g_again = _penalty_and_grad(reg, params, P.param_names)
    assert again.dtype == torch.float32 and rel(again, want) <= 1e-5 and rel(g_again, want_g) <= 1e-5
    # float64 model and regularizer: the penalty stays float64 throughout
    model.double()
    reg.double()
    got, g = _penalty_and_grad(reg, params, P.param_names)
    assert got.dtype == torch.float64 and g.dtype == torch.float64
    assert rel(got, want) <= 1e-10 and rel(g, want_g) <= 1e-10


def test_state_dict_round_trip_rebuilds():
    model = _model()
    P = _mixed_precision(model)
    params = lora_parameters(find_lora_adapters(model))
    reg = LaLoRARegularizer(model, P, STRENGTH)
    other = LaLoRARegularizer(model, 3.0 * P, STRENGTH)  # same layout, other values
    _move(params)
    want, want_g = _reference(P, params, "linearized")
    before, _ = _penalty_and_grad(other, params, P.param_names)
    assert rel(before, 3 * want) <= 1e-5
    other.load_state_dict(reg.state_dict())
    # the stacked products (G B0, B0^T G B0, ...) derive from the loaded factors: rebuilt, not stale
    got, g = _penalty_and_grad(other, params, P.param_names)
    assert rel(got, want) <= 1e-5 and rel(g, want_g) <= 1e-5


def test_overlapping_kronecker_blocks_add_up():
    """``P + Q`` (and ``consolidate``) puts two kfac blocks on one adapter into one stacked group: their
    products add (the stacked matvec kept only the last one: rel. error 0.5 before the fix)."""
    model = _model()
    P, Q = _mixed_precision(model, seed=0), _mixed_precision(model, seed=1)
    params = lora_parameters(find_lora_adapters(model))
    reg = LaLoRARegularizer(model, P + Q, STRENGTH)
    _move(params)
    want, want_g = _reference(P + Q, params, "linearized")
    got, g = _penalty_and_grad(reg, params, P.param_names)
    assert rel(got, want) <= 1e-5 and rel(g, want_g) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_cuda_moves(form):
    model = _model()
    P = _mixed_precision(model, effective=form == "effective-weight")
    params = lora_parameters(find_lora_adapters(model))
    P64 = P.to(dtype=torch.float64).to("cuda")  # Precision.to(device) keeps the dtype
    assert all(t.is_cuda and t.dtype == torch.float64 for b in P64.blocks for t in b.tensors().values())
    reg = LaLoRARegularizer(model, P, STRENGTH, form=form)  # on the CPU
    _move(params)
    want, want_g = _reference(P, params, form)
    model.to("cuda")
    assert all(reg._params[n] is p and p.is_cuda for n, p in params.items())
    with pytest.raises(RuntimeError, match=r"reg\.to\('cuda:0'\)"):
        reg()
    reg.to("cuda")
    assert all(t.is_cuda for t in reg.buffers())
    got, g = _penalty_and_grad(reg, params, P.param_names)
    # float32 on the GPU vs float64 reference (no TF32: torch's default for float32 matmuls): 1e-5
    assert got.is_cuda and rel(got.cpu(), want) <= 1e-5 and rel(g.cpu(), want_g) <= 1e-5
    reg.to("cuda", torch.float64)
    got, g = _penalty_and_grad(reg, params, P.param_names)
    assert got.dtype == torch.float64 and rel(got.cpu(), want) <= 1e-10 and rel(g.cpu(), want_g) <= 1e-6
    # built directly on the GPU model
    direct = LaLoRARegularizer(model, P, STRENGTH, form=form, check_anchor=False)
    assert all(t.is_cuda for t in direct.buffers())
    got, _ = _penalty_and_grad(direct, params, P.param_names)
    assert rel(got.cpu(), want) <= 1e-5
    model.to("cpu")
    reg.to("cpu", torch.float32)
    got, g = _penalty_and_grad(reg, params, P.param_names)
    assert rel(got, want) <= 1e-5 and rel(g, want_g) <= 1e-5
