"""The tests' references: the one exact EF/GGN reference (``lalora.reference``: brute-force per-example
autograd on unpadded singletons, with its own loss and target rule, see its module docstring) and, here,
the per-token K-FAC factors and dense Kronecker precisions by their definitions.

Every example is run alone and *unpadded* (``unpadded_examples``: positions with attention mask 0 removed
physically), so these references never depend on how a batch was padded (left, right) nor on
``lalora.losses``' target rules: in an example of L real tokens, token t (1 <= t < L) is a target when its
label is not -100; the first token never is (nothing precedes it).
"""
from __future__ import annotations

import torch

from lalora.adapters import find_lora_adapters
from lalora.reference import (dense_empirical_fisher, dense_ggn, example_loss, per_example_gradients, rel_err,
                              unpadded_example, unpadded_examples)

__all__ = ["dense_empirical_fisher", "dense_ggn", "effective_weight_dense", "example_loss", "kronecker_precision_reference",
           "layer_factors", "per_example_gradients", "rel_err", "unpadded_example", "unpadded_examples"]


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
            loss = example_loss(model, one)
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
