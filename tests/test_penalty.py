"""Closed-form penalty gradients (lalora.penalty) against the autograd path and dense float64 references.

For every block kind the new value and gradient equal autograd through ``Precision.quadratic`` /
``Block.effective_quadratic`` (float32, rel. err <= 1e-5) and the dense matrix ``to_dense()``
(float64 reference, same tolerance); B0 = 0 and B0 != 0; through ``LaLoRARegularizer`` with
``prior_precision > 0``, strength scaling and bf16 LoRA weights (bf16 ``.grad``, tolerance 1e-2:
bf16 keeps 8 mantissa bits, a relative rounding of <= 2^-8 = 3.9e-3 per entry).
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lalora
from lalora.adapters import find_lora_adapters
from lalora.blocks import DenseBlock, DiagBlock
from lalora.blocks.factored import FactoredBlock
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.penalty import effective_weight_quadratic, has_closed_form_effective, linearized_quadratic
from models import randomize_lora_B, tiny_llama, tiny_lora_llama

TOL = 1e-5  # float32 against float32 autograd / float64 dense
BF16_TOL = 1e-2
KINDS = ("diag", "dense", "factored", "kfac", "tri-kfac", "kfac-lowrank", "tri-kfac-lowrank")
KRON = ("kfac", "tri-kfac", "kfac-lowrank", "tri-kfac-lowrank")
TARGETS = ("q_proj", "v_proj", "up_proj")  # (d_out, d_in) = (16, 16), (8, 16), (24, 16)
MAX_RANK = 5  # < every factor side: all low-rank factors are compressed


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _psd(n, g):
    M = torch.randn(n, n, generator=g)
    return M @ M.T / n + 0.1 * torch.eye(n)


def _block(kind, a, b, A0, B0, scaling, g):
    """One block of ``kind`` over the adapter ``(a, b)`` with random PSD curvature."""
    (r, d_in), d_out = A0.shape, B0.shape[0]
    shapes = {a: tuple(A0.shape), b: tuple(B0.shape)}
    n = A0.numel() + B0.numel()
    if kind == "diag":
        return [DiagBlock(a, torch.rand(A0.shape, generator=g)), DiagBlock(b, torch.rand(B0.shape, generator=g))]
    if kind == "dense":
        M = torch.randn(n, n, generator=g)
        return [DenseBlock((a, b), M @ M.T / n, shapes)]
    if kind == "factored":
        return [FactoredBlock((a, b), torch.randn(7, n, generator=g), shapes)]
    cls = TriKFACBlock if kind.startswith("tri") else KFACBlock
    blk = cls((a, b), _psd(d_in, g), _psd(d_out, g), scaling)  # theta0: the Precision's anchor
    return [blk.compressed(MAX_RANK, seed=1) if kind.endswith("lowrank") else blk]


def _adapter_shapes(model):
    return [(ad.a_name, ad.b_name, ad.A.detach().float().clone(), ad.B.detach().float().clone(), ad.scaling)
            for ad in find_lora_adapters(model)]


def _precision(kind, adapters, seed=0, prior_precision=0.0):
    g = torch.Generator().manual_seed(seed)
    blocks, anchor = [], {}
    for a, b, A0, B0, s in adapters:
        anchor[a], anchor[b] = A0, B0
        blocks += _block(kind, a, b, A0, B0, s, g)
    return lalora.Precision(blocks, anchor, prior_precision=prior_precision)


def _synthetic(kind, b_zero, seed=0):
    """A precision over three adapters of different shapes (B0 = 0 or random), no model needed."""
    g = torch.Generator().manual_seed(100 + seed)
    adapters = []
    for i, (d_out, d_in, r) in enumerate([(16, 16, 2), (8, 16, 3), (24, 12, 2)]):
        A0 = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        B0 = torch.zeros(d_out, r) if b_zero else 0.3 * torch.randn(d_out, r, generator=g)
        adapters.append((f"l{i}.lora_A", f"l{i}.lora_B", A0, B0, 1.5 + i))
    return _precision(kind, adapters, seed)


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


@pytest.mark.parametrize("b_zero", [True, False], ids=["B0=0", "B0!=0"])
@pytest.mark.parametrize("kind", KINDS)
def test_linearized_value_and_gradient_match_autograd_and_dense(kind, b_zero):
    P = _synthetic(kind, b_zero)
    names = P.param_names
    g = torch.Generator().manual_seed(7)
    base = {n: 0.3 * torch.randn(P.shapes[n], generator=g) for n in names}
    d_new = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    d_old = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    q_new, q_old = linearized_quadratic(P, d_new), P.quadratic(d_old)
    assert q_new.dtype == torch.float32 and q_new.dim() == 0
    g_new = torch.autograd.grad(q_new, [d_new[n] for n in names])
    g_old = torch.autograd.grad(q_old, [d_old[n] for n in names])
    assert rel(q_new, q_old) <= TOL
    assert rel(torch.cat([t.reshape(-1) for t in g_new]), torch.cat([t.reshape(-1) for t in g_old])) <= TOL
    D, v = P.to_dense(), _flat(base, names).double()
    assert rel(q_new, v @ D @ v) <= TOL
    assert rel(torch.cat([t.reshape(-1) for t in g_new]), 2 * D @ v) <= TOL


@pytest.mark.parametrize("b_zero", [True, False], ids=["B0=0", "B0!=0"])
@pytest.mark.parametrize("kind", KRON)
def test_effective_weight_value_and_gradient_match_autograd(kind, b_zero):
    P = _synthetic(kind, b_zero, seed=1)
    g = torch.Generator().manual_seed(8)
    for blk in P.blocks:
        assert has_closed_form_effective(blk)
        a, b = blk.params
        base = {n: P.anchor[n] + 0.2 * torch.randn(P.shapes[n], generator=g) for n in blk.params}
        t_new = {n: t.clone().requires_grad_(True) for n, t in base.items()}
        t_old = {n: t.clone().requires_grad_(True) for n, t in base.items()}
        f_new, f_old = effective_weight_quadratic(blk, t_new), blk.effective_quadratic(t_old)
        g_new = torch.autograd.grad(f_new, [t_new[a], t_new[b]])
        g_old = torch.autograd.grad(f_old, [t_old[a], t_old[b]])
        assert rel(f_new, f_old) <= TOL
        for x, y in zip(g_new, g_old):
            assert rel(x, y) <= TOL
        # float64 dense reference: vec(Delta)^T kron(G, X) vec(Delta), gradient by autograd
        t64 = {n: t.double().requires_grad_(True) for n, t in base.items()}
        K = torch.kron(blk.G.dense(), blk.X.dense()).double()
        Delta = blk.scaling * (t64[b] @ t64[a] - blk.B0.double() @ blk.A0.double())
        ref = Delta.reshape(-1) @ K @ Delta.reshape(-1)
        g_ref = torch.autograd.grad(ref, [t64[a], t64[b]])
        assert rel(f_new, ref) <= TOL
        for x, y in zip(g_new, g_ref):
            assert rel(x, y) <= TOL
        # at the fit point the form and its gradient are exactly zero
        at0 = {n: P.anchor[n].clone().requires_grad_(True) for n in blk.params}
        f0 = effective_weight_quadratic(blk, at0)
        assert float(f0.detach()) == 0.0
        assert all(float(t.abs().max()) == 0.0 for t in torch.autograd.grad(f0, [at0[a], at0[b]]))


def test_non_kronecker_blocks_have_no_closed_form_effective_weight():
    P = _synthetic("diag", False)
    assert not any(has_closed_form_effective(b) for b in P.blocks)


@pytest.mark.parametrize("kind", ["kfac", "tri-kfac-lowrank"])
def test_cached_anchor_products_follow_in_place_changes(kind):
    """The (r, r) / (d, r) products are cached; an in-place change of a factor must be seen."""
    P = _synthetic(kind, False)
    blk = P.blocks[0]
    delta = {n: torch.ones(P.shapes[n]) for n in blk.params}
    before = blk.matvec(delta)
    with torch.no_grad():
        (blk.B0 if kind == "kfac" else blk.A0).mul_(2.0)
    after = blk.matvec(delta)
    fresh = type(blk).from_state(blk.params, {k: v.clone() for k, v in blk.tensors().items()}, blk.config())
    fresh = fresh.bind({n: t.clone() for n, t in zip(blk.params, (blk.A0, blk.B0))})
    want = fresh.matvec(delta)
    for n in blk.params:
        assert rel(after[n], want[n]) <= TOL
    assert any(rel(after[n], before[n]) > 0.1 for n in blk.params)


# --- through LaLoRARegularizer -----------------------------------------------------------------
def _bf16_model():
    base = tiny_llama(0, dtype=torch.bfloat16)
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights="orthogonal")
    model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
    randomize_lora_B(model)
    return model


def _reference(reg, P, lam, delta0, form):
    """(penalty, grads) by float32 autograd on the old path, at the model's current LoRA weights."""
    theta = {n: p.detach().float().clone().requires_grad_(True) for n, p in reg._params.items()}
    names = P.param_names
    if form == "linearized":
        d = {n: theta[n] - P.anchor[n] for n in names}
        q = P.quadratic(d)
    else:
        d = {n: theta[n] - P.anchor[n] for n in names}
        q = torch.stack([b.effective_quadratic(theta) for b in P.blocks]).sum()
    q = q + delta0 * sum(t.square().sum() for t in d.values())
    pen = 0.5 * lam * q
    return pen, torch.autograd.grad(pen, [theta[n] for n in names])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,form", [(k, "linearized") for k in KINDS] + [(k, "effective-weight") for k in KRON])
@pytest.mark.parametrize("b_zero", [True, False], ids=["B=0", "B!=0"])
def test_regularizer_penalty_and_grad(kind, form, dtype, b_zero):
    if dtype == torch.float32:
        model = tiny_lora_llama(targets=TARGETS, r=2)
        if not b_zero:
            randomize_lora_B(model)
    else:
        model = _bf16_model()
    ads = find_lora_adapters(model)
    if b_zero:
        with torch.no_grad():
            for ad in ads:
                ad.B.zero_()
    assert all(ad.A.dtype == dtype for ad in ads)
    P = _precision(kind, _adapter_shapes(model), seed=3, prior_precision=0.25)
    lam = 3.0
    # float32 factors also for bfloat16 LoRA weights (factor_dtype="auto" would store them in bfloat16: that path
    # is tested against its own reference in test_factor_dtype.py); here the float32 math is checked
    reg = lalora.LaLoRARegularizer(model, P, strength=lam, form=form, factor_dtype="float32")
    assert reg.prior_precision == 0.25
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in reg._params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    names = P.param_names
    params = [reg._params[n] for n in names]
    for p in params:
        p.grad = None
    pen = reg()
    pen.backward()
    assert pen.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == dtype for p in params)
    ref, ref_grads = _reference(reg, P, lam, 0.25, form)
    got = torch.cat([p.grad.float().reshape(-1) for p in params])
    want = torch.cat([t.reshape(-1) for t in ref_grads])
    assert rel(pen, ref) <= TOL
    assert rel(got, want) <= (TOL if dtype == torch.float32 else BF16_TOL)
    # strength scales penalty and gradient linearly; strength 0 gives exactly zero
    reg2 = lalora.LaLoRARegularizer(model, P, strength=2 * lam, form=form, check_anchor=False, factor_dtype="float32")
    pen2 = reg2()
    grads2 = torch.autograd.grad(pen2, params)
    assert rel(pen2, 2 * pen) <= TOL
    assert rel(torch.cat([t.float().reshape(-1) for t in grads2]), 2 * got) <= (TOL if dtype == torch.float32 else BF16_TOL)
    reg0 = lalora.LaLoRARegularizer(model, P, strength=0.0, form=form, check_anchor=False)
    assert float(reg0().detach()) == 0.0


@pytest.mark.parametrize("b_zero", [True, False], ids=["B0=0", "B0!=0"])
@pytest.mark.parametrize("kind", ["kfac", "tri-kfac"])
def test_grouped_precision_matvec_equals_precision_matvec(kind, b_zero):
    """Equal-shaped Kronecker blocks stacked for bmm (lalora.penalty.GroupedPrecision) give
    Precision.matvec to 1e-6, mixed with a block that stays alone and a diag block; the rebuilt
    precision (blocks on views of the stacks) has the same dense matrix."""
    from lalora.penalty import GroupedPrecision

    g = torch.Generator().manual_seed(7)
    adapters = []
    for i, (d_out, d_in, r, s) in enumerate([(16, 12, 2, 1.5), (16, 12, 2, 1.5), (16, 12, 2, 1.5), (8, 12, 2, 1.5),
                                             (16, 12, 2, 2.0)]):
        A0 = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        B0 = torch.zeros(d_out, r) if b_zero else 0.3 * torch.randn(d_out, r, generator=g)
        adapters.append((f"l{i}.lora_A", f"l{i}.lora_B", A0, B0, s))
    P = _precision(kind, adapters)
    extra = lalora.Precision([DiagBlock("x.w", torch.rand(3, 4, generator=g))], {"x.w": torch.zeros(3, 4)})
    P = lalora.Precision(P.blocks + extra.blocks, {**P.anchor, **extra.anchor})
    grouped = GroupedPrecision(P)
    assert [len(st.params) for st in grouped.groups] == [3]  # the three equal (16, 12, r=2, s=1.5) adapters
    d = {n: torch.randn(t.shape, generator=g) for n, t in P.anchor.items()}
    ref, got = P.matvec(d), grouped.matvec(d)
    assert set(got) == set(ref)
    for n in ref:
        assert rel(got[n], ref[n]) <= 1e-6, n
    assert rel(grouped.precision.to_dense(), P.to_dense()) <= 1e-6


def _three_equal_and_one(g, b_zero):
    """Adapters ``(a, b, A0, B0, s)``: three of shape (16, 12), r = 2, and one (8, 12); B0 = 0 or random."""
    adapters = []
    for i, (d_out, d_in, r) in enumerate([(16, 12, 2), (16, 12, 2), (16, 12, 2), (8, 12, 2)]):
        A0 = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        B0 = torch.zeros(d_out, r) if b_zero else 0.3 * torch.randn(d_out, r, generator=g)
        adapters.append((f"l{i}.lora_A", f"l{i}.lora_B", A0, B0, 1.5))
    return adapters


@pytest.mark.parametrize("b_zero", [True, False], ids=["B0=0", "B0!=0"])
@pytest.mark.parametrize("kind", ["kfac", "tri-kfac"])
def test_grouped_effective_weight_matches_per_block_autograd(kind, b_zero):
    """Stacked effective-weight form (bmm, closed-form gradient) equals the per-block autograd form,
    value and gradients, rel. err 1e-5, away from the anchor; groups of 3 plus a lone block."""
    from lalora.penalty import GroupedPrecision

    g = torch.Generator().manual_seed(11)
    adapters = _three_equal_and_one(g, b_zero)
    P = _precision(kind, adapters)
    grouped = GroupedPrecision(P)
    assert len(grouped.groups) == 1
    theta = {n: (t + 0.2 * torch.randn(t.shape, generator=g)).requires_grad_() for n, t in P.anchor.items()}
    got = grouped.effective_weight(theta)
    ref = torch.stack([b.effective_quadratic(theta) for b in P.blocks]).sum()
    assert rel(got.detach(), ref.detach()) <= 1e-5
    names = list(theta)
    g_got = torch.autograd.grad(got, [theta[n] for n in names])
    g_ref = torch.autograd.grad(ref, [theta[n] for n in names])
    for n, a, b in zip(names, g_got, g_ref):
        assert rel(a, b) <= 1e-5, n


@pytest.mark.parametrize("b_zero", [True, False], ids=["B0=0", "B0!=0"])
@pytest.mark.parametrize("kind", ["kfac", "tri-kfac"])
def test_grouped_linearized_matches_precision_quadratic(kind, b_zero):
    """``GroupedPrecision.linearized(theta)`` (one closed-form call per stacked group, the regularizer's path) equals
    autograd through ``Precision.quadratic`` at ``theta - theta0``, value and gradient (rel. 1e-5, float32 round-off of
    the same products in another order), with a group of three, a lone block, a diag block and a second block over
    one group member's weights (an overlap, as ``P1 + P2`` gives): every block's quadratic counts once."""
    from lalora.penalty import GroupedPrecision

    g = torch.Generator().manual_seed(13)
    adapters = _three_equal_and_one(g, b_zero)
    P = _precision(kind, adapters)
    a, b, A0, B0, s = adapters[0]
    overlap = _block(kind, a, b, A0, B0, 0.5, g)  # another scaling: not stacked with the group
    extra = DiagBlock("x.w", torch.rand(3, 4, generator=g))
    P = lalora.Precision(P.blocks + overlap + [extra], {**P.anchor, "x.w": torch.randn(3, 4, generator=g)})
    grouped = GroupedPrecision(P)
    assert [len(st.params) for st in grouped.groups] == [3] and len(grouped.rest) == 3
    base = {n: t + 0.2 * torch.randn(t.shape, generator=g) for n, t in P.anchor.items()}
    theta = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    d_ref = {n: (t - P.anchor[n]).requires_grad_(True) for n, t in base.items()}
    got, ref = grouped.linearized(theta), P.quadratic(d_ref)
    names = list(theta)
    g_got = torch.autograd.grad(got, [theta[n] for n in names])
    g_ref = torch.autograd.grad(ref, [d_ref[n] for n in names])
    assert rel(got, ref) <= TOL
    for n, x, y in zip(names, g_got, g_ref):
        assert rel(x, y) <= TOL, n
    # float64 dense reference (explicit Kronecker products, no matvec): v^T D v and 2 D v over P.param_names
    D = P.to_dense()
    v = torch.cat([(base[n] - P.anchor[n]).reshape(-1) for n in P.param_names]).double()
    assert rel(got, v @ D @ v) <= TOL
    by_name = dict(zip(names, g_got))
    assert rel(torch.cat([by_name[n].reshape(-1) for n in P.param_names]), 2 * D @ v) <= TOL
    at0 = {n: t.clone().requires_grad_(True) for n, t in P.anchor.items()}  # exactly 0 at the anchor
    q0 = grouped.linearized(at0)
    assert float(q0.detach()) == 0.0
    assert all(float(t.abs().max()) == 0.0 for t in torch.autograd.grad(q0, list(at0.values())))


@pytest.mark.parametrize("n", [1023, 1024])
def test_dense_factor_product_in_both_layouts(n):
    """``DenseFactor.mm`` multiplies as ``(V^T M)^T`` below 1024 and as ``M @ V`` from 1024 on (the faster layout
    for MKL, benchmarks/README.md): both equal the float64 product (rel. 1e-5: float32 sums over n terms), for one
    factor and a stacked pair, with a contiguous V and a transposed view (the penalty passes ``dA.mT``)."""
    from lalora.blocks.factors import DenseFactor

    g = torch.Generator().manual_seed(n)
    M = torch.randn(2, n, n, generator=g) / n ** 0.5
    M = M @ M.mT
    V = torch.randn(2, n, 8, generator=g)
    Vt = torch.randn(2, 8, n, generator=g).mT
    for W in (V, Vt):
        want = M.double() @ W.double()
        assert rel(DenseFactor(M).mm(W), want) <= TOL
        assert rel(DenseFactor(M[1]).mm(W[1]), want[1]) <= TOL
