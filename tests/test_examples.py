"""The runnable examples in examples/, each in quick mode, and the example backend plugin
(examples/custom_backend) installed as a real distribution and used through its entry point.

Examples run in this process (their ``main(argv)``): a subprocess would pay torch/transformers/peft
imports again (10-20 s each on a loaded 2-core machine). Tiny models from configs, no downloads.
"""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lalora
from numerics import rel_close
from models import randomize_lora_B, tiny_lora_llama, token_batches

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread. With two threads on a busy 2-core machine the quickstart
    took 105 s instead of 6 s (threads spin-waiting for each other on 16x64 matmuls)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def example(monkeypatch):
    """Load ``examples/<name>.py`` as a module (examples import each other by file name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    loaded = []

    def load(name):
        spec = importlib.util.spec_from_file_location(f"lalora_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(name)
        return module

    yield load
    for name in ("train_hf_trainer", "train_plain_torch", "quickstart", "precision_reuse", "compare_structures",
                 "read_precision_file"):
        sys.modules.pop(name, None)


def test_quickstart(example):
    results = example("quickstart").main(["--quick"])
    assert set(results) == {0.0, 100.0}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in results.values())


def test_train_hf_trainer(example):
    trainer, resumed = example("train_hf_trainer").main(["--quick"])
    logged = [h for h in trainer.state.log_history if "lalora_penalty" in h]
    assert logged, "the Trainer logged no lalora_penalty"
    assert all(h["lalora_penalty"] >= 0 and h["task_loss"] > 0 for h in logged)
    assert trainer.state.global_step == 4
    # the resumed trainer rebuilt its regularizer from the checkpoint: same strength, same anchor
    assert resumed.regularizer.strength == 1e3
    for n, t in trainer.regularizer.precision.anchor.items():
        assert torch.equal(t, resumed.regularizer.precision.anchor[n])


def test_train_plain_torch(example):
    results = example("train_plain_torch").main(["--quick", "--strength", "100"])
    assert results[0.0][2] == 0.0  # strength 0: no penalty
    assert results[100.0][2] > 0.0  # the weights moved away from theta0, so the penalty is positive


def test_precision_reuse(example, tmp_path):
    mod = example("precision_reuse")
    path = tmp_path / "source.lalora"
    assert mod.main(["fit", "--out", str(path), "--quick"]) is None
    stored = lalora.Precision.load(path)
    assert stored.metadata["backend"] == "diag" and stored.metadata["num_examples"] == 32
    # "another machine": another LoRA seed. The file validates against that model and
    # reset_to_anchor() puts its LoRA weights exactly at the fit's theta0.
    other = mod.make_model(lora_seed=7)
    reg = lalora.LaLoRARegularizer(other, lalora.Precision.load(path, model=other), strength=1.0, check_anchor=False)
    with pytest.raises(lalora.AnchorMismatchError):
        reg.check_anchor()
    reg.reset_to_anchor()
    fitted_at = lalora.adapters.lora_state(lalora.find_lora_adapters(mod.make_model(lora_seed=1)))
    now = lalora.adapters.lora_state(lalora.find_lora_adapters(other))
    assert fitted_at.keys() == now.keys() and all(torch.equal(fitted_at[n], now[n]) for n in now)
    rows = mod.main(["finetune", "--precision", str(path), "--quick"])
    assert [r["strength"] for r in rows] == [0.0, 10.0, 100.0, 1000.0]
    assert rows[0]["penalty"] == 0.0 and all(r["penalty"] > 0 for r in rows[1:])


def test_compare_structures(example):
    result = example("compare_structures").main(["--quick"])
    rows = {r["name"]: r for r in result.rows}
    assert set(rows) == {"diag", "kfac-ef", "tri-kfac-ef", "block"}
    assert all(r["status"] == "ok" for r in rows.values())
    # the dense per-adapter EF block holds the exact EF within each adapter: its per-matrix
    # Frobenius error against the exact EF is round-off (float32 storage)
    per_matrix = {k: v for k, v in rows["block"]["frobenius"].items() if k != "all"}
    assert len(per_matrix) == 8 and max(per_matrix.values()) < 1e-5
    assert rows["diag"]["frobenius_all"] > 0.1  # diag drops the off-diagonal terms


def test_read_precision_file_without_lalora(example):
    """The independent numpy reader of docs/file-format.md agrees with lalora on every block kind."""
    errors = example("read_precision_file").main(["--quick"])
    assert set(errors) == {"diag", "dense", "factored", "kfac", "tri-kfac", "kfac (low-rank)", "tri-kfac (low-rank)"}
    assert max(errors.values()) < 1e-6  # float32 tensors; the reader computes in float64


# --- the plugin package -----------------------------------------------------------------------


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """pip-install examples/custom_backend into a temporary folder (offline, no build isolation,
    no dependencies) and put that folder on sys.path: the dev venv is left untouched."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "custom_backend", src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "lalora_isotropic" / "__init__.py").is_file()
    monkeypatch.syspath_prepend(str(target))
    yield "isotropic"
    sys.modules.pop("lalora_isotropic", None)
    from lalora import backend as registry

    registry._REGISTRY.pop("isotropic", None)


def test_custom_backend_plugin(installed_plugin, tmp_path, capsys):
    name = installed_plugin
    assert name in lalora.list_backends()  # found through the installed entry point
    cls = lalora.get_backend(name)
    assert cls.__module__ == "lalora_isotropic" and cls.name == name

    from lalora.cli import main as cli

    assert cli(["backends", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    details = {d["name"]: d for d in listed[name]["option_details"]}  # from the plugin's declaration
    assert listed[name]["curvature"] == "ef" and listed[name]["curvatures"] == ["ef"]
    assert details["damping"]["type"] == "float >= 0" and details["damping"]["default"] == 0.0
    assert details["granularity"]["type"] == "matrix | model" and details["granularity"]["doc"]
    assert cli(["backends", name]) == 0
    assert "damping: float >= 0 = 0.0  Tikhonov term" in capsys.readouterr().out

    model = tiny_lora_llama(targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora_B(model)  # B != 0
    data = token_batches(n_batches=2, batch_size=3, seq_len=7)  # right-padded, masked prompts
    iso = lalora.fit_precision(model, data, backend=name, progress=False)
    diag = lalora.fit_precision(model, data, backend="diag", progress=False)
    # reference: tau_m = tr(F_m) / n_m, with the diag backend's exact EF diagonal
    want = {n: v.double().mean() for n, v in diag.diagonal().items()}
    for n, v in iso.diagonal().items():
        assert torch.allclose(v.double(), want[n].expand(v.shape), rtol=1e-5, atol=0), n
    assert iso.metadata["backend"] == name and iso.metadata["num_examples"] == diag.metadata["num_examples"]
    assert iso.metadata["curvature"] == "ef"
    # what `lalora fit --dry-run` reports, from the plugin's stored_bytes, is the file's size of tensors
    from lalora.estimate import stored_bytes

    assert stored_bytes(model, name) == iso.num_bytes

    # options as the CLI gives them (--option damping=0.5): read by the declared type
    from lalora.cli.inputs import parse_options

    damped = lalora.fit_precision(model, data, backend=name, progress=False,
                                  options=parse_options(["damping=0.5", "granularity=model"]))
    assert damped.metadata["backend_options"] == {"damping": 0.5, "granularity": "model"}
    total = sum(v.double().sum() for v in diag.diagonal().values()) / diag.num_params
    for v in damped.diagonal().values():
        assert torch.allclose(v.double(), (total + 0.5).expand(v.shape), rtol=1e-5, atol=0)
    options_cls = lalora.get_backend(name).Options
    same = lalora.fit_precision(model, data, backend=name, progress=False,
                                options=options_cls(damping=0.5, granularity="model"))
    assert rel_close(same.to_dense(), damped.to_dense())  # same computation, run twice
    with pytest.warns(lalora.LaloraDeprecationWarning, match="keyword arguments"):  # lalora 0.1's form
        old = lalora.fit_precision(model, data, backend=name, progress=False, damping=0.5, granularity="model")
    assert rel_close(old.to_dense(), damped.to_dense())
    with pytest.raises(lalora.BackendError, match="option damping must be a number >= 0, got -1.0"):
        lalora.fit_precision(model, data, backend=name, progress=False, options={"damping": -1.0})
    with pytest.raises(lalora.BackendError, match="did you mean 'damping'"):
        lalora.fit_precision(model, data, backend=name, progress=False, options={"dampin": 1.0})

    # the file holds DiagBlocks: it reads back without the plugin, and regularizes like any precision
    path = tmp_path / "iso.lalora"
    damped.save(path)
    back = lalora.Precision.load(path, model=model)
    assert torch.equal(back.to_dense(), damped.to_dense())
    reg = lalora.LaLoRARegularizer(model, back, strength=2.0)
    assert float(reg().detach()) == 0.0
