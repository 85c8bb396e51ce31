"""Exact dense references over the LoRA weights, for small models only (tests, checks).

Brute force on purpose: every example is run alone (batch of one, its padding removed)
and differentiated with plain autograd, with no hooks, vmap or batching tricks, so these functions check
the backends rather than share their code. Conventions (DESIGN.md section 2): ``l_n``
is example n's loss summed over its labelled tokens, examples without a labelled
token are skipped, results are means over the N remaining examples, in float64, with
parameters in ``lora_parameters`` order, each flattened row-major.

- ``dense_empirical_fisher``: ``(1/N) sum_n g_n g_n^T``;
- ``dense_ggn``: ``(1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t}``, ``J`` from one batched backward
  pass (``is_grads_batched``) per labelled position, ``H`` the Hessian of the loss w.r.t. that position's output
  (softmax CE: ``diag(p) - p p^T``; MSE: ``2 I``).
Cost: one backward per (example) for the EF, per (labelled position x output) for the GGN.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapters import find_lora_adapters, lora_parameters
from .losses import LossFunction, call_model, infer_loss, resolve_loss


def _examples(batches, loss):
    """Yield (loss_fn, batch-of-one) for every example with at least one labelled position.

    Each example is cut out of its batch *unpadded*: the positions with attention mask 0 are removed
    physically (from every ``(N, T)`` input, the labels included), so the reference never depends on
    how a batch was padded (left, right) nor on the padding rules of the loss under test."""
    if not isinstance(batches, list):  # one batch: dict, tensor or (x, y) tuple
        batches = [batches]
    loss_fn = resolve_loss(loss)
    for raw in batches:
        fn = loss_fn or infer_loss(raw)
        size = fn.prepare(raw).size
        for n in range(size):
            one = fn.prepare(_unpadded_row(raw, n, size))
            if int(fn.labelled_counts(one)[0]) == 0:
                continue
            yield fn, one


def _unpadded_row(raw, n: int, size: int):
    """Example ``n`` of a raw batch as a batch of one, its padding (attention mask 0) removed."""
    is_dict = isinstance(raw, dict) or hasattr(raw, "keys")
    mask = dict(raw).get("attention_mask") if is_dict else None
    keep = None if mask is None else mask[n] != 0

    def cut(t):
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        if keep is not None and t.dim() >= 2 and t.shape[0] in (1, size) and t.shape[1] == keep.shape[0]:
            row = t[n if t.shape[0] == size else 0]  # (T, ...); a shared (1, T) row (position_ids) too
            return row[keep.to(t.device)][None]
        return t[n:n + 1] if t.shape[0] == size else t

    if is_dict:
        return {k: cut(v) for k, v in dict(raw).items()}
    if isinstance(raw, (tuple, list)):
        return type(raw)(cut(v) for v in raw)
    return cut(raw)


def _lora(model: nn.Module, adapter_name=None):
    params = lora_parameters(find_lora_adapters(model, adapter_name))
    return list(params), list(params.values())


def _flat_grad(out: Tensor, tensors, retain: bool) -> Tensor:
    grads = torch.autograd.grad(out, tensors, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).double().reshape(-1) for g, p in zip(grads, tensors)])


def per_example_gradients(model: nn.Module, batches, loss="auto", adapter_name=None) -> tuple[list[str], Tensor]:
    """``(names, G)``, ``G (N, P)`` float64: row n is the flattened gradient of ``l_n``."""
    names, tensors = _lora(model, adapter_name)
    rows = []
    for fn, b in _examples(batches, loss):
        l = fn.per_example(call_model(model, b), b)[0]
        rows.append(_flat_grad(l, tensors, retain=False))
    return names, torch.stack(rows)


def dense_empirical_fisher(model: nn.Module, batches, loss="auto", adapter_name=None) -> Tensor:
    """``(P, P)`` float64: ``(1/N) sum_n g_n g_n^T``."""
    _, G = per_example_gradients(model, batches, loss, adapter_name)
    return G.T @ G / G.shape[0]


def dense_ggn(model: nn.Module, batches, loss="auto", adapter_name=None) -> Tensor:
    """``(P, P)`` float64: ``(1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t}`` (exact, per position)."""
    names, tensors = _lora(model, adapter_name)
    P = sum(t.numel() for t in tensors)
    total = torch.zeros(P, P, dtype=torch.float64)
    n_examples = 0
    for fn, b in _examples(batches, loss):
        out, _, _ = fn.outputs_and_targets(call_model(model, b), b)
        out = out.float()
        M, C = out.shape
        for m in range(M):
            J = _jacobian_rows(out[m], tensors)  # (C, P)
            total += J.T @ _output_hessian(fn, out[m].detach()) @ J
        n_examples += 1
    return total / n_examples


def _jacobian_rows(z: Tensor, tensors) -> Tensor:
    """``(C, P)``: row c = flattened gradient of ``z[c]`` (one batched reverse pass, retaining the graph)."""
    eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
    grads = torch.autograd.grad(z, tensors, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
    return torch.cat([(g if g is not None else torch.zeros(z.numel(), *p.shape)).double().reshape(z.numel(), -1)
                      for g, p in zip(grads, tensors)], 1)


def _output_hessian(fn: LossFunction, z: Tensor) -> Tensor:
    if fn.likelihood == "categorical":
        p = torch.softmax(z.double(), -1)
        return torch.diag(p) - torch.outer(p, p)
    if fn.likelihood == "gaussian":
        return 2.0 * torch.eye(z.numel(), dtype=torch.float64)
    raise ValueError(f"dense_ggn: loss {fn.name!r} has no known output Hessian (categorical or gaussian likelihoods only)")


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` (Frobenius), in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
