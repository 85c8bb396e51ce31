"""The one curvature vocabulary (``lalora.Curvature``: ggn, mc, ef) across the backends, the CLI, the
files and the comparison; lalora 0.1's names still work with a deprecation warning and give the same fit."""
from __future__ import annotations

import json

import pytest
import torch

import lalora
from lalora import Curvature, LaloraDeprecationWarning
from lalora.backends.backpack import BackPACKOptions
from lalora.backends.kfac import KFACOptions
from numerics import assert_same_precision
from models import fit_quiet, randomize_lora_B, tiny_lora_llama, token_batches
from test_backpack import class_batches, seq_lora_mlp


@pytest.fixture(scope="module")
def llama():
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    randomize_lora_B(model)
    return model


def test_every_backend_declares_its_curvature():
    for name in lalora.list_backends():
        cls = lalora.get_backend(name)
        assert cls.curvature in tuple(Curvature) and cls.curvatures(), name
        assert str(cls.curvature) in cls.curvatures() and set(cls.curvatures()) <= {"ggn", "mc", "ef"}, name
        assert set(cls.default_options) == set(cls.Options._names()), name
    assert lalora.get_backend("diag").curvatures() == ("ef",)
    assert lalora.get_backend("kfac").curvatures() == ("mc", "ef", "ggn")
    assert lalora.get_backend("kfac")(curvature="ggn").curvature_kind() is Curvature.GGN


def test_lalora_backends_lists_curvature_and_typed_options(capsys):
    from cli_fixtures import run

    code, out, _ = run(capsys, "backends", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == set(lalora.list_backends())
    for name, r in rows.items():
        assert r["curvature"] in ("ggn", "mc", "ef") and r["curvature"] in r["curvatures"], name
        assert [d["name"] for d in r["option_details"]] == list(lalora.get_backend(name).Options._names())
    kfac = {d["name"]: d for d in rows["kfac"]["option_details"]}
    assert kfac["curvature"]["type"] == "mc | ef | ggn" and kfac["curvature"]["renamed_from"] == ["fisher_type"]
    assert kfac["mc_samples"]["type"] == "int >= 1" and kfac["mc_samples"]["default"] == 1
    assert kfac["max_rank"]["type"] == "int >= 1 or None" and kfac["max_rank"]["doc"]
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "unknown" not in out and "undeclared" not in out
    for name, r in rows.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert f"curvature={r['curvature']}" in line, line
    code, out, _ = run(capsys, "backends", "block")
    assert code == 0 and out.startswith("block ") and "storage: auto | dense | factored = 'auto'" in out
    assert "[lalora 0.1: form]" in out and "kfac_approx" not in out
    code, _, err = run(capsys, "backends", "nosuch")
    assert code == 2 and "unknown backend 'nosuch'" in err


def test_block_and_backpack_old_names_same_result(llama):
    data = token_batches(1, pad=True, mask_prompt=True)
    with pytest.warns(LaloraDeprecationWarning) as caught:
        old = fit_quiet(llama, data, "block", options={"curvature": "empirical_fisher", "form": "factored"})
    assert any("option form is deprecated, use storage" in str(w.message) for w in caught)
    assert_same_precision(old, fit_quiet(llama, data, "block", options={"curvature": "ef", "storage": "factored"}))
    assert old.metadata["block_forms"] and set(old.metadata["block_forms"].values()) == {"factored"}

    model = seq_lora_mlp(init="orthogonal")
    randomize_lora_B(model)
    cdata = class_batches()
    pairs = [({"curvature": "kflr"}, {"structure": "kfac"}),
             ({"curvature": "kfac", "kron_block": "tri-kfac", "mc_samples": 3}, {"curvature": "mc", "structure": "tri-kfac",
                                                                                   "mc_samples": 3}),
             ({"curvature": "mc_fisher"}, {"curvature": "mc"}),
             ({"curvature": "ggn", "kron_block": "kfac"}, {"curvature": "ggn"})]  # 0.1: kron_block ignored for a diagonal
    for old_opts, new_opts in pairs:
        with pytest.warns(LaloraDeprecationWarning):
            old = fit_quiet(model, cdata, "backpack", loss="classification", options=old_opts)
        assert_same_precision(old, fit_quiet(model, cdata, "backpack", loss="classification", options=new_opts))
    assert BackPACKOptions(curvature="mc").to_dict() == {"curvature": "mc", "structure": "diag", "mc_samples": 1, "seed": 0}
    with pytest.raises(lalora.BackendError, match="kron_block"):
        lalora.get_backend("backpack")(curvature="ggn", kron_block="tri-kfac")


def test_laplace_old_curvature_names():
    laplace = lalora.get_backend("laplace")
    for old, new in (("mc_fisher", Curvature.MC), ("empirical_fisher", Curvature.EF)):
        with pytest.warns(LaloraDeprecationWarning, match=f"curvature='{old}' is deprecated, use curvature='{new}'"):
            assert laplace(curvature=old).options == laplace(curvature=new.value).options


def test_old_files_read_with_the_new_curvature_names():
    import struct

    path = "tests/fixtures/format2/diag.lalora"
    with open(path, "rb") as f:  # the file as written by lalora 0.1: an 8-byte header length, the JSON header
        st_header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    (lalora_header,) = st_header["__metadata__"].values()
    assert json.loads(lalora_header)["metadata"]["curvature"] == "empirical_fisher"
    assert lalora.Precision.load(path).metadata["curvature"] == "ef"


def test_cli_deprecated_option_warns_in_cli_words(capsys, tmp_path):
    from cli_fixtures import run
    from lalora.cli.vocab import Vocabulary

    fit = ["fit", "--model", tmp_path / "none", "--data", tmp_path / "none.jsonl", "--out", tmp_path / "p.lalora"]
    with pytest.warns(LaloraDeprecationWarning) as caught:
        code, _, err = run(capsys, *fit, "--backend", "kfac", "--option", "fisher_type=empirical")
    assert code == 2 and "none.jsonl" in err  # the option was accepted; the missing data file stops the command
    words = Vocabulary("fit", {}, backends=["kfac"]).translate(str(caught[0].message))
    assert "--option fisher_type=empirical is deprecated, use --option curvature=ef" in words, words


def test_compare_reference_takes_the_vocabulary(llama):
    data = token_batches(1)
    res = lalora.compare(llama, data, backends=["diag", ("kfac-ef", "kfac", KFACOptions(curvature="ef"))],
                         reference=Curvature.EF, directions=4, top_k=2)
    assert [r["curvature"] for r in res.rows] == ["ef", "ef"] and all(r["status"] == "ok" for r in res.rows)
    assert "exact dense ef over" in res.table()
    auto = lalora.compare(llama, data, backends=[("kfac-ef", "kfac", {"curvature": "ef"})], directions=4, top_k=2)
    assert auto.reference["kind"] == "ef"  # reference="auto": every backend estimates the EF
