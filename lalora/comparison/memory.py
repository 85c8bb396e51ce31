"""Peak memory of a code region (``MemoryMeter``): CUDA allocator peak or sampled process RSS."""
from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import threading

import torch


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Peak memory of a code region. ``method`` says how it was measured:

    - ``cuda_max_memory_allocated``: ``torch.cuda.max_memory_allocated`` minus the allocation at entry;
    - ``rss_sampled``: peak resident set size (``/proc/self/statm`` polled every ~1 ms by a thread,
      after ``malloc_trim``) minus the RSS at entry: all memory of the process, torch included;
    - ``ru_maxrss_delta``: growth of ``resource.getrusage().ru_maxrss`` (only sees new process peaks).
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        base = _rss_bytes()
        if base is None:
            self.method = "ru_maxrss_delta"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self.method = "rss_sampled"
        self._base, self._peak, self._stop = base, base, threading.Event()

        def poll():
            while not self._stop.is_set():
                rss = _rss_bytes() or 0
                if rss > self._peak:
                    self._peak = rss
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.method == "rss_sampled":
            self._peak = max(self._peak, _rss_bytes() or 0)
            self._stop.set()
            self._thread.join()
            self.peak_bytes = int(self._peak - self._base)
        else:
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)
        return False
