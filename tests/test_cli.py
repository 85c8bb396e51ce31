"""The ``lalora`` CLI on a tiny Llama + byte-level tokenizer saved to tmp_path (no downloads)."""
from __future__ import annotations

import json

import pytest

import lalora
from cli_fixtures import data_files, model_dir, run  # noqa: F401 (fixtures)
from lalora.cli import build_parser, main


def test_help_has_examples(capsys):
    for cmd in ["fit", "inspect", "compare", "finetune", "bench", "backends"]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out
    assert main([]) == 2


def test_backends_lists_registered_with_options(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(lalora.list_backends())
    assert rows["diag"]["available"] is True
    assert rows["diag"]["options"] == dict(lalora.get_backend("diag").default_options)
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "diag" in out and "available=yes" in out


def test_fit_inspect_finetune_round_trip(capsys, tmp_path, model_dir, data_files):
    src, task = data_files
    out = tmp_path / "p.lalora"
    code, stdout, err = run(capsys, "fit", "--model", model_dir, "--data", src, "--backend", "diag", "--out", out,
                            "--rank", 2, "--targets", "q_proj,v_proj", "--batch-size", 2, "-q")
    assert code == 0, err
    P = lalora.Precision.load(out)
    assert P.metadata["backend"] == "diag" and P.metadata["num_examples"] == 5
    assert len(P.param_names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not P.zero_params()  # orthogonal init: A gets curvature too

    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and "backend=diag" in stdout and "diagonal spectrum" in stdout
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert info["num_params"] == P.num_params and info["diagonal_summary"]["zero_fraction"] == 0.0

    # finetune with a huge strength stays near theta0; without penalty it moves further
    moved = {}
    for name, extra in [("reg", ["--precision", out, "--strength", 1e6]), ("plain", [])]:
        adir = tmp_path / f"adapter_{name}"
        code, stdout, err = run(capsys, "finetune", "--model", model_dir, "--data", task, "--out", adir, "--steps", 5,
                                "--lr", 1e-2, "--batch-size", 2, "--rank", 2, "--targets", "q_proj,v_proj", "-q", *extra)
        assert code == 0, err
        assert (adir / "adapter_config.json").is_file()
        from safetensors.torch import load_file

        w = load_file(adir / "adapter_model.safetensors")
        moved[name] = w
    from lalora.adapters import canonical_module_path

    def dist(w):  # squared distance of a saved adapter to the precision's anchor theta0
        names = {canonical_module_path(k.removesuffix(".weight")): k for k in w}
        assert set(names) == set(P.anchor)
        return sum(float((w[names[n]].float() - a).pow(2).sum()) for n, a in P.anchor.items())

    assert dist(moved["reg"]) < 0.1 * dist(moved["plain"])


def test_clear_errors(capsys, tmp_path, model_dir, data_files):
    src, _ = data_files
    p = tmp_path / "p.lalora"
    code, _, err = run(capsys, "fit", "--model", tmp_path / "nope", "--data", src, "--out", p, "-q")
    assert code == 2 and "--model" in err and "nope" in err
    code, _, err = run(capsys, "fit", "--model", model_dir, "--data", tmp_path / "missing.jsonl", "--out", p, "-q")
    assert code == 2 and "missing.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    code, _, err = run(capsys, "fit", "--model", model_dir, "--data", bad, "--out", p, "-q")
    assert code == 2 and "line 2" in err
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    code, _, err = run(capsys, "fit", "--model", model_dir, "--data", nofield, "--out", p, "-q")
    assert code == 2 and "record 1" in err and "'text'" in err
    code, _, err = run(capsys, "fit", "--model", model_dir, "--data", src, "--backend", "nosuch", "--out", p, "-q")
    assert code == 2 and "nosuch" in err
    code, _, err = run(capsys, "fit", "--model", model_dir, "--data", src, "--out", tmp_path / "no" / "dir" / "p.lalora", "-q")
    assert code == 2 and "does not exist" in err
    junk = tmp_path / "junk.lalora"
    junk.write_bytes(b"not a safetensors file at all")
    code, _, err = run(capsys, "inspect", junk)
    assert code == 2 and "junk.lalora" in err
    code, _, err = run(capsys, "inspect", tmp_path / "absent.lalora")
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "bench", "--methods", "lora,bogus")
    assert code == 2 and "bogus" in err


def test_compare_fitted_then_stored(capsys, tmp_path, model_dir, data_files):
    """`lalora compare --model --data --backends` fits and compares; the saved files compared again (with the
    saved reference, or with the reference recomputed from --model/--data) give the same numbers."""
    from lalora.comparison import CompareResult

    src, _ = data_files
    d = tmp_path / "fits"
    lora = ["--rank", 2, "--targets", "q_proj,v_proj", "--batch-size", 2, "-q"]
    common = ["--directions", 4, "--top-k", 2]
    code, out, err = run(capsys, "compare", "--model", model_dir, "--data", src, "--backends", "diag,block", "--reference",
                         "ef", "--save-dir", d, "--out", tmp_path / "fit.json", *common, *lora)
    assert code == 0, err
    assert "exact dense ef over" in out and "diag" in out and "block" in out
    fitted = CompareResult.from_json(tmp_path / "fit.json")
    assert [r["status"] for r in fitted.rows] == ["ok", "ok"]
    assert fitted.row("diag")["rel_err_random_mean"] > 0.01  # diag drops the off-diagonal EF mass
    files = [d / "diag.lalora", d / "block.lalora"]
    for ref in ([d / "reference-ef.lalora"], ["ef", "--model", model_dir, "--data", src, "--batch-size", 2]):
        code, out, err = run(capsys, "compare", *files, "--reference", *ref, "--out", tmp_path / "stored.json", *common)
        assert code == 0, err
        stored = CompareResult.from_json(tmp_path / "stored.json")
        for name in ("diag", "block"):
            a, b = stored.row(name), fitted.row(name)
            assert not a["notes"], a["notes"]  # same theta0: the LoRA setup was taken from the precision
            for key in ("rel_err_random_mean", "rel_err_eigen_mean", "frobenius_all"):
                assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(b[key])), (name, key, a[key], b[key])
            assert a["file_bytes"] == b["file_bytes"]
    code, _, err = run(capsys, "compare", "--model", model_dir, "--data", src, "--backends", "diag",
                       "--option", "kfac:fisher_type=mc", *lora)
    assert code == 2 and "'kfac' is not in --backends" in err
    code, out, err = run(capsys, "compare", "--model", model_dir, "--data", src, "--backends", "nosuch", "--reference", "none", *lora)
    assert code == 1 and "nosuch: unavailable" in out  # every method failed
