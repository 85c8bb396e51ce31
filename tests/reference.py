"""Brute-force references for the tests: per-example autograd loops (no hooks, no batching)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lalora.adapters import find_lora_adapters, lora_parameters


def example_loss(model, batch: dict, n: int) -> torch.Tensor:
    """Example n's next-token CE summed over labelled tokens, from a batch-of-one forward."""
    ids = batch["input_ids"][n:n + 1]
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask[n:n + 1]
    labels = batch.get("labels", batch["input_ids"])[n:n + 1].clone()
    if mask is not None:
        labels[mask == 0] = -100
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def per_example_grads(model, batches) -> tuple[list[str], torch.Tensor]:
    """(names, G) with G (N, P): row n = flattened gradient of l_n w.r.t. all LoRA weights
    (examples without labelled tokens are skipped, as in the lalora convention)."""
    params = lora_parameters(find_lora_adapters(model))
    names, tensors = list(params), list(params.values())
    rows = []
    was = model.training
    model.eval()
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            labels = batch.get("labels", batch["input_ids"])[n].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"][n] == 0] = -100
            if not bool((labels[1:] != -100).any()):
                continue
            loss = example_loss(model, batch, n)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                                   for g, p in zip(grads, tensors)]))
    model.train(was)
    return names, torch.stack(rows).double()


def dense_empirical_fisher(model, batches) -> torch.Tensor:
    """(1/N) sum_n g_n g_n^T over all LoRA weights (lalora's param order), float64."""
    _, G = per_example_grads(model, batches)
    return G.T @ G / G.shape[0]


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
