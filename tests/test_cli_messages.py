"""The CLI speaks in flags (issue #16, item 2) and every example of its ``--help`` texts is valid (item 4)."""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import warnings

import pytest
import torch

import lalora
from cli_fixtures import LORA, data_files, model_dir, precision_file, run  # noqa: F401 (fixtures)
from lalora.cli import vocab as cli_vocab
from lalora.cli import build_parser
from lalora.validation import match_to_model
from models import byte_tokenizer, tiny_llama

# Python arguments of the library that must never reach a CLI user as such
PYTHON_ARGS = re.compile(r"(?<![\w:-])(?<!--option )\b(strict|skip_nonfinite|prior_precision|check_anchor|fisher_type|curvature|mc_samples|max_rank|"
                         r"init_lora_weights|max_batches|adapter_name|form|reference|max_reference_params)=|"
                         r"reset_to_anchor\(|LoraConfig\(|\bprior_precision\b|\bskip_nonfinite\b")


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _all_flags() -> set[str]:
    return {s for p in _subparsers(build_parser()).values() for a in p._actions for s in a.option_strings}


def test_every_flag_the_vocabulary_names_exists():
    named = set(cli_vocab._VALUE_FLAGS.values()) | set(cli_vocab._SWITCHES.values()) | set(cli_vocab._BARE.values())
    missing = {f for f in named if f.split()[0] not in _all_flags()}
    assert not missing


def _library_texts() -> list[str]:
    """Every string literal of the library (lalora/ without its CLI, backends/), an f-string with ``{}`` for
    each replacement field: the text its messages are made of."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = []
    for path in sorted([*(root / "lalora").rglob("*.py"), *(root / "backends").rglob("*.py")]):
        if (root / "lalora" / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    return out


def test_every_translation_row_matches_a_library_message():
    """No dead rows: each pattern of the translation tables matches some text of the library's messages (a
    row for a message that was reworded or removed would otherwise linger, translating nothing)."""
    texts = _library_texts()
    assert any("choose one with adapter_name=..." in t for t in texts)  # the scan sees concatenated literals

    def used(pattern):
        return any(re.search(pattern, t) for t in texts)

    dead = [p for p, _ in cli_vocab._PHRASES if not used(p)]
    dead += [f"{k}=" for k in cli_vocab._VALUE_FLAGS if not used(rf"\b{k}=")]
    dead += [f"{k}={v}" for k, v in cli_vocab._SWITCHES if not used(rf"\b{k}={v}\b")]
    dead += [k for k in cli_vocab._BARE if not used(rf"\b{k}\b(?!=)")]
    assert not dead, f"rows of lalora/cli/vocab.py that no library message matches: {dead}"


def test_library_messages_in_cli_words(capsys, tmp_path, model_dir, data_files, precision_file):
    src, task = data_files
    tune = ["finetune", "--model", model_dir, "--data", task, "--out", tmp_path / "a", "--steps", 1, "--batch-size", 2, "-q"]
    fit = ["fit", "--model", model_dir, "--data", src, "--out", tmp_path / "p.lalora", *LORA, "-q"]
    cases = [  # (argv, exit code, what the message must say)
        # lalora.validation: "pass strict=False to keep what matches"
        ([*tune, "--precision", precision_file, "--targets", "q_proj"], 2, "pass --non-strict to keep what matches"),
        # LaLoRARegularizer: form='effective-weight' needs Kronecker blocks
        ([*tune, "--precision", precision_file, "--form", "effective-weight"], 2, "--form effective-weight needs"),
        # kfac: "Use curvature='mc' ... raise mc_samples"
        ([*fit, "--backend", "kfac", "--option", "curvature=ggn"], 2, "Use --option curvature=mc"),
        ([*fit, "--backend", "kfac", "--option", "max_rank=0"], 2, "--option max_rank must be"),
    ]
    for argv, code, want in cases:
        got, out, err = run(capsys, *argv)
        assert got == code, err
        assert want in err, err
        assert not PYTHON_ARGS.search(err), err
    # compare: a backend's failure is a row of the table (and of --out), with BACKEND:KEY=VALUE options
    code, out, err = run(capsys, "compare", "--model", model_dir, "--data", src, "--backends", "diag", "kfac",
                         "--option", "kfac:curvature=ggn", "--reference", "none", "--out", tmp_path / "c.json", *LORA, "-q")
    assert code == 0, err
    assert "Use --option kfac:curvature=mc" in out and "raise --option kfac:mc_samples" in out
    row = next(r for r in json.loads((tmp_path / "c.json").read_text())["rows"] if r["name"] == "kfac")
    assert "--option kfac:curvature=mc" in row["error"] and not PYTHON_ARGS.search(out + row["error"])
    # warnings (how they look on a terminal: tests/test_cli_output.py): zero curvature at peft's default init (B = 0)
    with pytest.warns(lalora.ZeroCurvatureWarning) as caught:
        assert run(capsys, *fit, "--init", "gaussian")[0] == 0
    msg = str(caught[0].message)
    assert "--init orthogonal" in msg and "--prior-precision > 0" in msg and "(of `lalora finetune`)" in msg
    assert not PYTHON_ARGS.search(msg), msg
    # --non-strict: the partial application is a warning in CLI words
    with pytest.warns(UserWarning, match="precision applied partially") as caught:
        code, _, err = run(capsys, *tune, "--precision", precision_file, "--targets", "q_proj", "--non-strict")
    assert code == 0, err
    assert not any(PYTHON_ARGS.search(str(w.message)) for w in caught)
    # a mismatch --non-strict cannot drop (another vocabulary size) is not sent back to --non-strict
    vocab = cli_vocab.Vocabulary("finetune", non_strict=True)
    text = vocab.translate("precision does not match the model: the model embeds 300 tokens, the precision was fitted "
                           "with 257 (another tokenizer or resized embeddings); pass strict=False to keep what matches")
    assert "--non-strict cannot drop this mismatch" in text and not PYTHON_ARGS.search(text)


def _poisoned_model(path):
    m = tiny_llama(vocab_size=257, max_position_embeddings=128)
    with torch.no_grad():
        m.lm_head.weight[0].fill_(float("nan"))
    m.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_nonfinite_batches_name_the_cli_flag(capsys, caplog, tmp_path, data_files):
    src, _ = data_files
    bad = _poisoned_model(tmp_path / "nan_model")
    argv = ["fit", "--model", bad, "--data", src, "--out", tmp_path / "p.lalora", *LORA, "-q"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "source batch 0 gives a non-finite loss" in err and "--skip-nonfinite" in err, err
    assert not PYTHON_ARGS.search(err), err
    code, _, err = run(capsys, *argv, "--skip-nonfinite")  # every batch is skipped: nothing left to fit
    assert code == 2 and "every source batch with a labelled token was skipped" in err, err
    # lalora's log records (on stderr through logging's last-resort handler; here pytest captures them)
    logged = [r.getMessage() for r in caplog.records if r.name == "lalora"]
    assert "lalora fit: warning: skipped source batch 0 (non-finite loss)" in logged, logged


def test_python_messages_and_hooks_untouched_after_the_cli(capsys, tmp_path, model_dir, data_files, precision_file):
    """The translation is the CLI's: after a command, the library speaks Python again."""
    src, _ = data_files
    show, fmt, filters = warnings.showwarning, warnings.formatwarning, list(logging.getLogger("lalora").filters)
    assert run(capsys, "fit", "--model", model_dir, "--data", src, "--out", tmp_path / "p.lalora", *LORA, "-q")[0] == 0
    assert (warnings.showwarning, warnings.formatwarning) == (show, fmt)
    assert logging.getLogger("lalora").filters == filters
    from models import tiny_lora_llama

    # another vocabulary: a model-level mismatch, for which the Python message names strict=False as what cannot help
    with pytest.raises(lalora.ModelMismatchError, match="strict=False cannot") as e:
        match_to_model(lalora.Precision.load(precision_file), tiny_lora_llama())
    assert "--non-strict" not in str(e.value)


def help_examples() -> list[tuple[str, str]]:
    """(help text's command, example command line) of every ``examples:`` block in ``lalora [CMD] --help``."""
    parser = build_parser()
    texts = [("lalora", parser.format_help())] + [(n, p.format_help()) for n, p in _subparsers(parser).items()]
    found = []
    for name, text in texts:
        block = text.split("examples:\n", 1)[1].split("\n\n", 1)[0]
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                found.append((name, line.strip()))
    return found


@pytest.mark.parametrize("where,example", help_examples())
def test_help_examples_parse_and_pass_the_flag_checks(where, example):
    """Each example parses, and its flags (backend names and options included) pass the checks every command runs
    before loading anything (files like ./base need not exist for that)."""
    words = shlex.split(example, comments=True)
    assert words[0] == "lalora", example
    args = build_parser().parse_args(words[1:])
    if args.check is not None:
        args.check(args)


def test_help_examples_cover_every_command():
    examples = help_examples()
    commands = {shlex.split(e, comments=True)[1] for _, e in examples}
    assert commands == set(_subparsers(build_parser())), commands
    assert len(examples) >= 20
    assert any("--option" in e for _, e in examples if e.startswith("lalora fit"))


def test_uncovered_flag_and_strict_hint_only_where_it_helps(tmp_path):
    """``--uncovered`` reaches fit_precision / the regularizer in CLI words; a precision of another base model is
    not sent to strict=False (which cannot make it fit)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from models import tiny_llama, tiny_lora_llama, token_batches

    ap = build_parser()
    for cmd in (["fit", "--model", "m", "--data", "d", "--out", "o"],
                ["finetune", "--model", "m", "--data", "d", "--out", "o"]):
        assert ap.parse_args(cmd).uncovered == "warn"
        assert ap.parse_args(cmd + ["--uncovered", "error"]).uncovered == "error"
    # the message spells the CLI flag when the caller is a command
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                            init_lora_weights="orthogonal"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lalora.fit_precision(model, token_batches(1), "diag", progress=False, others="none", _caller="lalora fit")
    texts = [str(w.message) for w in rec if isinstance(w.message, lalora.UncoveredParameterWarning)]
    assert texts and "lalora fit --uncovered ignore" in texts[0] and "lm_head" in texts[0]
    assert "lalora fit --others diag" in texts[0]
    # another base model: the hint is to refit, not strict=False
    P = lalora.fit_precision(tiny_lora_llama(), token_batches(1), "diag", progress=False)
    P.metadata["config_hash"] = "0" * 16  # as recorded by a fit on another base model
    with pytest.raises(lalora.ModelMismatchError, match="refit the precision on this model") as e:
        match_to_model(P, tiny_lora_llama(), strict=True)
    assert "pass strict=False" not in str(e.value)
    # a parameter-level mismatch (another target set) is what strict=False can drop: suggested
    with pytest.raises(lalora.ModelMismatchError, match="pass strict=False to keep what matches"):
        match_to_model(lalora.fit_precision(tiny_lora_llama(), token_batches(1), "diag", progress=False),
                       tiny_lora_llama(targets=("q_proj", "v_proj", "o_proj")), strict=True)
