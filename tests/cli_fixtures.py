"""Fixtures of the CLI tests: a tiny Llama + byte-level tokenizer saved to a directory, data files, and
``run`` (``lalora.cli.main`` in-process, returning exit code, stdout, stderr). Nothing is downloaded."""
from __future__ import annotations

import json

import pytest

from lalora.cli import main
from models import byte_tokenizer, tiny_llama

LORA = ["--rank", 2, "--targets", "q_proj,v_proj", "--batch-size", 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    m = tiny_llama(vocab_size=257, max_position_embeddings=128)
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "source.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in
                             ["The cat sat on the mat.", "A stitch in time saves nine.", "Fortune favours the bold.",
                              "All that glitters is not gold.", "Out of sight, out of mind."]) + "\n")
    task = d / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)})
                              for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]) + "\n")
    return src, task


@pytest.fixture(scope="module")
def precision_file(tmp_path_factory, model_dir, data_files):
    """A diag precision fitted by ``lalora fit`` on the tiny model (rank 2, q_proj and v_proj)."""
    out = tmp_path_factory.mktemp("precision") / "p.lalora"
    assert main([str(a) for a in ["fit", "--model", model_dir, "--data", data_files[0], "--out", out, *LORA, "-q"]]) == 0
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
