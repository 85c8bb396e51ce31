"""Typed backend options: declarations, validation, "did you mean", text from the command line read by
the declared type, plugins declaring options, options as keyword arguments (deprecated: they warn and
give the same fit), and the explicit collectives of ``FitContext``. The curvature vocabulary and the
other renamed options: tests/test_vocabulary.py."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import pytest
import torch

import lalora
from lalora import Curvature, LaloraDeprecationWarning
from lalora.backends.block import BlockOptions
from lalora.backends.kfac import KFACOptions
from lalora.options import OptionText, parse_option_items
from numerics import assert_same_precision
from models import fit_quiet, randomize_lora_B, tiny_lora_llama, token_batches


@pytest.fixture(scope="module")
def llama():
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    randomize_lora_B(model)
    return model


# --- declarations and validation ------------------------------------------------------------------
def test_options_are_typed_and_checked():
    o = KFACOptions(curvature="ef", mc_samples=3, max_rank=None)
    assert o.curvature is Curvature.EF and o["mc_samples"] == 3 and dict(o)["max_rank"] is None
    assert o.to_dict() == {"curvature": "ef", "mc_samples": 3, "kfac_approx": "expand", "seed": 0, "max_rank": None,
                           "sum_dtype": "float64", "max_memory": None, "shard_factors": False}
    assert replace(o, mc_samples=4).mc_samples == 4
    assert BlockOptions(memory_budget_mb=64).memory_budget_mb == 64.0  # an int is a number
    for bad, word in [({"mc_samples": 0}, "mc_samples must be an integer >= 1, got 0"),
                      ({"mc_samples": True}, "mc_samples must be an integer"),
                      ({"seed": 1.5}, "seed must be an integer"), ({"max_rank": "8"}, "max_rank"),
                      ({"sum_dtype": "float16"}, "sum_dtype='float16' is unknown"),
                      ({"curvature": "gnn"}, "did you mean 'ggn'")]:
        with pytest.raises(lalora.BackendError, match=word):
            KFACOptions(**bad)
    with pytest.raises(lalora.BackendError, match="storage='factored' exists for curvature='ef' only"):
        lalora.get_backend("block")(storage="factored", curvature="ggn")
    with pytest.raises(lalora.BackendError, match="backend 'block' takes BlockOptions, got KFACOptions"):
        lalora.get_backend("block")(KFACOptions())
    with pytest.raises(TypeError, match="keyword arguments only"):
        KFACOptions("mc")


def test_did_you_mean():
    with pytest.raises(lalora.BackendError, match=r"no option 'mc_sample' \(did you mean 'mc_samples'\?\)"):
        lalora.get_backend("kfac")({"mc_sample": 2})
    model, data = tiny_lora_llama(), token_batches(1)
    with pytest.raises(lalora.BackendError, match=r"no option 'max_batch' \(did you mean fit_precision's argument "
                                                   r"'max_batches'\?\)"):
        lalora.fit_precision(model, data, "diag", progress=False, max_batch=3)
    with pytest.raises(lalora.BackendError, match=r"no option 'fisher_typ' \(did you mean 'fisher_type'\?\)"):
        lalora.fit_precision(model, data, "kfac", progress=False, options={"fisher_typ": "mc"})
    with pytest.raises(lalora.BackendError, match="pass backend options in options= only"):
        lalora.fit_precision(model, data, "kfac", progress=False, options={}, mc_samples=2)


# --- the command line: typed parsing, listing ---------------------------------------------------------
def test_option_text_is_read_by_the_declared_type():
    parsed = parse_option_items(["curvature=ef", "mc_samples=2", "max_rank=none", "seed= 7", "sum_dtype=float32"])
    assert all(isinstance(v, OptionText) for v in parsed.values())
    o = lalora.get_backend("kfac")(parsed).options
    assert (o.curvature, o.mc_samples, o.max_rank, o.seed, o.sum_dtype) == (Curvature.EF, 2, None, 7, "float32")
    assert lalora.get_backend("kfac")(parse_option_items(["max_rank=12"])).options.max_rank == 12
    assert lalora.get_backend("block")(parse_option_items(["memory_budget_mb=1e2"])).options.memory_budget_mb == 100.0
    with pytest.raises(lalora.BackendError, match="mc_samples must be an integer >= 1, got 'two'"):
        lalora.get_backend("kfac")(parse_option_items(["mc_samples=two"]))
    with pytest.raises(ValueError, match="use key=value"):
        parse_option_items(["mc_samples"])

    @dataclass(frozen=True)
    class TextOptions(lalora.BackendOptions):
        tag: str = lalora.option("a", "a label")
        flag: bool = lalora.option(False, "a switch")
        ratio: float | None = lalora.option(None, "a ratio", ge=0, le=1)

    o = TextOptions(**parse_option_items(["tag=123", "flag=yes", "ratio=0.25"]))
    assert (o.tag, o.flag, o.ratio) == ("123", True, 0.25)  # JSON would have made "123" a number
    assert TextOptions(**parse_option_items(["flag=False", "ratio=null"])).to_dict() == {"tag": "a", "flag": False,
                                                                                       "ratio": None}
    with pytest.raises(lalora.BackendError, match="flag must be true or false, got 'maybe'"):
        TextOptions(**parse_option_items(["flag=maybe"]))
    with pytest.raises(lalora.BackendError, match="ratio must be a number >= 0 and <= 1, or None, got 2.0"):
        TextOptions(ratio=2)

    @dataclass(frozen=True)
    class ListOptions(lalora.BackendOptions):
        layers: list[int] = lalora.option([0, 1], "which layers")

    assert ListOptions(**parse_option_items(["layers=[2, 3]"])).layers == [2, 3]  # a container: JSON text
    assert ListOptions(layers=[4]).layers == [4] and ListOptions().layers == [0, 1]
    with pytest.raises(lalora.BackendError, match="layers must be a list, got 3"):
        ListOptions(layers=3)
    with pytest.raises(lalora.BackendError, match=r"layers must be a list in JSON, got '\[2,'"):
        ListOptions(**parse_option_items(["layers=[2,"]))


def test_cli_options_typed_and_refused_in_cli_words(capsys, tmp_path):
    from cli_fixtures import run

    fit = ["fit", "--model", tmp_path / "none", "--data", tmp_path / "none.jsonl", "--out", tmp_path / "p.lalora"]
    cases = [(["--backend", "kfac", "--option", "mc_samples=two"], "--option mc_samples must be an integer >= 1, got 'two'"),
             (["--backend", "kfac", "--option", "mc_sample=2"], "did you mean 'mc_samples'?"),
             (["--backend", "block", "--option", "storage=sparse"], "--option storage=sparse is unknown"),
             (["--backend", "kfac", "--option", "curvature"], "--option 'curvature': use key=value")]
    for extra, want in cases:  # refused by the checks before any file is read
        code, _, err = run(capsys, *fit, *extra)
        assert code == 2 and want in err, err


# --- deprecated names: a warning, the same fit --------------------------------------------------------
def test_fit_precision_keyword_options_deprecated_same_result(llama):
    data = token_batches(2, pad=True, mask_prompt=True)
    new = fit_quiet(llama, data, "kfac", options={"curvature": "ef"})
    with pytest.warns(LaloraDeprecationWarning, match=r"fisher_type='empirical' is deprecated, use curvature='ef'"):
        old = fit_quiet(llama, data, "kfac", fisher_type="empirical")
    assert_same_precision(new, old)
    assert new.metadata["curvature"] == "ef" and new.metadata["backend_options"]["curvature"] == "ef"
    with pytest.warns(LaloraDeprecationWarning, match=r"backend options as keyword arguments of fit_precision"):
        kw = fit_quiet(llama, data, "kfac", curvature="ef")
    assert_same_precision(new, kw)
    assert_same_precision(new, fit_quiet(llama, data, "kfac", options=KFACOptions(curvature=Curvature.EF)))
    for old_value, new_value in (("mc", "mc"), ("type-2", "ggn")):
        with pytest.warns(LaloraDeprecationWarning):
            assert KFACOptions(**{"fisher_type": old_value}).curvature == new_value


def test_plugin_declaring_options_and_old_style_plugin(llama):
    @dataclass(frozen=True)
    class Opts(lalora.BackendOptions):
        loss: float = lalora.option(1.0, "an option fit_precision itself also has a name for", gt=0)
        mode: Literal["a", "b"] = lalora.option("a", "a choice")

    @lalora.register_backend("unit-test-typed")
    class Typed(lalora.CurvatureBackend):
        curvature = Curvature.EF
        Options = Opts

        def fit(self, ctx):
            for _ in ctx.stream:
                pass
            n = ctx.global_num_examples()
            return [lalora.DiagBlock(k, torch.full(p.shape, self.options.loss * n)) for k, p in ctx.params().items()]

    with pytest.warns(LaloraDeprecationWarning, match="default_options dict is deprecated"):
        @lalora.register_backend("unit-test-untyped")
        class Untyped(lalora.CurvatureBackend):
            curvature = "empirical_fisher"  # lalora 0.1's name
            default_options = {"scale": 1.0}

            def fit(self, ctx):
                for _ in ctx.stream:
                    pass
                with pytest.warns(LaloraDeprecationWarning, match="FitContext.num_examples is deprecated"):
                    n = ctx.num_examples
                return [lalora.DiagBlock(k, torch.full(p.shape, float(self.options["scale"] * n))) for k, p in ctx.params().items()]

    try:
        data = token_batches(1)
        p = fit_quiet(llama, data, "unit-test-typed", options={"loss": 2.0, "mode": "b"})  # reachable: not fit_precision's loss
        n = p.metadata["num_examples"]
        assert torch.equal(p.to_dense(), 2.0 * n * torch.eye(p.num_params, dtype=torch.float64))
        assert p.metadata["backend_options"] == {"loss": 2.0, "mode": "b"} and p.metadata["curvature"] == "ef"
        with pytest.raises(lalora.BackendError, match=r"mode='c' is unknown; use one of 'a', 'b'"):
            fit_quiet(llama, data, "unit-test-typed", options={"mode": "c"})
        assert Untyped.curvature is Curvature.EF and Untyped.option_help == {"scale": ""}
        q = fit_quiet(llama, data, "unit-test-untyped", options=parse_option_items(["scale=3"]))  # untyped: JSON text
        assert q.metadata["backend_options"] == {"scale": 3} and q.metadata["curvature"] == "ef"
        assert torch.equal(q.to_dense(), 3.0 * n * torch.eye(q.num_params, dtype=torch.float64))
    finally:
        from lalora import backend as registry

        registry._REGISTRY.pop("unit-test-typed", None)
        registry._REGISTRY.pop("unit-test-untyped", None)


def test_num_examples_is_an_explicit_collective(monkeypatch):
    from types import SimpleNamespace

    from lalora import backend as core

    ctx = lalora.FitContext(model=None, adapters=[], stream=SimpleNamespace(num_examples=5), device=torch.device("cpu"))
    assert ctx.local_num_examples == 5 and ctx.global_num_examples() == 5  # one process: no communication
    with pytest.warns(LaloraDeprecationWarning, match="global_num_examples"):
        assert ctx.num_examples == 5
    monkeypatch.setattr(core, "_distributed", lambda: True)  # the property never hides a collective
    with pytest.raises(lalora.BackendError, match=r"call ctx.global_num_examples\(\) on every rank"):
        ctx.num_examples
