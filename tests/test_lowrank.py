"""Low-rank-plus-diagonal Kronecker factors (``max_rank``, ``lalora.compress``), streaming of the kfac
backend and ``lalora fit --dry-run`` / ``lalora.estimate``.

References are dense: ``to_dense()`` of the blocks (``torch.kron`` of the factors in
``lalora.blocks.kronecker``), ``torch.linalg.eigh`` for the eigenpairs. Tolerances: 1e-5 relative
(float32 algebra vs float64 references) unless a test states otherwise.
"""
from __future__ import annotations

import gc
import json
import warnings
import weakref

import pytest
import torch

import lalora
from lalora.blocks.factors import lowrank_plus_diag
from lalora.compression import compress
from lalora.errors import BackendError
from lalora.estimate import estimate_fit, stored_bytes
from models import randomize_lora_B, tiny_lora_llama, token_batches
from numerics import F32, rel_close
from reference import effective_weight_dense

TOL = 1e-5
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # factor sides 8, 16, 24


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fit(model, data, backend="kfac", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, progress=False, **kw)


@pytest.fixture(scope="module")
def model():
    m = tiny_lora_llama(targets=TARGETS, r=2)
    randomize_lora_B(m)  # B != 0: cross terms and A-curvature present
    return m


@pytest.fixture(scope="module")
def precisions(model):
    data = token_batches(3)
    return {kind: _fit(model, data, kind) for kind in ("kfac", "tri-kfac")}


def _psd(n, seed=0, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * decay ** torch.arange(n, dtype=torch.float64)) @ Q.T


def _directions(precision, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) for n, t in precision.anchor.items()}


def _uncompressed(b):
    """The same Kronecker block with its low-rank factors densified (``U diag(s) U^T + diag(d)``)."""
    return type(b)(b.params, b.X.dense(), b.G.dense(), b.scaling, A0=b.A0, B0=b.B0)


def _flat(delta, names):
    return torch.cat([delta[n].reshape(-1).double() for n in names])


# --- the factor ----------------------------------------------------------------------------
def test_lowrank_plus_diag_top_eigenpairs_diagonal_and_determinism():
    M64 = _psd(40)
    M = M64.float()
    f = lowrank_plus_diag(M, 6, seed=3)
    evals = torch.linalg.eigvalsh(M64).flip(0)
    assert rel(f.s, evals[:6]) <= 1e-5  # subspace iteration finds the top-6 eigenvalues
    assert rel(f.U.T @ f.U, torch.eye(6)) <= 1e-5  # orthonormal
    assert rel(f.diag(), torch.diagonal(M64)) <= 1e-6  # the diagonal is kept exactly
    assert bool((f.d >= 0).all()) and bool((f.s >= 0).all())
    V = torch.randn(40, 3)
    assert rel(f.mm(V), f.dense().double() @ V.double()) <= TOL
    g = lowrank_plus_diag(M, 6, seed=3)  # deterministic given the seed
    # the same seeded computation twice: equal up to float32 round-off (BLAS kernels may vary with alignment)
    assert rel_close(f.U, g.U) and rel_close(f.s, g.s) and rel_close(f.d, g.d)
    full = lowrank_plus_diag(M, 40)  # k = n: exact
    assert rel(full.dense(), M64) <= TOL
    errs = [rel(lowrank_plus_diag(M, k).dense(), M64) for k in (1, 4, 16, 39)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 < errs[0]
    t = full.truncated(6)  # truncating keeps the diagonal too
    assert rel(t.diag(), torch.diagonal(M64)) <= 1e-6 and t.k == 6


# --- blocks vs dense references ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "tri-kfac"])
def test_compressed_block_algebra_matches_dense(precisions, kind):
    P = precisions[kind]
    C = compress(P, 5)
    assert C.structure == kind and C.num_bytes < P.num_bytes
    assert all(F.kind == "lowrank" for b in C.blocks for F in (b.X, b.G) if F.n > 5)
    assert "low-rank k=5 + diag" in C.summary()
    D = C.to_dense()
    names = C.param_names
    for seed in range(3):
        delta = _directions(C, seed)
        v = _flat(delta, names)
        assert rel(C.quadratic(delta), v @ D @ v) <= TOL
        assert rel(_flat(C.matvec(delta), names), D @ v) <= TOL
    assert rel(_flat(C.diagonal(), names), torch.diagonal(D)) <= TOL
    for b in C.blocks:  # the blockwise dense form equals lalora.blocks.kronecker's J^T kron(G, X) J / block_diag
        assert rel(b.to_dense(), _uncompressed(b).to_dense()) <= TOL
    assert float(torch.linalg.eigvalsh(D).min()) >= -1e-6 * float(torch.linalg.eigvalsh(D).max())  # PSD
    # the effective-weight form: vec(Delta)^T kron(G~, X~) vec(Delta), Delta = s (B A - B0 A0)
    for b in C.blocks:
        a_name, b_name = b.params
        A, B = b.A0 + 0.1 * torch.randn_like(b.A0), b.B0 + 0.1 * torch.randn_like(b.B0)
        Delta = (b.scaling * (B.double() @ A.double() - b.B0.double() @ b.A0.double())).reshape(-1)
        ref = Delta @ effective_weight_dense(_uncompressed(b)).double() @ Delta
        assert rel(b.effective_quadratic({a_name: A, b_name: B}), ref) <= TOL


@pytest.mark.parametrize("kind", ["kfac", "tri-kfac"])
def test_accuracy_improves_with_rank_and_is_exact_at_full_rank(precisions, kind):
    P = precisions[kind]
    ref = P.to_dense()
    widths = sorted({n for b in P.blocks for n in (b.X.shape[0], b.G.shape[0])})  # [8, 16, 24]
    errs = {k: rel(compress(P, k).to_dense(), ref) for k in (1, 4, 12, 20, 23)}
    assert errs[23] < errs[12] < errs[1] and errs[1] > 0.05
    full = compress(P, widths[-1])  # nothing wider than max_rank: unchanged
    assert full.structure == kind and rel(full.to_dense(), ref) == 0.0
    # every factor low-rank with k = n (full eigh): exact up to float32 rounding
    blocks = [type(b)(b.params, lowrank_plus_diag(b.X.dense(), b.X.n), lowrank_plus_diag(b.G.dense(), b.G.n), b.scaling)
              for b in P.blocks]
    exact = lalora.Precision(blocks, P.anchor)
    for seed in range(3):
        delta = _directions(P, seed)
        assert rel(exact.quadratic(delta), P.quadratic(delta)) <= TOL
    # the compare tool measures the same: relative error of d'Pd along random directions
    res = lalora.compare_precisions([compress(P, 2), compress(P, 12), exact], reference=P, directions=8,
                                    labels=["k2", "k12", "full"])
    e = {r["name"]: r["rel_err_random_mean"] for r in res.rows}
    assert e["full"] <= TOL and e["k12"] < e["k2"]


def test_save_load_round_trip_bitwise(precisions, tmp_path):
    C = compress(precisions["tri-kfac"], 5, seed=7)
    C.save(tmp_path / "c.lalora")
    L = lalora.Precision.load(tmp_path / "c.lalora")
    assert [b.kind for b in L.blocks] == [b.kind for b in C.blocks]
    for b, c in zip(L.blocks, C.blocks):
        assert b.config() == c.config() == {"scaling": c.scaling}
        tb, tc = b.tensors(), c.tensors()
        assert sorted(tb) == sorted(tc) and {"X_U", "X_s", "X_d", "G_U", "G_s", "G_d"} <= set(tb)
        assert all(torch.equal(tb[k], tc[k]) for k in tc)
    delta = _directions(C)
    assert rel_close(L.quadratic(delta), C.quadratic(delta), F32)  # the stored tensors are equal bitwise (above)
    assert L.metadata["compression"]["max_rank"] == 5


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_regularizer_penalty_and_gradient(model, precisions, form):
    C = compress(precisions["kfac"], 4)
    lam = 3.0
    reg = lalora.LaLoRARegularizer(model, C, strength=lam, form=form)
    params = reg._params
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        names = C.param_names
        pen = reg()
        grads = torch.autograd.grad(pen, [params[n] for n in names])
        if form == "linearized":
            D = C.to_dense()
            v = _flat({n: params[n].detach() - C.anchor[n] for n in names}, names)
            assert rel(pen, 0.5 * lam * v @ D @ v) <= TOL
            assert rel(torch.cat([gr.reshape(-1) for gr in grads]), lam * D @ v) <= TOL
        else:  # per block vec(Delta)^T kron(G~, X~) vec(Delta); gradient by float64 autograd on it
            ref = 0
            theta = {n: params[n].detach().double().requires_grad_(True) for n in names}
            for b in C.blocks:
                a_name, b_name = b.params
                Delta = b.scaling * (theta[b_name] @ theta[a_name] - b.B0.double() @ b.A0.double())
                K = effective_weight_dense(_uncompressed(b)).double()
                ref = ref + Delta.reshape(-1) @ K @ Delta.reshape(-1)
            ref = 0.5 * lam * ref
            ref_grads = torch.autograd.grad(ref, [theta[n] for n in names])
            assert rel(pen, ref) <= TOL
            assert rel(torch.cat([gr.reshape(-1) for gr in grads]), torch.cat([gr.reshape(-1) for gr in ref_grads])) <= TOL
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


# --- backend option ---------------------------------------------------------------------------
def test_backend_max_rank_equals_compress(model, precisions):
    data = token_batches(3)
    for kind in ("kfac", "tri-kfac"):
        fitted = _fit(model, data, kind, options={"max_rank": 5})
        post = compress(precisions[kind], 5)
        assert fitted.metadata["backend_options"]["max_rank"] == 5
        for b, c in zip(fitted.blocks, post.blocks):
            assert b.kind == c.kind == kind and "lowrank" in {b.X.kind, b.G.kind} and b.X.kind == c.X.kind
            # two fits and two compressions of the same data: float32 round-off (tests/numerics.py)
            assert all(rel_close(b.tensors()[k], c.tensors()[k], F32) for k in c.tensors())


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_max_rank_is_refused_naming_it(model, precisions, bad):
    with pytest.raises(BackendError, match="max_rank"):
        lalora.get_backend("kfac")(max_rank=bad)
    with pytest.raises(ValueError, match="max_rank"):
        compress(precisions["kfac"], bad)


def test_kfac_backend_streams_one_batch_of_outputs(model):
    """The logits of batch i are freed before the forward of batch i+1 (one batch held at a time)."""
    base = model.get_base_model()
    refs, alive = [], []

    def pre(module, args, kwargs):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))

    def post(module, args, kwargs, output):
        refs.append(weakref.ref(output.logits))

    h1 = base.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = base.register_forward_hook(post, with_kwargs=True)
    try:
        _fit(model, token_batches(3), "kfac", options={"curvature": "ef"})
    finally:
        h1.remove()
        h2.remove()
    assert alive == [0, 0, 0]


# --- estimate / dry run -------------------------------------------------------------------------
@pytest.mark.parametrize("backend,options", [("diag", {}), ("kfac", {}), ("kfac", {"max_rank": 5}),
                                             ("tri-kfac", {"max_rank": 12})])
def test_stored_bytes_exact_from_shapes(model, backend, options):
    P = _fit(model, token_batches(1), backend, options=options)
    assert stored_bytes(model, backend, options) == P.num_bytes


def test_estimate_fit_extrapolates(model):
    est = estimate_fit(model, token_batches(5), "kfac", num_batches=2, options={"max_rank": 5})
    assert est.sample_batches == 2 and est.total_batches == 5 and len(est.batch_seconds) == 2
    assert est.estimated_seconds == pytest.approx(est.sample_seconds + 3 * est.batch_seconds[1])
    assert est.stored_bytes_exact and est.stored_bytes == stored_bytes(model, "kfac", {"max_rank": 5})
    ads = lalora.find_lora_adapters(model)  # float64 running + float32 window sums of X, G; a float64 T per adapter
    assert est.accumulator_bytes == 12 * sum(a.A.shape[1] ** 2 + a.B.shape[0] ** 2 for a in ads) + 8 * len(ads)
    text = est.format()
    assert "stored precision" in text and "estimated" in text and "peak memory" in text
    with pytest.raises(ValueError, match="num_batches"):
        estimate_fit(model, token_batches(1), "diag", num_batches=0)


def test_cli_fit_dry_run_prints_estimates_and_writes_nothing(tmp_path, capsys):
    from lalora.cli import main
    from models import tiny_llama
    from models import byte_tokenizer

    mdir = tmp_path / "model"
    tiny_llama(vocab_size=257, max_position_embeddings=128).save_pretrained(mdir)
    byte_tokenizer().save_pretrained(mdir)
    data = tmp_path / "src.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat sat.", "A stitch in time.", "Fortune favours.",
                                                                 "All that glitters.", "Out of sight."]) + "\n")
    out = tmp_path / "p.lalora"
    argv = ["fit", "--model", mdir, "--data", data, "--backend", "kfac", "--out", out, "--batch-size", "2",
            "--rank", "2", "--targets", "q_proj,v_proj", "--option", "max_rank=4", "-q"]
    code = main([str(a) for a in argv + ["--dry-run"]])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "sampled 2 of 3 batches" in text and "stored precision" in text and "peak memory" in text
    assert not out.exists() and not list(tmp_path.glob(".p.lalora*"))
    code = main([str(a) for a in argv[:-3] + ["--option", "max_rank=0", "--dry-run", "1", "-q"]])
    err = capsys.readouterr().err
    assert code == 2 and "max_rank" in err and not out.exists()
