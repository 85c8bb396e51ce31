"""The curvature-backend interface and the registry (``lalora.backends`` entry points).

A backend turns a model with LoRA adapters and a stream of source batches into a list
of blocks holding the *mean* over the N examples of each example's curvature
(DESIGN.md section 2). Built-in and third-party backends register the same way:

    @lalora.register_backend("my-backend")
    class MyBackend(lalora.CurvatureBackend):
        curvature = "empirical_fisher"
        default_options = {"damping": 0.0}
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
from .errors import BackendError, DataError
from .losses import Batch, LossFunction, call_model

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

    @property
    def loss(self) -> LossFunction:
        return self.stream.loss

    @property
    def num_examples(self) -> int:
        """N after the stream has been consumed (examples with at least one labelled token),
        summed over all ranks when ``torch.distributed`` is initialised."""
        n = self.stream.num_examples
        if _distributed():
            t = torch.tensor([n], dtype=torch.float64, device=self._collective_device())
            torch.distributed.all_reduce(t)
            n = int(t.item())
        return n

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks (identity in a single process). Backends call this on
        every accumulated *sum* before dividing by ``num_examples``."""
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
    """Base class of curvature backends. Options are keyword arguments checked against
    ``default_options``; ``curvature`` names the curvature kind (empirical_fisher, ggn,
    mc_fisher); ``requires`` lists the import names of the libraries the backend needs."""

    name: ClassVar[str] = "abstract"
    curvature: ClassVar[str] = "unknown"
    requires: ClassVar[tuple[str, ...]] = ()
    default_options: ClassVar[dict] = {}
    option_help: ClassVar[dict[str, str]] = {}
    #: the backend handles ``ctx.per_example_loss`` returning None (``fit_precision(skip_nonfinite=True)``)
    supports_skip_nonfinite: ClassVar[bool] = False
    # Optional checkpoint protocol (fit_precision(checkpoint_dir=...), docs/robustness.md):
    #   state_dict() -> dict[str, Tensor]   accumulated sums so far (not divided by N)
    #   load_state_dict(state) -> None      called before fit(); fit() continues from it

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise BackendError(f"backend {self.name!r} has no option {unknown[0]!r}; "
                               f"its options are {sorted(self.default_options) or 'none'}")
        self.options = {**self.default_options, **options}
        self.check_options()

    def check_options(self) -> None:
        """Validate ``self.options``; raise ``BackendError`` naming the option at fault."""

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> list[Block]:
        """Blocks holding the mean over ``ctx.num_examples`` examples of the per-example curvature."""

    def curvature_kind(self) -> str:
        return self.curvature

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


def list_backends() -> list[str]:
    """Names of all registered backends and installed entry points (nothing is imported)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))
