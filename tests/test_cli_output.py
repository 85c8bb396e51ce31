"""What a terminal shows: ``-q`` silences the libraries' bars and logs (issue #16, item 6), a closed stdout
ends a command quietly (item 5), no deprecation warning on every fit (item 7), lalora's warnings read
``lalora CMD: warning: ...`` once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli_fixtures import LORA, data_files, model_dir, precision_file, run  # noqa: F401 (fixtures)
from lalora.cli.output import EXIT_PIPE


def _lalora(*argv, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning once, as Python does for scripts
    env.pop("LALORA_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "lalora.cli", *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_quiet_silences_transformers_bars_and_logs(capsys, tmp_path, model_dir, data_files):
    src, _ = data_files
    argv = ["fit", "--model", model_dir, "--data", src, "--out", tmp_path / "p.lalora", *LORA]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "Loading weights" in err  # transformers' bar: the test can fail
    code, _, err = run(capsys, *argv, "-q")
    assert code == 0 and err == "", err
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled() and not are_progress_bars_disabled()  # restored after the command


def test_fit_on_a_terminal(tmp_path, model_dir, data_files):
    """A real process: -q leaves only lalora's own warning (once, in CLI words); no FutureWarning from
    transformers' deprecated checkpointing API (read by peft and formerly by lalora), no bars."""
    src, _ = data_files
    p = _lalora("fit", "--model", model_dir, "--data", src, "--out", tmp_path / "p.lalora", *LORA, "-q", "--init", "gaussian")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "Warning" not in err and "Loading weights" not in err and "%|" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lalora fit: warning: 4 of 8 LoRA matrices have exactly zero curvature")
    assert "--init orthogonal" in lines[0]


@pytest.mark.parametrize("argv,code", [(["backends", "--json"], EXIT_PIPE), (["inspect", "PRECISION", "--json"], EXIT_PIPE),
                                       (["inspect", "PRECISION"], EXIT_PIPE), (["fit", "--help"], 0)])
def test_closed_stdout_ends_quietly(argv, code, precision_file):
    """``lalora ... | head``: the reader is gone before the first write; the command stops without a traceback
    and with 141 (128 + SIGPIPE), as Unix tools stopped by a closed pipe do (``--help``: argparse's own 0)."""
    p = _lalora(*[precision_file if a == "PRECISION" else a for a in argv])
    p.stdout.close()  # before the interpreter has even started: every write to stdout fails
    err = p.stderr.read()
    assert p.wait(timeout=300) == code, err
    assert err == "", err
