"""Storage estimates come from the backend classes (``CurvatureBackend.stored_bytes`` /
``accumulator_bytes``), not from a switch on names: they equal lalora 0.1's numbers (the formulas
below, copied from its ``lalora/estimate.py``) and the bytes of the fitted precision."""
from __future__ import annotations

import warnings

import pytest

import lalora
from lalora.estimate import accumulator_bytes, estimate_fit, stored_bytes
from models import randomize_lora_B, tiny_lora_llama, token_batches
from test_backpack import class_batches, seq_lora_mlp


def _old_factor_floats(n, max_rank):
    return n * n if max_rank is None or n <= max_rank else n * max_rank + max_rank + n


def old_stored_bytes(adapters, backend, options):
    """lalora 0.1: exact for diag, kfac, tri-kfac; None (measured on the sample) for any other backend."""
    if backend == "diag":
        return 4 * sum(a.A.numel() + a.B.numel() for a in adapters)
    if backend in ("kfac", "tri-kfac"):
        k = options.get("max_rank")
        return 4 * sum(_old_factor_floats(a.A.shape[1], k) + _old_factor_floats(a.B.shape[0], k) for a in adapters)
    return None


def old_accumulator_bytes(adapters, backend, options):
    if backend not in ("kfac", "tri-kfac"):
        return None
    running = 4 if options.get("sum_dtype") == "float32" else 8
    # running + float32 window sums of X (d_in^2) and G (d_out^2), and one token count T per adapter (running)
    return (running + 4) * sum(a.A.shape[1] ** 2 + a.B.shape[0] ** 2 for a in adapters) + running * len(adapters)


def _fit(model, data, backend, options, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, options=options, progress=False, **kw)


@pytest.fixture(scope="module")
def llama():
    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora_B(model)
    return model


@pytest.mark.parametrize("backend,options", [
    ("diag", {}), ("kfac", {}), ("kfac", {"max_rank": 5}), ("kfac", {"sum_dtype": "float32"}),
    ("tri-kfac", {"max_rank": 12}), ("block", {}), ("block", {"granularity": "matrix"}),
    ("block", {"storage": "factored"}), ("block", {"memory_budget_mb": 1e-3})])
def test_estimates_from_the_backend_class(llama, backend, options):
    adapters = lalora.find_lora_adapters(llama)
    exact = stored_bytes(llama, backend, options)
    old = old_stored_bytes(adapters, backend, options)
    if old is not None:
        assert exact == old
    assert accumulator_bytes(llama, backend, options) == old_accumulator_bytes(adapters, backend, options)
    P = _fit(llama, token_batches(2, pad=True, mask_prompt=True), backend, options)
    if backend == "block" and set(P.metadata["block_forms"].values()) != {"dense"}:
        assert exact is None  # a factored EF grows with N: not known from the shapes
    else:
        assert exact == P.num_bytes  # what lalora 0.1 measured on the sample fit


@pytest.mark.parametrize("backend,options", [("backpack", {}), ("backpack", {"structure": "kfac"}),
                                             ("backpack", {"curvature": "mc", "structure": "tri-kfac"}),
                                             ("laplace", {}), ("laplace", {"hessian_structure": "kron"})])
def test_estimates_of_backpack_and_laplace_equal_the_fitted_bytes(backend, options):
    model = seq_lora_mlp(init="orthogonal")
    randomize_lora_B(model)
    P = _fit(model, class_batches(), backend, options, loss="classification")
    assert stored_bytes(model, backend, options) == P.num_bytes
    assert accumulator_bytes(model, backend, options) is None


def test_estimate_fit_options_and_deprecated_keywords(llama):
    data = token_batches(3)
    est = estimate_fit(llama, data, "block", num_batches=1, options={"granularity": "matrix"})
    assert est.stored_bytes_exact and est.stored_bytes == stored_bytes(llama, "block", {"granularity": "matrix"})
    assert est.options == {"granularity": "matrix"} and "granularity=matrix" in est.format()
    with pytest.warns(lalora.LaloraDeprecationWarning, match="keyword arguments of estimate_fit"):
        old = estimate_fit(llama, data, "kfac", num_batches=1, max_rank=5)
    assert old.stored_bytes == stored_bytes(llama, "kfac", {"max_rank": 5})
    with pytest.raises(lalora.BackendError, match="did you mean estimate_fit's argument 'num_batches'"):
        estimate_fit(llama, data, "diag", num_batch=1)
