"""A plain PyTorch LoRA training loop with an optional LaLoRA penalty (``loss = task + reg()``).

The task loss goes through the one loss path (``lalora.losses.CausalLMLoss``): the mean over the batch's
targets of the per-example summed next-token cross-entropy, the targets those of every backend (label
-100 and padding excluded, a target needs a real input position before it).
"""
from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from .losses import CausalLMLoss, call_model

# decoder-only models whose logits are exactly ``lm_head(last hidden state)`` (no soft-capping or scaling)
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_LOSS = CausalLMLoss()


def _token_mean(per_example: torch.Tensor, batch) -> torch.Tensor:
    return per_example.sum() / _LOSS.labelled_counts(batch).sum().clamp_min(1).to(per_example.device)


def _labelled_head_loss(model, batch: dict):
    """``task_loss`` with ``lm_head`` applied to the labelled positions only
    (``CausalLMLoss.per_example_from_hidden``), or None where that is not known to be exact. The
    arithmetic prompts are ~2/3 of the tokens and unlabelled; on SmolLM2 (49,152-word vocabulary) the
    head is ~1/5 of a step's work."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    b = _LOSS.prepare(batch)
    hidden = base.model(**b.inputs).last_hidden_state
    return _token_mean(_LOSS.per_example_from_hidden(hidden, base.lm_head, b), b)


def task_loss(model, batch: dict):
    """Mean token cross-entropy on ``labels`` (-100 ignored; without labels: the input ids), as
    ``model(**batch).loss`` on right-padded batches whose pad labels are -100."""
    loss = _labelled_head_loss(model, batch)
    if loss is None:
        b = _LOSS.prepare(batch)
        loss = _token_mean(_LOSS.per_example(call_model(model, b), b), b)
    return loss


@torch.no_grad()
def heldout_loss(model, data, loss="auto") -> float:
    """The loss on held-out data: the sum over every labelled position of ``data`` (batches as ``fit_precision``
    takes them) divided by their number -- for a causal LM the mean next-token cross-entropy per token in nats
    over the whole set (not a mean of batch means), ``log`` of the token perplexity. Eval mode (dropout off); the
    model's training mode is restored. ``loss`` as in ``fit_precision`` ("auto": inferred from the first batch)."""
    from .data import BatchStream
    from .losses import resolve_loss

    device = next(model.parameters()).device
    stream = BatchStream(data, resolve_loss(loss), device, progress=False, desc="held-out loss")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in stream:
            total += float(stream.loss.per_example(call_model(model, b), b).double().sum())
            count += int(stream.loss.labelled_counts(b).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the held-out data has no labelled positions (every label is -100?)")
    return total / count


def train_lora(model, batches: list[dict], steps: int, lr: float = 1e-3, reg=None, progress: bool = True,
               desc: str = "train", weight_decay: float = 0.0) -> list[float]:
    """AdamW on the trainable (LoRA) weights for ``steps`` steps, cycling over ``batches``.
    The task loss is the model's mean token cross-entropy on ``labels`` (-100 ignored); with
    ``reg`` (a ``LaLoRARegularizer``) its penalty is added once per step. Returns task losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (no LoRA adapters?)")
    if not batches:
        raise ValueError("no training batches")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _, b in zip(range(steps), itertools.cycle(batches)):
        loss = task_loss(model, b)
        total = loss + reg() if reg is not None else loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {len(losses)}: lower the learning rate or strength")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update()
    bar.close()
    model.eval()
    return losses
