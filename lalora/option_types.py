"""Option values: types in words, text from the command line read by the declared type, checks
(used by ``lalora.options``)."""
from __future__ import annotations

import difflib
import enum
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field


class OptionText(str):
    """An option value as typed on a command line: parsed by the declared type when the options are built."""


@dataclass(frozen=True)
class OptionSpec:
    doc: str = ""
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    check: typing.Callable | None = None  # check(value, "option NAME") raises ValueError with a message
    renamed_from: tuple[str, ...] = ()
    value_aliases: Mapping = field(default_factory=dict)  # old value -> new value (deprecated)


def did_you_mean(name: str, candidates) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``candidates`` (difflib), else ``""``."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --- types: readable names, text parsing, checks ----------------------------------------------
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               tuple: "a tuple", dict: "a dict"}
_CONTAINERS = (list, tuple, dict)


def split_optional(hint) -> tuple[object, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def is_enum(hint, base=enum.Enum) -> bool:
    hint, _ = split_optional(hint)
    return isinstance(hint, type) and issubclass(hint, base)


def choices_of(hint, spec: OptionSpec):
    hint, _ = split_optional(hint)
    if spec.choices is not None:
        return spec.choices
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(hint)
    return None


def type_text(hint, spec: OptionSpec) -> str:
    """``"int >= 1 or None"``, ``"mc | ef | ggn"``, ``"float > 0"``, ``"any"``..."""
    base, optional = split_optional(hint)
    choices = choices_of(hint, spec)
    if choices:
        text = " | ".join(str(plain(c)) for c in choices)
    elif base is typing.Any:
        text = "any"
    else:
        text = getattr(base, "__name__", str(base))
        bounds = [f"{op} {v:g}" for op, v in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le)) if v is not None]
        text = " ".join([text, ", ".join(bounds)]) if bounds else text
    return f"{text} or None" if optional and base is not typing.Any else text


def coerce(value, hint, spec: OptionSpec, name: str):
    """``value`` checked (and converted: text, enum value, int -> float) for ``hint``; ``ValueError`` naming it."""
    base, optional = split_optional(hint)
    if isinstance(value, OptionText):
        value = _from_text(str(value), base, optional, spec, name)
    if base is typing.Any or (value is None and optional):
        return value
    choices = choices_of(hint, spec)
    if choices is not None:
        same = [c for c in choices if value == c and isinstance(value, bool) == isinstance(c, bool)]
        if not same:
            shown = ", ".join(show(c) for c in choices)
            raise ValueError(f"option {name}={show(value)} is unknown{did_you_mean(plain(value), map(plain, choices))}"
                             f"; use one of {shown}")
        return same[0]
    origin = typing.get_origin(base)  # list[int] -> list (the items are not checked)
    expected = base if isinstance(base, type) else origin if isinstance(origin, type) else None
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(expected, lambda v: expected is None or isinstance(v, expected))
    if not ok(value):
        raise ValueError(f"option {name} must be {_type_phrase(hint, spec)}, got {show(value)}")
    if expected is float:
        value = float(value)
    for op, bound, good in ((">=", spec.ge, lambda v, b: v >= b), (">", spec.gt, lambda v, b: v > b),
                            ("<=", spec.le, lambda v, b: v <= b)):
        if bound is not None and not good(value, bound):
            raise ValueError(f"option {name} must be {_type_phrase(hint, spec)}, got {show(value)}")
    if spec.check is not None:
        spec.check(value, f"option {name}")
    return value


def _type_phrase(hint, spec) -> str:
    base, optional = split_optional(hint)
    words = _TYPE_WORDS.get(typing.get_origin(base) or base, getattr(base, "__name__", str(base)))
    bounds = [f"{op} {v:g}" for op, v in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le)) if v is not None]
    text = " ".join([words, " and ".join(bounds)]) if bounds else words
    return text + ((", or None" if bounds else " or None") if optional else "")


def _from_text(text: str, base, optional: bool, spec: OptionSpec, name: str):
    """A command-line value read by the declared type."""
    t = text.strip()
    if optional and t.lower() in ("none", "null"):
        return None
    if base is typing.Any:  # undeclared type: JSON when it parses (numbers, true, null), else the text
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            return text
    if base is bool:
        words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
        if t.lower() in words:
            return words[t.lower()]
        raise ValueError(f"option {name} must be true or false, got {text!r}")
    if base is int:
        try:
            return int(t)
        except ValueError:
            raise ValueError(f"option {name} must be {_type_phrase(base, spec)}, got {text!r}") from None
    if base is float:
        try:
            return float(t)
        except ValueError:
            raise ValueError(f"option {name} must be {_type_phrase(base, spec)}, got {text!r}") from None
    container = next((c for c in _CONTAINERS if base is c or typing.get_origin(base) is c), None)
    if container is not None:  # a list, tuple or dict: JSON text
        try:
            value = json.loads(t)
        except json.JSONDecodeError:
            raise ValueError(f"option {name} must be {_type_phrase(base, spec)} in JSON, got {text!r}") from None
        return tuple(value) if container is tuple and isinstance(value, list) else value
    choices = choices_of(base, spec)
    if choices:  # the choice whose text is this (numbers and enums too)
        return next((c for c in choices if str(plain(c)) == t), t)
    return t


def plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def show(value) -> str:
    return repr(plain(value))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text, where: str = "option max_memory") -> int:
    """``"40GiB"``, ``"512 MB"``, ``"1e6"`` (bytes) or an int -> bytes; ``ValueError`` naming ``where``. Memory
    budgets (the kfac option ``max_memory``, the dry run) are read here only."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{where}={text!r} is not a memory size: use e.g. '40GiB', '512MiB', '8GB' or a number "
                         "of bytes")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{where}={text!r} must be a positive size")
    return value


def plan_groups(adapters, need, budget: int | None) -> list[list]:
    """Consecutive groups of ``adapters`` whose ``need(adapter)`` bytes sum to at most ``budget`` each (one group
    without a budget): the passes of a ``max_memory`` fit (``backends/kfac_passes.py``) and of its estimate
    (``lalora.estimate_memory``).
    The caller checks first that every single adapter fits (its own error message)."""
    if budget is None:
        return [list(adapters)]
    groups, used = [[]], 0
    for a in adapters:
        n = need(a)
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(a)
        used += n
    return groups
