"""Backends ``kfac`` / ``tri-kfac`` and the Kronecker blocks, against exact references.

References: curvlinops' dense ``GGNLinearOperator`` (single linear layer, one example, where
K-FAC is exact), and an own brute-force per-token loop (each example alone, unpadded, the
gradient taken at the adapted layer's output with plain autograd).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora
from lalora.adapters import find_lora_adapters
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.errors import BackendError
from models import randomize_lora_B, tiny_lora_llama, token_batches
from numerics import F32, F64, rel_close
from reference import effective_weight_dense

TOL = 1e-5  # relative error, float32 computations vs float64 references


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fit(model, data, backend="kfac", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, progress=False, **kw)


# --- single linear layer + LoRA, MSE: K-FAC is exact ------------------------------------------
class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x)


def _one_linear(seed=0):
    torch.manual_seed(seed)
    base = OneLinear()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], init_lora_weights="orthogonal"))
    randomize_lora_B(model, scale=0.5)
    model.eval()
    return model


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_single_linear_layer_equals_curvlinops_ggn(fisher_type):
    from curvlinops import GGNLinearOperator

    model = _one_linear()
    torch.manual_seed(1)
    x, y = torch.randn(1, 5), torch.randn(1, 4)
    a = find_lora_adapters(model)[0]
    params = [a.A, a.B]
    op = GGNLinearOperator(model, nn.MSELoss(reduction="sum"), params, [(x, y)], check_deterministic=False)
    n = sum(p.numel() for p in params)
    ggn = (op @ torch.eye(n)).double()
    nA = a.A.numel()
    if fisher_type == "type-2":
        tri = _fit(model, (x, y), "tri-kfac", loss="mse", options={"curvature": "ggn"})
        kfac = _fit(model, (x, y), "kfac", loss="mse", options={"curvature": "ggn"})
        assert rel(tri.to_dense(), ggn) <= TOL  # the whole A-B block, cross terms included
        assert rel(ggn[:nA, nA:], torch.zeros(1)) > 0.1  # the cross block is not trivially zero
        kd = kfac.to_dense()
        assert rel(kd[:nA, :nA], ggn[:nA, :nA]) <= TOL and rel(kd[nA:, nA:], ggn[nA:, nA:]) <= TOL
        assert torch.count_nonzero(kd[:nA, nA:]) == 0
    else:  # MC for MSE: exact in expectation; many samples in one batch of copies
        tri = _fit(model, (x.repeat(400, 1), y.repeat(400, 1)), "tri-kfac", loss="mse", options={"mc_samples": 20})
        assert rel(tri.to_dense(), ggn) <= 0.05  # 8000 samples: noise ~ 2-3%


# --- tiny Llama: factors vs an own per-token reference --------------------------------------
def _layer_grads(model, batch_of_one, loss, backward_vectors):
    """Per adapter: x (T, d_in) and, for each backward vector function, g (T, d_out) at the adapted layer."""
    adapters = find_lora_adapters(model)
    xs, outs = {}, {}
    handles = []
    for a in adapters:
        def fwd(module, inputs, output, a=a):
            xs[a.name] = inputs[0].detach()[0].double()
            outs[a.name] = output
        handles.append(a.layer.register_forward_hook(fwd))
    logits = lalora.losses.call_model(model, batch_of_one)
    for h in handles:
        h.remove()
    rows, tgt, _ = loss.outputs_and_targets(logits, batch_of_one)
    names = [a.name for a in adapters]
    grads = {n: [] for n in names}
    for v in backward_vectors(rows, tgt):
        gs = torch.autograd.grad(rows, [outs[n] for n in names], grad_outputs=v, retain_graph=True)
        for n, g in zip(names, gs):
            grads[n].append(g[0].double())
    return xs, grads


def _examples(batches):
    loss = lalora.losses.CausalLMLoss()
    for raw in batches:
        b = loss.prepare(raw)
        counts = loss.labelled_counts(b)
        for n in range(b.size):
            if counts[n] == 0:
                continue
            L = int(b.inputs["attention_mask"][n].sum())
            one = {"input_ids": raw["input_ids"][n:n + 1, :L], "attention_mask": raw["attention_mask"][n:n + 1, :L],
                   "labels": raw["labels"][n:n + 1, :L]}
            yield loss, loss.prepare(one)


def _ef_vectors(rows, tgt):  # gradient of the summed CE w.r.t. the logits rows
    yield (torch.softmax(rows.detach().double(), -1) - F.one_hot(tgt, rows.shape[1]).double()).to(rows)


def _type2_vectors(rows, tgt):  # one position, one sqrt-Hessian column at a time: no cross-position terms
    p = torch.softmax(rows.detach().double(), -1)
    for m in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            v = torch.zeros_like(p)
            e = torch.zeros(rows.shape[1], dtype=p.dtype)
            e[c] = 1
            v[m] = p[m, c].sqrt() * (e - p[m])
            yield v.to(rows)


def reference_factors(model, batches, vectors, approx="expand"):
    """Per adapter name: (X, G) by the per-token definition, examples run alone without padding."""
    X, G, T, N = {}, {}, {}, 0
    for loss, b in _examples(batches):
        xs, grads = _layer_grads(model, b, loss, vectors)
        N += 1
        for name, x in xs.items():
            if approx == "expand":
                X[name] = X.get(name, 0) + x.T @ x
                T[name] = T.get(name, 0) + x.shape[0]
                G[name] = G.get(name, 0) + sum(g.T @ g for g in grads[name])
            else:
                xbar = x.mean(0, keepdim=True)
                X[name] = X.get(name, 0) + xbar.T @ xbar
                T[name] = T.get(name, 0) + 1
                G[name] = G.get(name, 0) + sum(g.sum(0, keepdim=True).T @ g.sum(0, keepdim=True) for g in grads[name])
    return {n: (X[n] / T[n], G[n] / N) for n in X}


def _blocks(precision):
    return {b.params[0].rsplit(".lora_A", 1)[0]: b for b in precision.blocks}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj")], ids=["qv", "all-linear"])
@pytest.mark.parametrize("init", ["orthogonal", True], ids=["B!=0", "B=0"])
def test_tiny_llama_empirical_factors_match_per_token_reference(targets, approx, init):
    model = tiny_lora_llama(targets=targets, r=2, init=init)  # orthogonal: A, B != 0; True (peft default): B = 0
    batches = token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)
    precision = _fit(model, batches, options={"curvature": "ef", "kfac_approx": approx})
    ref = reference_factors(model, batches, _ef_vectors, approx)
    blocks = _blocks(precision)
    assert set(blocks) == set(ref)
    for name, (X, G) in ref.items():
        assert rel(blocks[name].X.dense(), X) <= TOL, name
        assert rel(blocks[name].G.dense(), G) <= TOL, name
    assert precision.metadata["num_examples"] == 6


def test_wide_layers_panel_products_match_per_token_reference():
    """intermediate 400 >= 1.5 panels: G of gate/up and X of down are accumulated as upper panels over
    two padded batches and mirrored at the end (backends/kfac.py _gram); same reference and tolerance."""
    model = tiny_lora_llama(targets=("gate_proj", "up_proj", "down_proj"), r=2, intermediate_size=400,
                            num_hidden_layers=1)
    randomize_lora_B(model)
    batches = token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)
    precision = _fit(model, batches, options={"curvature": "ef"})
    ref = reference_factors(model, batches, _ef_vectors)
    blocks = _blocks(precision)
    for name, (X, G) in ref.items():
        assert rel(blocks[name].X.dense(), X) <= TOL, name
        assert rel(blocks[name].G.dense(), G) <= TOL, name
        assert max(X.shape[0], G.shape[0]) == 400


@pytest.mark.slow  # ~1500 MC samples: minutes on 2 cores; run with `-m slow`
def test_mc_converges_to_per_token_type2_reference():
    model = tiny_lora_llama(r=2)
    (batch,) = token_batches(n_batches=1, batch_size=2, seq_len=6, pad=True, mask_prompt=True)
    ref = reference_factors(model, [batch], _type2_vectors)
    ef = reference_factors(model, [batch], _ef_vectors)
    precision = _fit(model, batch, options={"curvature": "mc", "mc_samples": 1500})
    for name, b in _blocks(precision).items():
        X, G = ref[name]
        assert rel(b.X.dense(), X) <= TOL
        err = rel(b.G.dense(), G)
        # MC noise: the worst of the 4 factors measured 0.081 at 1500 samples (a bias, e.g. the
        # cross-position terms of batched type-2 or a wrong 1/S, is far larger); bound at ~2x that
        assert err <= 0.15, (name, err)
        assert err < 0.5 * rel(ef[name][1], G)  # it converges to the GGN, not to the EF


def test_mc_error_shrinks_like_one_over_sqrt_samples_to_the_type2_reference():
    """Fast MC convergence check (the slow test above uses 1500 samples on the default tiny Llama).

    Vocabulary 8, two sequences of 6 tokens (one padded, prompts masked): 7 labelled positions, so
    the per-token type-2 reference costs 56 backward passes. The MC variance is *measured*: K fits
    with S0 samples and different seeds; their spread about their own mean (a bias does not enter
    it) estimates var0 = E|G_S0 - E G_S0|^2, and an unbiased estimator with S1 samples has
    E|G_S1 - G|^2 = var0 * S0 / S1. Tolerance: err(S1) <= 3 * sqrt(var0 * S0 / S1) / |G|, i.e. 9x the
    expected squared error (Markov: P <= 1/9 for any unbiased estimator; the squared error is a sum
    over many entries, so far less in practice; the seed is fixed). A bias (cross-position terms,
    a wrong 1/S, pad tokens in G) larger than that noise fails it, and so does no convergence
    (err(S1) must also be below the mean error at S0, expected ratio sqrt(S0/S1) = 1/4).
    """
    V, S0, K, S1 = 8, 8, 4, 128
    model = tiny_lora_llama(r=2, vocab_size=V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (2, 6), generator=g)
    mask, labels = torch.ones_like(ids), ids.clone()
    mask[1, 4:], ids[1, 4:], labels[1, 4:] = 0, 0, -100
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = reference_factors(model, [batch], _type2_vectors)
    ef = reference_factors(model, [batch], _ef_vectors)
    small = [_blocks(_fit(model, batch, options={"curvature": "mc", "mc_samples": S0, "seed": k})) for k in range(K)]
    large = _blocks(_fit(model, batch, options={"curvature": "mc", "mc_samples": S1, "seed": K}))
    for name, (X, G) in ref.items():
        assert rel(large[name].X.dense(), X) <= TOL
        Gs = torch.stack([f[name].G.dense().double() for f in small])
        var0 = float(((Gs - Gs.mean(0)) ** 2).sum()) / (K - 1)
        bound = 3 * (var0 * S0 / S1) ** 0.5 / float(G.norm())
        err0 = sum(rel(f[name].G.dense(), G) for f in small) / K
        err1 = rel(large[name].G.dense(), G)
        assert err1 < err0, (name, err1, err0)
        assert err1 <= bound, (name, err1, bound)
        assert err1 < 0.5 * rel(ef[name][1], G), (name, err1, rel(ef[name][1], G))  # the GGN, not the EF


def test_type2_refused_on_causal_lm():
    model = tiny_lora_llama()
    with pytest.raises(BackendError, match="type-2.*mc"):
        _fit(model, token_batches(1), options={"curvature": "ggn"})


def test_options_are_checked():
    with pytest.raises(BackendError, match="fisher_type"), pytest.warns(lalora.LaloraDeprecationWarning):
        lalora.get_backend("kfac")(fisher_type="exact")  # lalora 0.1's name: the error names what was typed
    with pytest.raises(BackendError, match="kfac_approx"):
        lalora.get_backend("tri-kfac")(kfac_approx="sum")
    with pytest.raises(BackendError, match="mc_samples"):
        lalora.get_backend("kfac")(mc_samples=0)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_padded_equals_packed(approx):
    """The same sequences: right-padded in one batch, and each alone without padding."""
    model = tiny_lora_llama(r=2)
    (padded,) = token_batches(n_batches=1, batch_size=4, pad=True, mask_prompt=True)
    singles = []
    for n in range(4):
        L = int(padded["attention_mask"][n].sum())
        singles.append({k: v[n:n + 1, :L] for k, v in padded.items()})
    a = _fit(model, padded, "tri-kfac", options={"curvature": "ef", "kfac_approx": approx})
    b = _fit(model, singles, "tri-kfac", options={"curvature": "ef", "kfac_approx": approx})
    assert rel(a.to_dense(), b.to_dense()) <= TOL
    for ba, bb in zip(a.blocks, b.blocks):
        assert rel(ba.X.dense(), bb.X.dense()) <= TOL and rel(ba.G.dense(), bb.G.dense()) <= TOL


def test_bf16_model_gives_float32_factors_close_to_float32_fit():
    batches = token_batches(n_batches=1, batch_size=3)
    p32 = _fit(tiny_lora_llama(r=2), batches, options={"curvature": "ef"})
    p16 = _fit(tiny_lora_llama(r=2, dtype=torch.bfloat16), batches, options={"curvature": "ef"})
    for b32, b16 in zip(p32.blocks, p16.blocks):
        assert b16.X.dtype == torch.float32 and b16.G.dtype == torch.float32
        assert rel(b16.X.dense(), b32.X.dense()) <= 0.05 and rel(b16.G.dense(), b32.G.dense()) <= 0.1


# --- block algebra ------------------------------------------------------------------------------
def _random_block(cls, d_in=5, d_out=4, r=2, seed=0, b_zero=False):
    g = torch.Generator().manual_seed(seed)
    mx, mg = torch.randn(d_in, d_in + 2, generator=g), torch.randn(d_out, d_out + 1, generator=g)
    A0 = torch.randn(r, d_in, generator=g)
    B0 = torch.zeros(d_out, r) if b_zero else torch.randn(d_out, r, generator=g)
    return cls(("l.lora_A", "l.lora_B"), mx @ mx.T / d_in, mg @ mg.T / d_out, 1.5, A0=A0, B0=B0)


def _random_delta(block, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(s, generator=g, dtype=torch.float32).requires_grad_(requires_grad)
            for p, s in block.shapes.items()}


def _flat(d, params):
    return torch.cat([d[p].reshape(-1) for p in params])


@pytest.mark.parametrize("cls", [KFACBlock, TriKFACBlock])
def test_quadratic_matvec_diagonal_gradient_match_dense(cls):
    block = _random_block(cls)
    dense = block.to_dense().double()
    delta = _random_delta(block, requires_grad=True)
    v = _flat(delta, block.params).double()
    q = block.quadratic(delta)
    assert rel(q, v @ dense @ v) <= TOL
    grads = torch.autograd.grad(q, [delta[p] for p in block.params])
    assert rel(torch.cat([g.reshape(-1) for g in grads]), 2 * dense @ v.detach()) <= TOL
    mv = block.matvec({k: t.detach() for k, t in delta.items()})
    assert rel(_flat(mv, block.params), dense @ v.detach()) <= TOL
    assert rel(_flat(block.diagonal(), block.params), torch.diagonal(dense)) <= TOL
    assert rel(block.scaled(2.5).to_dense(), 2.5 * dense) <= TOL


def test_tri_kfac_definition_psd_and_kfac_diagonal_blocks():
    tri, kfac = _random_block(TriKFACBlock), _random_block(KFACBlock)
    T, K = tri.to_dense().double(), kfac.to_dense().double()
    nA = tri.A0.numel()
    assert rel(T[:nA, :nA], K[:nA, :nA]) <= TOL and rel(T[nA:, nA:], K[nA:, nA:]) <= TOL
    # cross block s^2 (B0^T G) (x) (X A0^T)
    cross = tri.scaling ** 2 * torch.kron(tri.B0.T @ tri.G.dense(), tri.X.dense() @ tri.A0.T).double()
    assert rel(T[:nA, nA:], cross) <= TOL
    ev = torch.linalg.eigvalsh(T)
    assert ev.min() >= -1e-6 * ev.max()
    assert ev.min() < 1e-6 * ev.max()  # rank-deficient: the LoRA symmetry directions are null


@pytest.mark.parametrize("cls", [KFACBlock, TriKFACBlock])
def test_effective_weight_form_and_gradient_match_dense(cls):
    block = _random_block(cls)
    theta = {p: (t + d).requires_grad_(True) for (p, t), d in
             zip(((block.params[0], block.A0), (block.params[1], block.B0)), _random_delta(block).values())}
    A, B = theta[block.params[0]], theta[block.params[1]]
    q = block.effective_quadratic(theta)
    Delta = block.scaling * (B @ A - block.B0 @ block.A0)
    dense_q = Delta.reshape(-1).double() @ effective_weight_dense(block).double() @ Delta.reshape(-1).double()
    assert rel(q, dense_q) <= TOL
    g1 = torch.autograd.grad(q, [A, B])
    g2 = torch.autograd.grad(dense_q, [A, B])
    for a, b in zip(g1, g2):
        assert rel(a, b) <= TOL


def test_effective_weight_is_reparametrisation_invariant_linearised_forms_are_not():
    tri, kfac = _random_block(TriKFACBlock), _random_block(KFACBlock)
    a, b = tri.params
    theta = {a: tri.A0 + 0.3 * torch.randn(tri.A0.shape), b: tri.B0 + 0.3 * torch.randn(tri.B0.shape)}
    R = torch.tensor([[2.0, 0.5], [-0.3, 0.7]])
    moved = {a: R @ theta[a], b: theta[b] @ torch.linalg.inv(R)}
    for blk in (tri, kfac):
        e1, e2 = blk.effective_quadratic(theta), blk.effective_quadratic(moved)
        assert abs(float(e1 - e2)) <= 1e-5 * abs(float(e1))
        d1 = {a: theta[a] - blk.A0, b: theta[b] - blk.B0}
        d2 = {a: moved[a] - blk.A0, b: moved[b] - blk.B0}
        assert abs(float(blk.quadratic(d1) - blk.quadratic(d2))) > 0.1 * abs(float(blk.quadratic(d1)))


def test_effective_weight_constrains_A_when_B0_is_zero():
    model = tiny_lora_llama(r=2, init=True)  # peft default: B0 = 0
    batches = token_batches(n_batches=1, batch_size=3)
    precision = _fit(model, batches, "kfac", options={"curvature": "ef"})
    lin = lalora.LaLoRARegularizer(model, precision, strength=1.0, form="linearized")
    assert lalora.LaLoRARegularizer(model, precision, strength=1.0).form == "effective-weight"  # the default (auto)
    diag = _fit(model, batches, "diag")
    assert lalora.LaLoRARegularizer(model, diag, strength=1.0).form == "linearized"  # the only form diag blocks have
    eff = lalora.LaLoRARegularizer(model, precision, strength=1.0, form="effective-weight")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    As = [p for n, p in model.named_parameters() if "lora_A" in n]
    g_lin = torch.autograd.grad(lin(), As)
    g_eff = torch.autograd.grad(eff(), As)
    assert all(float(g.abs().max()) == 0 for g in g_lin)  # the linearised kfac form ignores A at B0 = 0
    assert all(float(g.abs().max()) > 0 for g in g_eff)


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_precision_file_round_trip_and_regularizer(tmp_path, backend):
    model = tiny_lora_llama(r=2)
    randomize_lora_B(model)
    precision = _fit(model, token_batches(n_batches=1, batch_size=3), backend, options={"curvature": "mc", "mc_samples": 2})
    path = tmp_path / "p.safetensors"
    precision.save(path)
    loaded = lalora.Precision.load(path, model)
    assert [b.kind for b in loaded.blocks] == [backend] * 4  # 2 layers x (q, v)
    for b1, b2 in zip(precision.blocks, loaded.blocks):
        for k, t in b1.tensors().items():
            assert torch.equal(t, b2.tensors()[k]), k
        assert b1.scaling == b2.scaling
    assert rel_close(precision.to_dense(), loaded.to_dense(), F32)  # the stored tensors are equal bitwise (above)
    assert loaded.metadata["curvature"] == "mc" and loaded.metadata["backend_options"]["curvature"] == "mc"
    for form in ("linearized", "effective-weight"):
        reg = lalora.LaLoRARegularizer(model, loaded, strength=2.0, form=form)
        assert float(reg().detach()) == 0.0  # at the anchor


def test_validate_names_the_bad_tensor():
    block = _random_block(KFACBlock)
    bad = KFACBlock(block.params, block.X.dense()[:3, :3], block.G, 1.0, A0=block.A0, B0=block.B0)
    with pytest.raises(ValueError, match="'X'"):
        bad.validate(block.shapes)



@pytest.mark.parametrize("d", [3, 300, 600])
def test_validate_refuses_asymmetric_factors_in_any_tile(d):
    """The symmetry check compares 256-wide tiles: an asymmetry of 1e-3 (relative to the largest
    diagonal entry) in the far corner, in a diagonal tile or next to it is refused; float32
    rounding-level asymmetry (1e-7) is accepted."""
    g = torch.Generator().manual_seed(d)
    m = torch.randn(d, d + 3, generator=g)
    X = m @ m.T / d
    r = 2
    A0, B0 = torch.randn(r, d, generator=g), torch.randn(4, r, generator=g)
    G = torch.eye(4)
    shapes = {"l.lora_A": (r, d), "l.lora_B": (4, r)}
    scale = float(torch.diagonal(X).max())
    for i, j in {(0, d - 1), (d // 2, d // 2 + 1), (d - 2, d - 1)}:
        noisy = X.clone()
        noisy[j, i] += 1e-7 * scale
        KFACBlock(("l.lora_A", "l.lora_B"), noisy, G, 1.0, A0=A0, B0=B0).validate(shapes)
        noisy[j, i] += 1e-3 * scale
        with pytest.raises(ValueError, match="factor 'X' is not symmetric"):
            KFACBlock(("l.lora_A", "l.lora_B"), noisy, G, 1.0, A0=A0, B0=B0).validate(shapes)



def test_fitted_factors_are_marked_symmetric_and_the_mark_ends_with_an_in_place_change():
    """The fit's factors are exactly symmetric and marked so (validation skips reading them again,
    ``lalora.blocks.symmetry``); an in-place change of a marked factor ends the mark, and a clone is not
    marked: both are checked in full again."""
    from lalora.blocks.symmetry import asymmetric, known_symmetric

    model = tiny_lora_llama(init="orthogonal", hidden_size=400, num_hidden_layers=1)  # > 1.5 panels: mirrored
    p = lalora.fit_precision(model, token_batches(), backend="kfac", progress=False)
    factors = [f.M for b in p.blocks for f in (b.X, b.G)]
    assert any(M.shape[0] == 400 for M in factors)
    for M in factors:
        assert known_symmetric(M) and torch.equal(M, M.T)
    M = next(M for M in factors if M.shape[0] == 400)
    copy = M.clone()
    assert not known_symmetric(copy) and not asymmetric(copy)
    M[0, -1] += 1e-2 * float(torch.diagonal(M).max())
    assert not known_symmetric(M) and asymmetric(M)
    block = next(b for b in p.blocks if b.X.M is M or b.G.M is M)
    with pytest.raises(ValueError, match="is not symmetric"):
        block.validate(p.shapes)

# --- non-contiguous factors / anchors (torch.kron raised "view size is not compatible") ----------
def _noncontiguous_block(cls, d_in, d_out, r, seed=0):
    """float64 block whose X, G, A0, B0 are all transposed views (as made by ``.t()``)."""
    g = torch.Generator().manual_seed(seed)
    mx = torch.randn(d_in, d_in + 2, generator=g, dtype=torch.float64)
    mg = torch.randn(d_out, d_out + 1, generator=g, dtype=torch.float64)
    X, G = (mx @ mx.T / d_in).t(), (mg @ mg.T / d_out).t()
    A0 = torch.randn(d_in, r, generator=g, dtype=torch.float64).t()
    B0 = torch.randn(r, d_out, generator=g, dtype=torch.float64).t()
    assert not any(t.is_contiguous() for t in (X, G, A0, B0))
    return cls(("l.lora_A", "l.lora_B"), X, G, 1.5, A0=A0, B0=B0)


@pytest.mark.parametrize("cls", [KFACBlock, TriKFACBlock])
@pytest.mark.parametrize("d_in,d_out,r", [(5, 3, 2), (3, 6, 3), (4, 2, 3)])
def test_to_dense_with_noncontiguous_tensors_matches_quadratic_and_matvec(cls, d_in, d_out, r):
    block = _noncontiguous_block(cls, d_in, d_out, r)
    dense = block.to_dense()  # raised RuntimeError (torch.kron on a transposed B0 / G / X) before the fix
    assert dense.shape == (r * (d_in + d_out),) * 2
    g = torch.Generator().manual_seed(5)
    delta = {p: torch.randn(s[::-1], generator=g, dtype=torch.float64).t() for p, s in block.shapes.items()}
    v = _flat(delta, block.params)
    # float64 block, float64 references: 1e-10 is round-off
    assert rel(block.quadratic(delta), v @ dense @ v) <= 1e-10
    assert rel(_flat(block.matvec(delta), block.params), dense @ v) <= 1e-10
    assert rel(_flat(block.diagonal(), block.params), torch.diagonal(dense)) <= 1e-10
    contiguous = cls(block.params, block.X.dense().contiguous(), block.G.dense().contiguous(), block.scaling,
                     A0=block.A0.contiguous(), B0=block.B0.contiguous())
    # the same float64 products on contiguous copies: BLAS picks other kernels for other strides, so the
    # two agree to float64 round-off, not bitwise (tests/numerics.py)
    assert rel_close(dense, contiguous.to_dense(), F64)
    # the effective-weight dense form too: vec(Delta)^T kron(G, X) vec(Delta)
    theta = {block.params[0]: block.A0 + delta[block.params[0]], block.params[1]: block.B0 + delta[block.params[1]]}
    Delta = block.scaling * (theta[block.params[1]] @ theta[block.params[0]] - block.B0 @ block.A0)
    dvec = Delta.reshape(-1)
    assert rel(block.effective_quadratic(theta), dvec @ effective_weight_dense(block) @ dvec) <= 1e-10


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_fit_with_noncontiguous_lora_weights_gives_usable_dense(backend):
    """LoRA weights stored transposed (e.g. assigned from ``W.t()``): the fitted anchors keep those strides."""
    from models import lora_mlp

    model = lora_mlp(r=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for a in find_lora_adapters(model):
            a.lora_A.weight = nn.Parameter(torch.randn(a.A.shape[::-1]).t())
            a.lora_B.weight = nn.Parameter(0.5 * torch.randn(a.B.shape[::-1]).t())
    assert not find_lora_adapters(model)[0].A.is_contiguous()
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    precision = _fit(model, (x, y), backend, loss="mse", options={"curvature": "ef"})
    dense = precision.to_dense().double()
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(t.shape, generator=g) for n, t in precision.anchor.items()}
    v = torch.cat([delta[n].reshape(-1) for n in precision.param_names]).double()
    assert rel(precision.quadratic(delta), v @ dense @ v) <= TOL


def test_categorical_sampler_frequencies_zero_mass_and_blocks():
    """Two-level inverse-CDF draws: frequencies within 5 sigma of p, zero-probability classes never drawn
    (C = 6: one partial block; C = 1000: three 256-wide blocks, a zero block and a partial one), and
    one-hot rows over C = 2^20 classes land on their class."""
    from lalora.sampling import sample_categorical as _sample_categorical

    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    R = 200_000
    y = _sample_categorical(p.expand(R, -1).contiguous(), gen)
    freq = torch.bincount(y, minlength=6).double() / R
    sigma = (p.double() * (1 - p.double()) / R).sqrt()
    assert bool(((freq - p.double()).abs() <= 5 * sigma + 1e-12).all()), freq
    assert freq[1] == 0 and freq[5] == 0
    q = torch.rand(1000, generator=gen)
    q[256:512] = 0  # a whole block without mass
    q[::7] = 0
    q[255] = q[999] = 0.5  # block edges
    q /= q.sum()
    y = _sample_categorical(q.expand(R, -1).contiguous(), gen)
    freq = torch.bincount(y, minlength=1000).double() / R
    sigma = (q.double() * (1 - q.double()) / R).sqrt()
    assert bool(((freq - q.double()).abs() <= 5 * sigma + 1e-12).all())
    assert bool((freq[q == 0] == 0).all())
    C, rows = 1 << 20, 40
    where = torch.randint(0, C, (rows,), generator=gen)
    onehot = torch.zeros(rows, C)
    onehot[torch.arange(rows), where] = 1
    assert torch.equal(_sample_categorical(onehot, gen), where)


@pytest.mark.parametrize("d", [5, 383, 384, 700])
def test_gram_panels_mirrored_equal_full_product(d):
    """Upper panels of z^T z added in place (two batches, the second scaled), mirrored once, equal the full
    product (float64, 1e-12)."""
    from lalora.backends.kfac_gram import add_gram, mirror_panels

    g = torch.Generator().manual_seed(d)
    z1, z2 = (torch.randn(37, d, generator=g, dtype=torch.float64) for _ in range(2))
    got = torch.zeros(d, d, dtype=torch.float64)
    add_gram(add_gram(got, z1), z2, alpha=0.25)
    got = mirror_panels(got)
    ref = z1.T @ z1 + 0.25 * z2.T @ z2
    assert rel(got, ref) <= 1e-12
    assert rel(0.5 * (got + got.T), ref) <= 1e-12


def test_float32_running_sums_match_float64():
    """sum_dtype='float32' (half the fit's accumulator memory) gives the float64-sum factors to 1e-6."""
    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"), r=2)
    batches = token_batches(n_batches=3, batch_size=3, pad=True, mask_prompt=True)
    a = _blocks(_fit(model, batches, options={"curvature": "ef"}))
    b = _blocks(_fit(model, batches, options={"curvature": "ef", "sum_dtype": "float32"}))
    for name in a:
        assert rel(b[name].X.dense(), a[name].X.dense()) <= 1e-6 and rel(b[name].G.dense(), a[name].G.dense()) <= 1e-6
    with pytest.raises(BackendError, match="sum_dtype"):
        _fit(model, batches, options={"sum_dtype": "float16"})


@pytest.mark.parametrize("curvature", ["mc", "ef"])
def test_fit_differentiates_the_adapted_outputs_not_the_lora_weights(curvature):
    """The fit's backward passes ask for the gradients at the adapted outputs (lora_B's), all the factors need:
    no gradient of a LoRA weight is computed (a hook on each weight counts how often autograd computes its
    gradient: zero), nothing is accumulated into ``.grad``, and the factors still match the per-token reference
    of ``test_tiny_llama_empirical_factors_match_per_token_reference`` (checked there; here: finite, non-zero)."""
    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"), r=2)
    randomize_lora_B(model)
    calls = []
    weights = [p for n, p in model.named_parameters() if "lora_" in n]
    handles = [p.register_hook(lambda g, n=n: calls.append(n)) for n, p in model.named_parameters() if "lora_" in n]
    try:
        P = lalora.fit_precision(model, token_batches(n_batches=2), backend="kfac", progress=False,
                                 options={"curvature": curvature})
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert all(p.grad is None for p in weights)
    assert all(float(b.G.diag().sum()) > 0 and float(b.X.diag().sum()) > 0 for b in P.blocks)
