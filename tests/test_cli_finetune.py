"""``lalora finetune --adapter DIR --precision P`` (where training starts: ``--anchor``) and precisions from another
base model (issue #16, items 1 and 3)."""
from __future__ import annotations

import math
import re

import torch
from safetensors.torch import load_file

import lalora
from cli_fixtures import LORA, data_files, model_dir, precision_file, run  # noqa: F401 (fixtures)
from lalora.adapters import canonical_module_path
from models import byte_tokenizer

LR = 1e-6  # one AdamW step moves each weight by at most lr (|m/sqrt(v)| = 1 at step 1, no weight decay)
STEP_BOUND = 2 * LR  # lr plus float32 rounding of weights of size ~1 (ulp 1.2e-7)


def _adapter(path) -> dict[str, torch.Tensor]:
    """A saved adapter's LoRA weights by canonical name (as in a precision's anchor)."""
    return {canonical_module_path(k.removesuffix(".weight")): t.float()
            for k, t in load_file(path / "adapter_model.safetensors").items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _finetune(capsys, model_dir, task, out, *extra, steps=1, lr=LR):
    return run(capsys, "finetune", "--model", model_dir, "--data", task, "--out", out, "--steps", steps, "--lr", lr,
               "--batch-size", 2, "-q", *extra)


def test_finetune_from_an_adapter_keeps_reset_or_checks_it(capsys, tmp_path, model_dir, data_files, precision_file):
    _, task = data_files
    P = lalora.Precision.load(precision_file)
    trained = tmp_path / "trained"  # an adapter trained away from theta0
    code, _, err = _finetune(capsys, model_dir, task, trained, "--precision", precision_file, steps=3, lr=1e-2)
    assert code == 0, err
    theta = _adapter(trained)
    moved = _max_diff(theta, P.anchor)
    assert moved > 100 * STEP_BOUND  # far enough from theta0 that one tiny step cannot bridge it

    # default with --adapter: continue from the adapter, the penalty still centred at theta0, said clearly
    code, _, err = _finetune(capsys, model_dir, task, tmp_path / "keep", "--precision", precision_file, "--adapter", trained)
    assert code == 0, err
    assert f"continuing from adapter {trained}" in err and "penalty pulls towards the precision's anchor theta0" in err
    assert P.metadata["created"] in err and "--anchor reset" in err
    printed = float(re.search(r"at distance ([0-9.e+-]+) from theta0", err).group(1))
    dist = math.sqrt(sum(float((theta[n] - a).double().square().sum()) for n, a in P.anchor.items()))
    assert abs(printed - dist) <= 1e-3 * dist  # printed with 4 significant digits
    assert _max_diff(_adapter(tmp_path / "keep"), theta) <= STEP_BOUND  # started from the adapter

    # --anchor reset: start from theta0 and say that the loaded weights were replaced
    code, _, err = _finetune(capsys, model_dir, task, tmp_path / "reset", "--precision", precision_file, "--adapter",
                             trained, "--anchor", "reset")
    assert code == 0, err
    assert "starting from the precision's anchor theta0" in err and f"not from the weights of adapter {trained}" in err
    assert _max_diff(_adapter(tmp_path / "reset"), P.anchor) <= STEP_BOUND

    # --anchor check refuses an adapter away from theta0, naming both other modes; nothing is written
    code, _, err = _finetune(capsys, model_dir, task, tmp_path / "check", "--precision", precision_file, "--adapter",
                             trained, "--anchor", "check")
    assert code == 2 and "--anchor check" in err and "--anchor keep" in err and "--anchor reset" in err
    assert not (tmp_path / "check").exists()


def test_adapter_at_the_anchor_continues_without_a_word(capsys, tmp_path, model_dir, data_files, precision_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, task = data_files
    P = lalora.Precision.load(precision_file)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    lalora.LaLoRARegularizer(model, P, 1.0, check_anchor=False).reset_to_anchor()
    at_anchor = tmp_path / "at_anchor"
    model.save_pretrained(at_anchor)
    assert _max_diff(_adapter(at_anchor), P.anchor) == 0  # a pure copy of theta0
    for mode in ("check", "keep"):
        code, _, err = _finetune(capsys, model_dir, task, tmp_path / mode, "--precision", precision_file, "--adapter",
                                 at_anchor, "--anchor", mode)
        assert code == 0, err
        assert "theta0" not in err  # nothing to say: the start is the anchor


def test_anchor_flags_need_a_precision(capsys, tmp_path, model_dir, data_files):
    _, task = data_files
    for extra in (["--anchor", "keep"], ["--non-strict"], ["--prior-precision", 1]):
        code, _, err = _finetune(capsys, model_dir, task, tmp_path / "a", *extra)
        assert code == 2 and f"{extra[0]} needs --precision" in err


def _save(model, path):
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_precision_from_another_base_model_is_named_as_such(capsys, tmp_path, model_dir, data_files, precision_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from models import tiny_llama

    src, task = data_files
    P = lalora.Precision.load(precision_file)
    gpt2 = _save(GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=128, n_embd=16, n_layer=2, n_head=2,
                                            bos_token_id=256, eos_token_id=256)), tmp_path / "gpt2")
    first = P.param_names[0]
    for argv in (["finetune", "--model", gpt2, "--data", task, "--precision", precision_file, "--out", tmp_path / "o",
                  "-q", "--steps", 1],
                 ["compare", precision_file, "--reference", "ef", "--model", gpt2, "--data", src, "-q"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert "fitted on another base model" in err and "--targets" not in err and "not found" not in err
        assert repr(P.metadata["base_model"]) in err and repr(str(gpt2)) in err
        assert P.metadata["config_hash"] in err
        assert f"parameter {first!r} has no layer {first.removesuffix('.lora_A')!r}" in err

    # the same architecture at another size: the config hashes say it, no layer is missing
    wider = _save(tiny_llama(vocab_size=257, max_position_embeddings=128, hidden_size=24), tmp_path / "wider")
    code, _, err = run(capsys, "finetune", "--model", wider, "--data", task, "--precision", precision_file, "--out",
                       tmp_path / "o", "-q", "--steps", 1)
    assert code == 2 and "fitted on another base model" in err and P.metadata["config_hash"] in err
    assert "has no layer" not in err
