"""QLoRA: LoRA on quantized base layers, whose weight is packed (another shape and dtype than (d_out, d_in)).

Reference: the same model with the base weights *dequantized* into plain float32 ``nn.Linear`` layers (the
"twin": the same function, no quantization code anywhere), fitted by the same backend and by the exact
per-example EF (``lalora.reference.dense_empirical_fisher``). Two kinds of quantized model:

- a stand-in (always run): peft's ``lora.Linear`` over ``PackedLinear``, an ``nn.Linear`` subclass like
  bitsandbytes' ``Linear4bit`` whose ``weight`` is a packed uint8 tensor of another shape (true shape in
  ``weight.quant_state.shape``) and whose forward uses a hidden float32 copy;
- bitsandbytes 4-bit and 8-bit models loaded with ``BitsAndBytesConfig`` on CPU (run when bitsandbytes is
  installed; it is not a lalora dependency: 125 MB installed).
"""
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora
from lalora.adapters import find_lora_adapters
from lalora.errors import BackendError
from lalora.quantized import cpu_training_path, quantized_base
from models import randomize_lora_B, tiny_llama, tiny_lora_llama, token_batches
from numerics import rel_diff
from reference import dense_empirical_fisher, kronecker_precision_reference, layer_factors

# float32 fits of two models computing the same function with the same float32 weights; differences are the
# round-off of a different kernel order at most (1e-5: a few dozen float32 roundings, relative)
TOL = 1e-5
BACKENDS = [("diag", None), ("kfac", {"curvature": "ef"}), ("tri-kfac", {"curvature": "ef"}), ("block", None)]


class _State:
    def __init__(self, shape):
        self.shape = torch.Size(shape)


class PackedLinear(nn.Linear):
    """Stand-in for bitsandbytes' ``Linear4bit``: an ``nn.Linear`` whose ``weight`` is packed uint8
    ``(d_out * d_in // 2, 1)``; the forward uses a float32 copy (the "dequantized" weight)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.register_buffer("dense", linear.weight.detach().clone())
        packed = torch.randint(0, 256, (linear.out_features * linear.in_features // 2, 1), dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.quant_state = _State((linear.out_features, linear.in_features))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.dense, self.bias)


def pack_base_layers(model):
    """A copy of ``model`` whose LoRA layers' base layers are ``PackedLinear``; returns it and the adapted paths."""
    packed = copy.deepcopy(model)
    for a in find_lora_adapters(packed):
        a.layer.base_layer = PackedLinear(a.layer.base_layer)
    return packed


def _fit(model, data, backend, options=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend=backend, options=options, progress=False)


def _check_against_twin(quantized, twin, batches):
    ref = dense_empirical_fisher(twin, batches)
    for backend, options in BACKENDS:
        p, t = _fit(quantized, batches, backend, options), _fit(twin, batches, backend, options)
        assert p.shapes == t.shapes, backend  # shapes from lora_A / lora_B, never from the packed base weight
        assert rel_diff(p.to_dense(), t.to_dense()) <= TOL, backend
        if backend == "diag":
            d = torch.cat([v.flatten() for v in p.diagonal().values()])
            assert rel_diff(d, torch.diagonal(ref)) <= TOL
    return p


def _penalty_is_the_dense_quadratic(model, precision):
    reg = lalora.LaLoRARegularizer(model, precision, strength=1.0)
    params = {n: p for a in find_lora_adapters(model) for n, p in a.params().items()}
    g = torch.Generator().manual_seed(2)
    deltas = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(deltas[n])
    d = torch.cat([deltas[n].flatten() for n in precision.param_names]).double()
    assert rel_diff(reg().detach(), 0.5 * d @ precision.to_dense() @ d) <= TOL


def test_standin_packed_base_weights_fit_like_the_dequantized_twin():
    twin = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora_B(twin)
    quantized = pack_base_layers(twin)
    layer = find_lora_adapters(quantized)[0].layer
    assert layer.base_layer.weight.dtype == torch.uint8 and quantized_base(layer) == "PackedLinear"
    assert quantized_base(find_lora_adapters(twin)[0].layer) is None
    precision = _check_against_twin(quantized, twin, token_batches(n_batches=2, batch_size=3))
    _penalty_is_the_dense_quadratic(quantized, precision)


def test_backends_that_need_the_base_weight_refuse_packed_layers():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model = get_peft_model(seq, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="orthogonal"))
    packed = pack_base_layers(model)
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    _fit(model, data, "backpack")  # BackPACK's second-order route runs on the float twin
    with pytest.raises(BackendError, match=r"0 \(PackedLinear under LoRA\)"):
        _fit(packed, data, "backpack")
    with pytest.raises(BackendError, match=r"laplace backend: the base layers of \['0', '2'\] are quantized"):
        _fit(packed, data, "laplace")


def test_repacked_cpu_weights_are_refused_and_the_flag_restored():
    """bitsandbytes' CPU bf16 repacking (lalora.quantized), simulated on a stand-in so that no CPU feature matters."""
    model = pack_base_layers(tiny_lora_llama())
    base = find_lora_adapters(model)[0].layer.base_layer
    base.support_avx512bf16_for_cpu = 1  # what bitsandbytes sets on a CPU with AVX512-BF16
    with cpu_training_path(model):
        assert base.support_avx512bf16_for_cpu is False
    assert base.support_avx512bf16_for_cpu == 1
    base.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(BackendError, match=r"4-bit weight of .*q_proj.base_layer.* was repacked .*state_dict\(\)"):
        _fit(model, token_batches(1), "diag")
    assert base.support_avx512bf16_for_cpu == 1


def _bnb_models(tmp_path, bits):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64, intermediate_size=64).save_pretrained(tmp_path)
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                         dtype=torch.float32)
    twin = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    plain = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                plain[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
            elif isinstance(m, bnb.nn.Linear8bitLt):
                plain[name].weight.copy_(m.weight.CB.float() * m.weight.SCB.float()[:, None] / 127)
    # peft's "orthogonal" init reads the dtype of the (uint8) base weight and fails on 4-bit layers: default init,
    # then B drawn, and the twin gets the very same LoRA weights
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True)
    quantized, twin = get_peft_model(quantized, cfg), get_peft_model(twin, copy.deepcopy(cfg))
    randomize_lora_B(quantized)
    twin.load_state_dict({n: p for n, p in quantized.state_dict().items() if "lora_" in n}, strict=False)
    # from_pretrained with a quantization config leaves the model in train mode, and bitsandbytes' 8-bit layers
    # compute differently there (1.7% apart measured): fits run in eval mode (DESIGN.md section 2), so do the
    # references
    return quantized.eval(), twin.eval()


def test_bitsandbytes_4bit_fits_like_the_dequantized_twin(tmp_path):
    quantized, twin = _bnb_models(tmp_path, 4)
    layer = find_lora_adapters(quantized)[0].layer
    assert layer.base_layer.weight.dtype == torch.uint8 and quantized_base(layer) == "Linear4bit"
    precision = _check_against_twin(quantized, twin, token_batches(n_batches=2, batch_size=3))
    _penalty_is_the_dense_quadratic(quantized, precision)


def test_bitsandbytes_8bit_fits_match_its_own_per_example_autograd_reference(tmp_path):
    """LLM.int8 quantizes the layer *inputs* too (per row, after a float16 cast), so the 8-bit model is not the
    float twin's function (2% apart here) and the twin is no reference. The reference is then the 8-bit model
    itself, differentiated by bitsandbytes' own backward on unpadded singletons (``dense_empirical_fisher``; the
    K-FAC factors by their per-token definition, ``layer_factors``): the per-row quantization keeps tokens
    independent of the batch unless an activation exceeds ``llm_int8_threshold`` (outlier columns are picked per
    batch), which would show as a large mismatch. Measured: 2e-7 to 3e-7, float32 round-off."""
    quantized, _ = _bnb_models(tmp_path, 8)
    assert quantized_base(find_lora_adapters(quantized)[0].layer) == "Linear8bitLt"
    batches = token_batches(n_batches=2, batch_size=3)
    ref, factors = dense_empirical_fisher(quantized, batches), layer_factors(quantized, batches)
    diag = _fit(quantized, batches, "diag").diagonal()
    assert rel_diff(torch.cat([v.flatten() for v in diag.values()]), torch.diagonal(ref)) <= TOL
    for backend in ("kfac", "tri-kfac"):
        p = _fit(quantized, batches, backend, {"curvature": "ef"})
        assert rel_diff(p.to_dense(), kronecker_precision_reference(quantized, factors, tri=backend == "tri-kfac")) <= TOL
    block = _fit(quantized, batches, "block")  # one block per adapter: its diagonal is the EF's
    assert rel_diff(torch.diagonal(block.to_dense()), torch.diagonal(ref)) <= TOL
