"""Whether this process runs under jemalloc: on these CPUs a LoRA training step is ~20x slower under glibc
malloc (DESIGN.md section 5, "Allocator"), so long CPU jobs (``lalora fit``, ``finetune``, ``bench``) say how
to get it."""
from __future__ import annotations

import os

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def jemalloc_note() -> str | None:
    """A warning when the process does not run under jemalloc (CPU training is ~20x slower)."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    hint = f"LD_PRELOAD={JEMALLOC}" if os.path.exists(JEMALLOC) else "apt-get install libjemalloc2, then LD_PRELOAD=" + JEMALLOC
    return f"note: not running under jemalloc; CPU LoRA steps can be ~20x slower with glibc malloc ({hint})"
