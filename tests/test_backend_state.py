"""Backend instances between fits (a loaded checkpoint state is used by one fit only) and the registry's
protection of backend names (issue #16, items 8 and 9)."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import lalora
from lalora import backend as registry
from numerics import F32, rel_close, rel_diff
from models import randomize_lora_B, tiny_lora_llama, token_batches


def _fit(model, instance):
    return lalora.fit_precision(model, token_batches(), backend=instance, progress=False)


def _close(a, b):
    # the same computation on the same data twice (float32 GEMMs summed in float64): round-off only. Compared
    # norm-wise (tests/numerics.py): BLAS may pick another kernel for a buffer of another alignment, and a float32
    # GEMM's round-off is relative to the row and column norms, so an entry that cancels to near zero can move by
    # 1e-6 of itself while the matrix moves by 1e-7 of its norm
    assert rel_close(a, b, F32), rel_diff(a, b)


def _state_after_last_batch(cls, options, model):
    """Fit once and keep ``state_dict()`` as a checkpoint would hold it after the last batch (kfac hands its sums
    over to the blocks when the fit ends, so the state is taken inside the fit)."""
    captured = {}

    class Capturing(cls):
        def fit(self, ctx):
            done = ctx.batch_done

            def batch_done(backend):
                done(backend)
                captured.clear()
                captured.update(backend.state_dict())

            ctx.batch_done = batch_done
            return super().fit(ctx)

    return _fit(model, Capturing(**options)), captured


# kfac with the true labels: with MC labels the continued fit would draw other labels (the loaded generator state)
@pytest.mark.parametrize("backend,options", [("diag", {}), ("kfac", {"curvature": "ef"}),
                                             ("tri-kfac", {"curvature": "ef"})])
def test_loaded_state_is_used_by_one_fit_only(backend, options):
    """A state loaded before a fit continues that fit; the next fit of the same instance starts from zero."""
    model = tiny_lora_llama()
    randomize_lora_B(model)
    cls = lalora.get_backend(backend)
    fresh, state = _state_after_last_batch(cls, options, model)  # state: the sums of one full pass over the data
    assert any(k.startswith("sum.") for k in state)

    inst = cls(**options)
    inst.load_state_dict(state)
    continued = _fit(model, inst)  # the loaded sums + the same data again: twice the sums over N examples
    again = _fit(model, inst)  # nothing loaded for this fit: from zero, like a fresh instance
    if backend == "diag":
        for name, d in fresh.diagonal().items():
            _close(continued.diagonal()[name], 2 * d)  # sum of squares doubled, N the same
    else:
        for b_fresh, b_cont in zip(fresh.blocks, continued.blocks):
            _close(b_cont.X.dense(), b_fresh.X.dense())  # X: input sums and token count both doubled
            _close(b_cont.G.dense(), 2 * b_fresh.G.dense())  # G: gradient sums doubled, N the same
    for name, d in fresh.diagonal().items():
        _close(again.diagonal()[name], d)
    for b_fresh, b_again in zip(fresh.blocks, again.blocks):
        for key in ("X", "G"):
            if hasattr(b_fresh, key):
                _close(getattr(b_again, key).dense(), getattr(b_fresh, key).dense())


class _Stub(lalora.CurvatureBackend):
    def fit(self, ctx):
        return []


def _class_in_module(module: str, qualname: str = "Plugin"):
    return type(qualname, (_Stub,), {"__module__": module, "__qualname__": qualname})


def test_same_class_name_from_two_modules_is_refused():
    a, b = _class_in_module("plugin_alpha.backends"), _class_in_module("plugin_beta.backends")
    try:
        lalora.register_backend("unit-test-shared")(a)
        with pytest.raises(lalora.BackendError) as e:
            lalora.register_backend("unit-test-shared")(b)
        msg = str(e.value)
        assert "'unit-test-shared'" in msg and "plugin_alpha.backends" in msg and "plugin_beta.backends" in msg
        assert lalora.get_backend("unit-test-shared") is a  # the first registration stays
        assert lalora.register_backend("unit-test-shared")(a) is a  # the same class again is fine
        assert lalora.get_backend("unit-test-shared") is a
    finally:
        registry._REGISTRY.pop("unit-test-shared", None)


def test_reloaded_module_may_register_again(tmp_path, monkeypatch):
    """importlib.reload makes a new class object with the same module and qualname: it replaces the old one."""
    (tmp_path / "lalora_reload_plugin.py").write_text(textwrap.dedent('''
        import lalora

        @lalora.register_backend("unit-test-reload")
        class ReloadBackend(lalora.CurvatureBackend):
            def fit(self, ctx):
                return []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod = importlib.import_module("lalora_reload_plugin")
        old = mod.ReloadBackend
        mod = importlib.reload(mod)
        assert mod.ReloadBackend is not old
        assert lalora.get_backend("unit-test-reload") is mod.ReloadBackend
    finally:
        sys.modules.pop("lalora_reload_plugin", None)
        registry._REGISTRY.pop("unit-test-reload", None)
