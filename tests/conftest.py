"""The test device switch: ``LALORA_TEST_DEVICE=cuda pytest ...`` runs the device tests (the ``device`` fixture)
on CUDA; unset (or ``cpu``) they run on the CPU, as every other test does.

Every test that takes the ``device`` fixture is marked ``cuda`` (``pytest -m cuda`` / ``-k cuda`` selects
them: ``benchmarks/gpu_check.py`` runs them with ``LALORA_TEST_DEVICE=cuda`` on a GPU). Asking for CUDA where
none is available is an error at start-up, never a silent run on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("LALORA_TEST_DEVICE", "cpu").strip().lower() or "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on LALORA_TEST_DEVICE (CUDA on a GPU machine; else the CPU)")
    if DEVICE not in ("cpu", "cuda") and not DEVICE.startswith("cuda:"):
        raise pytest.UsageError(f"LALORA_TEST_DEVICE={DEVICE!r}: use cpu or cuda (cuda:N)")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"LALORA_TEST_DEVICE={DEVICE!r} but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def device() -> torch.device:
    """The device of the device tests: ``LALORA_TEST_DEVICE`` (default cpu)."""
    return torch.device(DEVICE)
