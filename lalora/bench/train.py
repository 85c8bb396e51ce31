"""A plain PyTorch LoRA training loop with an optional LaLoRA penalty (``loss = task + reg()``)."""
from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm


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
        loss = model(**b).loss
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
