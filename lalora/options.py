"""Backend options: one curvature vocabulary, typed declarations, validation, CLI text.

A backend declares its options as a frozen dataclass deriving from ``BackendOptions``; each field
has a type, a default and a doc (``option(...)``), optionally allowed values, a range, a check,
and the names it was known by before (accepted for one release with a ``LaloraDeprecationWarning``)::

    @dataclass(frozen=True)
    class MyOptions(lalora.BackendOptions):
        curvature: lalora.Curvature = lalora.option(lalora.Curvature.EF, "which curvature", choices=("ef",))
        damping: float = lalora.option(0.0, "Tikhonov term added to every value", ge=0)

    class MyBackend(lalora.CurvatureBackend):
        Options = MyOptions

Values are checked when an options object is built (``MyOptions(damping=-1)`` raises ``BackendError``
naming ``damping``); unknown names get a "did you mean" suggestion; ``OptionText`` values (what the
CLI's ``--option key=value`` gives) are parsed by the declared type. An options object reads like
a mapping (``opts["damping"]``, ``dict(opts)``) and like a dataclass (``opts.damping``).
"""
from __future__ import annotations

import abc
import contextvars
import dataclasses
import enum
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from .errors import BackendError, warn_deprecated
from .option_types import OptionSpec, OptionText, choices_of, coerce, did_you_mean, is_enum, plain, show, type_text

__all__ = ["BackendOptions", "Curvature", "OptionText", "curvature_name", "option", "parse_option_items"]


class Curvature(str, enum.Enum):
    """The curvature a backend estimates (DESIGN.md section 2): one name for one concept everywhere
    (backend options, ``metadata["curvature"]``, ``lalora backends``, compare's ``reference=``)."""

    #: generalized Gauss-Newton (type-2 Fisher): ``sum_t J_t^T H_t J_t`` per example
    GGN = "ggn"
    #: Monte-Carlo Fisher: labels sampled from the model (unbiased for the GGN)
    MC = "mc"
    #: empirical Fisher: ``g_n g_n^T`` with the true labels, per example
    EF = "ef"

    def __str__(self):
        return self.value

    def __format__(self, spec):
        return format(self.value, spec)

    def __repr__(self):
        return f"Curvature.{self.name}"


#: names used before the one vocabulary (files written by lalora 0.1 hold them in metadata["curvature"])
LEGACY_CURVATURE = {"empirical_fisher": Curvature.EF, "mc_fisher": Curvature.MC}


def curvature_name(value) -> str | None:
    """The vocabulary name of ``value`` ("ggn", "mc", "ef"); old names mapped, other strings (a plugin's own
    kind) kept as they are."""
    if value is None:
        return None
    if isinstance(value, Curvature):
        return value.value
    value = str(value)
    return LEGACY_CURVATURE[value].value if value in LEGACY_CURVATURE else value


def as_curvature(value):
    """``value`` as a ``Curvature`` when it names one (old names too), else unchanged (a plugin's own kind)."""
    name = curvature_name(value)
    return Curvature(name) if name in Curvature._value2member_map_ else value


def option(default, doc: str = "", *, choices=None, ge=None, gt=None, le=None, check=None, renamed_from=(),
           value_aliases=None):
    """A field of a ``BackendOptions`` dataclass: its default, doc, allowed values (``choices``), range
    (``ge``/``gt``/``le``), an extra ``check(value, where)`` raising ``ValueError``, the deprecated names
    (``renamed_from``) and deprecated values (``value_aliases``: old -> new) it still accepts."""
    spec = OptionSpec(doc, None if choices is None else tuple(choices), ge, gt, le, check,
                      (renamed_from,) if isinstance(renamed_from, str) else tuple(renamed_from), dict(value_aliases or {}))
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"lalora": spec})
    return field(default=default, metadata={"lalora": spec})


# who is building options ("backend 'kfac'") and which names the caller used (new name -> the old one)
_WHERE: contextvars.ContextVar = contextvars.ContextVar("lalora_options_where", default=None)
_RESERVED = {"get", "keys", "items", "values", "to_dict", "describe", "check", "upgrade", "legacy_names",
             "accepted_names"}


class _OptionsMeta(abc.ABCMeta):
    """``SomeOptions(**values)`` goes through ``resolve_options``: deprecated names upgraded, unknown ones
    refused with a suggestion, every value checked (also for ``dataclasses.replace``)."""

    def __call__(cls, *args, **values):
        if args:
            raise TypeError(f"{cls.__name__} takes keyword arguments only (option=value)")
        return resolve_options(cls, values, cls.__name__)


class BackendOptions(Mapping, metaclass=_OptionsMeta):
    """Base of the frozen option dataclasses of backends (see the module docstring)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        bad = _RESERVED & set(getattr(cls, "__annotations__", {}))
        if bad:
            raise TypeError(f"{cls.__name__}: option names {sorted(bad)} are reserved (BackendOptions methods)")

    def __post_init__(self):
        where, renamed = _WHERE.get() or (type(self).__name__, {})
        hints = _hints(type(self))
        for f in fields(self):
            spec = _spec(f)
            try:
                value = coerce(getattr(self, f.name), hints[f.name], spec, f.name)
            except ValueError as e:
                note = (f" (given as {renamed[f.name]}, the deprecated name of {f.name})" if f.name in renamed else "")
                raise BackendError(f"{where}: {e}{note}") from None
            object.__setattr__(self, f.name, value)
        try:
            self.check()
        except ValueError as e:
            raise BackendError(f"{where}: {e}") from None

    def check(self) -> None:
        """Checks across options (after each one is validated); raise ``ValueError`` naming them."""

    @classmethod
    def upgrade(cls, given: dict, where: str, renamed: dict) -> dict:
        """``given`` with deprecated names and values replaced, one ``LaloraDeprecationWarning`` each; records
        ``renamed[new name] = old name`` (error messages name what the caller typed). Override to map
        combinations (call ``super().upgrade`` too)."""
        out = dict(given)
        hints = _hints(cls)
        for f in fields(cls):
            spec = _spec(f)
            given_as = next((old for old in spec.renamed_from if old in out), None)
            if given_as is not None:
                if f.name in out:
                    raise BackendError(f"{where}: options {given_as} and {f.name} are the same option ({given_as} is "
                                       f"its deprecated name): pass only {f.name}")
                out[f.name] = out.pop(given_as)
                renamed[f.name] = given_as
            if f.name not in out:
                continue
            aliases = {**(LEGACY_CURVATURE if is_enum(hints[f.name], Curvature) else {}), **spec.value_aliases}
            value = out[f.name]
            if isinstance(value, str) and not isinstance(value, enum.Enum) and value in aliases:
                out[f.name] = aliases[value]
                warn_deprecated(f"{where}: option {given_as or f.name}={str(value)!r} is deprecated, "
                                f"use {f.name}={show(aliases[value])}")
            elif given_as is not None:
                warn_deprecated(f"{where}: option {given_as} is deprecated, use {f.name}")
        return out

    # --- a read-only mapping of the option values ---------------------------------------------
    def __getitem__(self, name):
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    #: deprecated names that an ``upgrade`` override handles (beyond the fields' ``renamed_from``)
    legacy_names: typing.ClassVar[tuple[str, ...]] = ()

    @classmethod
    def accepted_names(cls) -> tuple[str, ...]:
        """The option names and the deprecated names still accepted."""
        return (*cls._names(), *(o for f in fields(cls) for o in _spec(f).renamed_from), *cls.legacy_names)

    def to_dict(self) -> dict:
        """The values as plain JSON-able Python values (an enum as its string)."""
        return {k: plain(getattr(self, k)) for k in self._names()}

    @classmethod
    def describe(cls) -> list[dict]:
        """One entry per option: ``name``, ``type`` (readable), ``default``, ``doc``, ``choices``, ``renamed_from``."""
        hints = _hints(cls)
        out = []
        for f in fields(cls):
            spec = _spec(f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append({"name": f.name, "type": type_text(hints[f.name], spec), "default": plain(default),
                        "doc": spec.doc, "choices": [plain(c) for c in choices_of(hints[f.name], spec) or ()] or None,
                        "renamed_from": list(spec.renamed_from)})
        return out


@dataclass(frozen=True)
class NoOptions(BackendOptions):
    """A backend without options."""


def resolve_options(options_cls: type[BackendOptions], given, where: str) -> BackendOptions:
    """An ``options_cls`` instance from ``given`` (None, an ``options_cls`` instance or a mapping of names,
    deprecated names upgraded); unknown names raise ``BackendError`` with a "did you mean" suggestion."""
    if given is None:
        given = {}
    if isinstance(given, BackendOptions) and not isinstance(given, options_cls):
        raise BackendError(f"{where} takes {options_cls.__name__}, got {type(given).__name__}")
    if isinstance(given, options_cls):
        return given
    if not isinstance(given, Mapping):
        raise BackendError(f"{where}: options must be a {options_cls.__name__} or a dict of option values, "
                           f"got {type(given).__name__}")
    renamed: dict = {}
    token = _WHERE.set((where, renamed))
    try:
        values = options_cls.upgrade(dict(given), where, renamed)
        names = options_cls._names()
        unknown = [k for k in values if k not in names]
        if unknown:
            raise BackendError(f"{where} has no option {unknown[0]!r}{did_you_mean(unknown[0], options_cls.accepted_names())}; "
                               f"its options are {', '.join(names) or 'none'}")
        return type.__call__(options_cls, **values)
    finally:
        _WHERE.reset(token)


def options_from_dict(name: str, defaults: Mapping, docs: Mapping) -> type[BackendOptions]:
    """A ``BackendOptions`` class for a backend that declares a plain ``default_options`` dict (lalora 0.1):
    untyped fields (no type check; ``OptionText`` parsed as JSON), the docs from ``option_help``."""
    spec = [(k, typing.Any, option(v, docs.get(k, ""))) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, spec, bases=(BackendOptions,), frozen=True)


def parse_option_items(items) -> dict[str, OptionText]:
    """``["key=value", ...]`` (the CLI's ``--option``) as ``{key: OptionText(value)}``; the values are parsed
    by each option's declared type when the backend's options are built. ``ValueError`` on a malformed item."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r}: use key=value")
        out[key.strip()] = OptionText(value)
    return out


@functools.lru_cache(maxsize=256)
def _hints(cls) -> dict:
    """The resolved field types of an options class (cached: resolving the annotations took ~1 ms of every fit;
    callers only read the dict)."""
    return typing.get_type_hints(cls)


def _spec(f) -> OptionSpec:
    return f.metadata.get("lalora") or OptionSpec()
