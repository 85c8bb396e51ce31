"""``benchmarks/coverage_check.py`` (the check from outside the test suite) passes, and fails when a tensor is
left neither covered nor reported."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage_check.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_coverage_check_passes():
    out = _run("--backends", "diag,kfac")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every trainable tensor is covered" in out.stdout
    assert "dora                         kfac      refused: " in out.stdout


def test_coverage_check_detects_an_unreported_tensor(monkeypatch):
    """The same check on a fit that drops the others without a warning (uncovered='ignore' forced) must fail."""
    import warnings

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import coverage_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import lalora

    real = lalora.fit_precision
    monkeypatch.setattr(lalora, "fit_precision", lambda *a, **kw: real(*a, **kw, others="none", uncovered="ignore"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status, missing = coverage_check.check("modules_to_save", "diag")
    assert missing == ["base_model.model.lm_head.modules_to_save.default.weight"]
