"""Kronecker factors of LoRA on embeddings for the ``kfac``/``tri-kfac`` backends (backends/kfac.py).

peft's embedding LoRA (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (d_out, r)) is the LoRA form
``out = base(ids) + c B A x`` with ``x`` = one-hot(token id) (``lalora.capture_embedding``). The K-FAC
structure is therefore the linear one with that input, and it is sound for both matrices: the per-token
gradients are ``dA = c (B^T g) x^T`` and ``dB = c g (A x)^T``, so the blocks of DESIGN.md section 3 hold
with ``X = E[x x^T]`` and ``G = E[g g^T]`` of the layer. ``X`` of one-hot inputs is diagonal (the
token frequencies over the real tokens of the counted examples, normalised by their number ``T`` as
the linear input factor), stored as ``lalora.blocks.factors.diagonal_factor``; ``X_B = A X A^T`` is
dense (r, r) as for a linear layer. Only ``kfac_approx="expand"``: "reduce" averages the one-hot
inputs of an example into a dense (vocab, vocab) ``X``, which is refused by name.

Capture (no module hooks exist on peft's ParameterDicts): a forward hook on the peft embedding layer
reads the token ids, and a tensor hook on the layer's output adds ``g g^T`` at each backward pass
(``g`` is the layer's output gradient itself, no 1/s rescaling as at ``lora_B``'s output). A token
equal to the embedding's ``padding_idx`` is refused: ``F.embedding`` gives A's column of that token no
gradient while B still sees ``A x``, so the Kronecker factors would not describe the model's gradients.

The sums of one batch are held apart and added to the running sums (``sum_dtype``) when the batch is
committed, so a skipped batch (``skip_nonfinite``) is dropped exactly; ``X`` sums are (vocab,) vectors,
``state_dict`` entries ``sum.<adapter>.X`` of that shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lalora.blocks.factors import diagonal_factor
from lalora.capture_embedding import active, check_forward, token_ids
from lalora.errors import BackendError

from .kfac_factors import FactorHooks
from .kfac_gram import finish_factor


class EmbeddingFactorHooks:
    """The factor sums of the embedding adapters of one fit (the interface of ``FactorHooks``)."""

    def __init__(self, adapters, approx: str, sums: dict, sum_dtype: torch.dtype, device):
        self.adapters = adapters
        if adapters and approx != "expand":
            raise BackendError(f"kfac_approx={approx!r} is refused for LoRA on embeddings ({adapters[0].key!r}): the "
                               "per-example mean of one-hot token inputs makes X a dense vocabulary x vocabulary "
                               "matrix; use kfac_approx='expand' (X diagonal: token frequencies)")
        self.sums, self.sum_dtype, self.device = sums, sum_dtype, device
        self.mask: Tensor | None = None
        self.example_mask: Tensor | None = None
        self._ids: list[tuple[object, Tensor]] = []  # this forward's (layer, ids)
        self.targets: list[Tensor] = []  # this forward's adapted embedding outputs (``FactorHooks.targets``)
        self.batch: dict[str, dict[str, Tensor]] = {}  # adapter key -> {"X", "G", "T"} of this batch
        self._handles = []

    def _on_layer(self, layer):
        return [a for a in self.adapters if a.layer is layer and active(a)]

    def begin_batch(self, mask: Tensor | None, example_mask: Tensor) -> None:
        self.mask, self.example_mask, self._ids, self.batch, self.targets = mask, example_mask, [], {}, []

    def _add(self, key: str, role: str, t: Tensor) -> None:
        slot = self.batch.setdefault(key, {})
        slot[role] = t if role not in slot else slot[role] + t

    def forward_done(self) -> None:
        """Token counts of this forward: ``X += diag(sum_t w_t x_t)``, ``T += sum_t w_t`` per adapter."""
        for layer, ids in self._ids:
            ids = ids.reshape(ids.shape[0], -1)
            w = self.mask if self.mask is not None and self.mask.shape == ids.shape else \
                self.example_mask[:, None].expand(ids.shape)
            w = w.to(device=ids.device, dtype=torch.float32)
            users = self._on_layer(layer)
            counts = torch.zeros(users[0].A.shape[1], device=ids.device).index_add_(0, ids.reshape(-1), w.reshape(-1))
            pad = layer.get_base_layer().padding_idx
            if pad is not None and float(counts[pad]) > 0:
                raise BackendError(
                    f"LoRA on the embedding {users[0].module_path!r}: {int(counts[pad])} real token(s) of counted "
                    f"examples are the embedding's padding_idx {pad}, whose column of lora_embedding_A gets no gradient "
                    "from F.embedding while lora_embedding_B still sees it: no Kronecker factor describes that. Use "
                    "backend 'diag' (exact), or mask these tokens (attention_mask 0)")
            for a in users:
                self._add(a.key, "X", counts)
                self._add(a.key, "T", w.sum())
        self._ids = []

    def _hook(self, module, inputs, output):
        users = self._on_layer(module)
        if not output.requires_grad or not users:
            return
        self._ids.append((module, token_ids(inputs)))

        def grad_hook(g):
            g = g.detach().float().reshape(-1, g.shape[-1])
            product = g.T @ g
            for a in users:
                self._add(a.key, "G", product)

        output.register_hook(grad_hook)
        self.targets.append(output)

    def nonfinite(self) -> str | None:
        for key, slot in self.batch.items():
            if any(not bool(torch.isfinite(t.sum())) for t in slot.values()):
                return key
        return None

    def drop_batch(self) -> None:
        self.batch = {}

    def commit_batch(self) -> None:
        for key, slot in self.batch.items():
            running = self.sums.setdefault(key, {})
            for role, t in slot.items():
                t = t.to(self.sum_dtype)
                running[role] = t if role not in running else running[role] + t
        self.batch = {}

    def flush(self) -> None:
        """Nothing to flush: batches go into the running sums when committed."""

    def take(self, name: str, key: str) -> Tensor | None:
        return self.sums.get(name, {}).get(key)

    def __enter__(self):
        for a in self.adapters:
            check_forward(a)
        layers = {id(a.layer): a.layer for a in self.adapters}
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers.values()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._ids, self.targets = [], [], []


class AllFactorHooks:
    """``FactorHooks`` for the linear adapters and ``EmbeddingFactorHooks`` for the embedding ones, as one."""

    def __init__(self, adapters, approx: str, sums: dict, sum_dtype: torch.dtype, window: int, device):
        self.parts = [FactorHooks([a for a in adapters if not a.embedding], approx, sums, sum_dtype, window, device),
                      EmbeddingFactorHooks([a for a in adapters if a.embedding], approx, sums, sum_dtype, device)]
        self._owner = {a.key: self.parts[1 if a.embedding else 0] for a in adapters}

    @property
    def acc_X(self) -> dict:
        """The linear part's window sums (measured by ``max_memory``'s ``HeldBytes``; the embedding part adds each
        batch into the running sums directly)."""
        return self.parts[0].acc_X

    @property
    def acc_G(self) -> dict:
        return self.parts[0].acc_G

    @property
    def targets(self) -> list[Tensor]:
        """This forward's adapted outputs (lora_B's, the embedding layers'): the backward passes differentiate
        w.r.t. them, so every gradient factor's hook fires and no LoRA weight gradient is computed."""
        return [t for p in self.parts for t in p.targets]

    def begin_batch(self, mask, example_mask) -> None:
        for p in self.parts:
            p.begin_batch(mask, example_mask)

    def forward_done(self) -> None:
        for p in self.parts:
            p.forward_done()

    def nonfinite(self) -> str | None:
        return next((bad for bad in (p.nonfinite() for p in self.parts) if bad), None)

    def drop_batch(self) -> None:
        for p in self.parts:
            p.drop_batch()

    def commit_batch(self) -> None:
        for p in self.parts:
            p.commit_batch()

    def flush(self) -> None:
        for p in self.parts:
            p.flush()

    def take(self, name: str, key: str) -> Tensor | None:
        return self._owner[name].take(name, key)

    def __enter__(self):
        for p in self.parts:
            p.__enter__()
        return self

    def __exit__(self, *exc):
        for p in self.parts:
            p.__exit__(*exc)


def input_sum_shape(adapter) -> tuple[int, ...]:
    """Shape of the running sum of ``X``: (vocab,) for embedding LoRA, (d_in, d_in) otherwise."""
    d_in = adapter.A.shape[1]
    return (d_in,) if adapter.embedding else (d_in, d_in)


def finish_input_factor(adapter, X: Tensor, T: float):
    """The stored input factor from the sum ``X`` over ``T`` tokens (diagonal for embedding LoRA)."""
    if adapter.embedding:
        return diagonal_factor((X / T).float())
    return finish_factor(X, 1.0 / T)
