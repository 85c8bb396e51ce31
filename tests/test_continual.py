"""Continual learning: P_new = decay * P_old + P_task, anchored at the end of the last task."""
from __future__ import annotations

import pytest
import torch

import lalora
from lalora import LaLoRARegularizer, fit_precision
from lalora.adapters import find_lora_adapters, lora_parameters
from lalora.continual import consolidate, end_of_task
from models import randomize_lora_B, tiny_lora_llama, token_batches


def _train(model, reg, data, steps=3, lr=0.3):
    params = list(lora_parameters(find_lora_adapters(model)).values())
    loss_fn = lalora.regularized(lambda b: model(**b).loss, reg)
    for s in range(steps):
        grads = torch.autograd.grad(loss_fn(data[s % len(data)]), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g


def test_two_tasks_recipe(tmp_path):
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    source = token_batches(2, 3, 7, seed=1)
    task1, task2 = token_batches(2, 3, 7, seed=2), token_batches(2, 3, 7, seed=3)
    p0 = fit_precision(model, source, "diag", progress=False)
    _train(model, LaLoRARegularizer(model, p0, 10.0), task1)
    theta1 = {n: p.detach().float().clone() for n, p in lora_parameters(find_lora_adapters(model)).items()}
    assert max((theta1[n] - p0.anchor[n]).abs().max().item() for n in theta1) > 1e-3

    decay = 0.5
    p1 = end_of_task(model, task1, old=p0, decay=decay, progress=False)
    f1 = fit_precision(model, task1, "diag", progress=False)
    for n in theta1:  # anchor moved to the end of task 1
        assert torch.equal(p1.anchor[n], theta1[n])
    # Dense check in float64: decay * P0 + F1 (rel 1e-6: float32 sums of float32 blocks).
    want = decay * p0.to_dense() + f1.to_dense()
    assert (p1.to_dense() - want).abs().max() <= 1e-6 * want.abs().max()
    assert p1.metadata["continual"]["num_tasks"] == 2
    # The regularizer for task 2 starts at the anchor (no AnchorMismatchError), penalty 0 there.
    reg = LaLoRARegularizer(model, p1, 10.0)
    assert float(reg().detach()) == 0.0
    _train(model, reg, task2, steps=2)
    d = {n: p.detach().float() - theta1[n] for n, p in lora_parameters(find_lora_adapters(model)).items()}
    flat = torch.cat([d[n].flatten() for n in p1.param_names]).double()
    assert float(reg().detach()) == pytest.approx(float(5.0 * flat @ want @ flat), rel=1e-5)
    # Round trip keeps the combined curvature and anchor.
    p1.save(tmp_path / "p1.safetensors")
    back = lalora.Precision.load(tmp_path / "p1.safetensors", model)
    assert torch.equal(back.to_dense(), p1.to_dense())
    # A third task keeps the history.
    p2 = consolidate(p1, fit_precision(model, task2, "diag", progress=False), decay=decay)
    assert p2.metadata["continual"]["num_tasks"] == 3


def test_consolidate_errors():
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    p = fit_precision(model, token_batches(1, 3, 7), "diag", progress=False)
    assert consolidate(None, p) is p
    with pytest.raises(ValueError, match="decay"):
        consolidate(p, p, decay=1.5)
    other = tiny_lora_llama(seed=0, targets=("q_proj",))
    randomize_lora_B(other)
    q = fit_precision(other, token_batches(1, 3, 7), "diag", progress=False)
    with pytest.raises(ValueError, match="different LoRA weights"):
        consolidate(p, q)
    with pytest.raises(TypeError, match="lalora.Precision"):
        consolidate(p, "p.safetensors")
