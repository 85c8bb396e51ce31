"""The sharded precision layout (lalora/shards.py, docs/scale.md) in one process: a precision split into rank
shards by hand (the metadata a ``shard_factors`` fit leaves on each rank) saves and loads back as the whole
precision; owners are balanced by size. The 2-process fit itself: tests/test_distributed_shards.py."""
from __future__ import annotations

import json

import pytest
import torch

import lalora
from lalora.backends.kfac_passes import plan_owners
from lalora.errors import PrecisionFileError
from models import fit_quiet, tiny_lora_llama, token_batches

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def whole():
    return fit_quiet(tiny_lora_llama(targets=ALL_LINEAR), token_batches(2), "tri-kfac", options={"curvature": "ef"})


def _rank_shards(p, world):
    """What each rank of a ``shard_factors`` fit holds: its blocks, their anchors, ``factor_shard``."""
    adapters = lalora.find_lora_adapters(tiny_lora_llama(targets=ALL_LINEAR))
    owners = {n: r for a, r in ((a, plan_owners(adapters, world)[a.key]) for a in adapters) for n in (a.a_name, a.b_name)}
    out = []
    for rank in range(world):
        blocks = [b for b in p.blocks if owners[b.params[0]] == rank]
        anchor = {n: t for n, t in p.anchor.items() if owners[n] == rank}
        meta = {**p.metadata, "factor_shard": {"rank": rank, "world_size": world, "owners": owners}}
        out.append(lalora.Precision(blocks, anchor, metadata=meta, prior_precision=p.prior_precision))
    return out


@pytest.mark.parametrize("world", [2, 20])  # 20 ranks > 14 adapters: some ranks own nothing (and write no file)
def test_shards_save_and_load_whole(whole, tmp_path, world):
    for shard in _rank_shards(whole, world):
        shard.save(tmp_path / "p.safetensors")
    files = sorted(f.name for f in tmp_path.iterdir())
    assert "p.safetensors.index.json" in files and len(files) == 1 + min(world, 14)
    loaded = lalora.Precision.load(tmp_path / "p.safetensors")
    assert list(loaded.anchor) == list(whole.anchor) and [b.params for b in loaded.blocks] == [b.params for b in whole.blocks]
    for b1, b2 in zip(loaded.blocks, whole.blocks):  # a pure copy: bitwise
        assert all(torch.equal(b1.tensors()[k], b2.tensors()[k]) for k in b2.tensors())
    assert loaded.metadata["factor_shards"] == world and loaded.prior_precision == whole.prior_precision


def test_owners_are_balanced_by_size():
    adapters = lalora.find_lora_adapters(tiny_lora_llama(targets=ALL_LINEAR))
    owners = plan_owners(adapters, 2)
    load = [sum(a.A.shape[1] ** 2 + a.B.shape[0] ** 2 for a in adapters if owners[a.key] == r) for r in (0, 1)]
    total = sum(load)
    assert max(load) - min(load) <= max(a.A.shape[1] ** 2 + a.B.shape[0] ** 2 for a in adapters), load
    assert plan_owners(adapters, 2) == owners and total > 0  # deterministic


def test_index_defects_are_named(whole, tmp_path):
    for shard in _rank_shards(whole, 2):
        shard.save(tmp_path / "p.safetensors")
    index_file = tmp_path / "p.safetensors.index.json"
    index = json.loads(index_file.read_text())
    whole.save(tmp_path / "p.safetensors")  # a single file with the same name as well: ambiguous
    with pytest.raises(PrecisionFileError, match="both this file and the sharded precision index"):
        lalora.Precision.load(tmp_path / "p.safetensors")
    assert lalora.Precision.load(index_file).num_bytes == whole.num_bytes  # the index named explicitly
    for change, match in [({"format": "other"}, "not a lalora sharded precision index"),
                          ({"format_version": 99}, "format_version 99 is not supported"),
                          ({"params": index["params"][1:]}, "'params' and 'weight_map' must name the same")]:
        bad = tmp_path / "bad.safetensors.index.json"
        bad.write_text(json.dumps({**index, **change}))
        with pytest.raises(PrecisionFileError, match=match):
            lalora.Precision.load(bad)
    swapped = dict(index["weight_map"])
    first = next(iter(swapped))
    swapped[first] = next(f for f in set(swapped.values()) if f != swapped[first])
    bad.write_text(json.dumps({**index, "weight_map": swapped}))
    with pytest.raises(PrecisionFileError, match="differently from the index"):
        lalora.Precision.load(bad)
