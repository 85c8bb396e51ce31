"""Sharded factors over 2 gloo processes on CPU (``shard_factors=True``, docs/scale.md): each adapter's factor sums
are reduced to one owning rank; every rank saves its shard and rank 0 the index; ``Precision.load`` of the index
gives the single-process fit. Per-rank factor memory is measured as the bytes of the finished factor tensors each
rank holds (``Precision.num_bytes`` of its shard) and the peak of the factor tensors alive during its fit
(``metadata["accumulator_peak_bytes"]``, backends/kfac_passes.py ``HeldBytes``)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import lalora
from lalora.errors import PrecisionFileError
from models import fit_quiet, tiny_lora_llama, token_batches
from spawn import run_ranks
from numerics import F32, rel_diff

WORLD = 2
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIONS = {"curvature": "ef", "shard_factors": True}
BOUNDED = {**OPTIONS, "max_memory": "24KiB"}  # several passes, each group reduced to its owners


def _source():
    return token_batches(n_batches=5, batch_size=3, seq_len=7, seed=11)  # 5 batches: uneven shards


def _model(head: bool = False):
    """All-linear LoRA; ``head``: also a trainable ``modules_to_save`` copy of lm_head, covered by the generic
    diagonal (``others="diag"``), which every rank computes alike and rank 0's shard keeps."""
    if not head:
        return tiny_lora_llama(targets=ALL_LINEAR)
    from peft import LoraConfig, get_peft_model

    from models import tiny_llama

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LINEAR), init_lora_weights="orthogonal",
                     modules_to_save=["lm_head"])
    base = tiny_llama(0)
    torch.manual_seed(1)
    return get_peft_model(base, cfg)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        report = {}
        for name, options in (("sharded", OPTIONS), ("bounded", BOUNDED)):
            precision = fit_quiet(_model(), _source(), "kfac", options=options)
            precision.save(os.path.join(out_dir, f"{name}.safetensors"))  # every rank: its shard; rank 0: the index
            report[name] = {"num_bytes": precision.num_bytes, "blocks": len(precision.blocks),
                            "peak": precision.metadata["accumulator_peak_bytes"],
                            "passes": precision.metadata["kfac_passes"]}
        head = fit_quiet(_model(head=True), _source(), "kfac", options=OPTIONS)
        head.save(os.path.join(out_dir, "head.safetensors"))
        report["head"] = sorted(head.param_names)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    run_ranks(_worker, out, WORLD)
    return out


@pytest.fixture(scope="module")
def single():
    return fit_quiet(_model(), _source(), "kfac", options={"curvature": "ef"})


def _assert_same_factors(p, q):
    assert [b.params for b in p.blocks] == [b.params for b in q.blocks]
    assert list(p.anchor) == list(q.anchor)
    for n in p.anchor:
        assert torch.equal(p.anchor[n], q.anchor[n])  # a copy of theta0
    for b1, b2 in zip(p.blocks, q.blocks):
        for k in ("X", "G"):  # sums over 2 ranks added in another order than one process adds them
            assert rel_diff(b1.tensors()[k], b2.tensors()[k]) <= F32, (b1.params, k)


@pytest.mark.parametrize("name", ["sharded", "bounded"])
def test_sharded_fit_equals_one_process(shard_run, single, name):
    files = sorted(p.name for p in shard_run.iterdir() if p.name.startswith(f"{name}-"))
    assert files == [f"{name}-00001-of-00002.safetensors", f"{name}-00002-of-00002.safetensors"]
    loaded = lalora.Precision.load(shard_run / f"{name}.safetensors")
    _assert_same_factors(loaded, single)
    assert lalora.Precision.load(shard_run / f"{name}.safetensors.index.json").num_bytes == single.num_bytes
    assert loaded.metadata["factor_shards"] == 2 and loaded.metadata["num_examples"] == 15
    assert "factor_shard" not in loaded.metadata
    # a loaded sharded precision is an ordinary one: it saves as one file
    loaded.save(shard_run / f"{name}-whole.safetensors")
    _assert_same_factors(lalora.Precision.load(shard_run / f"{name}-whole.safetensors"), single)


def test_per_rank_factor_memory_is_about_half(shard_run, single):
    """Each rank holds the factors it owns (balanced by size): about half of the single-process bytes."""
    ranks = [json.loads((shard_run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    held = [r["sharded"]["num_bytes"] for r in ranks]
    assert sum(held) == single.num_bytes and all(r["sharded"]["blocks"] > 0 for r in ranks)
    assert max(held) <= 0.55 * single.num_bytes, held  # LPT over 14 blocks of 4 sizes
    # during the data pass every rank sums all layers of its batches (data parallel): the accumulator peak is
    # not divided by the ranks; max_memory bounds it (several passes, each group reduced to its owners)
    for r in ranks:
        assert r["bounded"]["passes"] > 1 and r["bounded"]["peak"] <= 24 * 1024 < r["sharded"]["peak"]
    print("per-rank factor bytes", held, "of", single.num_bytes, "; accumulator peaks",
          [(r["sharded"]["peak"], r["bounded"]["peak"]) for r in ranks])


def test_missing_shard_is_named(shard_run, tmp_path):
    index = json.loads((shard_run / "sharded.safetensors.index.json").read_text())
    (tmp_path / "p.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PrecisionFileError, match="shard 'sharded-00001-of-00002.safetensors' is missing"):
        lalora.Precision.load(tmp_path / "p.safetensors")
    index["weight_map"] = {**index["weight_map"], "x": "../evil.safetensors"}
    index["params"].append("x")
    (tmp_path / "q.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PrecisionFileError, match="not a file beside the index"):
        lalora.Precision.load(tmp_path / "q.safetensors")


def test_shard_factors_in_one_process_is_the_ordinary_fit(single):
    p = fit_quiet(_model(), _source(), "kfac", options=OPTIONS)
    assert "factor_shard" not in p.metadata
    _assert_same_factors(p, single)


def test_read_only_the_shards_needed(shard_run, single, monkeypatch):
    """``read_sharded(params=)`` opens only the shards the index maps those parameters to."""
    import lalora.shards as shards

    index = json.loads((shard_run / "sharded.safetensors.index.json").read_text())
    wanted = [n for n, f in index["weight_map"].items() if f == "sharded-00002-of-00002.safetensors"][:2]
    opened = []
    real = shards.read_precision
    monkeypatch.setattr(shards, "read_precision", lambda path: opened.append(path.name) or real(path))
    part = shards.read_sharded(shard_run / "sharded.safetensors", params=wanted)
    assert opened == ["sharded-00002-of-00002.safetensors"]
    assert set(wanted) <= set(part.anchor) and set(part.anchor) < set(single.anchor)


def test_other_tensors_are_in_rank_0s_shard_once(shard_run):
    """With ``others="diag"`` (a ``modules_to_save`` head) the sharded precision still covers every tensor once:
    the LoRA blocks on their owners, the head's diagonal on rank 0, equal to the single-process fit."""
    single = fit_quiet(_model(head=True), _source(), "kfac", options={"curvature": "ef"})
    ranks = [json.loads((shard_run / f"rank{r}.json").read_text())["head"] for r in range(WORLD)]
    head = "lm_head.modules_to_save.weight"
    assert head in single.param_names and head in ranks[0] and head not in ranks[1]
    assert sorted(ranks[0] + ranks[1]) == sorted(single.param_names)  # each tensor on exactly one rank
    loaded = lalora.Precision.load(shard_run / "head.safetensors")
    assert sorted(loaded.param_names) == sorted(single.param_names)
    got, want = loaded.diagonal(), single.diagonal()
    for n in single.param_names:  # sums over 2 ranks added in another order than one process adds them
        assert rel_diff(got[n], want[n]) <= F32, n
