"""How the ``lalora`` commands treat the terminal: ``-q`` also silences transformers' and huggingface_hub's
progress bars and info logs; a closed stdout (``lalora inspect --json | head``) ends a command quietly."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack, contextmanager

#: exit status after stdout was closed by the reader: 128 + SIGPIPE, what a shell shows for a Unix tool
#: stopped by a closed pipe (``yes | head``), so ``set -o pipefail`` scripts see the same as with those tools
EXIT_PIPE = 141


@contextmanager
def quiet_libraries(enabled: bool = True):
    """With ``enabled``: transformers' and huggingface_hub's progress bars off, transformers' logs at error
    level and lalora's below warning off, while the block runs; the previous settings are restored after."""
    if not enabled:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(_quiet_hub())  # restored last: transformers' restore switches hub bars too
        stack.enter_context(_quiet_transformers())
        lalora_log = logging.getLogger("lalora")
        level = lalora_log.level
        lalora_log.setLevel(max(logging.WARNING, level))
        stack.callback(lalora_log.setLevel, level)
        yield


@contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


@contextmanager
def _quiet_hub():
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a dependency of transformers
        yield
        return
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            disable_progress_bars()
        else:
            enable_progress_bars()


def stdout_closed() -> int:
    """After a ``BrokenPipeError`` on stdout (the reader went away): point stdout at /dev/null so the
    interpreter's final flush does not fail again (the Python docs' "Note on SIGPIPE"), return ``EXIT_PIPE``."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured, replaced)
        pass
    return EXIT_PIPE


def jemalloc_hint(progress: bool = True) -> None:
    """On CPU without jemalloc, say how to get it (DESIGN.md: LoRA steps are ~20x slower under glibc malloc)."""
    from ..allocator import jemalloc_note

    note = jemalloc_note()
    if note and progress:
        print(note, file=sys.stderr)
