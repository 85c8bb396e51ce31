"""QLoRA: LoRA on bitsandbytes-quantized base layers (peft's ``lora.bnb.Linear4bit`` / ``Linear8bitLt``).

lalora never reads a base weight: every shape comes from ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r),
which stay ``nn.Linear`` in float32. That matters because the base weight of a 4-bit layer is packed
uint8 of shape ``((d_out * d_in + 1) // 2, 1)`` (true shape in ``weight.quant_state.shape``), an 8-bit
one is int8, and bitsandbytes' ``Linear4bit`` subclasses ``nn.Linear``, so ``isinstance`` scans for
linear layers hit it: code that needs the base weight as a matrix (BackPACK's second-order route,
laplace-torch's torch.func route) must ask ``quantized_base`` and refuse.

bitsandbytes on CPU (0.50): ``Linear4bit.forward`` in eval mode, with an input that does not require grad,
on a CPU with AVX512-BF16 (``support_avx512bf16_for_cpu``), repacks the weight for a bf16 inference kernel
(``quant_state.packing_format_for_cpu``) for good; later calls run ``gemv_4bit``, which computes in bf16 and
has no autograd formula (torch warns that it "may lead to silently incorrect behavior"). A fit runs in eval
mode, so ``fitting_mode`` switches the repacking off for the fit (``cpu_training_path``): the layers then
run bitsandbytes' differentiable dequantize-and-matmul path on every CPU, and a weight that was already
repacked (an earlier no-grad forward) is refused by name.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .errors import BackendError


def quantized_base(layer: nn.Module) -> str | None:
    """The class name of ``layer``'s base layer (a peft LoRA layer) when its weight is quantized (not a floating
    point (d_out, d_in) matrix: bitsandbytes 4-bit packed uint8, 8-bit int8), else None."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    packed = getattr(weight, "quant_state", None) is not None or not weight.is_floating_point()
    if not packed and hasattr(base, "out_features") and hasattr(base, "in_features"):
        packed = tuple(weight.shape) != (base.out_features, base.in_features)
    return type(base).__name__ if packed else None


def quantized_adapters(adapters) -> list[str]:
    """Keys of the adapters whose base layer is quantized (``quantized_base``)."""
    return [a.key for a in adapters if quantized_base(a.layer)]


@contextmanager
def cpu_training_path(model: nn.Module):
    """Within: bitsandbytes 4-bit layers of ``model`` do not repack their weights for the CPU bf16 inference kernel
    (see the module docstring); restored on exit. ``BackendError`` naming a layer already repacked."""
    switched = []
    try:
        for name, m in model.named_modules():
            flag = vars(m).get("support_avx512bf16_for_cpu")  # bitsandbytes sets it to has_avx512bf16() (truthy int)
            if not flag:
                continue
            if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False):
                raise BackendError(
                    f"the 4-bit weight of {name!r} was repacked by bitsandbytes for its CPU bf16 inference kernel (a "
                    "forward without gradients in eval mode), through which no gradient flows: reload the model, or "
                    "call model.state_dict() once (bitsandbytes converts the weights back when saving), then fit")
            m.support_avx512bf16_for_cpu = False
            switched.append((m, flag))
        yield
    finally:
        for m, flag in switched:
            m.support_avx512bf16_for_cpu = flag
