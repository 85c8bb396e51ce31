"""The one exact dense reference for the EF and the GGN over the LoRA weights (small models only).

Used by ``lalora.comparison`` (``dense_reference``: the reference of a comparison), by the tests (every
test of a curvature against brute force; ``tests/reference.py`` re-exports this module) and by users
checking a backend of their own (docs/howto-custom-backend.md). The ``block`` backend computes the same
exact blocks for real use, fast (per-example gradients from hooks, ``torch.func`` Jacobians of whole
batches through ``lalora.losses``), so it does not call this module: its tests compare against it.

Brute force on purpose, so that it checks the backends instead of sharing their code:

- every example is run alone: cut out of its batch with its padding removed (the positions with
  attention mask 0 are deleted from every ``(N, T)`` input, labels included: ``unpadded_example``),
  as a batch of one, in eval mode (``_eval_mode``), so it never depends on how a batch was padded
  (left, right) nor on the padding rules of ``lalora.losses``;
- its loss is computed here from the definition, not by ``lalora.losses``, for the built-in losses:
  ``causal_lm``: cross-entropy of the logits at position t against token t + 1 wherever that label
  is not -100 (the first token is never a target: nothing precedes it), summed; ``classification``:
  cross-entropy of the row, label -100 = no loss; ``mse``: ``sum_j (f_j - y_j)^2``. A custom loss (a
  callable or another ``LossFunction``) has no second definition: its own ``per_example`` is used on
  the singleton, its ``outputs_and_targets`` and ``output_hessian`` for the GGN;
- gradients and Jacobians by plain autograd (no hooks, no ``torch.func`` through the model), output
  Hessians by ``torch.func.hessian`` of the loss above w.r.t. each output row (not the formula
  ``diag(p) - p p^T`` of ``LossFunction.output_hessian``, which the backends use).

Shared with the code it checks: only the split of a batch into model inputs and labels
(``lalora.batch.split_raw``), the choice of loss for ``loss="auto"`` (``infer_loss``) and the LoRA
parameter order (``lora_parameters``).

Conventions (DESIGN.md section 2): ``l_n`` is example n's loss summed over its targets; examples
without a target are skipped; results are means over the N remaining examples, float64 on the CPU,
with parameters in ``lora_parameters`` order, each flattened row-major.

- ``dense_empirical_fisher``: ``(1/N) sum_n g_n g_n^T`` (``per_example_gradients``: one backward per example);
- ``dense_ggn``: ``(1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t}`` with the explicit Jacobian of the example's
  labelled outputs (batched reverse passes, ``is_grads_batched``: one per output entry) and ``H`` the Hessian
  of the loss w.r.t. each labelled output row. Cost grows with positions x classes: tiny vocabularies only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import find_lora_adapters, lora_parameters
from .batch import Batch, batch_size, call_model, split_raw
from .data import _is_single_batch, _to_device
from .losses import IGNORE_INDEX, CausalLMLoss, ClassificationLoss, LossFunction, MSELoss, infer_loss, resolve_loss

__all__ = ["dense_empirical_fisher", "dense_ggn", "example_loss", "per_example_gradients", "rel_err",
           "unpadded_example", "unpadded_examples"]

_BUILTIN = (CausalLMLoss, ClassificationLoss, MSELoss)


# --- examples, unpadded ------------------------------------------------------------------------------
def unpadded_example(raw, n: int):
    """Example ``n`` of a raw batch (dict, ``(x, y)`` tuple or tensor) as a batch of one, its padding
    (attention mask 0) removed from every per-token input; a ``(1, T)`` row shared by the batch
    (``position_ids``) is cut the same way."""
    inputs, _ = split_raw(raw)
    size = batch_size(inputs)
    is_dict = isinstance(raw, dict) or hasattr(raw, "keys")
    mask = dict(raw).get("attention_mask") if is_dict else None
    keep = None if mask is None else mask[n] != 0

    def cut(t):
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        if keep is not None and t.dim() >= 2 and t.shape[0] in (1, size) and t.shape[1] == keep.shape[0]:
            row = t[n if t.shape[0] == size else 0]  # (T, ...)
            return row[keep.to(t.device)][None]
        return t[n:n + 1] if t.shape[0] == size else t

    if is_dict:
        return {k: cut(v) for k, v in dict(raw).items()}
    if isinstance(raw, (tuple, list)):
        return type(raw)(cut(v) for v in raw)
    return cut(raw)


def _prepare(fn: LossFunction, one) -> Batch:
    """Model inputs and labels of a raw singleton (built-in losses: without lalora's padding rules)."""
    if type(fn) not in _BUILTIN:
        return fn.prepare(one)
    inputs, labels = split_raw(one)
    if labels is None and type(fn) is CausalLMLoss:  # a causal LM predicts its own tokens
        labels = inputs.get("input_ids") if isinstance(inputs, dict) else inputs[0]
    return Batch(inputs, labels, one, 1)


def _num_targets(fn: LossFunction, b: Batch) -> int:
    if type(fn) is CausalLMLoss:
        return int((b.labels[0, 1:] != IGNORE_INDEX).sum())
    if type(fn) is ClassificationLoss:
        return int((b.labels.reshape(-1) != IGNORE_INDEX).sum())
    if type(fn) is MSELoss:
        return 1
    return int(fn.labelled_counts(b)[0])


def _singletons(batches, loss, device=None) -> Iterator[tuple[LossFunction, object, Batch]]:
    """``(loss, raw singleton, prepared singleton)`` for every example with at least one target (on ``device``)."""
    loss_fn = resolve_loss(loss)
    for raw in ([batches] if _is_single_batch(batches) else batches):
        fn = loss_fn or infer_loss(raw)
        for n in range(batch_size(split_raw(raw)[0])):
            one = unpadded_example(raw, n)
            one = one if device is None else _to_device(one, device)
            b = _prepare(fn, one)
            if _num_targets(fn, b):
                yield fn, one, b


def unpadded_examples(batches, loss="auto") -> Iterator:
    """Every example of ``batches`` with at least one target, unpadded (raw batches of one)."""
    for _, one, _ in _singletons(batches, loss):
        yield one


# --- the loss of one example, by the definition ----------------------------------------------------------
def _rows(fn: LossFunction, output: Tensor, b: Batch):
    """``(z, y)``: the example's outputs with a target ``(M, C)`` (at least float32) and their targets."""
    if type(fn) is CausalLMLoss:  # position t predicts token t + 1
        y = b.labels[0, 1:].to(output.device)
        z, y = output[0, :-1][y != IGNORE_INDEX], y[y != IGNORE_INDEX]
    elif type(fn) is ClassificationLoss:
        y = b.labels.reshape(-1).to(output.device)
        z, y = output.reshape(1, -1)[y != IGNORE_INDEX], y[y != IGNORE_INDEX]
    elif type(fn) is MSELoss:
        z, y = output.reshape(1, -1), b.labels.reshape(1, -1).to(output.device)
    else:
        z, y, _ = fn.outputs_and_targets(output, b)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z, (y.to(z.dtype) if torch.is_floating_point(y) else y)


def _row_loss(fn: LossFunction, z: Tensor, y: Tensor) -> Tensor:
    """The summed loss of output rows ``z`` with targets ``y`` (built-in losses)."""
    if type(fn) is MSELoss:
        return (z - y).square().sum()
    return F.cross_entropy(z, y, reduction="sum")


def example_loss(model: nn.Module, one, loss="auto") -> Tensor:
    """``l_n`` of a raw unpadded singleton (``unpadded_examples``), by the definition for built-in losses."""
    fn = resolve_loss(loss) or infer_loss(one)
    b = _prepare(fn, one)
    return _loss_of(fn, call_model(model, b), b)


def _loss_of(fn, output, b) -> Tensor:
    if type(fn) not in _BUILTIN:
        return fn.per_example(output, b)[0]
    return _row_loss(fn, *_rows(fn, output, b))


def _row_hessians(fn: LossFunction, z: Tensor, y: Tensor) -> Tensor:
    """``(M, C, C)`` float64 Hessians of each row's loss w.r.t. that row, by autograd (built-in losses)."""
    if type(fn) not in _BUILTIN:
        try:
            return fn.output_hessian(z)
        except NotImplementedError as e:
            raise ValueError(f"dense_ggn: {e}") from None
    z, y = z.detach().double(), (y.double() if torch.is_floating_point(y) else y)
    return torch.func.vmap(torch.func.hessian(lambda r, t: _row_loss(fn, r[None], t[None])))(z, y)


# --- the references ----------------------------------------------------------------------------------------
def _lora(model: nn.Module, adapter_name=None):
    params = lora_parameters(find_lora_adapters(model, adapter_name))
    return list(params), list(params.values())


def _flat(grads, tensors, rows: int | None = None) -> Tensor:
    shape = (-1,) if rows is None else (rows, -1)
    lead = () if rows is None else (rows,)
    return torch.cat([(g if g is not None else torch.zeros(*lead, *p.shape, device=p.device)).double().reshape(shape)
                      for g, p in zip(grads, tensors)], -1)


@contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off for the reference, the model's mode restored after (``lalora.comparison`` also switches
    gradient checkpointing off: ``fit.fitting_mode``)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _progress(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="example", leave=False)


def per_example_gradients(model: nn.Module, batches, loss="auto", adapter_name=None, *,
                          progress: bool = False) -> tuple[list[str], Tensor]:
    """``(names, G)``, ``G (N, P)`` float64: row n is the flattened gradient of ``l_n``."""
    names, tensors = _lora(model, adapter_name)
    rows = []
    with _eval_mode(model):
        for fn, _, b in _progress(_singletons(batches, loss, tensors[0].device), progress, "lalora reference [ef]"):
            l = _loss_of(fn, call_model(model, b), b)
            rows.append(_flat(torch.autograd.grad(l, tensors, allow_unused=True), tensors).cpu())
    if not rows:
        raise ValueError("no example with a target in the data")
    return names, torch.stack(rows)


def dense_empirical_fisher(model: nn.Module, batches, loss="auto", adapter_name=None, *,
                           progress: bool = False) -> Tensor:
    """``(P, P)`` float64: ``(1/N) sum_n g_n g_n^T``."""
    _, G = per_example_gradients(model, batches, loss, adapter_name, progress=progress)
    return G.T @ G / G.shape[0]


def dense_ggn(model: nn.Module, batches, loss="auto", adapter_name=None, *, progress: bool = False) -> Tensor:
    """``(P, P)`` float64: ``(1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t}`` (exact, per position)."""
    _, tensors = _lora(model, adapter_name)
    P = sum(t.numel() for t in tensors)
    total = torch.zeros(P, P, dtype=torch.float64, device=tensors[0].device)
    n_examples = 0
    with _eval_mode(model):
        for fn, _, b in _progress(_singletons(batches, loss, tensors[0].device), progress, "lalora reference [ggn]"):
            if type(fn) not in _BUILTIN and fn.likelihood is None:
                raise ValueError(f"dense_ggn: loss {fn.name!r} has no known output Hessian (categorical or gaussian "
                                 "likelihoods only)")
            z, y = _rows(fn, call_model(model, b), b)
            H = _row_hessians(fn, z, y)  # (M, C, C)
            J = _jacobian(z, tensors)  # (M, C, P)
            total += torch.einsum("mcp,mcd,mdq->pq", J, H, J)
            n_examples += 1
    if not n_examples:
        raise ValueError("no example with a target in the data")
    return (total / n_examples).cpu()


def _jacobian(z: Tensor, tensors, chunk: int = 256) -> Tensor:
    """``(M, C, P)``: the flattened gradient of every entry of ``z`` (M, C), by batched reverse passes
    (``chunk`` entries each; one pass per entry where an op has no batching rule)."""
    m, c = z.shape
    eye = torch.eye(m * c, dtype=z.dtype, device=z.device)
    rows = []
    for start in range(0, m * c, chunk):
        seeds = eye[start:start + chunk].reshape(-1, m, c)
        try:
            grads = torch.autograd.grad(z, tensors, grad_outputs=seeds, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            rows.append(_flat(grads, tensors, rows=seeds.shape[0]))
        except RuntimeError:  # an op without a vmap rule
            rows.append(torch.stack([_flat(torch.autograd.grad(z, tensors, grad_outputs=s, retain_graph=True,
                                                               allow_unused=True), tensors) for s in seeds]))
    return torch.cat(rows).reshape(m, c, -1)


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` (Frobenius), in float64."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
