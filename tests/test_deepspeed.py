"""DeepSpeed ZeRO-3 on CPU with gloo and 2 processes (torch.multiprocessing spawn).

ZeRO-3 leaves every partitioned parameter empty outside forward (``stage3_param_persistence_threshold: 0``
partitions even the tiny LoRA matrices, as it does a real model's larger ones). ``reg()`` gathers the LoRA
weights with ``deepspeed.zero.GatheredParameters`` and its value joins the loss ``engine.backward`` receives,
so the penalty's gradient arrives in the same backward as the task gradient (DeepSpeed reduces each
partition's gradient once per backward).

- a plain ``deepspeed.initialize`` loop: two SGD steps equal one process's hand-written SGD;
- ``LaLoRATrainer`` with a ZeRO-3 ``deepspeed=`` config, gradient accumulation 2 and ``source_data=`` (the
  precision is fitted at the start of ``train()``, each rank on its share of the source batches): the fitted
  precision equals one process's fit and the update equals one process's hand-written SGD.

DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce kernel (~20 s, and its vector
kernels need AVX2/AVX-512 or the peers hang); ZeRO-3 does not use it (its collectives go through
torch.distributed), so the worker turns it off (``deepspeed.comm.torch.build_shm_op``). Tolerance 2e-6 as in
tests/test_fsdp.py (float32 sums over 2 ranks' shards in another order).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import deepspeed  # noqa: E402,F401  (the test extra: pip install -e '.[test]'; a missing one fails, not skips)

import lalora  # noqa: E402
from spawn import run_ranks  # noqa: E402
from numerics import F32, rel_close  # noqa: E402

WORLD = 2
TOL = 2e-6
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True}


def _no_shm_kernel():
    import deepspeed.comm.torch as ds_torch

    ds_torch.build_shm_op = lambda: None


def _plain_engine(rank, out_dir):
    import deepspeed
    from transformers import default_data_collator

    from test_distributed import _source
    from test_trainer import LR, STRENGTH, examples, make_model

    model = make_model()
    precision = lalora.fit_precision(model, _source(), "kfac", progress=False, options={"curvature": "ef"})
    config = {**ZERO3, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    reg = lalora.LaLoRARegularizer(model, precision, STRENGTH, form="linearized")  # checks the anchor on the gathered weights
    assert reg.sharding == "zero3" and all(p.numel() == 0 for p in reg._params.values())
    exs = examples()
    for s in range(2):
        full = default_data_collator(exs[s * 4:(s + 1) * 4])
        n_tok = (full["labels"][:, 1:] != -100).sum()
        batch = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                reduction="sum")
        engine.backward(nll / n_tok * WORLD + reg())  # ZeRO averages the gradients over ranks
        engine.step()
    params = reg._params
    with deepspeed.zero.GatheredParameters(list(params.values())):
        weights = {n: p.detach().clone() for n, p in params.items()}
    if rank == 0:
        save_file(weights, os.path.join(out_dir, "plain.safetensors"))
        precision.save(os.path.join(out_dir, "kfac.safetensors"))


def _trainer(rank, out_dir):
    import deepspeed
    from transformers import default_data_collator

    from test_distributed import _source
    from test_trainer import STRENGTH, args, examples, make_model

    model = make_model()
    targs = args(os.path.join(out_dir, "trainer"), 1, 2, 2, ddp_backend="gloo",
                 deepspeed={**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"})
    trainer = lalora.LaLoRATrainer(model=model, args=targs, train_dataset=examples(),
                                   data_collator=default_data_collator, source_data=_source(), backend="kfac",
                                   fit_options={"curvature": "ef"}, strength=STRENGTH, form="linearized")
    trainer.train()
    reg = trainer.regularizer
    assert trainer.is_deepspeed_enabled and reg.sharding == "zero3"
    with deepspeed.zero.GatheredParameters(list(reg._params.values())):
        weights = {n: p.detach().clone() for n, p in reg._params.items()}
    pens = [h["lalora_penalty"] for h in trainer.state.log_history if "lalora_penalty" in h]
    if rank == 0:
        save_file(weights, os.path.join(out_dir, "trainer.safetensors"))
        reg.precision.save(os.path.join(out_dir, "trainer-fitted.safetensors"))
        torch.save(pens, os.path.join(out_dir, "trainer-penalties.pt"))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    _no_shm_kernel()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        _plain_engine(rank, out_dir)
        _trainer(rank, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run_ranks(_worker, out, WORLD)
    return out


def _reference(precision, strength):
    from test_fsdp import _reference as ref

    return ref(precision, "linearized", strength)


def _diff(a, b):
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_zero3_plain_engine_equals_one_process(ds_run):
    from test_trainer import STRENGTH

    precision = lalora.Precision.load(ds_run / "kfac.safetensors")
    got = load_file(str(ds_run / "plain.safetensors"))
    ref = _reference(precision, STRENGTH)
    assert _diff(got, ref) < TOL, _diff(got, ref)
    assert _diff(ref, _reference(precision, 0.0)) > 1e-3  # the penalty matters


def test_trainer_zero3_fit_at_start_with_accumulation_equals_one_process(ds_run):
    from test_distributed import _source
    from test_trainer import STRENGTH, make_model

    fitted = lalora.Precision.load(ds_run / "trainer-fitted.safetensors")
    single = lalora.fit_precision(make_model(), _source(), "kfac", progress=False, options={"curvature": "ef"})
    by_params = {tuple(b.params): b for b in fitted.blocks}
    for b in single.blocks:  # sums over 2 ranks' shards vs one process: float32 round-off
        for role, t in b.tensors().items():
            assert rel_close(by_params[tuple(b.params)].tensors()[role], t, F32), (b.params, role)
    assert fitted.metadata["num_examples"] == single.metadata["num_examples"] == 15
    got = load_file(str(ds_run / "trainer.safetensors"))
    ref = _reference(single, STRENGTH)
    assert _diff(got, ref) < TOL, _diff(got, ref)
    pens = torch.load(ds_run / "trainer-penalties.pt")
    assert pens[0] == 0.0 and pens[1] > 0


def test_fit_at_start_refuses_weights_partitioned_at_load(tmp_path):
    """A model loaded under a ZeRO-3 config (``deepspeed.zero.Init``) is partitioned before the Trainer exists, so
    the ``source_data=`` fit cannot run its forward passes: refused by name (no DeepSpeed run needed: the check
    reads the attributes ZeRO-3 puts on its parameters)."""
    from transformers import default_data_collator

    from test_distributed import _source
    from test_trainer import STRENGTH, args, examples, make_model

    model = make_model()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.ds_id, lora_a.ds_status = 0, "NOT_AVAILABLE"
    trainer = lalora.LaLoRATrainer(model=model, args=args(tmp_path, 4, 1, 1), train_dataset=examples(),
                                   data_collator=default_data_collator, source_data=_source(), strength=STRENGTH)
    with pytest.raises(NotImplementedError, match=r"source_data=.*already sharded \(zero3.*pass precision="):
        trainer.train()
