"""``fitting_mode``: gradient checkpointing is off during a fit and comes back exactly as the user set it,
without deprecation warnings from lalora's code (issue #16, item 7)."""
from __future__ import annotations

import warnings

import pytest

import lalora
from lalora.adapters import base_model_of
from models import randomize_lora_B, tiny_lora_llama, token_batches


def _checkpointing_state(base):
    """Per module: its checkpointing flag and checkpoint function (the partial holding the user's kwargs)."""
    return {name: (m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
            for name, m in base.named_modules() if "gradient_checkpointing" in vars(m)}


def _enable(base, **kwargs):
    """Turn checkpointing on the way the installed transformers wants it (outside the recorded warnings)."""
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs["ckpt_kwargs"], **kwargs.get("extra", {}))
    else:  # transformers 4.x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs["ckpt_kwargs"])


def _fit_recording_warnings(model, backend):
    # pyproject ignores FutureWarning/DeprecationWarning for the whole suite: record them here ourselves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lalora.fit_precision(model, token_batches(), backend=backend, progress=False)
    return [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


class _Probe(lalora.get_backend("diag")):
    """The diag backend, recording the checkpointing flags it sees during the fit."""

    def fit(self, ctx):
        self.seen = {n: flag for n, (flag, _) in _checkpointing_state(base_model_of(ctx.model)).items()}
        return super().fit(ctx)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fit_warns_nothing_deprecated_and_restores_checkpointing(checkpointing):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    base = base_model_of(model)
    if checkpointing:  # non-default kwargs and every other layer: both must survive the fit
        extra = {"every_n_layers": 2} if hasattr(base, "activation_checkpointing_enable") else {}
        _enable(base, ckpt_kwargs={"use_reentrant": True}, extra=extra)
    model.train()
    before = _checkpointing_state(base)
    assert before, "the tiny Llama has modules with a gradient_checkpointing flag"
    assert any(flag for flag, _ in before.values()) == checkpointing
    probe = _Probe()
    bad = _fit_recording_warnings(model, probe)
    assert not bad, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in bad]
    assert not any(probe.seen.values()), probe.seen  # off during the fit
    after = _checkpointing_state(base)
    assert after.keys() == before.keys()
    for name, (flag, func) in before.items():
        assert after[name][0] == flag, name
        assert after[name][1] is func, name  # the very checkpoint function (with the user's kwargs) is kept
    if checkpointing:
        funcs = [f for _, f in after.values() if f is not None]
        assert funcs and all(f.keywords.get("use_reentrant") is True for f in funcs)
        if "every_n_layers" in extra:
            layers = [after[f"model.layers.{i}"][0] for i in range(2)]
            assert layers == [True, False]
    assert model.training  # train mode restored
