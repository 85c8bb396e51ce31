"""FSDP on CPU with gloo and 2 processes (torch.multiprocessing spawn).

- FSDP2 (``fully_shard``) in a plain loop: the LoRA weights are DTensors; ``reg()`` gathers them differentiably,
  every rank adds the penalty to its loss. Two steps (the second away from theta0) equal one process's
  hand-written SGD on the same global batch, for the linearized and the effective-weight form.
- ``LaLoRATrainer`` under accelerate's FSDP2 (``fsdp_config={"version": 2}``), with gradient accumulation 2:
  the same update as one process. accelerate 1.15 turns FSDP on only for accelerator devices (its
  ``AcceleratorState`` keeps ``MULTI_CPU`` runs on DDP, and ``FullyShardedDataParallelPlugin`` refuses FSDP1
  without a GPU), so the worker relabels the process state ``MULTI_CPU -> MULTI_GPU`` before the Trainer is
  built; the model, the data and the device mesh stay on the CPU and accelerate's FSDP2 path (``fully_shard``
  of each decoder layer and of the root) runs unchanged.
- FSDP1 (``FullyShardedDataParallel``, flattened parameters) is refused by name.

Tolerance 2e-6 on LoRA weights that move by > 1e-2 in these 2 steps: a float32 sum over 2 ranks' shards is
added in another order than one process adds it; a penalty counted on one rank only or twice would move
the weights by > 1e-3 (checked: the penalty alone moves them by more than that).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import lalora
from spawn import run_ranks

WORLD = 2
TOL = 2e-6


def _plain_fsdp2(rank, out_dir, form):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import default_data_collator

    from test_distributed import _source
    from test_trainer import LR, STRENGTH, examples, make_model

    model = make_model()
    precision = lalora.fit_precision(model, _source(), "kfac", progress=False, options={"curvature": "ef"})
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reg = lalora.LaLoRARegularizer(model, precision, STRENGTH, form=form)  # built on the sharded model
    assert reg.sharding == "fsdp2"
    params = list(reg._params.values())
    opt = torch.optim.SGD(params, lr=LR)
    exs = examples()
    model.train()
    for s in range(2):
        full = default_data_collator(exs[s * 4:(s + 1) * 4])
        n_tok = (full["labels"][:, 1:] != -100).sum()
        batch = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                reduction="sum")
        # FSDP2 averages the gradients over ranks: this rank's share of the step's token mean, times WORLD
        (nll / n_tok * WORLD + reg()).backward()
        opt.step()
        opt.zero_grad()
    weights = {n: p.full_tensor().detach().clone() for n, p in reg._params.items()}
    if rank == 0:
        save_file(weights, os.path.join(out_dir, f"plain-{form}.safetensors"))
        precision.save(os.path.join(out_dir, "kfac.safetensors"))


def _trainer_fsdp2(rank, out_dir):
    from accelerate.state import DistributedType, PartialState
    from transformers import default_data_collator

    from test_trainer import STRENGTH, args, examples, make_model

    model = make_model()
    precision = lalora.Precision.load(os.path.join(out_dir, "kfac.safetensors"))  # saved by rank 0 (barrier)
    kw = dict(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
              ddp_backend="gloo")
    targs = args(os.path.join(out_dir, "trainer"), 1, 2, 2, **kw)
    state = PartialState()
    assert state.distributed_type == DistributedType.MULTI_CPU
    state.distributed_type = DistributedType.MULTI_GPU  # see the module docstring: accelerate's FSDP2 on a CPU mesh
    trainer = lalora.LaLoRATrainer(model=model, args=targs, train_dataset=examples(),
                                   data_collator=default_data_collator, precision=precision, strength=STRENGTH,
                                   form="linearized")
    trainer.train()
    assert trainer.is_fsdp_enabled and trainer.regularizer.sharding == "fsdp2"
    weights = {n: p.full_tensor().detach().clone() for n, p in trainer.regularizer._params.items()}
    if rank == 0:
        save_file(weights, os.path.join(out_dir, "trainer.safetensors"))


def _fsdp1_refused(rank, out_dir):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from test_distributed import _source
    from test_trainer import make_model

    model = make_model()
    precision = lalora.fit_precision(model, _source(), "diag", progress=False)
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    try:
        lalora.LaLoRARegularizer(wrapped, precision, 1.0)
    except NotImplementedError as e:
        if rank == 0:
            with open(os.path.join(out_dir, "fsdp1.txt"), "w") as f:
                f.write(str(e))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for form in ("linearized", "effective-weight"):
            _plain_fsdp2(rank, out_dir, form)
        dist.barrier()
        _trainer_fsdp2(rank, out_dir)
        _fsdp1_refused(rank, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, out, WORLD)
    return out


def _reference(precision, form, strength):
    """One process, plain autograd SGD on the whole step's batch (tests/test_trainer.py's data and model)."""
    from transformers import default_data_collator

    from test_trainer import LR, examples, lora_weights, make_model

    model = make_model()
    model.train()
    reg = lalora.LaLoRARegularizer(model, precision, strength, form=form)
    params = list(reg._params.values())
    exs = examples()
    for s in range(2):
        batch = default_data_collator(exs[s * 4:(s + 1) * 4])
        grads = torch.autograd.grad(model(**batch).loss + reg(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= LR * g
    return lora_weights(model)


def _diff(a, b):
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_fsdp2_plain_loop_equals_one_process(fsdp_run, form):
    from test_trainer import STRENGTH

    precision = lalora.Precision.load(fsdp_run / "kfac.safetensors")
    got = load_file(str(fsdp_run / f"plain-{form}.safetensors"))
    ref = _reference(precision, form, STRENGTH)
    assert _diff(got, ref) < TOL, _diff(got, ref)
    assert _diff(ref, _reference(precision, form, 0.0)) > 1e-3  # the penalty matters


def test_trainer_fsdp2_with_accumulation_equals_one_process(fsdp_run):
    from test_trainer import STRENGTH

    precision = lalora.Precision.load(fsdp_run / "kfac.safetensors")
    got = load_file(str(fsdp_run / "trainer.safetensors"))
    ref = _reference(precision, "linearized", STRENGTH)
    assert _diff(got, ref) < TOL, _diff(got, ref)


def test_fsdp1_is_refused_by_name(fsdp_run):
    msg = (fsdp_run / "fsdp1.txt").read_text()
    assert "FSDP1" in msg and "fully_shard" in msg and "'version': 2" in msg


def test_trainer_refuses_accelerate_fsdp1():
    """accelerate's FSDP1 plugin cannot be built without a GPU, so the Trainer's decision is checked on the
    attributes it reads (``is_fsdp_enabled``, ``accelerator.state.fsdp_plugin.fsdp_version``)."""
    from types import SimpleNamespace

    from lalora.integrations.trainer_setup import launcher_of

    def trainer(version):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
        return SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True,
                               accelerator=SimpleNamespace(state=state))

    assert launcher_of(trainer(2)) == "fsdp2"
    with pytest.raises(NotImplementedError, match="FSDP1.*'version': 2"):
        launcher_of(trainer(1))
