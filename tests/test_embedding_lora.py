"""LoRA on embeddings (peft's ``lora_embedding_A/B``): backends ``diag``, ``kfac``, ``tri-kfac`` against brute force.

References (no lalora capture code): the exact per-example EF of ``lalora.reference.dense_empirical_fisher``
(plain autograd through peft's own forward on unpadded singletons), and the K-FAC factors by their
per-token definition with ``x`` = one-hot(token id) and ``g`` = autograd's gradient at the peft embedding
layer's output, pulled back through the explicit Jacobian of ``vec(s (B0 dA + dB A0))``
(``tests/reference.kronecker_precision_reference``).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lalora
from lalora.adapters import find_lora_adapters
from lalora.errors import BackendError
from models import VOCAB, tiny_lora_llama, token_batches
from reference import dense_empirical_fisher, example_loss, kronecker_precision_reference, unpadded_examples
from numerics import rel_diff

# float32 fit vs float64 reference on a 2-layer model: products of a few dozen float32 roundings; 1e-5 is round-off
TOL = 1e-5


def _fit(model, data, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, progress=False, **kw)


def embedding_model(seed=0, targets=("embed_tokens",), random_A=True, r=2, **kw):
    """Tiny Llama with LoRA on its input embedding; peft's default init sets A = 0 for embeddings (then B gets
    no gradient), so ``random_A`` draws A too."""
    model = tiny_lora_llama(seed=seed, targets=targets, r=r, **kw)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_embedding_A" in n and random_A or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def embedding_factors(model, batches, adapter_name=None):
    """Per embedding adapter key: ``(X, G)`` float64 by the per-token definition (expand): ``X = (1/T) sum x x^T``
    with ``x`` = one-hot(id) over the real tokens of the counted examples, ``G = (1/N) sum g g^T``."""
    adapters = [a for a in find_lora_adapters(model, adapter_name) if a.embedding]
    X, G, T, N = {}, {}, {}, 0
    for one in unpadded_examples(batches):
        outs = {}
        handles = [a.layer.register_forward_hook(lambda m, i, o, a=a: outs.__setitem__(a.key, (i[0][0], o)))
                   for a in adapters]
        try:
            loss = example_loss(model, one)
        finally:
            for h in handles:
                h.remove()
        N += 1
        for a in adapters:
            ids, out = outs[a.key]
            x = F.one_hot(ids, a.A.shape[1]).double()
            g = torch.autograd.grad(loss, out, retain_graph=True)[0][0].double()
            X[a.key], T[a.key] = X.get(a.key, 0) + x.T @ x, T.get(a.key, 0) + x.shape[0]
            G[a.key] = G.get(a.key, 0) + g.T @ g
    return {k: (X[k] / T[k], G[k] / N) for k in X}


@pytest.mark.parametrize("random_A", [True, False], ids=["A!=0", "A=0"])
def test_diag_is_the_exact_empirical_fisher_diagonal(random_A):
    model = embedding_model(random_A=random_A)
    batches = token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)
    ref = dense_empirical_fisher(model, batches)
    precision = _fit(model, batches, "diag")
    assert set(precision.param_names) == {"model.embed_tokens.lora_A", "model.embed_tokens.lora_B"}
    d = torch.cat([precision.diagonal()[n].flatten() for n in precision.param_names])
    assert rel_diff(d, torch.diagonal(ref)) <= TOL
    # tokens repeat inside an example (37-token vocabulary, 7 positions): their gradients add before squaring
    assert float(torch.diagonal(ref)[:2 * VOCAB].max()) > 0


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_kfac_factors_and_dense_block_match_the_per_token_definition(backend):
    model = embedding_model()
    batches = token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)
    precision = _fit(model, batches, backend, options={"curvature": "ef"})
    ref = embedding_factors(model, batches)
    (block,) = precision.blocks
    X, G = ref["model.embed_tokens"]
    assert block.X.k == 0 and "diagonal" in block.describe()  # stored as (vocab,), not vocab x vocab
    assert rel_diff(block.X.dense(), X) <= TOL and rel_diff(block.G.dense(), G) <= TOL
    dense = kronecker_precision_reference(model, ref, tri=backend == "tri-kfac")
    assert rel_diff(precision.to_dense(), dense) <= TOL
    # the dry-run estimate counts vocab floats for X (lalora fit --dry-run)
    from lalora.estimate import stored_bytes

    assert stored_bytes(model, backend, {"curvature": "ef"}) == precision.num_bytes


def test_tri_kfac_is_the_exact_empirical_fisher_where_kfac_is_exact():
    """K-FAC is exact for one example with one token of non-zero gradient whose input equals the other
    tokens' (DESIGN.md section 6): ids (5, 5), only position 0 has a target, so ``g_1 = 0`` (position 1 feeds
    no loss), ``G = g_0 g_0^T``, ``X = x x^T`` and ``J^T kron(G, X) J`` is the per-example EF ``grad grad^T``."""
    model = embedding_model()
    batch = {"input_ids": torch.tensor([[5, 5]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 5]])}
    precision = _fit(model, [batch], "tri-kfac", options={"curvature": "ef"})
    ref = dense_empirical_fisher(model, [batch])
    assert float(ref.abs().max()) > 0
    assert rel_diff(precision.to_dense(), ref) <= TOL


def test_mixed_model_covers_linear_and_embedding_adapters_and_the_penalty_is_the_dense_quadratic(tmp_path):
    model = embedding_model(targets=("embed_tokens", "q_proj"))
    batches = token_batches(n_batches=2, batch_size=3)
    for backend in ("diag", "kfac", "tri-kfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", lalora.UncoveredParameterWarning)  # every trainable tensor covered
            precision = _fit(model, batches, backend)
        assert {"model.embed_tokens.lora_A", "model.embed_tokens.lora_B"} <= set(precision.param_names)
        precision.save(tmp_path / f"{backend}.safetensors")
        loaded = lalora.Precision.load(tmp_path / f"{backend}.safetensors", model)
        dense = loaded.to_dense()
        assert rel_diff(dense, precision.to_dense()) == 0  # save -> load is a pure copy
        reg = lalora.LaLoRARegularizer(model, loaded, strength=2.0, form="linearized")
        g = torch.Generator().manual_seed(1)
        params = find_lora_adapters(model)
        names = [n for a in params for n in (a.a_name, a.b_name)]
        tensors = {n: p for a in params for n, p in a.params().items()}
        deltas = {n: torch.randn(tensors[n].shape, generator=g) * 0.1 for n in names}
        with torch.no_grad():
            for n in names:
                tensors[n].add_(deltas[n])
        d = torch.cat([deltas[n].flatten() for n in loaded.param_names]).double()
        assert rel_diff(reg().detach(), 0.5 * 2.0 * d @ dense @ d) <= TOL, backend
        with torch.no_grad():
            for n in names:
                tensors[n].sub_(deltas[n])


def test_backends_without_embedding_support_name_the_uncovered_weights_or_refuse():
    mixed = embedding_model(targets=("embed_tokens", "q_proj"))
    batches = token_batches(n_batches=1, batch_size=2)
    with pytest.warns(lalora.UncoveredParameterWarning, match=r"lora_embedding_A.*diag, kfac and tri-kfac"):
        precision = _fit(mixed, batches, "block")
    assert not any("embed_tokens" in n for n in precision.param_names)
    # the regularizer takes that precision (the embedding LoRA is uncovered, not a mismatch) and says so again
    with pytest.warns(lalora.UncoveredParameterWarning, match="modelled only by the diag, kfac and tri-kfac"):
        lalora.LaLoRARegularizer(mixed, precision, strength=1.0)
    only = embedding_model()
    with pytest.raises(BackendError, match=r"backend 'block' does not model LoRA on embeddings.*'diag', 'kfac' or 'tri-kfac'"):
        _fit(only, batches, "block")


def test_padding_idx_tokens_diag_exact_kfac_refused():
    """``F.embedding(padding_idx=p)`` gives A's column p no gradient: diag reproduces that exactly; the Kronecker
    factors cannot (B still sees A x there), so kfac refuses by name when a real token is p."""
    model = embedding_model(pad_token_id=3)
    assert model.base_model.model.model.embed_tokens.get_base_layer().padding_idx == 3
    batch = {"input_ids": torch.tensor([[4, 3, 6, 3, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": torch.tensor([[4, 3, 6, 3, 8]])}
    ref = dense_empirical_fisher(model, [batch])
    precision = _fit(model, [batch], "diag")
    d = torch.cat([precision.diagonal()[n].flatten() for n in precision.param_names])
    assert rel_diff(d, torch.diagonal(ref)) <= TOL
    assert float(precision.diagonal()["model.embed_tokens.lora_A"][:, 3].abs().max()) == 0  # no gradient at all
    with pytest.raises(BackendError, match=r"padding_idx 3.*backend 'diag'"):
        _fit(model, [batch], "kfac", options={"curvature": "ef"})
    # pad positions masked out (attention mask 0) are no real tokens: kfac fits
    padded = token_batches(n_batches=1, batch_size=3)
    _fit(embedding_model(pad_token_id=0), padded, "kfac", options={"curvature": "ef"})


def test_refusals_name_the_option():
    batches = token_batches(n_batches=1, batch_size=2)
    with pytest.raises(BackendError, match=r"kfac_approx='reduce' is refused for LoRA on embeddings"):
        _fit(embedding_model(), batches, "kfac", options={"kfac_approx": "reduce"})
    model = embedding_model()
    model.base_model.model.model.embed_tokens.get_base_layer().scale_grad_by_freq = True
    with pytest.raises(BackendError, match="scale_grad_by_freq=True"):
        find_lora_adapters(model)
    model = embedding_model()
    model.base_model.model.model.embed_tokens.get_base_layer().max_norm = 1.0
    with pytest.raises(BackendError, match="max_norm=1.0"):
        find_lora_adapters(model)
    model = embedding_model()
    model.merge_adapter()
    with pytest.raises(BackendError, match="merged into the base weights"):
        _fit(model, batches, "diag")


def test_embed_scale_enters_the_scaling():
    """Gemma-style scaled embeddings: peft multiplies the LoRA output by the base layer's ``embed_scale``."""
    model = embedding_model()
    base = model.base_model.model.model.embed_tokens.get_base_layer()
    reference_scaling = find_lora_adapters(model)[0].scaling
    base.embed_scale = torch.tensor(1.7)
    (a,) = find_lora_adapters(model)
    assert a.scaling == pytest.approx(1.7 * reference_scaling, rel=1e-6)
    batches = token_batches(n_batches=2, batch_size=3)
    ref = dense_empirical_fisher(model, batches)
    d = torch.cat([v.flatten() for v in _fit(model, batches, "diag").diagonal().values()])
    assert rel_diff(d, torch.diagonal(ref)) <= TOL


@pytest.mark.parametrize("backend", ["diag", "kfac"])
def test_checkpointed_fit_with_embedding_lora_resumes_to_the_uninterrupted_result(tmp_path, backend):
    from test_robustness import _FlakyData, _Interrupted

    model = embedding_model(targets=("embed_tokens", "q_proj"))
    batches = token_batches(5, seed=4)
    options = {"mc_samples": 2} if backend == "kfac" else None  # MC: the generator state is restored too
    reference = _fit(model, batches, backend, options=options, checkpoint_dir=tmp_path / "ref", checkpoint_every=2)
    with pytest.raises(_Interrupted):
        _fit(model, _FlakyData(batches, fail_after=3), backend, options=options, checkpoint_dir=tmp_path / "c",
             checkpoint_every=2)
    resumed = _fit(model, _FlakyData(batches), backend, options=options, checkpoint_dir=tmp_path / "c",
                   checkpoint_every=2)
    assert resumed.metadata["resumed_from_batch"] == 2
    # the running sums are restored (float64): the remaining batches add in the same order, round-off only
    assert rel_diff(resumed.to_dense(), reference.to_dense()) <= 1e-6


@pytest.mark.parametrize("backend", ["diag", "kfac"])
def test_two_active_adapters_on_one_embedding_are_separate_adapters(backend):
    """Both adapters see the same ids and output gradient, each with its own A, B and scaling (DESIGN.md section 6)."""
    from models import add_active_adapter

    model = add_active_adapter(embedding_model(), ["embed_tokens"], r=3, alpha=2.0)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.lora_embedding_A["second"].normal_()
    batches = token_batches(n_batches=2, batch_size=3)
    names = ["default", "second"]
    precision = _fit(model, batches, backend, adapter_name=names, options={"curvature": "ef"} if backend == "kfac" else None)
    assert len(find_lora_adapters(model, names)) == 2 and len(precision.param_names) == 4
    if backend == "diag":
        ref = dense_empirical_fisher(model, batches, adapter_name=names)
        d = torch.cat([precision.diagonal()[n].flatten() for n in precision.param_names])
        assert rel_diff(d, torch.diagonal(ref)) <= TOL
    else:
        ref = embedding_factors(model, batches, adapter_name=names)
        dense = kronecker_precision_reference(model, ref, tri=False, adapter_name=names)
        assert rel_diff(precision.to_dense(), dense) <= TOL
