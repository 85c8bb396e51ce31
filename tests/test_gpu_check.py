"""benchmarks/gpu_check.py in its CPU dry mode: every step of the GPU check runs (on a tiny config), so
the script that is run once on a lent GPU does not rot between such runs. Timings are printed, not asserted."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def test_gpu_check_dry_mode_runs_every_step(tmp_path):
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--cpu", "--skip-tests", "--out", str(tmp_path)])
    for step in ("3. fit / forward+backward", "4. regularizer / training step", "5a. curvlinops KFAC"):
        assert "error" not in results[step], (step, results[step])
    assert results["3. fit / forward+backward"]["kfac mc stored MiB"] > 0
    assert (tmp_path / "gpu_check.json").is_file()
