"""Fits, the penalty and a training step on ``LALORA_TEST_DEVICE`` (tests/conftest.py: CUDA when asked for,
else the CPU), each against a reference computed on the CPU in float64 that does not share the code path.

References: ``lalora.reference`` (per-example autograd on unpadded singletons, CPU, float64) for the EF of
the diag and block backends; for kfac / tri-kfac (approximations, checked against brute force on the CPU in
tests/test_kfac.py) the same fit on the CPU;
the explicit dense quadratic ``(lam / 2) d^T F d`` for the penalty and its gradient ``lam F d``; the float32
per-row cross-entropy of all logits at once for the chunked loss. Tolerances: float32 results on another
device (other kernels, other summation orders) against float64: 1e-5 relative, norm-wise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lalora
from lalora.adapters import find_lora_adapters, lora_parameters
from lalora.logit_rows import row_cross_entropy
from lalora.training import train_lora
from models import randomize_lora_B, tiny_lora_llama, token_batches
from numerics import rel_diff
from reference import dense_empirical_fisher

TOL = 1e-5


def _model(device, targets=("q_proj", "v_proj")):
    model = tiny_lora_llama(targets=targets)
    randomize_lora_B(model)
    return model.to(device)


def _on(data, device):
    return [{k: v.to(device) for k, v in b.items()} for b in data]


@pytest.mark.parametrize("backend", ["diag", "block"])
def test_ef_fits_on_the_device_equal_the_cpu_reference(device, backend):
    data = token_batches()
    model = _model(device)
    P = lalora.fit_precision(model, _on(data, device), backend=backend, progress=False)
    assert all(t.device.type == device.type for t in P.anchor.values()) or all(not t.is_cuda for t in P.anchor.values())
    ref = dense_empirical_fisher(model.cpu().double(), data)
    if backend == "diag":
        assert rel_diff(torch.diagonal(P.to_dense().cpu().double()), torch.diagonal(ref)) <= TOL
        return
    start, at = {}, 0
    for n in P.param_names:  # the reference's order (lora_parameters), each matrix flattened row-major
        start[n], at = at, at + P.anchor[n].numel()
    for b in P.blocks:  # one block per adapter: the exact EF's diagonal block of its (A, B)
        idx = torch.cat([torch.arange(start[n], start[n] + P.anchor[n].numel()) for n in b.params])
        assert rel_diff(b.to_dense().cpu().double(), ref[idx][:, idx]) <= TOL, b.params


@pytest.mark.parametrize("backend,curvature", [("kfac", "ef"), ("kfac", "mc"), ("tri-kfac", "mc")])
def test_kronecker_fits_on_the_device_equal_the_cpu_fit(device, backend, curvature):
    """The same fit (same seed: MC labels are drawn on the CPU, lalora.sampling) on the device and on the CPU."""
    data = token_batches()
    fits = []
    for dev in (device, torch.device("cpu")):
        model = _model(dev, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
        fits.append(lalora.fit_precision(model, _on(data, dev), backend=backend, options={"curvature": curvature},
                                         progress=False))
    assert rel_diff(fits[0].to_dense().cpu(), fits[1].to_dense()) <= TOL


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_penalty_on_the_device_equals_the_dense_quadratic(device, form):
    model = _model(device)
    P = lalora.fit_precision(model, _on(token_batches(), device), backend="kfac", options={"curvature": "ef"},
                             progress=False)
    lam = 3.0
    reg = lalora.LaLoRARegularizer(model, P, strength=lam, form=form)
    params = lora_parameters(find_lora_adapters(model))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(device))
    pen = reg()
    assert pen.device.type == device.type
    grads = torch.autograd.grad(pen, list(params.values()))
    names = P.param_names
    theta = {n: params[n].detach().cpu().double() for n in names}
    anchor = {n: P.anchor[n].cpu().double() for n in names}
    if form == "linearized":
        d = torch.cat([(theta[n] - anchor[n]).reshape(-1) for n in names])
        F_ = P.to_dense().cpu().double()
        want, want_g = lam / 2 * d @ F_ @ d, lam * F_ @ d
    else:  # tr(Delta^T G Delta X), Delta = s (B A - B0 A0), by autograd in float64 on the CPU
        th = {n: t.clone().requires_grad_() for n, t in theta.items()}
        want = 0.0
        for b in P.blocks:
            a, bb = b.params
            X, G = b.X.dense().cpu().double(), b.G.dense().cpu().double()
            D = b.scaling * (th[bb] @ th[a] - anchor[bb] @ anchor[a])
            want = want + lam / 2 * torch.trace(D.T @ G @ D @ X)
        want_g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(want, [th[n] for n in names])])
    got_g = torch.cat([gr.cpu().double().reshape(-1) for gr in grads])
    assert rel_diff(pen.cpu(), want) <= TOL and rel_diff(got_g, want_g) <= TOL


def test_chunked_loss_and_a_training_step_on_the_device(device):
    g = torch.Generator().manual_seed(0)
    rows = (3 * torch.randn(40, 37, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, 37, (40,), generator=g).to(device)
    got = row_cross_entropy(rows, targets, chunk=7)
    (gg,) = torch.autograd.grad(got.sum(), rows)
    r64 = rows.detach().cpu().double().requires_grad_()
    want = F.cross_entropy(r64, targets.cpu(), reduction="none")
    (gw,) = torch.autograd.grad(want.sum(), r64)
    assert rel_diff(got.cpu(), want) <= TOL and rel_diff(gg.cpu(), gw) <= TOL
    model = _model(device)
    data = _on(token_batches(), device)
    P = lalora.fit_precision(model, data, backend="diag", progress=False)
    reg = lalora.LaLoRARegularizer(model, P, strength=1.0)
    losses = train_lora(model, data, steps=2, reg=reg, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.device.type == device.type for p in lora_parameters(find_lora_adapters(model)).values())
