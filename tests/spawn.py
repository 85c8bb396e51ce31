"""Multi-process tests on CPU (gloo): a free TCP port for the rendezvous and ``run_ranks``, which spawns
``world`` processes calling ``worker(rank, port, out_dir)`` and waits for all of them (an exception in a rank
fails the test). Each worker sets the environment its launcher would (``MASTER_PORT=port``, ``RANK``, ...)."""
from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, out_dir, world: int) -> None:
    """``worker(rank, port, str(out_dir))`` in ``world`` spawned processes, joined."""
    mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True, start_method="spawn")
