"""Brute-force references for the tests: per-example autograd loops (no hooks, no batching).

Every example is run alone and *unpadded*: positions with attention mask 0 are removed from the
example physically (``unpadded_example``) before the model sees it, so these references never
depend on how a batch was padded (left, right) nor on lalora's target rules. Targets are made here
independently: in an example of L real tokens, token t (1 <= t < L) is a target when its label is
not -100; the first token never is (nothing precedes it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lalora.adapters import find_lora_adapters, lora_parameters

_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


def unpadded_example(batch: dict, n: int) -> dict:
    """Example n of an HF-style batch as a batch of one with its pad positions removed; labels default to
    input_ids; the attention mask of the result is all ones."""
    ids = batch["input_ids"][n]
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[n] != 0
    labels = batch.get("labels", batch["input_ids"])[n]
    one = {"input_ids": ids[keep][None], "labels": labels[keep][None],
           "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
    for k in _PER_TOKEN_KEYS:
        if k not in one and k in batch:
            one[k] = batch[k][n][keep][None]
    return one


def example_loss_unpadded(model, one: dict) -> torch.Tensor:
    """Next-token CE summed over the labelled tokens of an unpadded batch of one."""
    inputs = {k: v for k, v in one.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits[0, :-1], one["labels"][0, 1:], ignore_index=-100, reduction="sum")


def has_target(one: dict) -> bool:
    return bool((one["labels"][0, 1:] != -100).any())


def unpadded_examples(batches):
    """Every example of ``batches`` with at least one target, unpadded (batches of one)."""
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            one = unpadded_example(batch, n)
            if has_target(one):
                yield one


def per_example_grads(model, batches, adapter_name=None) -> tuple[list[str], torch.Tensor]:
    """(names, G) with G (N, P): row n = flattened gradient of l_n w.r.t. all LoRA weights
    (examples without labelled tokens are skipped, as in the lalora convention)."""
    params = lora_parameters(find_lora_adapters(model, adapter_name))
    names, tensors = list(params), list(params.values())
    rows = []
    was = model.training
    model.eval()
    for one in unpadded_examples(batches):
        loss = example_loss_unpadded(model, one)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                               for g, p in zip(grads, tensors)]))
    model.train(was)
    return names, torch.stack(rows).double()


def dense_empirical_fisher(model, batches, adapter_name=None) -> torch.Tensor:
    """(1/N) sum_n g_n g_n^T over all LoRA weights (lalora's param order), float64."""
    _, G = per_example_grads(model, batches, adapter_name)
    return G.T @ G / G.shape[0]


def dense_ggn(model, batches, adapter_name=None) -> torch.Tensor:
    """(P, P) float64 per-position GGN ``(1/N) sum_n sum_t J_t^T (diag(p) - p p^T) J_t`` over the LoRA
    weights, from unpadded examples: one backward pass per (target position, class), batched over the classes
    (tiny models only)."""
    params = lora_parameters(find_lora_adapters(model, adapter_name))
    tensors = list(params.values())
    P = sum(t.numel() for t in tensors)
    total, N = torch.zeros(P, P, dtype=torch.float64), 0
    for one in unpadded_examples(batches):
        inputs = {k: v for k, v in one.items() if k != "labels"}
        logits = model(**inputs).logits.float()[0, :-1]
        targets = one["labels"][0, 1:]
        for t in (targets != -100).nonzero().flatten().tolist():
            z = logits[t]
            C = z.numel()  # the C rows of the Jacobian of z w.r.t. the LoRA weights, one backward pass each
            gs = torch.autograd.grad(z, tensors, grad_outputs=torch.eye(C), retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
            J = torch.cat([(g if g is not None else torch.zeros(C, *p.shape)).double().reshape(C, -1)
                           for g, p in zip(gs, tensors)], 1)  # (C, P)
            p = torch.softmax(z.detach().double(), -1)
            total += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        N += 1
    return total / N


def layer_factors(model, batches, approx: str = "expand", adapter_name=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapter key: the K-FAC factors ``(X, G)`` of its layer by the per-token definition, float64, from
    unpadded examples with plain autograd (empirical Fisher: true labels). ``x`` is the adapted layer's input
    and ``g = d l_n / d y`` the gradient of the example's summed loss w.r.t. the layer's *output* (taken at
    the peft layer, not at lora_B, so several adapters on one layer get the same x and g).
    expand: ``X = (1/T) sum_{n,t} x x^T`` over all T tokens of the counted examples, ``G = (1/N) sum_{n,t} g g^T``;
    reduce: ``X = (1/N) sum_n xbar_n xbar_n^T`` (mean over the example's tokens), ``G = (1/N) sum_n gsum gsum^T``."""
    adapters = find_lora_adapters(model, adapter_name)
    layers = {id(a.layer): a.layer for a in adapters}
    X, G, T, N = {}, {}, {}, 0
    for one in unpadded_examples(batches):
        xs, ys, handles = {}, {}, []
        for i, layer in layers.items():
            def hook(module, inputs, output, i=i):
                xs[i], ys[i] = inputs[0].detach()[0].double(), output
            handles.append(layer.register_forward_hook(hook))
        try:
            loss = example_loss_unpadded(model, one)
        finally:
            for h in handles:
                h.remove()
        keys = list(layers)
        grads = dict(zip(keys, torch.autograd.grad(loss, [ys[i] for i in keys])))
        N += 1
        for a in adapters:
            x, g = xs[id(a.layer)], grads[id(a.layer)][0].double()
            if approx == "expand":
                X[a.key] = X.get(a.key, 0) + x.T @ x
                T[a.key] = T.get(a.key, 0) + x.shape[0]
                G[a.key] = G.get(a.key, 0) + g.T @ g
            else:
                xbar, gsum = x.mean(0, keepdim=True), g.sum(0, keepdim=True)
                X[a.key] = X.get(a.key, 0) + xbar.T @ xbar
                T[a.key] = T.get(a.key, 0) + 1
                G[a.key] = G.get(a.key, 0) + gsum.T @ gsum
    return {k: (X[k] / T[k], G[k] / N) for k in X}


def kronecker_precision_reference(model, factors: dict, tri: bool, adapter_name=None) -> torch.Tensor:
    """The dense (P, P) float64 matrix of a ``kfac`` (``tri=False``) or ``tri-kfac`` precision with the given
    per-adapter ``(X, G)``, built from the definition (no lalora block code): per adapter the Jacobian
    ``J = s [kron(B0, I_in), kron(I_out, A0^T)]`` of ``vec(s (B0 dA + dB A0))`` (row-major) and the block
    ``J^T kron(G, X) J``; ``kfac`` keeps its two diagonal blocks (A-A and B-B) only."""
    adapters = find_lora_adapters(model, adapter_name)
    sizes = [a.A.numel() + a.B.numel() for a in adapters]
    out = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    i = 0
    for a, n in zip(adapters, sizes):
        X, G = factors[a.key]
        A0, B0, s = a.A.detach().double(), a.B.detach().double(), a.scaling
        d_out, d_in = B0.shape[0], A0.shape[1]
        J = s * torch.cat([torch.kron(B0, torch.eye(d_in, dtype=torch.float64)),
                           torch.kron(torch.eye(d_out, dtype=torch.float64), A0.T.contiguous())], 1)  # torch 2.14: kron needs contiguous inputs
        block = J.T @ torch.kron(G, X) @ J
        if not tri:
            nA = A0.numel()
            block[:nA, nA:] = 0
            block[nA:, :nA] = 0
        out[i:i + n, i:i + n] = block
        i += n
    return out


def effective_weight_dense(block) -> torch.Tensor:
    """``kron(G, X)`` of a Kronecker block: its effective-weight form is ``vec(Delta)^T kron(G, X) vec(Delta)``
    (one adapter, small blocks only). ``torch.kron`` on contiguous copies: torch 2.14's kron refuses many
    non-contiguous inputs."""
    return torch.kron(block.G.dense().contiguous(), block.X.dense().contiguous())


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
