"""Coverage: every tensor the user trains is covered by the precision or named in a warning / error,
and a penalty on weights nobody trains is refused.

The reference for "what is trainable" is ``model.named_parameters()`` filtered here by hand
(requires_grad, and the linear LoRA weights picked by their peft names), not the code under test.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainingArguments, default_data_collator

import lalora
from lalora import (BackendError, LaLoRARegularizer, ModelMismatchError, UncoveredParameterError,
                    UncoveredParameterWarning, fit_precision)
from lalora.integrations.trainer import LaLoRATrainer
from models import tiny_llama, tiny_lora_llama, token_batches


def _peft(targets, **cfg):
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=list(targets),
                                                      init_lora_weights="orthogonal", **cfg))


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _linear_lora(names, layer="q_proj"):
    return [n for n in names if f".{layer}.lora_A.default.weight" in n or f".{layer}.lora_B.default.weight" in n]


def _fit(model, backend="diag", **kw):
    return fit_precision(model, token_batches(1), backend, progress=False, **kw)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, UncoveredParameterWarning)]


def test_embedding_lora_is_named():
    """With a backend that does not model LoRA on embeddings (``block``; diag, kfac, tri-kfac do:
    tests/test_embedding_lora.py)."""
    model = _peft(["embed_tokens", "q_proj"])
    trainable = _trainable(model)
    covered = _linear_lora(trainable)
    expected = sorted(set(trainable) - set(covered))
    assert len(trainable) == 6 and len(covered) == 4 and all("lora_embedding" in n for n in expected)
    precision, caught = _record(lambda: _fit(model, "block"))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "2 of 6 trainable tensors" in msg and "LoRA on embedding layers" in msg and "diag, kfac and tri-kfac" in msg
    assert all(repr(n) in msg for n in expected)
    assert "fit_precision(..., uncovered='ignore')" in msg
    assert len(precision.param_names) == 4
    # the regularizer reports them too; "error" refuses, "ignore" is silent
    _, caught = _record(lambda: LaLoRARegularizer(model, precision, 1.0))
    assert len(caught) == 1 and all(repr(n) in str(caught[0].message) for n in expected)
    assert "LaLoRARegularizer(..., uncovered='error')" in str(caught[0].message)
    with pytest.raises(UncoveredParameterError, match="lora_embedding_A"):
        LaLoRARegularizer(model, precision, 1.0, uncovered="error")
    with pytest.raises(UncoveredParameterError, match="lora_embedding_B"):
        _fit(model, "block", uncovered="error")
    for fn in (lambda: _fit(model, "block", uncovered="ignore"), lambda: LaLoRARegularizer(model, precision, 1.0, uncovered="ignore")):
        assert _record(fn)[1] == []
    with pytest.raises(ValueError, match="uncovered='sometimes'"):
        _fit(model, uncovered="sometimes")


def test_modules_to_save_is_named():
    model = _peft(["q_proj"], modules_to_save=["lm_head"])
    trainable = _trainable(model)
    expected = sorted(set(trainable) - set(_linear_lora(trainable)))
    assert expected == ["base_model.model.lm_head.modules_to_save.default.weight"]
    precision, caught = _record(lambda: _fit(model))  # others="diag" (default) covers the copy
    assert caught == [] and "lm_head.modules_to_save.weight" in precision.param_names
    _, caught = _record(lambda: _fit(model, others="none"))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "1 of 5 trainable tensors" in msg and "modules_to_save" in msg and repr(expected[0]) in msg


def test_embedding_only_adapter_gets_a_clear_error():
    """A backend that does not model LoRA on embeddings refuses an embedding-only adapter by name."""
    model = _peft(["embed_tokens"])
    assert [a.embedding for a in lalora.find_lora_adapters(model)] == [True]
    with pytest.raises(BackendError) as info:
        _fit(model, "block")
    msg = str(info.value)
    assert "does not model LoRA on embeddings" in msg and "model.embed_tokens.lora_A" in msg
    assert "'diag', 'kfac' or 'tri-kfac'" in msg and "get_peft_model" not in msg


def test_many_uncovered_tensors_first_ten_and_a_count():
    model = tiny_lora_llama(seed=0, targets=("q_proj",))
    unfrozen = [n for n, _ in model.named_parameters() if "lora_" not in n]  # every base weight, unfrozen by hand
    for n, p in model.named_parameters():
        p.requires_grad_(True)
    assert len(unfrozen) > 10
    _, caught = _record(lambda: _fit(model, others="none"))
    msg = str(caught[0].message)
    assert f"{len(unfrozen)} of {len(unfrozen) + 4} trainable tensors" in msg
    listed = re.findall(r"'([^']+)'", msg.split("not modelled by the backends: ")[1].split(";")[0])
    assert listed == unfrozen[:10] and f"(and {len(unfrozen) - 10} more)" in msg


def test_fit_checks_what_the_user_trains_not_the_fitting_mode():
    """fitting_mode() makes only the LoRA weights trainable while fitting: the check runs before it, so a
    frozen embedding adapter is not reported and an unfrozen base weight is."""
    model = _peft(["embed_tokens", "q_proj"])
    for n, p in model.named_parameters():
        if "lora_embedding" in n:
            p.requires_grad_(False)
    assert _record(lambda: _fit(model))[1] == []
    head = model.base_model.model.lm_head.weight
    head.requires_grad_(True)
    _, caught = _record(lambda: _fit(model, others="none"))
    assert len(caught) == 1 and "'base_model.model.lm_head.weight'" in str(caught[0].message)
    assert head.requires_grad  # restored after the fit


def test_other_adapter_is_named():
    model = tiny_lora_llama(seed=0, adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    model.base_model.set_adapter(["first", "second"])  # both trainable
    _, caught = _record(lambda: _fit(model, adapter_name="first"))
    msg = str(caught[0].message)
    b_names = [n for n in _trainable(model) if n.endswith(".second.weight")]
    assert len(b_names) == 4 and all(repr(n) in msg for n in b_names)
    assert "adapters the precision does not cover" in msg


def test_trainer_uses_its_own_vocabulary(tmp_path):
    model = _peft(["embed_tokens", "q_proj"])
    precision = _fit(model, "block", uncovered="ignore")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", max_steps=1)
    with pytest.raises(UncoveredParameterError) as info:
        LaLoRATrainer(model=model, args=args, data_collator=default_data_collator, precision=precision, strength=1.0,
                      uncovered="error")
    assert "LaLoRATrainer(..., uncovered='ignore')" in str(info.value)
    with pytest.raises(ValueError, match="uncovered="):
        LaLoRATrainer(model=model, args=args, precision=precision, strength=1.0, uncovered="maybe")


# --- a penalty on frozen weights -------------------------------------------------------------------
def test_frozen_adapter_is_refused(tmp_path):
    model = tiny_lora_llama(seed=0)
    precision = _fit(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")  # is_trainable=False by default
    assert _trainable(loaded) == []
    with pytest.raises(ModelMismatchError) as info:
        LaLoRARegularizer(loaded, precision, 1.0)
    msg = str(info.value)
    assert "requires_grad=False" in msg and "is_trainable=True" in msg and "set_adapter" in msg
    trainable = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter", is_trainable=True)
    reg = LaLoRARegularizer(trainable, precision, 1.0)
    assert float(reg().detach()) == 0.0


def test_inactive_adapter_is_refused_and_partly_frozen_is_named():
    model = tiny_lora_llama(seed=0, adapter_name="first")
    precision = _fit(model, adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights="orthogonal"))
    model.set_adapter("second")  # "first" is now inactive and frozen
    with pytest.raises(ModelMismatchError, match="set_adapter"):
        LaLoRARegularizer(model, precision, 1.0, adapter_name="first", uncovered="ignore")
    model.set_adapter("first")
    frozen = "model.layers.1.self_attn.v_proj.lora_B"
    lora_B = lalora.adapters.lora_parameters(lalora.find_lora_adapters(model, "first"))[frozen]
    lora_B.requires_grad_(False)
    with pytest.warns(UserWarning, match=re.escape(f"1 of 8 LoRA weights the precision covers have requires_grad=False "
                                                   f"and do not train: {frozen!r}")):
        LaLoRARegularizer(model, precision, 1.0, adapter_name="first")
