"""Exceptions raised by lalora. Every error names the parameter, file or field at fault."""


class LaloraError(Exception):
    """Base class of all lalora errors."""


class PrecisionFileError(LaloraError, ValueError):
    """A precision file is missing, truncated, corrupted, foreign or from a newer format."""


class ModelMismatchError(LaloraError, ValueError):
    """A precision does not fit the model it is applied to (names, shapes, base model)."""


class BackendError(LaloraError, ValueError):
    """Unknown backend, bad backend option, or a backend that cannot handle the model."""


class DataError(LaloraError, ValueError):
    """Source data that cannot be used (empty, all labels masked, wrong format)."""


class AnchorMismatchError(LaloraError, ValueError):
    """The model's LoRA weights are not at the precision's anchor theta0."""


class UncoveredParameterError(LaloraError, ValueError):
    """Some trainable tensors are not covered by the precision (``uncovered="error"``)."""


class UncoveredParameterWarning(UserWarning):
    """Some trainable tensors are not covered by the precision and train without the penalty
    (``uncovered="warn"``, the default; see docs/concepts.md#coverage)."""


def caller_option(caller: str, name: str, value) -> str:
    """How the caller spells option ``name=value``: ``--name value`` for a CLI command (``caller``
    starting with ``"lalora "``), else ``Caller(..., name=value)``."""
    if caller.startswith("lalora "):
        return f"{caller} --{name.replace('_', '-')} {value}"
    return f"{caller}(..., {name}={value!r})"


class LaloraDeprecationWarning(FutureWarning):
    """A name or form that still works but goes away in the next release (CHANGELOG.md says what replaces it).
    A ``FutureWarning``: Python shows it by default, to users rather than only to developers."""


def warn_deprecated(message: str) -> None:
    """Warn with ``LaloraDeprecationWarning``, pointing at the first caller outside lalora (the user's line)."""
    import os
    import sys
    import warnings

    here = os.path.dirname(os.path.abspath(__file__))
    backends = os.path.join(os.path.dirname(here), "backends")
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((here + os.sep, backends + os.sep)):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, LaloraDeprecationWarning, stacklevel=level)
