"""Several peft adapters active at once (issue #16): every adapter is its own block with its own factors.

Two adapters on one layer read the same input x and see the same layer-output gradient g, but each has
its own A, B and scaling s_i: its K-FAC factors are X = E[x x^T] and G = E[g g^T] of the layer (each
recovered from its own lora_B output gradient, s_i g, divided by s_i), and its blocks use its own A0, B0,
s_i. Before the fix, kfac/tri-kfac keyed the adapters by layer path and raised ("saw no token of a
counted example"). Configurations: both adapters on the same layers, on different layers, and a mix.

References (tests/reference.py): per-token x and g taken at the peft *layer* (input and output
gradient, not at lora_A/lora_B) by plain autograd on unpadded singletons; the dense EF of per-example
gradients; the dense kfac/tri-kfac matrices built from the definition J^T kron(G, X) J.
Tolerance 1e-5 (relative Frobenius): float32 fits vs float64 references, measured <= 6e-7.
"""
import warnings

import pytest
from safetensors import safe_open

import lalora
from lalora.adapters import find_lora_adapters
from models import add_active_adapter, labelled_sequences, pad_batch, tiny_lora_gpt2, tiny_lora_llama
from reference import dense_empirical_fisher, kronecker_precision_reference, layer_factors, rel_err

TOL = 1e-5

# model -> config -> (default's targets, second's targets)
CONFIGS = {
    "llama": {"same-layer": (("v_proj",), ("v_proj",)), "different-layers": (("q_proj",), ("o_proj",)),
              "mix": (("q_proj", "v_proj"), ("v_proj", "o_proj"))},
    "gpt2": {"same-layer": (("c_attn",), ("c_attn",)), "different-layers": (("c_fc",), ("c_attn",)),
             "mix": (("c_attn", "c_fc"), ("c_attn", "c_proj"))},
}
BUILD = {"llama": tiny_lora_llama, "gpt2": tiny_lora_gpt2}


def _model(model_name, config, init="orthogonal"):
    first, second = CONFIGS[model_name][config]
    model = BUILD[model_name](targets=first, init=init)
    return add_active_adapter(model, second, init=init)


def _batches():
    """A left-padded batch (with position ids, for GPT-2) and a right-padded one."""
    ex = labelled_sequences()
    return [pad_batch(ex[:4], "left", position_ids=True), pad_batch(ex[4:], "right")]


def _fit(model, data, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, progress=False, **kw)


def test_adapter_keys_are_unique_per_layer_and_adapter():
    model = _model("llama", "mix")
    adapters = find_lora_adapters(model)
    keys = [a.key for a in adapters]
    assert len(set(keys)) == len(keys) == 8  # q: default; v: default + second; o: second; 2 layers
    shared = [a for a in adapters if a.name == "model.layers.0.self_attn.v_proj"]
    assert sorted(a.key for a in shared) == ["model.layers.0.self_attn.v_proj.default",
                                             "model.layers.0.self_attn.v_proj.second"]
    assert len({a.scaling for a in shared}) == 2  # alpha / r: 2.0 and 0.75
    for a in adapters:
        assert a.a_name == a.key.rsplit(".", 1)[0] + ".lora_A." + a.adapter_name
    single = find_lora_adapters(tiny_lora_llama())  # one adapter: the key is the layer path (checkpoints unchanged)
    assert all(a.key == a.name for a in single)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("config", ["same-layer", "different-layers", "mix"])
@pytest.mark.parametrize("init", ["orthogonal", True], ids=["B!=0", "B=0"])
def test_each_adapter_matches_its_own_reference(model_name, config, init):
    model = _model(model_name, config, init)
    batches = _batches()
    adapters = find_lora_adapters(model)
    ref = layer_factors(model, batches)
    assert set(ref) == {a.key for a in adapters}
    for backend in ("kfac", "tri-kfac"):
        p = _fit(model, batches, backend, options={"curvature": "ef"})
        assert [b.params for b in p.blocks] == [(a.a_name, a.b_name) for a in adapters]
        for a, b in zip(adapters, p.blocks):
            X, G = ref[a.key]
            assert b.scaling == a.scaling
            assert rel_err(b.X.dense(), X) <= TOL, (backend, a.key)
            assert rel_err(b.G.dense(), G) <= TOL, (backend, a.key)  # recovered from s_i g: the layer's g for each
        assert rel_err(p.to_dense(), kronecker_precision_reference(model, ref, tri=backend == "tri-kfac")) <= TOL
        assert set(p.metadata["adapters"]) == {a.key for a in adapters}
        assert sorted(p.metadata["lora_config"]) == ["default", "second"]
    ef = dense_empirical_fisher(model, batches)
    p = _fit(model, batches, "diag")
    assert rel_err(p.to_dense().diagonal(), ef.diagonal()) <= TOL
    p = _fit(model, batches, "block")
    assert rel_err(p.to_dense(), ef * (p.to_dense() != 0).double()) <= TOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_reduce_and_expand_with_two_adapters_on_one_layer(approx):
    model = _model("llama", "mix")
    batches = _batches()
    ref = layer_factors(model, batches, approx)
    p = _fit(model, batches, "tri-kfac", options={"curvature": "ef", "kfac_approx": approx})
    for a, b in zip(find_lora_adapters(model), p.blocks):
        assert rel_err(b.X.dense(), ref[a.key][0]) <= TOL and rel_err(b.G.dense(), ref[a.key][1]) <= TOL, a.key


def test_shared_input_is_one_window_sum(monkeypatch):
    """Memory: the adapters reading one layer's input share one float32 window sum of X (one product per
    batch); accounting (T, the sums, the blocks) stays per adapter (checked against the references above)."""
    import lalora.backends.kfac_factors as kfac_factors

    seen = {}
    commit = kfac_factors.FactorHooks.commit_batch

    def spy(self):
        seen.update(self.x_leader)
        return commit(self)

    monkeypatch.setattr(kfac_factors.FactorHooks, "commit_batch", spy)
    model = _model("llama", "same-layer")
    _fit(model, _batches(), "kfac", options={"curvature": "ef"})
    for layer in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"):
        assert seen[f"{layer}.default"] == seen[f"{layer}.second"]
    assert len(set(seen.values())) == 2 and len(seen) == 4


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_checkpoint_state_is_per_adapter_and_resumes(tmp_path, backend):
    from test_robustness import _FlakyData, _Interrupted

    model = _model("llama", "mix")
    ex = labelled_sequences()
    batches = [pad_batch(ex[i:i + 2], "left") for i in range(0, 6, 2)]
    options = {"curvature": "mc", "mc_samples": 2}
    reference = _fit(model, batches, backend, checkpoint_dir=tmp_path / "ref", checkpoint_every=1, options=options)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):
        _fit(model, _FlakyData(batches, fail_after=2), backend, checkpoint_dir=ckpt, checkpoint_every=1, options=options)
    with safe_open(str(ckpt / "fit-checkpoint.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    adapters = find_lora_adapters(model)
    assert keys == {f"sum.{a.key}.{k}" for a in adapters for k in "XGT"} | {"rng"}
    resumed = _fit(model, _FlakyData(batches), backend, checkpoint_dir=ckpt, checkpoint_every=1, options=options)
    assert resumed.metadata["resumed_from_batch"] == 2
    # the float64 sums and the generator state are restored, the remaining batch is computed alike
    assert rel_err(resumed.to_dense(), reference.to_dense()) <= 1e-6
