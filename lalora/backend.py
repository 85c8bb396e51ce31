"""The curvature-backend interface and the registry (``lalora.backends`` entry points).

A backend turns a model with LoRA adapters and a stream of source batches into a list
of blocks holding the *mean* over the N examples of each example's curvature
(DESIGN.md section 2). Built-in and third-party backends register the same way:

    @dataclass(frozen=True)
    class MyOptions(lalora.BackendOptions):
        damping: float = lalora.option(0.0, "Tikhonov term", ge=0)

    @lalora.register_backend("my-backend")
    class MyBackend(lalora.CurvatureBackend):
        curvature = lalora.Curvature.EF      # or an option named ``curvature`` in MyOptions
        Options = MyOptions
        def fit(self, ctx): ...

and, to be found without an import, an entry point in the plugin's pyproject::

    [project.entry-points."lalora.backends"]
    my-backend = "my_plugin:MyBackend"
"""
from __future__ import annotations

import abc
import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import Tensor, nn

from .adapters import LoraAdapter, lora_parameters
from .blocks import Block
from .errors import BackendError, DataError, warn_deprecated
from .losses import Batch, LossFunction, call_model
from .options import (BackendOptions, Curvature, NoOptions, as_curvature, curvature_name, did_you_mean,
                      options_from_dict, resolve_options)

ENTRY_POINT_GROUP = "lalora.backends"
_REGISTRY: dict[str, type["CurvatureBackend"]] = {}


@dataclass
class FitContext:
    """What a backend sees: the model (eval mode, only LoRA weights trainable), its adapters,
    the loss and a single-pass stream of batches. Backends may add to ``metadata``."""

    model: nn.Module
    adapters: list[LoraAdapter]
    stream: "Iterable[Batch]"  # noqa: F821
    device: torch.device
    metadata: dict = field(default_factory=dict)
    #: with ``skip_nonfinite`` a batch with a non-finite loss/gradient is dropped (``nonfinite``)
    skip_nonfinite: bool = False
    #: set by ``fit_precision(checkpoint_dir=...)``; backends call ``batch_done(self)`` (docs/robustness.md)
    checkpointer: object = None
    #: the trainable tensors beside the LoRA matrices (canonical name -> parameter, ``lalora.others``) the
    #: precision covers: a backend with ``covers_others`` returns blocks for them, else fit_precision adds
    #: their generic EF diagonal (``lalora.pergrad``)
    others: dict = field(default_factory=dict)

    @property
    def loss(self) -> LossFunction:
        return self.stream.loss

    @property
    def local_num_examples(self) -> int:
        """This rank's N so far (examples with at least one labelled token); no communication."""
        return self.stream.num_examples

    def global_num_examples(self) -> int:
        """N over all ranks after the stream has been consumed: a collective under ``torch.distributed``
        (every rank must call it, in the same order as its other collectives); the local N otherwise."""
        n = self.stream.num_examples
        if _distributed():
            t = torch.tensor([n], dtype=torch.float64, device=self._collective_device())
            torch.distributed.all_reduce(t)
            n = int(t.item())
        return n

    @property
    def num_examples(self) -> int:
        """Deprecated: ``global_num_examples()`` (an explicit collective) or ``local_num_examples``. In one
        process it still gives N; under ``torch.distributed`` it raises (a property that all-reduces
        deadlocks the rank that reads it alone)."""
        if _distributed():
            raise BackendError("FitContext.num_examples is gone under torch.distributed (it hid an all-reduce): "
                               "call ctx.global_num_examples() on every rank, or read ctx.local_num_examples")
        warn_deprecated("FitContext.num_examples is deprecated: call ctx.global_num_examples() (on every rank "
                        "under torch.distributed) or read ctx.local_num_examples")
        return self.stream.num_examples

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks (identity in a single process): a collective, every rank calls it.
        Backends call this on every accumulated *sum* before dividing by ``global_num_examples()``."""
        if not _distributed():
            return tensor
        t = tensor.to(self._collective_device())
        torch.distributed.all_reduce(t)
        return t.to(tensor.device)

    def _collective_device(self):
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def params(self) -> dict[str, nn.Parameter]:
        return lora_parameters(self.adapters)

    def forward(self, batch: Batch) -> Tensor:
        """Model outputs (logits) for a prepared batch."""
        return call_model(self.model, batch)

    def per_example_loss(self, batch: Batch, output: Tensor | None = None) -> Tensor | None:
        """``(N,)`` summed loss per example. A non-finite loss raises ``DataError`` naming the
        batch, or with ``skip_nonfinite`` drops the batch and returns ``None`` (skip it)."""
        losses = self.loss.per_example(self.forward(batch) if output is None else output, batch)
        if not bool(torch.isfinite(losses).all()):
            bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()[:5]
            self.nonfinite(batch, "loss", f"examples {bad}")
            return None
        return losses

    def nonfinite(self, batch: Batch, what: str, detail: str = "") -> None:
        """Report a non-finite ``what`` ("loss", "gradient") in ``batch``: raise ``DataError``,
        or with ``skip_nonfinite`` remove the batch from the counts (the caller must not
        accumulate it). Backends supporting the skip set ``supports_skip_nonfinite = True``."""
        index = batch.extra.get("index", "?")
        if not self.skip_nonfinite:
            raise DataError(f"source batch {index} gives a non-finite {what}" + (f" ({detail})" if detail else "")
                            + "; fix the data/model or pass skip_nonfinite=True to skip such batches")
        self.stream.discard(batch)
        import logging

        logging.getLogger("lalora").warning("lalora: skipped source batch %s (non-finite %s)", index, what)

    def batch_done(self, backend: "CurvatureBackend") -> None:
        """Call after a batch is fully accumulated: saves a checkpoint every K batches when
        ``fit_precision(checkpoint_dir=...)`` is used (the backend implements ``state_dict``)."""
        if self.checkpointer is not None:
            self.checkpointer.after_batch(backend)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class CurvatureBackend(abc.ABC):
    """Base class of curvature backends.

    - ``Options``: a frozen ``BackendOptions`` dataclass declaring the options (types, defaults, docs);
      an instance is built from ``Backend(OptionsInstance)``, ``Backend({"name": value})`` or
      ``Backend(name=value)`` and is ``self.options`` (read it like a dict or by attribute).
    - ``curvature``: the ``Curvature`` the backend estimates (GGN, MC or EF; a plugin may name another
      kind as a string). A backend whose ``Options`` has a ``curvature`` field gets it from that
      field's default; ``curvatures()`` lists the allowed ones.
    - ``requires``: the import names of the libraries the backend needs.
    - ``stored_bytes``/``accumulator_bytes``: what ``lalora fit --dry-run`` reports (None: unknown).

    (lalora 0.1 declared ``default_options``/``option_help`` dicts: still read, with a deprecation
    warning, as options without types; ``default_options``/``option_help`` are derived from ``Options``.)"""

    name: ClassVar[str] = "abstract"
    curvature: ClassVar[Curvature | str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[BackendOptions]] = NoOptions
    default_options: ClassVar[dict] = {}
    option_help: ClassVar[dict[str, str]] = {}
    #: the backend handles ``ctx.per_example_loss`` returning None (``fit_precision(skip_nonfinite=True)``)
    supports_skip_nonfinite: ClassVar[bool] = False
    #: the backend models LoRA on embeddings (``LoraAdapter.embedding``); see ``select_adapters``
    supports_embedding_lora: ClassVar[bool] = False
    #: the backend models DoRA adapters (``LoraAdapter.magnitude``); others are refused on DoRA models
    supports_dora: ClassVar[bool] = False
    #: ``fit()`` returns blocks covering every tensor of ``ctx.others`` itself
    covers_others: ClassVar[bool] = False
    # Optional checkpoint protocol (fit_precision(checkpoint_dir=...), docs/robustness.md):
    #   state_dict() -> dict[str, Tensor]   accumulated sums so far (not divided by N)
    #   load_state_dict(state) -> None      called before fit(); fit() continues from it

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        own = vars(cls)
        if "default_options" in own and "Options" not in own:  # a lalora 0.1 declaration
            warn_deprecated(f"{cls.__qualname__}: declaring backend options as a default_options dict is deprecated; "
                            "declare Options = a BackendOptions dataclass (docs/howto-custom-backend.md)")
            cls.Options = options_from_dict(f"{cls.__name__}Options", own["default_options"],
                                            own.get("option_help", {}))
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, BackendOptions)):
            raise TypeError(f"{cls.__qualname__}.Options must be a BackendOptions dataclass, got {cls.Options!r}")
        described = {d["name"]: d for d in cls.Options.describe()}
        cls.default_options = {k: d["default"] for k, d in described.items()}
        cls.option_help = {k: d["doc"] for k, d in described.items()}
        if "curvature" in described and "curvature" not in own:
            cls.curvature = described["curvature"]["default"]
        cls.curvature = as_curvature(cls.curvature)

    def __init__(self, options: BackendOptions | dict | None = None, /, **kwargs):
        if options is not None and kwargs:
            raise BackendError(f"backend {self.name!r}: pass options either as one {self.Options.__name__} / dict or "
                               "as keyword arguments, not both")
        self.options = self.resolve_options(kwargs if options is None else options)
        self.check_options()

    @classmethod
    def resolve_options(cls, options: BackendOptions | dict | None = None) -> BackendOptions:
        """``options`` (an ``Options`` instance or a dict, deprecated names accepted) as a validated ``Options``."""
        return resolve_options(cls.Options, options, f"backend {cls.name!r}")

    def check_options(self) -> None:
        """Checks beyond the declaration (which ``Options.check`` can also do); raise ``BackendError``
        naming the option at fault."""

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> list[Block]:
        """Blocks holding the mean over ``ctx.global_num_examples()`` examples of the per-example curvature."""

    def curvature_kind(self) -> Curvature | str | None:
        """The curvature this configured instance estimates (its ``curvature`` option, else the class's)."""
        return as_curvature(self.options.get("curvature", self.curvature))

    @classmethod
    def curvatures(cls) -> tuple:
        """The curvatures the backend can estimate (the ``curvature`` option's choices, or the class's one)."""
        entry = next((d for d in cls.Options.describe() if d["name"] == "curvature"), None)
        if entry is not None and entry["choices"]:
            return tuple(entry["choices"])
        return () if cls.curvature is None else (curvature_name(cls.curvature),)

    @classmethod
    def select_adapters(cls, adapters: list[LoraAdapter]) -> list[LoraAdapter]:
        """The adapters a fit hands to this backend: all of them, or without LoRA on embeddings when
        ``supports_embedding_lora`` is False (those weights are then uncovered: ``lalora.coverage`` names them);
        ``BackendError`` when nothing would be left."""
        kept = adapters if cls.supports_embedding_lora else [a for a in adapters if not a.embedding]
        if not kept:
            names = [n for a in adapters for n in (a.a_name, a.b_name)]
            raise BackendError(f"backend {cls.name!r} does not model LoRA on embeddings (peft's lora_embedding_A/B), "
                               f"and the selected adapter(s) have no other LoRA weights: {', '.join(names[:6])}; "
                               "use backend 'diag', 'kfac' or 'tri-kfac' (docs/variants.md)")
        return kept

    @classmethod
    def stored_bytes(cls, adapters: list[LoraAdapter], options: BackendOptions) -> int | None:
        """Exact bytes of the curvature tensors a fit with ``options`` stores (``Precision.num_bytes``, the
        anchor not counted), from the adapter shapes alone; None when they depend on the data."""
        return None

    @classmethod
    def accumulator_bytes(cls, adapters: list[LoraAdapter], options: BackendOptions) -> int | None:
        """Bytes of the running sums the fit holds (an upper bound); None when not known from shapes."""
        return None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the libraries in ``requires`` can be imported (without importing them)."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return (not missing, f"missing: {', '.join(missing)}" if missing else "ok")


def register_backend(name: str):
    """Class decorator registering a ``CurvatureBackend`` subclass under ``name``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, CurvatureBackend)):
            raise TypeError(f"register_backend({name!r}) decorates CurvatureBackend subclasses, got {cls!r}")
        existing = _REGISTRY.get(name)
        # the same class again, or its module reloaded (same module and qualname), replaces the entry; a class
        # from another module never does, even with the same class name (two plugins choosing one name)
        if existing is not None and existing is not cls and _origin(existing) != _origin(cls):
            raise BackendError(f"backend name {name!r} is already registered by {'.'.join(_origin(existing))} "
                               f"(module {existing.__module__!r}); {'.'.join(_origin(cls))} (module {cls.__module__!r}) "
                               "cannot register under the same name: rename one of them")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _origin(cls) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_backend(name: str) -> type[CurvatureBackend]:
    """The backend class registered as ``name`` (loading its entry point on first use)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name not in eps:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(list_backends()) or 'none'}")
    try:
        obj = eps[name].load()
    except ImportError as e:
        raise BackendError(f"backend {name!r} could not be imported ({e}); install the library it needs") from e
    if name not in _REGISTRY:
        if isinstance(obj, type) and issubclass(obj, CurvatureBackend):
            register_backend(name)(obj)
        else:
            raise BackendError(f"entry point {eps[name].value!r} for backend {name!r} is not a CurvatureBackend")
    return _REGISTRY[name]


def make_backend(backend: "str | CurvatureBackend", options=None, legacy: dict | None = None, *,
                 caller: str = "fit_precision", caller_args=()) -> "CurvatureBackend":
    """The backend instance for ``caller(backend=..., options=..., **legacy)``. ``legacy``: backend options
    passed as keyword arguments of ``caller`` (deprecated: one ``LaloraDeprecationWarning``); a name that is
    none of the backend's options raises ``BackendError`` suggesting the closest option or argument of
    ``caller`` (``caller_args``)."""
    legacy = legacy or {}
    if isinstance(backend, CurvatureBackend):
        if options is not None or legacy:
            raise BackendError(f"pass backend options to the backend instance, not to {caller}")
        return backend
    cls = get_backend(backend)
    if not legacy:
        return cls(options)
    if options is not None:
        raise BackendError(f"{caller}: pass backend options in options= only, not also as keyword arguments "
                           f"({', '.join(legacy)})")
    known = cls.Options.accepted_names()
    for name in legacy:
        if name not in known:
            near = did_you_mean(name, caller_args)
            hint = near.replace("did you mean", f"did you mean {caller}'s argument") if near else did_you_mean(name, known)
            raise BackendError(f"backend {cls.name!r} has no option {name!r}{hint}; its options are "
                               f"{', '.join(cls.Options._names()) or 'none'}")
    warn_deprecated(f"{caller}(..., {', '.join(f'{k}=...' for k in legacy)}): backend options as keyword arguments "
                    f"of {caller} are deprecated; pass options={{{', '.join(f'{k!r}: ...' for k in legacy)}}} "
                    f"or options={cls.Options.__name__}(...)")
    return cls(legacy)


def list_backends() -> list[str]:
    """Names of all registered backends and installed entry points (nothing is imported)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))
