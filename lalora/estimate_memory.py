"""Per-rank peak memory and stored bytes of a fit from a model config alone (``lalora fit --dry-run --config``).

    est = estimate_from_config("llama-3.1-8b", "kfac", rank=16, options={"max_rank": 1024},
                               max_memory="48GiB", seq_len=2048, batch_size=8)
    print(est.format())

A model of the memory, not a measurement (docs/dry-run.md states its terms):

- **factor sums** (kfac, tri-kfac): the backend class's own ``accumulator_bytes`` of the adapters fitted in one
  pass. With ``max_memory`` the adapters are planned, in model order, into consecutive groups whose sums each
  fit the budget, one pass over the data per group (the kfac option ``max_memory``); peak = one group's sums
  plus the factors finished in earlier passes (divided by the world size with ``shard_factors``: each rank
  keeps the factors it owns);
- **stored bytes**: the backend class's ``stored_bytes`` (``Precision.num_bytes``); on disk the input factor
  shared by q/k/v (and by gate/up) of one layer is stored once (``lalora.fileformat``);
- **model weights** in the model's dtype, whole on one rank, fully sharded over ``world_size`` ranks (FSDP2 /
  ZeRO-3) plus one gathered layer; LoRA weights float32;
- **one batch's working set**: activations saved for the backward (per token and layer ``5h + 2 kv + 2 q + 4 i``
  values of the model's dtype, attention without a ``T x T`` matrix), the logits and their gradient (model
  dtype), two float32 loss chunks (``lalora.logit_rows.CHUNK_ROWS`` rows), float32 hook buffers of the widest
  layer input and output;
- **compression** (``max_rank``): a float64 copy of the widest compressed factor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .backend import get_backend
from .estimate_config import ModelShape, lora_layout, model_config
from .logit_rows import CHUNK_ROWS
from .option_types import parse_bytes

__all__ = ["ShapeEstimate", "estimate_from_config", "parse_bytes"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_OWN_OPTIONS = ("max_memory", "shard_factors")  # modelled here (and options of kfac where it has them)


@dataclass
class ShapeEstimate:
    """The numbers of a dry run from a config (bytes); ``format()`` gives the printed report."""

    model: str
    backend: str
    options: dict
    world_size: int
    batch_size: int
    seq_len: int
    dtype: str
    num_adapters: int
    num_lora_params: int
    passes: int
    parts: dict = field(default_factory=dict)  # per rank, name -> bytes
    peak_bytes: int = 0
    stored_bytes: int = 0
    file_bytes: int = 0
    stored_bytes_per_rank: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def gib(b):
            return f"{b / 2**30:,.2f} GiB"

        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"dry run from a model config (no weights): {self.model}, {self.dtype}, backend={self.backend}"
                 f"{' ' + opts if opts else ''}",
                 f"  {self.num_adapters} adapters ({self.num_lora_params:,} LoRA weights), world size {self.world_size}, "
                 f"{self.batch_size} x {self.seq_len} tokens per batch per rank, {self.passes} pass(es) over the data",
                 f"  peak memory per rank (model, not measured): {gib(self.peak_bytes)}"]
        lines += [f"    {name:34s} {gib(b):>12s}" for name, b in self.parts.items()]
        lines.append(f"  stored precision: {gib(self.stored_bytes)} ({self.stored_bytes:,} bytes); on disk "
                     f"{gib(self.file_bytes)} (shared input factors stored once); per rank with shard_factors "
                     f"{gib(self.stored_bytes_per_rank)}")
        return "\n".join(lines)


def _plan(cls, adapters, opts, budget: int | None) -> list[list]:
    need = lambda a: cls.accumulator_bytes([a], opts)  # noqa: E731
    for a in adapters if budget is not None else ():
        if need(a) > budget:
            raise ValueError(f"max_memory={budget:,} bytes is below the factor sums of adapter {a.key!r} alone "
                             f"({need(a):,} bytes): raise max_memory")
    from .option_types import plan_groups

    return plan_groups(adapters, need, budget)


def _shared_input_bytes(cls, adapters, opts) -> int:
    """Bytes saved on disk by storing each layer input's factor ``X`` once (q/k/v, gate/up)."""
    import torch

    from .estimate_config import ShapeAdapter

    seen, saved = set(), 0
    for a in adapters:
        if (a.layer, a.input) in seen:
            x_only = ShapeAdapter(a.key, a.layer, a.proj, a.input, a.A, torch.empty(0, a.A.shape[0], device="meta"))
            saved += cls.stored_bytes([x_only], opts)
        seen.add((a.layer, a.input))
    return saved


def _working_set(shape: ModelShape, tokens: int, b: int, rank: int, per_layer: int) -> dict:
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    act = tokens * shape.layers * ((5 * h + 2 * kv + 2 * q + 4 * i) * b + per_layer * rank * 4)
    logits = 2 * tokens * shape.vocab * b + 2 * min(tokens, CHUNK_ROWS) * shape.vocab * 4
    hooks = 2 * tokens * max(h, i, q) * 4
    return {"activations (one batch)": act, "logits + gradient + loss chunks": logits, "factor hook buffers": hooks}


def _split_options(cls, options) -> tuple[object, dict]:
    options = dict(options or {})
    own = {k: options.pop(k) for k in _OWN_OPTIONS if k in options}
    accepted = set(cls.Options.accepted_names()) if hasattr(cls.Options, "accepted_names") else set()
    # the backend checks them where it has them (a budget given as bytes is text to its option)
    options.update({k: (str(v) if k == "max_memory" and isinstance(v, int) else v) for k, v in own.items() if k in accepted})
    return cls.resolve_options(options), own


def estimate_from_config(config, backend: str = "kfac", *, targets="all-linear", rank: int = 8, alpha=None,
                         options=None, world_size: int = 1, batch_size: int = 8, seq_len: int = 2048,
                         dtype: str = "bfloat16") -> ShapeEstimate:
    """Per-rank peak memory and stored bytes of fitting ``backend`` on a model known by its ``config`` (a
    ``config.json`` path, a directory or a preset of ``lalora.estimate_config.PRESETS``), LoRA of rank ``rank`` on
    ``targets``. ``options``: the backend's options plus ``max_memory`` (bytes or "40GiB": the factor sums of
    one pass) and ``shard_factors`` (each rank keeps its share of the finished factors)."""
    shape = model_config(config)
    if backend not in ("kfac", "tri-kfac"):
        raise ValueError(f"the shape estimate models the Kronecker backends (kfac, tri-kfac), not {backend!r}; "
                         "run the dry run on the model itself (--model)")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPE_BYTES)}")
    for name, v in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    cls = get_backend(backend)
    adapters = lora_layout(shape, targets, rank, alpha)
    opts, own = _split_options(cls, options)
    budget = None if own.get("max_memory") is None else parse_bytes(own["max_memory"], "max_memory")
    share = world_size if own.get("shard_factors") else 1
    groups = _plan(cls, adapters, opts, budget)
    b = _DTYPE_BYTES[dtype]
    finished, held = 0, 0
    for g in groups:  # the largest (factors finished before this pass + this pass's sums)
        held = max(held, finished + cls.accumulator_bytes(g, opts))
        finished += cls.stored_bytes(g, opts) // share
    layer_params = (shape.num_params - shape.vocab * shape.hidden * (1 if shape.tied else 2)) // shape.layers
    weights = shape.num_params * b if world_size == 1 else shape.num_params * b // world_size + layer_params * b
    lora = sum(a.A.numel() + a.B.numel() for a in adapters)
    parts = {"model weights" + (" (sharded)" if world_size > 1 else ""): weights, "LoRA weights": 4 * lora}
    parts.update(_working_set(shape, batch_size * seq_len, b, rank, len(adapters) // shape.layers))
    parts["factor sums + finished factors"] = held
    k = opts["max_rank"]
    sides = [n for a in adapters for n in (a.A.shape[1], a.B.shape[0]) if k is not None and n > k]
    if sides:
        parts["compression (float64 copy)"] = 8 * max(sides) ** 2
    stored = cls.stored_bytes(adapters, opts)
    given = {k: v for k, v in opts.to_dict().items() if v != cls.default_options.get(k)}
    return ShapeEstimate(model=shape.name, backend=backend, options={**given, **own}, world_size=world_size,
                         batch_size=batch_size, seq_len=seq_len, dtype=dtype, num_adapters=len(adapters),
                         num_lora_params=lora, passes=len(groups), parts=parts, peak_bytes=sum(parts.values()),
                         stored_bytes=stored, file_bytes=stored - _shared_input_bytes(cls, adapters, opts),
                         stored_bytes_per_rank=-(-stored // world_size) if own.get("shard_factors") else stored)
