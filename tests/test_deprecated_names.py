"""Names of lalora 0.1 that moved (CHANGELOG.md, "Layout") still work, warn with their new home, and are the
very objects at that home. ``Precision.to_laplace``/``from_laplace``: tests/test_laplace.py."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lalora


def test_compare_plot_module_warns_and_is_comparison_plot():
    from lalora.comparison.plot import plot_result

    sys.modules.pop("lalora.compare_plot", None)  # the warning is given when the module is first imported
    with pytest.warns(lalora.LaloraDeprecationWarning, match="lalora.comparison.plot") as seen:
        import lalora.compare_plot as old
    assert old.plot_result is plot_result
    assert seen[0].filename == __file__  # points at the importing line, not into lalora or importlib
    assert lalora.compare is lalora.comparison.compare  # importing it rebinds nothing


@pytest.mark.parametrize("name", ["text_batches", "completion_batches"])
def test_bench_batch_builders_warn_and_are_textdata(name):
    from lalora import textdata
    from lalora.bench import tasks

    with pytest.warns(lalora.LaloraDeprecationWarning, match=f"lalora.textdata.{name}") as seen:
        old = getattr(tasks, name)
    assert old is getattr(textdata, name) and seen[0].filename == __file__
    with pytest.raises(AttributeError, match="no_such_name"):
        tasks.no_such_name  # noqa: B018 - other names still fail


def test_python_m_lalora_cli_runs_the_command():
    """``python -m lalora.cli`` (the package's ``__main__``) is the ``lalora`` command."""
    proc = subprocess.run([sys.executable, "-m", "lalora.cli", "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lalora {lalora.__version__}", proc.stderr[-2000:]
    importlib.import_module("lalora.cli.__main__")  # importing it (a walk over every module) runs nothing
