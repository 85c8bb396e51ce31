"""The backend registry: decorator registration and discovery through the entry-point group."""
import sys
import textwrap

import pytest
import torch

import lalora
from models import randomize_lora_B, tiny_lora_llama, token_batches

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    import lalora
    from lalora.blocks import DiagBlock

    @dataclass(frozen=True)
    class IsotropicOptions(lalora.BackendOptions):
        scale: float = lalora.option(1.0, "the multiple of the identity")

    class IsotropicBackend(lalora.CurvatureBackend):
        """P = scale * I: isotropic L2 to theta0 (a data-free backend)."""
        curvature = "isotropic"
        Options = IsotropicOptions

        def fit(self, ctx):
            for _ in ctx.stream:  # consume the data so example counts are recorded
                pass
            return [DiagBlock(n, torch.full(p.shape, float(self.options["scale"]))) for n, p in ctx.params().items()]
''')


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """A temporary installed distribution declaring a `lalora.backends` entry point."""
    (tmp_path / "lalora_test_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "lalora_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lalora-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lalora.backends]\nisotropic-test = lalora_test_plugin:IsotropicBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "isotropic-test"
    sys.modules.pop("lalora_test_plugin", None)
    from lalora import backend as registry

    registry._REGISTRY.pop("isotropic-test", None)


def test_builtin_backends_come_from_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="lalora.backends")}
    assert {"diag", "kfac", "tri-kfac", "block", "backpack", "laplace"} <= names
    assert set(names) <= set(lalora.list_backends())
    assert lalora.get_backend("diag").name == "diag"


def test_plugin_through_entry_point(plugin_distribution):
    name = plugin_distribution
    assert name in lalora.list_backends()
    cls = lalora.get_backend(name)
    assert cls.name == name and cls.curvature == "isotropic"
    model = tiny_lora_llama()
    randomize_lora_B(model)
    P = lalora.fit_precision(model, token_batches(), backend=name, progress=False, options={"scale": 2.0})
    assert torch.equal(P.to_dense(), 2.0 * torch.eye(P.num_params, dtype=torch.float64))
    assert P.metadata["backend"] == name and P.metadata["backend_options"] == {"scale": 2.0}


def test_decorator_registration_and_errors():
    @lalora.register_backend("unit-test-zero")
    class Zero(lalora.CurvatureBackend):
        def fit(self, ctx):
            return []

    try:
        assert lalora.get_backend("unit-test-zero") is Zero
        assert "unit-test-zero" in lalora.list_backends()
        with pytest.raises(lalora.BackendError, match="no option 'damping'"):
            lalora.fit_precision(tiny_lora_llama(), token_batches(), backend="unit-test-zero", damping=1.0)
        with pytest.raises(lalora.BackendError, match="already registered"):
            @lalora.register_backend("unit-test-zero")
            class Other(lalora.CurvatureBackend):
                def fit(self, ctx):
                    return []
    finally:
        from lalora import backend as registry

        registry._REGISTRY.pop("unit-test-zero", None)
    with pytest.raises(lalora.BackendError, match="unknown backend 'nope'"):
        lalora.get_backend("nope")
    with pytest.raises(TypeError):
        lalora.register_backend("x")(object)
