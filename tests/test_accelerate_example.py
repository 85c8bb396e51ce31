"""examples/accelerate_train.py under ``accelerate launch`` with 2 CPU processes (gloo): it fits the precision
on both ranks' shares of the source data, trains 4 steps with the penalty (accumulation 2) and ends with the
same LoRA weights on both ranks.

A known flake outside lalora is retried, and only that one: on the 2-core CI VM a rank sometimes aborts in the
C++ teardown *after* the example finished ("terminate called without an active exception", exit -6, every line
of the output printed; reproduced on the landed main of 1 Dec, 1 run in 6 when the whole suite is collected, 0 in
17 alone). Such a run is repeated, at most twice; any other failure, or the abort three times, fails the test."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from spawn import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_launch_two_cpu_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    for _ in range(3):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "examples" / "accelerate_train.py"), "--cpu", "--quick"]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or not _teardown_abort(run):
            break
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "processes 2; LoRA weights equal on every rank: max diff 0" in out, out
    penalties = [float(p) for p in re.findall(r"^step +\d+ +task loss [\d.]+ +penalty ([\d.]+)$", out, re.M)]
    assert len(penalties) == 4, out  # printed by the main process only
    assert penalties[0] == 0.0 and all(p > 0 for p in penalties[1:])  # at theta0, then pulled back towards it


def _teardown_abort(run) -> bool:
    """The run did all its work and then a rank aborted in the C++ teardown (see the module docstring)."""
    return ("LoRA weights equal on every rank" in run.stdout and "terminate called without an active exception" in run.stderr
            and "exitcode: -6" in run.stderr)
