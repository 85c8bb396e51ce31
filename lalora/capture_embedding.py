"""Capture for LoRA on embeddings (peft's ``lora.Embedding``): token ids and output gradients.

peft keeps embedding LoRA in bare Parameters, ``lora_embedding_A[name]`` (r, vocab) and
``lora_embedding_B[name]`` (d_out, r), and applies them inside the layer's forward:
``out = base(ids) + c * F.embedding(ids, A.T) @ B.T`` with ``c`` = the adapter's scaling (times the
base layer's ``embed_scale`` for Gemma-style scaled embeddings). There is no ``lora_A``/``lora_B``
module to hook, and ``after_A`` is a local of peft's forward. So lalora hooks the peft layer itself:
a forward hook reads the token ids (the layer's input) and puts a tensor hook on the layer's output,
which hands over ``g = dL/d out`` at each backward. Everything else follows from the forward above,
with ``x_t`` = one-hot(id_t) (``W = c B A`` acting on it is the adapter's weight change):

- ``h_t = A x_t = A[:, id_t]`` (a gather of the current weights: what ``after_A`` holds);
- per example ``dL/dB = c sum_t g_t h_t^T`` and ``dL/dA[:, j] = c sum_{t: id_t = j} B^T g_t``, except
  ``j = padding_idx``, whose column ``F.embedding`` gives no gradient;
- K-FAC: ``X = E[x x^T]`` is diagonal (token frequencies), ``G = E[g g^T]``.

The checks in ``embedding_scaling`` refuse, by name, the layer options under which this is not
the forward peft runs (``max_norm``, ``scale_grad_by_freq``, LoRA variants, tensor parallelism);
``check_forward`` refuses merged or disabled adapters at fit time (no LoRA term in the forward).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import BackendError
from .sharding import sharding_of


def embedding_scaling(layer: nn.Module, name: str, path: str) -> float:
    """The factor ``c`` of adapter ``name`` of peft's ``lora.Embedding`` ``layer``, after refusing what lalora's
    capture does not reproduce (``BackendError`` naming ``path`` and the option)."""
    base = layer.get_base_layer()
    where = f"LoRA adapter {name!r} on the embedding {path!r}"
    if getattr(layer, "use_dora", {}).get(name, False) or name in getattr(layer, "lora_variant", {}):
        raise BackendError(f"{where} uses a LoRA variant ({'DoRA' if layer.use_dora.get(name) else type(layer.lora_variant[name]).__name__}), "
                           "which lalora does not support on embeddings")
    if getattr(base, "max_norm", None) is not None:
        raise BackendError(f"{where}: the embedding has max_norm={base.max_norm}, which renormalises the weights in "
                           "place during the forward; lalora does not support it")
    if getattr(base, "scale_grad_by_freq", False):
        raise BackendError(f"{where}: the embedding has scale_grad_by_freq=True, which makes each gradient depend on "
                           "the token counts of the whole mini-batch (no per-example gradient); lalora does not support it")
    if getattr(layer, "input_fns", {}).get(name) is not None or getattr(layer, "tp_layer", None) is not None:
        raise BackendError(f"{where} is tensor-parallel; lalora does not support tensor-parallel embedding LoRA")
    scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
    return float(layer.scaling[name]) * (1.0 if scale is None else float(scale))


def check_forward(adapter) -> None:
    """Refuse a fit whose forward has no LoRA term for the embedding ``adapter`` (merged or disabled adapters),
    and sharded embedding LoRA weights (the capture reads A and B as whole tensors)."""
    layer = adapter.layer
    sharded = sharding_of([adapter.A, adapter.B])
    if sharded is not None:
        raise BackendError(f"LoRA adapter {adapter.adapter_name!r} on the embedding {adapter.module_path!r} is sharded "
                           f"({sharded}); lalora's capture of embedding LoRA needs whole weights: fit in one process")
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        raise BackendError(f"LoRA adapter {adapter.adapter_name!r} on the embedding {adapter.module_path!r} is "
                           f"{'merged into the base weights' if layer.merged else 'disabled'}: its weights are not in "
                           "the forward, so they have no curvature; unmerge / enable the adapters before fitting")


def token_ids(inputs) -> Tensor:
    return inputs[0].detach()


def active(adapter) -> bool:
    return adapter.adapter_name in adapter.layer.active_adapters


class EmbeddingGrads:
    """Per-example gradients of embedding LoRA weights (the role ``PerExampleGrads`` plays for linear LoRA).

    Context manager; each backward adds ``(ids, g)`` of every call of an embedding layer with an active
    adapter. ``squared_sums()`` and ``grads()`` are keyed by canonical names like ``PerExampleGrads``'."""

    def __init__(self, adapters):
        self.adapters = [a for a in adapters if a.embedding]
        self._calls: dict[int, list[tuple[Tensor, Tensor]]] = {}  # id(layer) -> [(ids (N, T), g (N, T, d))]
        self._handles = []
        self.version = 0  # counts the recorded calls (PerExampleGrads' cache of the gradients checks it)

    def clear(self) -> None:
        self._calls = {}
        self.version += 1

    def _hook(self, key: int):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            ids = token_ids(inputs)

            def grad_hook(g):
                self._calls.setdefault(key, []).append((ids, g.detach().float()))
                self.version += 1

            output.register_hook(grad_hook)
        return hook

    def __enter__(self):
        self.clear()
        layers = {id(a.layer): a.layer for a in self.adapters}
        for a in self.adapters:
            check_forward(a)
        self._handles = [layer.register_forward_hook(self._hook(k)) for k, layer in layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _terms(self, a):
        """``(n, ids, gA, gB)`` over all calls of ``a``'s layer: the example index and token id of each token,
        ``c B^T g`` (zero at ``padding_idx``) and ``c g``, flattened over tokens; None if never called."""
        calls = self._calls.get(id(a.layer))
        if not calls or not active(a):
            return None
        pad = a.layer.get_base_layer().padding_idx
        B = a.B.detach().float()
        ns, idss, gAs, gBs = [], [], [], []
        for ids, g in calls:
            n, t = ids.shape[0], ids.reshape(ids.shape[0], -1).shape[1]
            ids = ids.reshape(n, t)
            g = g.reshape(n, t, -1)
            gA = a.scaling * g @ B
            if pad is not None:
                gA = gA * (ids != pad)[..., None]
            ns.append(torch.arange(n, device=ids.device)[:, None].expand(n, t))
            idss.append(ids)
            gAs.append(gA)
            gBs.append(a.scaling * g)
        return ns, idss, gAs, gBs

    def squared_sums(self) -> dict[str, Tensor]:
        """``{name: sum_n grad_n**2}`` in float32, without forming the (N, r, vocab) per-example gradients of A:
        the tokens of one example with one id are summed (``unique``) before squaring."""
        out = {}
        for a in self.adapters:
            terms = self._terms(a)
            if terms is None:
                continue
            ns, idss, gAs, gBs = terms
            V = a.A.shape[1]
            key = torch.cat([(n * V + i).reshape(-1) for n, i in zip(ns, idss)])
            uniq, inv = torch.unique(key, return_inverse=True)
            per = torch.zeros(uniq.numel(), a.A.shape[0], device=key.device).index_add_(
                0, inv, torch.cat([gA.reshape(-1, gA.shape[-1]) for gA in gAs]))
            out[a.a_name] = torch.zeros(V, a.A.shape[0], device=key.device).index_add_(0, uniq % V, per.square()).T
            gradB = self._grad_B(a, idss, gBs)
            out[a.b_name] = gradB.square().sum(0)
        return out

    def _grad_B(self, a, idss, gBs) -> Tensor:
        """(N, d_out, r): ``c sum_t g_t h_t^T`` with ``h_t = A[:, id_t]`` summed over the layer's calls."""
        At = a.A.detach().float().T
        per = [torch.einsum("ntd,ntr->ndr", gB, At[ids]) for ids, gB in zip(idss, gBs)]
        return per[0] if len(per) == 1 else torch.stack(per).sum(0)

    def grads(self) -> dict[str, Tensor]:
        """``{name: (N, out, in)}`` per-example gradients (A's are (N, r, vocab): small vocabularies only)."""
        out = {}
        for a in self.adapters:
            terms = self._terms(a)
            if terms is None:
                continue
            ns, idss, gAs, gBs = terms
            N, (r, V) = ns[0].shape[0], a.A.shape
            flat = torch.cat([(n * V + i).reshape(-1) for n, i in zip(ns, idss)])
            gA = torch.zeros(N * V, r, device=flat.device).index_add_(0, flat, torch.cat([g.reshape(-1, r) for g in gAs]))
            out[a.a_name] = gA.reshape(N, V, r).transpose(1, 2)
            out[a.b_name] = self._grad_B(a, idss, gBs)
        return out
