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


def embedding_factors(model, batches):
    """Per embedding adapter key: ``(X, G)`` float64 by the per-token definition (expand): ``X = (1/T) sum x x^T``
    with ``x`` = one-hot(id) over the real tokens of the counted examples, ``G = (1/N) sum g g^T``."""
    adapters = [a for a in find_lora_adapters(model) if a.embedding]
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
