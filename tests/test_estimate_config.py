"""The dry run from a model config (lalora.estimate_config, lalora.estimate_memory, ``lalora fit --dry-run --config``).

References: a real fit of a tiny Llama built from the same config (``Precision.num_bytes``, the bytes of its saved
file, the backend's ``accumulator_bytes`` on the real adapters); the published parameter counts of Llama-3.1-8B
and -70B (8,030,261,248 and 70,553,706,496, their model cards); the pass plan counted by hand. Bytes are exact
integers: compared with ``==``. The docs' table (docs/dry-run.md) is checked so that it stays true.
"""
from __future__ import annotations

import json

import pytest

import lalora
from lalora.backend import get_backend
from lalora.cli import main
from lalora.estimate_config import PRESETS, lora_layout, model_config
from lalora.estimate_memory import estimate_from_config, parse_bytes
from models import tiny_lora_llama, tiny_llama_config, token_batches
from test_shared_factors import ALL, block_data_bytes

GiB = 2**30


def _config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_llama_config().to_dict()))
    return path


def test_presets_have_the_published_parameter_counts():
    assert model_config("llama-3.1-8b").num_params == 8_030_261_248
    assert model_config("Llama-3.1-70B").num_params == 70_553_706_496
    assert set(PRESETS) == {"llama-3.1-8b", "llama-3.1-70b"}


@pytest.mark.parametrize("backend,options", [("kfac", {}), ("tri-kfac", {}), ("kfac", {"max_rank": 4})])
def test_stored_and_file_bytes_equal_a_real_fit(tmp_path, backend, options):
    est = estimate_from_config(_config_file(tmp_path), backend, targets="all-linear", rank=2, options=options,
                               seq_len=7, batch_size=3, dtype="float32")
    model = tiny_lora_llama(targets=ALL, r=2)
    P = lalora.fit_precision(model, token_batches(), backend=backend, options={"curvature": "ef", **options},
                             progress=False)
    P.save(tmp_path / "p.lalora")
    assert est.stored_bytes == P.num_bytes
    assert est.file_bytes == block_data_bytes(tmp_path / "p.lalora")
    assert est.num_lora_params == P.num_params and est.num_adapters == 14 and est.passes == 1
    adapters = lalora.find_lora_adapters(model)
    cls = get_backend(backend)
    assert est.parts["factor sums + finished factors"] == cls.accumulator_bytes(adapters, cls.resolve_options(options))


def test_max_memory_plans_consecutive_groups_and_shard_factors_divides_the_stored_factors(tmp_path):
    cfg = _config_file(tmp_path)
    cls = get_backend("kfac")
    opts = cls.resolve_options({})
    layout = lora_layout(model_config(cfg), "all-linear", 2)
    per_layer = cls.accumulator_bytes(layout[:7], opts)  # the 7 adapters of layer 0 (layer 1: the same shapes)
    est = estimate_from_config(cfg, "kfac", rank=2, options={"max_memory": per_layer}, world_size=2,
                               seq_len=7, batch_size=3, dtype="float32")
    assert est.passes == 2  # one layer per pass
    layer_stored = cls.stored_bytes(layout[:7], opts)
    assert est.parts["factor sums + finished factors"] == layer_stored + per_layer  # pass 2 holds layer 1's sums
    sharded = estimate_from_config(cfg, "kfac", rank=2, options={"max_memory": per_layer, "shard_factors": True},
                                   world_size=2, seq_len=7, batch_size=3, dtype="float32")
    assert sharded.parts["factor sums + finished factors"] == layer_stored // 2 + per_layer
    assert sharded.stored_bytes_per_rank == -(-est.stored_bytes // 2)
    with pytest.raises(ValueError, match="max_memory.*below the factor sums of adapter"):
        estimate_from_config(cfg, "kfac", rank=2, options={"max_memory": 100})
    assert parse_bytes("40GiB") == 40 * GiB and parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="max_memory='lots'"):
        parse_bytes("lots")


def test_bad_configs_and_targets_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither a config.json"):
        model_config(tmp_path / "nope.json")
    (tmp_path / "gpt.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        model_config(tmp_path / "gpt.json")
    with pytest.raises(ValueError, match=r"targets \['c_attn'\]"):
        lora_layout(model_config("llama-3.1-8b"), "q_proj,c_attn")
    with pytest.raises(ValueError, match="Kronecker backends"):
        estimate_from_config("llama-3.1-8b", "diag")


# the rows of docs/dry-run.md: (preset, world size, batch size, tokens, options) -> within 80 GiB per GPU
DOC_ROWS = [
    ("llama-3.1-8b", 1, 2, 2048, {"max_rank": 1024, "max_memory": "24GiB"}),
    ("llama-3.1-8b", 8, 2, 2048, {"max_rank": 1024, "max_memory": "44GiB", "shard_factors": True}),
    ("llama-3.1-70b", 8, 1, 1024, {"max_rank": 1024, "sum_dtype": "float32", "max_memory": "16GiB",
                                   "shard_factors": True}),
]


@pytest.mark.parametrize("preset,world,batch,tokens,options", DOC_ROWS)
def test_the_documented_settings_fit_80_gib_per_gpu(preset, world, batch, tokens, options):
    est = estimate_from_config(preset, "kfac", rank=16, options=options, world_size=world, batch_size=batch,
                               seq_len=tokens, dtype="bfloat16")
    assert est.peak_bytes <= 80 * GiB
    unbounded = estimate_from_config(preset, "kfac", rank=16, world_size=world, batch_size=batch, seq_len=tokens)
    assert unbounded.peak_bytes > 80 * GiB  # the options are what makes it fit


def test_cli_dry_run_from_a_config(tmp_path, capsys):
    argv = ["fit", "--dry-run", "--config", "llama-3.1-8b", "--backend", "kfac", "--rank", "16", "--dtype", "bfloat16",
            "--batch-size", "2", "--max-length", "2048", "--option", "max_rank=1024", "--option", "max_memory=24GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-8b" in out and "12 pass(es)" in out and "peak memory per rank" in out
    assert main(["fit", "--dry-run", "--config", str(_config_file(tmp_path)), "--backend", "tri-kfac",
                 "--option", "shard_factors=true", "--world-size", "2"]) == 0
    assert "shard_factors=True" in capsys.readouterr().out
    assert main(["fit", "--config", "llama-3.1-8b", "--backend", "kfac"]) == 2
    assert "--config needs --dry-run" in capsys.readouterr().err
    assert main(["fit", "--data", "x.jsonl", "--out", "p.lalora"]) == 2
    assert "required: --model" in capsys.readouterr().err
    assert main(["fit", "--dry-run", "--config", "llama-3.1-8b", "--backend", "kfac", "--option", "max_memory=1MB"]) == 2
    assert "--config llama-3.1-8b: max_memory" in capsys.readouterr().err
