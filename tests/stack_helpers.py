"""Shared by the training-stack tests (TRL, FSDP2, DeepSpeed): a tiny byte-level Llama with LoRA, a starting
point away from theta0 (so the penalty has a gradient at the first step), the penalty gradient from the dense
precision (float64; no regularizer code involved), per-token log-probabilities from a plain forward, and a
recorder of what a trainer's ``compute_loss`` receives."""
from __future__ import annotations

import os

import torch

from models import byte_tokenizer, randomize_lora_B, tiny_lora_llama

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub from its trainers' __init__
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 257  # byte_tokenizer: 256 bytes + <eos>
LR = 0.5
STRENGTH = 200.0


def make_model():
    model = tiny_lora_llama(seed=0, vocab_size=VOCAB)
    randomize_lora_B(model)
    return model


def lora(model) -> dict[str, torch.nn.Parameter]:
    from lalora.adapters import find_lora_adapters, lora_parameters

    return lora_parameters(find_lora_adapters(model))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in lora(model).items()}


def source_batches(n=4, seed=11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (3, 7), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@torch.no_grad()
def perturb(model, seed=7, scale=0.05) -> None:
    """Move the LoRA weights away from where the precision was fitted (the trainer gets ``anchor="ignore"``)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(lora(model).items()):
        p.add_(torch.randn(p.shape, generator=g) * scale)


def penalty_grad(precision, theta: dict[str, torch.Tensor], strength=STRENGTH) -> dict[str, torch.Tensor]:
    """``strength * (P + delta I) (theta - theta0)`` from ``precision.to_dense()`` in float64."""
    names = precision.param_names
    d = torch.cat([(theta[n].double() - precision.anchor[n].double()).flatten() for n in names])
    g = strength * (precision.to_dense().double() @ d + precision.prior_precision * d)
    out, i = {}, 0
    for n in names:
        k = precision.anchor[n].numel()
        out[n] = g[i:i + k].view(precision.anchor[n].shape)
        i += k
    return out


def token_logps(model, input_ids, attention_mask):
    """``log p(input_ids[:, t+1] | input_ids[:, :t+1])``, shape (B, T-1), from a plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]


def expected_update(model, precision, task_loss_fn, strength=STRENGTH, lr=LR) -> dict[str, torch.Tensor]:
    """``-lr * (grad task_loss_fn(model) + penalty gradient)`` at ``model``'s current LoRA weights, with the
    penalty part also returned alone (to check that it matters)."""
    params = lora(model)
    names = list(params)
    task = torch.autograd.grad(task_loss_fn(model), [params[n] for n in names])
    pen = penalty_grad(precision, weights(model), strength)
    step = {n: -lr * (t.double() + pen[n]) for n, t in zip(names, task)}
    return step, {n: -lr * pen[n] for n in names}, {n: -lr * t.double() for n, t in zip(names, task)}


def max_abs(d: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in d.values())


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def recording(cls):
    """``cls`` whose ``compute_loss`` records (inputs, num_items_in_batch) of every training micro-batch."""

    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.recorded = getattr(self, "recorded", [])
                self.recorded.append(({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)},
                                      num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    Recording.__name__ = cls.__name__
    return Recording


def tokenizer():
    return byte_tokenizer()
