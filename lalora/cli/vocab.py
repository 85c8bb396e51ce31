"""lalora's messages in a command-line user's words: Python argument names become CLI flags.

The library's errors and warnings name Python arguments (``strict=False``, ``skip_nonfinite=True``,
``fisher_type='mc'``), which is right for Python callers. The CLI passes every library message it
shows through ``to_cli``: errors where it catches them, lalora's warnings and its log records while a
command runs (``speaking``). The library's own messages stay as they are.
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

# whole sentences whose grammar changes (matched first). Every pattern of these tables matches a message of the
# library (tests/test_cli_messages.py): a row no message matches is removed, not kept "just in case".
_PHRASES = [
    # lalora.validation.match_to_model, several adapters
    (r"choose one with adapter_name=\.\.\.",
     "the command line wraps the model with a single adapter: use a precision fitted on one adapter"),
    # lalora.fit (zero curvature)
    (r"LoraConfig\(init_lora_weights='orthogonal'\) \(even rank;", lambda v: f"{v.flag('--init orthogonal')} (even --rank;"),
    (r"the effective-weight form of a Kronecker precision",
     lambda v: f"{v.flag('--form effective-weight')} with a kfac or tri-kfac precision"),
    (r"^strength must", "--strength must"),  # LaLoRARegularizer
]
# ``name=value`` -> ``FLAG value``
_VALUE_FLAGS = {"reference": "--reference", "max_reference_params": "--max-reference-params", "init_lora_weights": "--init",
                "form": "--form", "strength": "--strength", "prior_precision": "--prior-precision",
                "others": "--others"}
# ``name=value`` -> a switch
_SWITCHES = {("strict", "False"): "--non-strict", ("skip_nonfinite", "True"): "--skip-nonfinite",
             ("check_anchor", "False"): "--anchor keep"}
# names used without a value ("a prior_precision > 0", "strength must be ...")
_BARE = {"prior_precision": "--prior-precision", "max_batches": "--max-batches", "skip_nonfinite": "--skip-nonfinite",
         "max_reference_params": "--max-reference-params"}
_VALUE = r"""('[^']*'|"[^"]*"|[^\s,;:)\]]+)"""
# not inside a word, a flag or a CLI-style "backend:key=value"; not what follows "--option "
_START = r"(?<![\w:='\"./-])(?<!--option )"


class Vocabulary:
    """The translation for one command: its flags (from the parser) and its backends' option names."""

    def __init__(self, command: str | None = None, flags: dict[str, set[str]] | None = None,
                 backends: list[str] = (), option_form: str = "key", non_strict: bool = False):
        self.command, self.flags = command, flags or {}
        self.option_form, self.non_strict = option_form, non_strict
        self.logged: set[str] = set()  # warnings already shown as a log record (lalora logs and warns some)
        self.options: dict[str, list[str]] = {}  # option name -> backends having it
        for name in backends:
            for key in _backend_options(name):
                self.options.setdefault(key, []).append(name)

    def flag(self, flag: str) -> str:
        """``flag``, or where this command lacks it, the command that has it."""
        head = flag.split()[0]
        mine = self.flags.get(self.command)
        if mine is None or head in mine:
            return flag
        other = next((c for c, fl in sorted(self.flags.items()) if head in fl), None)
        return f"{flag} (of `lalora {other}`)" if other else flag

    def option(self, key: str, value: str, backend: str | None = None) -> str:
        value = {"None": "null", "True": "true", "False": "false"}.get(value, value.strip("'\""))
        if self.option_form == "backend:key":
            owners = self.options.get(key, [])
            backend = backend or (owners[0] if len(owners) == 1 else "BACKEND")
            return f"--option {backend}:{key}={value}"
        return f"--option {key}={value}"

    def option_name(self, key: str, backend: str | None = None) -> str:
        if self.option_form == "backend:key":
            owners = self.options.get(key, [])
            return f"--option {backend or (owners[0] if len(owners) == 1 else 'BACKEND')}:{key}"
        return f"--option {key}"

    def translate(self, message: str, backend: str | None = None) -> str:
        msg = str(message)
        if self.non_strict:  # the user already passed --non-strict: it cannot drop what is left
            msg = msg.replace("; pass strict=False to keep what matches",
                              "; --non-strict cannot drop this mismatch (it only leaves out LoRA matrices that do "
                              "not match)")
        for pattern, repl in _PHRASES:
            msg = re.sub(pattern, (lambda m, r=repl: r(self)) if callable(repl) else repl, msg)

        def value_arg(m):
            key, value = m.group(1), m.group(2)
            if (key, value) in _SWITCHES:
                return self.flag(_SWITCHES[key, value])
            if key in self.options and (key not in _VALUE_FLAGS or self.command in ("fit", "compare")):
                return self.option(key, value, backend)
            if key in _VALUE_FLAGS:
                v = value.strip("'\"")
                return self.flag(f"{_VALUE_FLAGS[key]} {v.lower() if v == 'None' else v}")
            return m.group(0)

        names = sorted(set(self.options) | set(_VALUE_FLAGS) | {k for k, _ in _SWITCHES}, key=len, reverse=True)
        msg = re.sub(rf"{_START}(?:\boption )?\b({'|'.join(map(re.escape, names))})={_VALUE}", value_arg, msg)
        msg = re.sub(rf"{_START}\b({'|'.join(map(re.escape, _BARE))})\b(?!=)",
                     lambda m: self.flag(_BARE[m.group(1)]), msg)
        if self.options:  # "option max_rank must be", "raise mc_samples" -> "--option max_rank must be", ...
            keys = "|".join(map(re.escape, sorted(self.options, key=len, reverse=True)))
            # a bare name is an option when it says so ("option seed") or is an identifier ("mc_samples")
            msg = re.sub(rf"{_START}(option )?\b({keys})\b(?![=\w'])",
                         lambda m: self.option_name(m.group(2), backend) if m.group(1) or "_" in m.group(2) else m.group(0),
                         msg)
        return msg


def _backend_options(name: str) -> list[str]:
    from ..backend import get_backend
    from ..errors import BackendError

    try:
        return list(get_backend(name).Options.accepted_names())  # deprecated names too: their warnings are CLI words
    except BackendError:
        return []


_current = Vocabulary()


def to_cli(message, backend: str | None = None) -> str:
    """``message`` (a string or an exception) in the words of the command that is running."""
    return _current.translate(str(message), backend)


class _Translate(logging.Filter):
    """lalora's log records in CLI words; a warning ``lalora: ...`` reads ``lalora CMD: warning: ...``."""

    def filter(self, record):
        msg = to_cli(record.getMessage())
        if record.levelno >= logging.WARNING and msg.startswith("lalora: "):
            _current.logged.add(msg.removeprefix("lalora: "))
            msg = f"lalora {_current.command}: warning: {msg.removeprefix('lalora: ')}"
        record.msg, record.args = msg, None
        return True


def _from_lalora(category, message) -> bool:
    return category.__module__.startswith("lalora") or str(message).startswith("lalora")


@contextmanager
def speaking(vocabulary: Vocabulary):
    """While a command runs: ``to_cli`` uses ``vocabulary``; lalora's warnings (shown as ``lalora CMD: warning:
    ...`` instead of Python's file:line form) and log records are translated."""
    global _current
    previous, _current = _current, vocabulary
    show, fmt = warnings.showwarning, warnings.formatwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _from_lalora(category, message):
            message = to_cli(message)
        show(message, category, filename, lineno, file, line)

    def formatwarning(message, category, filename, lineno, line=None):
        if _from_lalora(category, message):
            text = str(message).removeprefix("lalora: ")
            if text in vocabulary.logged:  # shown a moment ago as a log record
                return ""
            return f"lalora {vocabulary.command}: warning: {text}\n"
        return fmt(message, category, filename, lineno, line)

    log_filter = _Translate()
    logger = logging.getLogger("lalora")
    warnings.showwarning, warnings.formatwarning = showwarning, formatwarning
    logger.addFilter(log_filter)
    try:
        yield vocabulary
    finally:
        logger.removeFilter(log_filter)
        warnings.showwarning, warnings.formatwarning = show, fmt
        _current = previous
