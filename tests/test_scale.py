"""Scale options of the Kronecker backends (docs/scale.md): a memory bound (``max_memory``: groups of layers in
successive passes), accumulators on each layer's own device, bf16 models.

What "peak accumulator bytes" measures here: ``metadata["accumulator_peak_bytes"]``, the bytes of the factor
tensors alive during the fit (float32 window sums, running sums in ``sum_dtype``, the factor being finished),
sampled after every batch and every finished adapter (backends/kfac_passes.py ``HeldBytes``). torch keeps no
allocator statistics for CPU tensors, so this is the measurement available on CPU; it counts storages, not
the model or activations.
"""
from __future__ import annotations

import pytest
import torch

import lalora
from lalora.backends.kfac_passes import parse_bytes
from lalora.errors import BackendError, DataError
from models import fit_quiet, tiny_lora_llama, token_batches
from numerics import F32, rel_diff

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(dtype=torch.float32):
    return tiny_lora_llama(targets=ALL_LINEAR, dtype=dtype)


def _data():
    return token_batches(n_batches=4, batch_size=3, seq_len=7, seed=5)


def _assert_same_factors(p, q, tol):
    assert [b.params for b in p.blocks] == [b.params for b in q.blocks]
    for b1, b2 in zip(p.blocks, q.blocks):
        for k in ("X", "G"):
            t1, t2 = b1.tensors()[k], b2.tensors()[k]
            assert t1.abs().max() > 0 and rel_diff(t1, t2) <= tol, (b1.params, k, rel_diff(t1, t2))


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
@pytest.mark.parametrize("curvature", ["mc", "ef"])
def test_max_memory_equals_unbounded_fit(backend, curvature, monkeypatch):
    """A budget of twice the largest adapter's sums (14 adapters) forces >= 4 passes; the result equals the one-pass fit to float32
    round-off (the same batches, the same MC labels in every pass: each pass restarts the generator), and
    the measured peak stays within the budget while the unbounded fit's is > 3x the budget."""
    from lalora.backends import kfac as kfac_backend

    # window sums flushed into the running sums every 2 batches (default 16): the running sums then exist,
    # as in any fit of more than 16 batches
    monkeypatch.setattr(kfac_backend, "FLUSH_EVERY", 2)
    model = _model()
    unbounded = fit_quiet(model, _data(), backend, options={"curvature": curvature})
    cls = lalora.get_backend(backend)
    budget = 2 * max(cls.accumulator_bytes([a], cls.resolve_options({})) for a in lalora.find_lora_adapters(model))
    bounded = fit_quiet(model, _data(), backend, options={"curvature": curvature, "max_memory": str(budget)})
    assert unbounded.metadata["kfac_passes"] == 1 and bounded.metadata["kfac_passes"] >= 4
    peak, peak0 = bounded.metadata["accumulator_peak_bytes"], unbounded.metadata["accumulator_peak_bytes"]
    assert 0 < peak <= budget < peak0 / 3, (peak, budget, peak0)
    # the same products summed in the same order: float32 round-off at most (the window sums are shared
    # differently by q/k/v when they fall into different groups)
    _assert_same_factors(bounded, unbounded, F32)
    assert bounded.metadata["num_examples"] == unbounded.metadata["num_examples"]


def test_max_memory_refusals():
    model = _model()
    with pytest.raises(BackendError, match="max_memory='1KiB'.*below the factor sums of adapter"):
        fit_quiet(model, _data(), "kfac", options={"max_memory": "1KiB"})
    with pytest.raises(BackendError, match="max_memory='20KiB' needs .* passes .* one-shot iterator"):
        fit_quiet(model, iter(_data()), "kfac", options={"max_memory": "20KiB"})
    with pytest.raises(BackendError, match="skip_nonfinite"):
        fit_quiet(model, _data(), "kfac", options={"max_memory": "20KiB"}, skip_nonfinite=True)
    with pytest.raises(BackendError, match="option max_memory='forty' is not a memory size"):
        fit_quiet(model, _data(), "kfac", options={"max_memory": "forty"})
    # a generator passed once is fine when everything fits in one pass
    assert fit_quiet(model, iter(_data()), "kfac", options={"max_memory": "40GiB"}).metadata["kfac_passes"] == 1


class _Shuffled:
    """Re-iterable, but in another order every time (a shuffling loader)."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __iter__(self):
        self.calls += 1
        return iter(self.batches if self.calls % 2 else self.batches[::-1])


def test_max_memory_refuses_data_that_change_between_passes():
    with pytest.raises(DataError, match="changed between passes 1 and 2"):
        fit_quiet(_model(), _Shuffled(_data()), "kfac", options={"max_memory": "20KiB"})


def test_memory_sizes_and_cli_text():
    assert parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("512 MB") == 512 * 10**6 and parse_bytes("1e6") == 10**6
    from lalora.options import parse_option_items

    opts = lalora.get_backend("kfac").resolve_options(parse_option_items(["max_memory=40GiB"]))
    assert opts["max_memory"] == "40GiB"
    with pytest.raises(BackendError, match="max_memory"):
        lalora.get_backend("kfac").resolve_options(parse_option_items(["max_memory=0GiB"]))


def test_accumulators_follow_the_input_device():
    """FactorHooks creates every window sum and running sum on the device of the tensor it sums (the layer's
    own device under ``device_map='auto'``), not on a configured device: given ``device='meta'`` it still
    sums this CPU model's inputs on the CPU. (Only CPU is available here and torch has no second fake CPU
    device, so a model really split over devices is not run.)"""
    from lalora.backends.kfac_factors import FactorHooks

    model = _model()
    adapters = lalora.find_lora_adapters(model)
    batch = _data()[0]
    sums = {a.key: {} for a in adapters}
    hooks = FactorHooks(adapters, "expand", sums, torch.float64, 1, torch.device("meta"))
    with hooks:
        hooks.begin_batch(batch["attention_mask"].float(), torch.ones(3))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hooks.forward_done()
        out.square().sum().backward()
        hooks.commit_batch()
    held = [*hooks.acc_G.values(), *hooks.acc_X.values(), *(t for s in sums.values() for t in s.values())]
    assert len(held) >= 3 * len(adapters)  # G window + running X, G, T per adapter
    assert {t.device.type for t in held} == {"cpu"}


def test_bf16_model_fit_equals_float32_fit():
    """A bf16 model (activations and forward/backward in bf16; peft keeps the LoRA weights in float32, the
    factors are float32 products summed in float64) against the float32 fit of the very same weights.
    Tolerance 2e-2 (relative, Frobenius; measured at most 8e-3 here): bf16 has 8 significant bits (unit
    round-off u = 2^-9 = 2e-3), and every activation and output gradient of the two-layer model is rounded
    to bf16 after each of its operations (norm, attention, MLP, residuals, logits), so x and g carry errors
    of a few u, and their second moments up to twice that: 10 u covers it; a wrong factor (a token missed or
    counted twice, a scale) moves it by far more."""
    m16 = _model(torch.bfloat16)
    m32 = _model(torch.bfloat16)
    m32.float()
    for p16, p32 in zip(m16.parameters(), m32.parameters()):
        assert torch.equal(p16.detach().float(), p32.detach())
    lora_dtypes = {p.dtype for n, p in m16.named_parameters() if "lora_" in n}
    p16 = fit_quiet(m16, _data(), "kfac", options={"curvature": "ef"})
    p32 = fit_quiet(m32, _data(), "kfac", options={"curvature": "ef"})
    assert lora_dtypes == {torch.float32}  # peft's autocast_adapter_dtype; the base model runs in bf16
    assert m16.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for b in p16.blocks for t in b.tensors().values())
    _assert_same_factors(p16, p32, 2e-2)
