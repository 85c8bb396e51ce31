"""One MC-label convention (``lalora.sampling``): every backend that draws its own labels draws the same ones
for the same seed; libraries that draw from torch's global RNG are seeded and leave it as it was.
(The sampler's distribution itself: tests/test_kfac.py, frequencies within 5 sigma.)"""
import warnings

import pytest
import torch

import lalora
from lalora.reference import rel_err
from lalora.sampling import library_rng, mc_generator, sample_row_targets
from models import lora_mlp, randomize_lora_B

F32 = 1e-5  # float32 fits of the same quantity in two codes: round-off only


def _fit(model, data, backend, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, options=options, loss="classification", progress=False)


def test_kfac_and_backpack_draw_the_same_mc_labels():
    """One example with one output row: K-FAC is exact there (``kron(mean_s g_s g_s^T, x x^T)`` is the MC Fisher of
    those samples), so ``kfac(curvature="mc")`` and BackPACK's MC route (SumGradSquared) give the same diagonal
    exactly when they draw the same labels, and different ones for another seed."""
    model = lora_mlp()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(1, 5, generator=g), torch.tensor([1]))]
    kw = {"mc_samples": 7, "seed": 3}
    kfac = _fit(model, data, "kfac", curvature="mc", **kw).to_dense().diagonal()
    bp = _fit(model, data, "backpack", curvature="mc", **kw)
    assert bp.metadata["backpack_route"] == "SumGradSquared"
    assert rel_err(bp.to_dense().diagonal(), kfac) <= F32
    other = _fit(model, data, "backpack", curvature="mc", mc_samples=7, seed=4).to_dense().diagonal()
    assert rel_err(other, kfac) > 1e-2  # measured 0.24: another seed, other labels


def test_draws_are_reproducible_and_gaussian_targets_have_the_mse_variance():
    rows = torch.randn(50_000, 3, generator=torch.Generator().manual_seed(1))
    a = sample_row_targets("categorical", rows, mc_generator(5))
    assert torch.equal(a, sample_row_targets("categorical", rows, mc_generator(5)))  # a pure function of the seed
    y = sample_row_targets("gaussian", rows, mc_generator(5))
    var = float((y - rows).var())
    assert abs(var - 0.5) <= 5 * 0.5 * (2 / y.numel()) ** 0.5  # |f - y|^2 is the NLL of N(f, I/2); 5 sigma
    with pytest.raises(ValueError, match="likelihood"):
        sample_row_targets("poisson", rows, mc_generator(5))


def test_library_rng_seeds_and_restores_the_global_generator():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with library_rng(7):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with library_rng(7):
        assert torch.equal(torch.rand(4), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws_and_library_rng_restores_the_cuda_generator():
    """The draws are made on the CPU: the same labels on CUDA (a CUDA fit of the example above equals the CPU
    fit to float32 round-off, with the MC labels of the same seed); library_rng leaves the CUDA generator as
    it was."""
    model = lora_mlp()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 5, generator=g), torch.tensor([1])
    cpu = _fit(model, [(x, y)], "backpack", curvature="mc", mc_samples=7, seed=3).to_dense().diagonal()
    model.to("cuda")
    cuda = _fit(model, [(x.cuda(), y.cuda())], "backpack", curvature="mc", mc_samples=7, seed=3).to_dense().diagonal()
    assert rel_err(cuda.cpu(), cpu) <= F32
    before = torch.cuda.get_rng_state()
    with library_rng(7, "cuda"):
        torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
