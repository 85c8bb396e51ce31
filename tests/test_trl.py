"""TRL's SFT, DPO and GRPO trainers with the LaLoRA penalty (lalora.integrations.trl).

Each update test runs ONE SGD step from LoRA weights away from theta0 (so the penalty has a gradient) and
compares the change of every LoRA weight with ``-lr * (grad task + grad penalty)`` computed by hand: the
task loss from the token ids the trainer's ``compute_loss`` received (recorded), with the trainer's own
normalisation written out here, through a plain forward of an identically built model; the penalty
gradient ``strength * P d`` from the dense precision in float64. Tolerance 2e-6 (absolute, on updates of
1e-3..1e-1): two float32 evaluations of the same forward/backward on a tiny model differ by summation order
only (~1e-7); a penalty counted twice, dropped or scaled by the accumulation steps moves the update by at
least the penalty part, which each test checks is > 1e-3.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import trl  # noqa: E402,F401  (the test extra: pip install -e '.[test]'; a missing one fails, not skips)

import datasets  # noqa: E402  (installed with TRL)
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, GRPOConfig, SFTConfig  # noqa: E402

import lalora  # noqa: E402
from lalora import AnchorMismatchError  # noqa: E402
from lalora.integrations.trainer import PRECISION_FILE  # noqa: E402
from lalora.integrations.trl import LaLoRADPOTrainer, LaLoRAGRPOTrainer, LaLoRASFTTrainer, lalora_trainer  # noqa: E402
from models import tiny_llama  # noqa: E402
from spawn import run_ranks  # noqa: E402
from numerics import F32, rel_close  # noqa: E402
from stack_helpers import (LR, STRENGTH, VOCAB, diff, expected_update, lora, make_model, max_abs,  # noqa: E402
                           perturb, recording, source_batches, token_logps, tokenizer, weights)

TOL = 2e-6


def common(tmp_path, ga, bs, steps=1, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=0.0, warmup_steps=0, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential",
                bf16=False)  # TRL's configs default to bf16 autocast (also on CPU); the references are float32
    base.update(kw)
    return base


def sft_dataset(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)  # varying lengths: padding and unequal token counts per micro-batch
    return datasets.Dataset.from_list([{"input_ids": torch.randint(0, 256, (4 + i % 4,), generator=g).tolist()}
                                       for i in range(n)])


def start(fit_backend="diag", **fit_kw):
    """(trainer's model, reference model at the same weights, precision fitted at theta0)."""
    model = make_model()
    precision = lalora.fit_precision(model, source_batches(), fit_backend, progress=False, **fit_kw)
    perturb(model)
    ref = make_model()
    perturb(ref)
    return model, ref, precision


def check_update(model, ref, precision, before, task_loss):
    got = {n: w - before[n] for n, w in weights(model).items()}
    step, pen, task = expected_update(ref, precision, task_loss)
    assert max_abs(pen) > 1e-3 and max_abs(task) > 1e-3  # both parts matter, so the test can fail
    assert diff(got, step) < TOL, diff(got, step)
    return diff(got, step)


# --- SFTTrainer: normalised by num_items_in_batch when the model accepts loss kwargs --------------------
def fused(trainer, on: bool) -> None:
    """Take the DeepSpeed path on one process: the penalty joins the first micro-batch's loss, multiplied by
    what the Trainer divides the loss by (tests/test_deepspeed.py runs it under DeepSpeed itself)."""
    if on:
        trainer._lalora_launcher = "deepspeed"


@pytest.mark.parametrize("ga,accepts,fuse", [(1, True, False), (2, True, False), (2, False, False), (2, True, True),
                                             (2, False, True)])
def test_sft_update_equals_hand_computed(tmp_path, ga, accepts, fuse):
    model, ref, precision = start("kfac", options={"curvature": "ef"})
    trainer = recording(LaLoRASFTTrainer)(
        model=model, args=SFTConfig(**common(tmp_path, ga, 4 // ga), shuffle_dataset=False),
        train_dataset=sft_dataset(), processing_class=tokenizer(), precision=precision, strength=STRENGTH, form="linearized",
        anchor="ignore")
    assert trainer.model_accepts_loss_kwargs  # a Llama forward takes **kwargs
    trainer.model_accepts_loss_kwargs = accepts
    fused(trainer, fuse)
    before = weights(model)
    trainer.train()
    micro = trainer.recorded
    assert len(micro) == ga

    def task(m):
        nll, count = [], []
        for inputs, _ in micro:
            mask = inputs["labels"][:, 1:] != -100
            nll.append(-(token_logps(m, inputs["input_ids"], inputs["attention_mask"]) * mask).sum())
            count.append(mask.sum())
        if accepts:  # one token mean over the optimizer step
            return sum(nll) / sum(count)
        return sum(n / c for n, c in zip(nll, count)) / ga  # mean of the micro-batch means

    total = sum(int((i["labels"][:, 1:] != -100).sum()) for i, _ in micro)
    assert [None if n is None else int(n) for _, n in micro] == ([total] * ga if accepts else [None] * ga)
    if ga == 2:  # unequal micro-batches, so the two normalisations really differ
        assert len({int((i["labels"][:, 1:] != -100).sum()) for i, _ in micro}) == 2
    check_update(model, ref, precision, before, task)
    logs = [h for h in trainer.state.log_history if "lalora_penalty" in h]
    assert len(logs) == 1 and logs[0]["lalora_penalty"] > 0 and logs[0]["task_loss"] == logs[0]["loss"]


# --- DPOTrainer: loss_is_scaled_for_ga=False, a mean per micro-batch ------------------------------------
def dpo_dataset():
    rows = [("ab", "cde", "fg"), ("hij", "k", "lmn"), ("op", "qrs", "t"), ("uv", "wx", "yz0")]
    return datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])


@pytest.mark.parametrize("ga,fuse", [(1, False), (2, False), (2, True)])
def test_dpo_update_equals_hand_computed(tmp_path, ga, fuse):
    model, ref, precision = start("diag")
    frozen = copy.deepcopy(ref)  # DPO's reference: a copy of the adapter as the trainer got it ("ref" adapter)
    trainer = recording(LaLoRADPOTrainer)(
        model=model, args=DPOConfig(**common(tmp_path, ga, 4 // ga)), train_dataset=dpo_dataset(),
        processing_class=tokenizer(), precision=precision, strength=STRENGTH, form="linearized", anchor="ignore")
    assert trainer.loss_is_scaled_for_ga is False
    fused(trainer, fuse)
    beta = trainer.beta
    before = weights(model)
    trainer.train()
    micro = trainer.recorded
    assert len(micro) == ga

    def task(m):
        losses = []
        for inputs, _ in micro:
            ids, am, cm = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"][:, 1:]
            with torch.no_grad():
                ref_lp = token_logps(frozen, ids, am)
            s = ((token_logps(m, ids, am) - ref_lp) * cm).sum(1)
            chosen, rejected = s.chunk(2)
            losses.append(-F.logsigmoid(beta * (chosen - rejected)).mean())
        return sum(losses) / ga
    check_update(model, ref, precision, before, task)


# --- GRPOTrainer: loss_is_scaled_for_ga=True (it divides by the tokens of the whole generation batch) ---
def reward(completions, **kwargs):
    return [sum(c.encode()) / 100.0 for c in completions]


@pytest.mark.parametrize("ga,fuse", [(1, False), (2, False), (2, True)])
def test_grpo_update_equals_hand_computed(tmp_path, ga, fuse):
    model, ref, precision = start("diag")
    args = GRPOConfig(**common(tmp_path, ga, 4), num_generations=4, max_completion_length=4, shuffle_dataset=False)
    prompts = datasets.Dataset.from_list([{"prompt": p} for p in ("ab", "cde", "fg", "hi")])
    trainer = recording(LaLoRAGRPOTrainer)(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                                           processing_class=tokenizer(), precision=precision, strength=STRENGTH, form="linearized",
                                           anchor="ignore")
    assert trainer.loss_is_scaled_for_ga is True and trainer.loss_type == "dapo" and trainer.beta == 0.0
    fused(trainer, fuse)
    before = weights(model)
    trainer.train()
    micro = trainer.recorded
    assert len(micro) == ga
    n_tokens = sum(int(i["completion_mask"].sum()) for i, _ in micro)
    assert all(int(i["num_items_in_batch"]) == n_tokens for i, _ in micro)

    def task(m):  # ratio pi/pi_old = 1 at the first step: the gradient is -A grad log pi per completion token
        total = 0.0
        for inputs, _ in micro:
            P = inputs["prompt_ids"].shape[1]
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            lp = token_logps(m, ids, am)[:, P - 1:]
            total = total - (inputs["advantages"][:, None] * lp * inputs["completion_mask"]).sum()
        return total / n_tokens
    check_update(model, ref, precision, before, task)


# --- peft_config=: TRL wraps the model itself ---------------------------------------------------------
LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")


def test_peft_config_fits_at_start_saves_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(args=SFTConfig(**common(out, 1, 4, steps=2, save_strategy="steps", save_steps=1), shuffle_dataset=False),
              train_dataset=sft_dataset(), processing_class=tokenizer(), source_data=source_batches(),
              backend="kfac", fit_options={"curvature": "ef"}, strength=STRENGTH)
    trainer = LaLoRASFTTrainer(model=tiny_llama(0, vocab_size=VOCAB), peft_config=LoraConfig(**LORA), **kw)
    assert trainer.regularizer is None  # fitted in train(), on the model TRL wrapped
    theta0 = weights(trainer.model)
    trainer.train()
    fitted = trainer.regularizer.precision
    assert fitted.metadata["backend"] == "kfac"
    assert all(torch.equal(fitted.anchor[n], theta0[n]) for n in theta0)  # a copy of the weights TRL made
    from peft import get_peft_model  # the same model built without TRL, at the weights TRL initialised

    independent_model = get_peft_model(tiny_llama(0, vocab_size=VOCAB), LoraConfig(**LORA))
    with torch.no_grad():
        for n, p in lora(independent_model).items():
            p.copy_(theta0[n])
    independent = lalora.fit_precision(independent_model, source_batches(), "kfac", progress=False,
                                       options={"curvature": "ef"})
    by_params = {tuple(b.params): b for b in fitted.blocks}  # the regularizer groups blocks by shape
    assert set(by_params) == {tuple(b.params) for b in independent.blocks}
    for b1 in independent.blocks:  # the same fit, evaluated twice: float32 round-off
        b2 = by_params[tuple(b1.params)]
        for role, t in b1.tensors().items():
            assert rel_close(b2.tensors()[role], t, F32), (b1.params, role)
    pens = [h["lalora_penalty"] for h in trainer.state.log_history if "lalora_penalty" in h]
    assert pens[0] == 0.0 and pens[1] > 0  # at theta0, then away from it
    saved = lalora.Precision.load(out / "checkpoint-1" / PRECISION_FILE)
    assert all(torch.equal(saved.anchor[n], theta0[n]) for n in theta0)

    # Resuming skips the fit and continues with the checkpoint's precision (a new TRL wrap, other init).
    def no_fit(*a, **k):
        raise AssertionError("the fit must not run when the checkpoint holds a precision")

    monkeypatch.setattr(lalora.fit, "fit_precision", no_fit)
    torch.manual_seed(99)
    resumed = LaLoRASFTTrainer(model=tiny_llama(0, vocab_size=VOCAB), peft_config=LoraConfig(**LORA), **kw)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert all(torch.equal(resumed.regularizer.precision.anchor[n], theta0[n]) for n in theta0)
    assert diff(weights(resumed.model), weights(trainer.model)) < 1e-6


def test_peft_config_with_precision_fitted_elsewhere(tmp_path):
    """A precision fitted on a separately built peft model is not at the adapters TRL makes: the error says
    why and offers source_data= and anchor='reset' in the trainer's arguments; reset then works."""
    from peft import get_peft_model

    torch.manual_seed(1)
    elsewhere = get_peft_model(tiny_llama(0, vocab_size=VOCAB), LoraConfig(**LORA))
    precision = lalora.fit_precision(elsewhere, source_batches(), "diag", progress=False)
    kw = dict(args=SFTConfig(**common(tmp_path, 1, 4), shuffle_dataset=False), train_dataset=sft_dataset(),
              processing_class=tokenizer(), precision=precision, strength=STRENGTH, form="linearized")
    torch.manual_seed(2)
    with pytest.raises(AnchorMismatchError) as e:
        LaLoRASFTTrainer(model=tiny_llama(0, vocab_size=VOCAB), peft_config=LoraConfig(**LORA), **kw)
    msg = str(e.value)
    assert "from peft_config=" in msg and "LaLoRASFTTrainer(..., source_data=..., backend=...)" in msg
    assert "LaLoRASFTTrainer(..., anchor='reset')" in msg and "ERASES" not in msg
    trainer = LaLoRASFTTrainer(model=tiny_llama(0, vocab_size=VOCAB), peft_config=LoraConfig(**LORA), anchor="reset",
                               **kw)
    assert diff(weights(trainer.model), precision.anchor) == 0.0
    trainer.train()


def test_config_changes_accepted_only_for_token_ids():
    """A precision fitted before the trainer existed survives the trainer's change of pad/eos/bos ids (the forward
    does not read them), and nothing else."""
    from lalora.integrations.trainer_setup import accept_trainer_config_changes, config_snapshot

    model = make_model()
    precision = lalora.fit_precision(model, source_batches(), "diag", progress=False)
    before = config_snapshot(model)
    config = model.base_model.model.config
    config.pad_token_id, config.eos_token_id = 256, 256
    accepted = accept_trainer_config_changes(precision, before, model)
    assert accepted.metadata["config_hash"] == config_snapshot(model)[0] != precision.metadata["config_hash"]
    assert accepted.metadata["config_hash_before_trainer"] == precision.metadata["config_hash"]
    lalora.LaLoRARegularizer(model, accepted, 1.0)
    before = config_snapshot(model)
    config.rms_norm_eps = 1e-3  # any other field: another model as far as the config hash can tell
    assert accept_trainer_config_changes(accepted, before, model) is accepted
    with pytest.raises(lalora.ModelMismatchError, match="config hash"):
        lalora.LaLoRARegularizer(model, accepted, 1.0)


def test_arguments_are_checked(tmp_path):
    model = make_model()
    kw = dict(args=SFTConfig(**common(tmp_path, 1, 4)), train_dataset=sft_dataset(), processing_class=tokenizer())
    with pytest.raises(ValueError, match="strength="):
        LaLoRASFTTrainer(model=model, source_data=source_batches(), **kw)
    precision = lalora.fit_precision(model, source_batches(), "diag", progress=False)
    with pytest.raises(ValueError, match="not both"):
        LaLoRASFTTrainer(model=model, precision=precision, source_data=source_batches(), strength=1.0, **kw)
    with pytest.raises(TypeError, match="fit_options"):
        LaLoRASFTTrainer(model=model, source_data=source_batches(), strength=1.0, fit_options=["kfac"], **kw)
    with pytest.raises(TypeError, match="Trainer subclass"):
        lalora_trainer(dict)
    with pytest.raises(ValueError, match="LaLoRASFTTrainer has no precision"):
        LaLoRASFTTrainer(model=model, **kw).train()


# --- 2 processes (DDP, gloo): average_tokens_across_devices multiplies the loss by the world size ----------
WORLD = 2


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, _, precision = start("kfac", options={"curvature": "ef"})
        args = SFTConfig(**common(os.path.join(out_dir, "sft"), 2, 2), shuffle_dataset=False, ddp_backend="gloo",
                         average_tokens_across_devices=True)
        trainer = recording(LaLoRASFTTrainer)(model=model, args=args, train_dataset=sft_dataset(),
                                              processing_class=tokenizer(), precision=precision, strength=STRENGTH,
                                              form="linearized",
                                              anchor="ignore")
        trainer.train()
        torch.save({"recorded": trainer.recorded, "weights": weights(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sft_two_processes_equal_hand_computed(tmp_path):
    run_ranks(_ddp_worker, tmp_path, WORLD)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    micro = [m for run in runs for m in run["recorded"]]
    assert len(micro) == WORLD * 2
    total = sum(int((i["labels"][:, 1:] != -100).sum()) for i, _ in micro)
    assert all(int(n) == total for _, n in micro)  # the token count of the whole step, over both ranks
    assert diff(runs[0]["weights"], runs[1]["weights"]) == 0.0  # DDP: every rank applies the same update
    model, ref, precision = start("kfac", options={"curvature": "ef"})
    before = weights(model)

    def task(m):  # one token mean over the step's micro-batches of both ranks
        return sum(-(token_logps(m, i["input_ids"], i["attention_mask"]) * (i["labels"][:, 1:] != -100)).sum()
                   for i, _ in micro) / total

    got = {n: w - before[n] for n, w in runs[0]["weights"].items()}
    step, pen, task_part = expected_update(ref, precision, task)
    assert max_abs(pen) > 1e-3 and max_abs(task_part) > 1e-3
    assert diff(got, step) < TOL, diff(got, step)


def test_sft_normalized_strength_and_source_loss(tmp_path):
    """``normalize="mean-diagonal"``: the update equals the hand-computed one with the precision divided by its mean
    diagonal (the benchmark's rescaling); ``source_eval_dataset=`` logs the held-out source loss."""
    from lalora.training import heldout_loss

    model, ref, precision = start("kfac", options={"curvature": "ef"})
    held_out = source_batches(n=2, seed=12)
    mean = precision.mean_diagonal()
    # strength STRENGTH * mean: lambda = STRENGTH, so the updates have the other tests' size (TOL's justification)
    trainer = recording(LaLoRASFTTrainer)(
        model=model, args=SFTConfig(**common(tmp_path, 1, 4), shuffle_dataset=False), train_dataset=sft_dataset(),
        processing_class=tokenizer(), precision=precision, strength=STRENGTH * mean, form="linearized", anchor="ignore",
        normalize="mean-diagonal", source_eval_dataset=held_out)
    assert trainer.regularizer.raw_strength == pytest.approx(STRENGTH, rel=1e-6)
    at_start = heldout_loss(model, held_out)
    before = weights(model)
    trainer.train()
    (inputs, _), = trainer.recorded

    def task(m):
        mask = inputs["labels"][:, 1:] != -100
        return -(token_logps(m, inputs["input_ids"], inputs["attention_mask"]) * mask).sum() / mask.sum()

    got = {n: w - before[n] for n, w in weights(model).items()}
    step, pen, _ = expected_update(ref, precision * (1.0 / mean), task, strength=STRENGTH * mean)
    assert max_abs(pen) > 1e-3 and diff(got, step) < TOL, diff(got, step)
    logged = [(h["step"], h["source_loss"]) for h in trainer.state.log_history if "source_loss" in h]
    assert [s for s, _ in logged] == [0, 1]
    assert logged[0][1] == pytest.approx(at_start, rel=1e-6) and logged[1][1] == pytest.approx(
        heldout_loss(model, held_out), rel=1e-6)
