"""The per-example causal-LM loss, forward+backward on (8, 128, 8000) logits, three ways side by side.

    python benchmarks/bench_loss.py

``gather``: the labelled rows copied out (``logits[mask]``), ``cross_entropy``, ``index_add`` (lalora
before issue 8); ``lalora``: ``CausalLMLoss.per_example`` now (all rows in place, ``ignore_index``);
``hf``: Hugging Face's summed loss on the flattened logits. The creation of the random logits
(``base``) is timed alone so it can be subtracted.
"""
import time

import torch
import torch.nn.functional as F

from lalora.losses import CausalLMLoss

N, T, V = 8, 128, 8000
ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(0))
loss = CausalLMLoss()
batch = loss.prepare({"input_ids": ids})


def base():
    torch.randn(N, T, V, requires_grad=True)


def gather():
    z = torch.randn(N, T, V, requires_grad=True)
    out, tgt, idx = loss.outputs_and_targets(z, batch)
    losses = torch.zeros(N).index_add(0, idx, F.cross_entropy(out.float(), tgt, reduction="none"))
    torch.autograd.grad(losses.sum(), z)


def lalora():
    z = torch.randn(N, T, V, requires_grad=True)
    torch.autograd.grad(loss.per_example(z, batch).sum(), z)


def hf():
    z = torch.randn(N, T, V, requires_grad=True)
    labels = F.pad(ids, (0, 1), value=-100)[:, 1:]
    torch.autograd.grad(F.cross_entropy(z.view(-1, V), labels.reshape(-1), reduction="sum"), z)


if __name__ == "__main__":
    for f in [base, gather, lalora, hf] * 2:
        f()
        t = time.perf_counter()
        for _ in range(5):
            f()
        print(f"{f.__name__}: {(time.perf_counter() - t) / 5:.3f}s")
