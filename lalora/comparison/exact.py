"""Exact dense curvature over all LoRA weights (GGN or per-example EF), the reference of a comparison.

Conventions of DESIGN.md section 2: the mean over the N examples of each example's summed-loss
curvature, float64, parameters in ``lora_parameters`` order, each flattened row-major.
Small models only: the matrix is ``P x P`` for P LoRA weights.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import BackendError


def dense_reference(model, data, kind: str = "ggn", *, loss="auto", adapter_name=None, max_batches=None,
                    progress: bool = False, implementation: str = "auto"):
    """Exact dense curvature over all LoRA weights as a ``Precision`` with one float64 ``DenseBlock``.

    ``kind="ef"``: ``(1/N) sum_n g_n g_n^T`` (per-example gradients, one backward per example).
    ``kind="ggn"``: ``(1/N) sum_n sum_t J_t^T H_t J_t`` with the explicit Jacobian of the outputs at
    every labelled position (one backward per output entry, batched) and ``H = diag(p) - p p^T``
    (categorical) or ``2 I`` (MSE). Cost grows with ``#positions x #classes``: small models only.
    ``implementation``: "builtin" (this module, batched), "lalora.reference" (the brute-force
    batch-of-one loops of ``lalora.reference``, CPU only) or "auto" (lalora.reference for the EF on
    CPU, builtin for the GGN: one batched Jacobian per batch instead of one backward per logit).
    """
    if implementation not in ("auto", "builtin", "lalora.reference"):
        raise ValueError(f"implementation={implementation!r}: use 'auto', 'builtin' or 'lalora.reference'")
    if implementation != "builtin":
        use_ref = _reference_module() is not None and _model_device(model, adapter_name).type == "cpu"
        if implementation == "lalora.reference" and not use_ref:
            raise BackendError("implementation='lalora.reference' needs lalora.reference and a CPU model")
        if use_ref and (implementation == "lalora.reference" or kind == "ef"):
            return _dense_reference_external(model, data, kind, loss=loss, adapter_name=adapter_name,
                                             max_batches=max_batches)
    return _dense_reference_builtin(model, data, kind, loss=loss, adapter_name=adapter_name, max_batches=max_batches,
                                    progress=progress)


def _reference_module():
    try:
        from .. import reference
    except ImportError:
        return None
    return reference if hasattr(reference, "dense_empirical_fisher") and hasattr(reference, "dense_ggn") else None


def _model_device(model, adapter_name=None) -> torch.device:
    from ..adapters import find_lora_adapters

    return find_lora_adapters(model, adapter_name)[0].A.device


def _dense_reference_external(model, data, kind, *, loss, adapter_name, max_batches):
    """The same reference through ``lalora.reference`` (batch-of-one autograd loops)."""
    from ..adapters import find_lora_adapters, lora_parameters, lora_state
    from ..blocks import DenseBlock
    from ..data import BatchStream, _is_single_batch
    from ..fit import fitting_mode
    from ..losses import resolve_loss
    from ..precision import Precision

    if kind not in ("ggn", "ef"):
        raise ValueError(f"reference kind must be 'ggn' or 'ef', got {kind!r}")
    ref = _reference_module()
    batches = [data] if _is_single_batch(data) else list(data)
    if max_batches is not None:
        batches = batches[:max_batches]
    stream = BatchStream(batches, resolve_loss(loss), torch.device("cpu"), progress=False)
    for _ in stream:  # counts N and the fingerprint exactly as fit_precision does
        pass
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    started = time.perf_counter()
    with fitting_mode(model, adapters):
        fn = ref.dense_empirical_fisher if kind == "ef" else ref.dense_ggn
        try:
            matrix = fn(model, batches, loss=stream.loss, adapter_name=adapter_name)
        except ValueError as e:
            raise BackendError(f"reference={kind!r}: {e}") from None
    matrix = 0.5 * (matrix + matrix.T).double().cpu()
    meta = {"backend": f"reference-{kind}", "curvature": kind,
            "implementation": "lalora.reference", "num_examples": stream.num_examples, "num_tokens": stream.num_tokens,
            "data_fingerprint": stream.fingerprint, "fit_seconds": round(time.perf_counter() - started, 3)}
    return Precision([DenseBlock(tuple(params), matrix, {n: tuple(p.shape) for n, p in params.items()})],
                     lora_state(adapters), metadata=meta)


def _dense_reference_builtin(model, data, kind: str = "ggn", *, loss="auto", adapter_name=None, max_batches=None,
                             progress: bool = False):
    from ..adapters import find_lora_adapters, lora_parameters, lora_state
    from ..blocks import DenseBlock
    from ..data import BatchStream
    from ..fit import fitting_mode
    from ..losses import call_model, resolve_loss
    from ..precision import Precision

    if kind not in ("ggn", "ef"):
        raise ValueError(f"reference kind must be 'ggn' or 'ef', got {kind!r}")
    adapters = find_lora_adapters(model, adapter_name)
    params = lora_parameters(adapters)
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    numel = sum(t.numel() for t in tensors)
    stream = BatchStream(data, resolve_loss(loss), device, progress=progress, desc=f"lalora reference [{kind}]",
                         max_batches=max_batches)
    anchor = lora_state(adapters)
    total = torch.zeros(numel, numel, dtype=torch.float64, device=device)

    def flat(grads):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, tensors)])

    started = time.perf_counter()
    with fitting_mode(model, adapters):
        for batch in stream:
            output = call_model(model, batch)
            lossfn = stream.loss
            if kind == "ef":
                losses = lossfn.per_example(output, batch)
                counts = batch.extra["labelled_counts"]
                for n in range(batch.size):
                    if int(counts[n]) == 0:
                        continue
                    g = flat(torch.autograd.grad(losses[n], tensors, retain_graph=True, allow_unused=True))
                    total.addr_(g, g)
                continue
            if lossfn.likelihood == "categorical":
                out, _, _ = lossfn.outputs_and_targets(output, batch)
                p = torch.softmax(out.detach().double(), dim=-1)
                hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            elif lossfn.likelihood == "gaussian":
                out, _, _ = lossfn.outputs_and_targets(output, batch)
                c = out.shape[-1]
                hess = 2.0 * torch.eye(c, dtype=torch.float64, device=out.device).expand(out.shape[0], c, c)
            else:
                raise BackendError(f"reference='ggn' needs a loss with a known output Hessian (categorical or MSE); "
                                   f"loss {lossfn.name!r} has none: use reference='ef'")
            jac = _jacobian(out, tensors, flat)  # (M, C, P)
            total += torch.einsum("mcp,mcd,mdq->pq", jac, hess, jac)
    n_examples = stream.num_examples
    matrix = (total / n_examples).cpu()
    matrix = 0.5 * (matrix + matrix.T)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    meta = {"backend": f"reference-{kind}", "curvature": kind,
            "implementation": "builtin", "num_examples": n_examples, "num_tokens": stream.num_tokens, "data_fingerprint": stream.fingerprint,
            "fit_seconds": round(time.perf_counter() - started, 3)}
    return Precision([DenseBlock(tuple(names), matrix, shapes)], anchor, metadata=meta)


def _jacobian(out: Tensor, tensors, flat, chunk: int = 256) -> Tensor:
    """``(M, C, P)`` Jacobian of ``out`` (M, C) w.r.t. ``tensors`` (rows batched through autograd)."""
    m, c = out.shape
    k = m * c
    rows = []
    eye = torch.eye(k, dtype=out.dtype, device=out.device)
    for start in range(0, k, chunk):
        seeds = eye[start:start + chunk].reshape(-1, m, c)
        try:
            grads = torch.autograd.grad(out, tensors, grad_outputs=seeds, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros(seeds.shape[0], *p.shape, device=p.device))
                                   .reshape(seeds.shape[0], -1).double() for g, p in zip(grads, tensors)], dim=1))
        except RuntimeError:  # an op without a vmap rule: one backward per row
            rows.append(torch.stack([flat(torch.autograd.grad(out, tensors, grad_outputs=s, retain_graph=True,
                                                              allow_unused=True)) for s in seeds]))
    return torch.cat(rows).reshape(m, c, -1)

