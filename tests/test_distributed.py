"""Data parallel on CPU with gloo and 2 processes (torch.multiprocessing spawn):
``fit_precision`` sharded over ranks writes the same file as one process on the same data, and
``LaLoRATrainer`` under DDP (Trainer + accelerate) makes the same update as one process."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import lalora
from models import token_batches
from spawn import run_ranks
from numerics import F32, rel_close

WORLD = 2


def _source():
    return token_batches(n_batches=5, batch_size=3, seq_len=7, seed=11)  # 5 batches: uneven shards


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from test_trainer import STRENGTH, args, examples, lora_weights, make_model
        from transformers import default_data_collator

        model = make_model()
        precision = lalora.fit_precision(model, _source(), "diag", progress=False)
        kfac = lalora.fit_precision(model, _source(), "kfac", progress=False, options={"curvature": "ef"})
        if rank == 0:
            precision.save(os.path.join(out_dir, "dist.safetensors"))
            kfac.save(os.path.join(out_dir, "dist-kfac.safetensors"))
        trainer = lalora.LaLoRATrainer(model=model, args=args(os.path.join(out_dir, "trainer"), 2, 1, 2, ddp_backend="gloo"),
                                       train_dataset=examples(), data_collator=default_data_collator,
                                       precision=precision, strength=STRENGTH)
        trainer.train()
        if rank == 0:
            save_file({n: t.contiguous() for n, t in lora_weights(model).items()},
                      os.path.join(out_dir, "ddp_weights.safetensors"))
            logs = [h for h in trainer.state.log_history if "lalora_penalty" in h]
            with open(os.path.join(out_dir, "logs.json"), "w") as f:
                json.dump(logs, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _read(path):
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lalora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return header, tensors


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(_worker, out, WORLD)
    return out


def test_fit_precision_two_ranks_equals_one(dist_run, tmp_path):
    from test_trainer import make_model

    single = lalora.fit_precision(make_model(), _source(), "diag", progress=False)
    single.save(tmp_path / "single.safetensors")
    h1, t1 = _read(tmp_path / "single.safetensors")
    h2, t2 = _read(dist_run / "dist.safetensors")
    assert set(t1) == set(t2)
    for k in t1:  # sums over ranks are added in another order than one process adds them: float32 round-off
        assert rel_close(t2[k], t1[k], F32), k
    for h in (h1, h2):  # the only fields that differ between any two runs (and the checksums over them)
        h["metadata"].pop("created")
        h["metadata"].pop("fit_seconds")
        h.pop("header_checksum", None)
        h.pop("checksum", None)  # over the tensor bytes, which agree to round-off only (compared above)
    assert h1 == h2
    assert h2["metadata"]["num_examples"] == 15 and h2["metadata"]["num_batches"] == 5


def test_kfac_fit_two_ranks_equals_one(dist_run):
    """kfac factor sums (q and v share one input window sum) all-reduced over 2 ranks equal one process's
    to float32 rounding: each rank sums its shard in float32, so the order of additions differs."""
    from test_trainer import make_model

    single = lalora.fit_precision(make_model(), _source(), "kfac", progress=False, options={"curvature": "ef"})
    dist = lalora.Precision.load(dist_run / "dist-kfac.safetensors")
    assert [b.params for b in dist.blocks] == [b.params for b in single.blocks]
    for b1, b2 in zip(single.blocks, dist.blocks):
        for k in ("X", "G"):
            t1, t2 = b1.tensors()[k], b2.tensors()[k]
            assert float((t1 - t2).abs().max()) <= 1e-6 * float(t1.abs().max()), (b1.params, k)
    assert dist.metadata["num_examples"] == 15

def test_trainer_ddp_equals_single_process(dist_run):
    from test_trainer import STRENGTH, max_diff, reference

    precision = lalora.Precision.load(dist_run / "dist.safetensors")
    ref, ref_pen = reference(precision, steps=2, per_step=4, strength=STRENGTH)
    with safe_open(str(dist_run / "ddp_weights.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == set(ref)
    assert max_diff(got, ref) < 2e-6
    logs = json.loads((dist_run / "logs.json").read_text())
    assert [h["lalora_penalty"] for h in logs] == pytest.approx(ref_pen, rel=1e-5, abs=1e-9)
    assert ref_pen[1] > 0


def test_shard_option_is_checked():
    from test_trainer import make_model

    with pytest.raises(ValueError, match="shard="):
        lalora.fit_precision(make_model(), _source(), "diag", progress=False, shard="maybe")
