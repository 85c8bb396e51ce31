"""Choosing the strength (issue #22): ``normalize="mean-diagonal"`` (the regularizer, the Trainer, TRL's trainers,
``lalora finetune --normalize``), the held-out source loss (``lalora.training.heldout_loss``, the Trainer's
``source_eval_dataset=``), and the sweep (``lalora.sweep_strengths``, ``lalora sweep``)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

import lalora
from cli_fixtures import data_files, model_dir, precision_file, run  # noqa: F401 (fixtures)
from lalora import DenseBlock, DiagBlock, LaLoRARegularizer, Precision
from lalora.adapters import find_lora_adapters, lora_state
from lalora.training import heldout_loss
from models import fit_quiet, labelled_sequences, pad_batch, randomize_lora_B, singleton_batches, tiny_lora_llama, \
    token_batches

SCALE = 37.5  # a "raw scale" factor between two conventions (EF vs MC, sum vs mean: any positive factor)


def _moved(model, seed=4, size=0.05):
    """Move every LoRA weight away from theta0 (the penalty is 0 there)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.add_(size * torch.randn(p.shape, generator=g))


def _diag_precision(model, seed=0, skip_last=True):
    """A DiagBlock precision with known random values; the last LoRA weight is left uncovered by any block
    (it counts as 0 in the mean diagonal)."""
    anchor = lora_state(find_lora_adapters(model))
    g = torch.Generator().manual_seed(seed)
    names = list(anchor)[:-1] if skip_last else list(anchor)
    blocks = [DiagBlock(n, torch.rand(anchor[n].shape, generator=g) * 3) for n in names]
    return Precision(blocks, anchor)


def test_mean_diagonal_against_the_dense_matrix():
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    P = fit_quiet(model, token_batches(n_batches=2, batch_size=3, seed=2), "kfac")
    dense = P.to_dense()  # float64, formed from each block's own to_dense (not the diagonal code path)
    ref = float(torch.diagonal(dense).mean())
    # float32 factors, float64 sums on both sides: 1e-6 is round-off
    assert P.mean_diagonal() == pytest.approx(ref, rel=1e-6)
    Q = Precision(P.blocks, P.anchor, prior_precision=0.3, validate=False)
    assert Q.mean_diagonal(include_prior=True) == pytest.approx(ref + 0.3, rel=1e-6)


def test_normalized_penalty_by_hand():
    model = tiny_lora_llama(seed=0)
    P = _diag_precision(model)
    _moved(model)
    theta0 = P.anchor
    delta = {n: p.detach().double() - theta0[n].double()
             for n, p in lora_state(find_lora_adapters(model)).items()}
    values = {b.params[0]: b.tensors()["values"].double() for b in P.blocks}
    n_all = sum(t.numel() for t in theta0.values())
    for prior in (0.0, 0.25):
        mean = sum(float(v.sum()) for v in values.values()) / n_all + prior  # uncovered weight: diagonal 0
        quad = sum(float((values[n] * delta[n] ** 2).sum()) for n in values) + prior * sum(
            float((d ** 2).sum()) for d in delta.values())
        reg = LaLoRARegularizer(model, P, 3.0, normalize="mean-diagonal", prior_precision=prior, check_anchor=False,
                                uncovered="ignore")
        assert reg.scale == pytest.approx(mean, rel=1e-6) and reg.raw_strength == pytest.approx(3.0 / mean, rel=1e-6)
        # float32 penalty vs float64 hand sum over ~300 terms: 1e-5 is round-off
        assert float(reg().detach()) == pytest.approx(0.5 * 3.0 / mean * quad, rel=1e-5)
        plain = LaLoRARegularizer(model, P, 3.0, prior_precision=prior, check_anchor=False, uncovered="ignore")
        assert plain.scale == 1.0 and float(plain().detach()) == pytest.approx(0.5 * 3.0 * quad, rel=1e-5)


def test_proportional_precisions_of_two_block_types_give_the_same_normalized_penalty():
    """A diagonal precision and a dense one holding SCALE times the same matrix (another block type, another
    matvec) give one penalty for one normalized strength, and SCALE times it unnormalized."""
    model = tiny_lora_llama(seed=0)
    P = _diag_precision(model, skip_last=False)
    names = list(P.anchor)  # one dense block over every LoRA weight, in flatten order
    values = torch.cat([b.tensors()["values"].flatten() for b in P.blocks])  # a block per weight, in that order
    assert [b.params[0] for b in P.blocks] == names
    dense = Precision([DenseBlock(names, torch.diag(SCALE * values), {n: P.anchor[n].shape for n in names})],
                      P.anchor)
    _moved(model)
    for prior in (dict(), dict(prior_precision=0.1)):
        a = LaLoRARegularizer(model, P, 2.0, normalize="mean-diagonal", check_anchor=False, **prior)
        b = LaLoRARegularizer(model, dense, 2.0, normalize="mean-diagonal", check_anchor=False,
                              **{k: SCALE * v for k, v in prior.items()})  # the prior scales with the matrix
        assert b.scale == pytest.approx(SCALE * a.scale, rel=1e-6)
        assert float(b().detach()) == pytest.approx(float(a().detach()), rel=1e-5)  # float32 round-off of two matvecs
    raw_a = LaLoRARegularizer(model, P, 2.0, check_anchor=False)
    raw_b = LaLoRARegularizer(model, dense, 2.0, check_anchor=False)
    assert float(raw_b().detach()) == pytest.approx(SCALE * float(raw_a().detach()), rel=1e-5)


@pytest.mark.parametrize("form", ["linearized", "effective-weight"])
def test_scaled_kfac_precision_same_normalized_penalty(form):
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    P = fit_quiet(model, token_batches(n_batches=2, batch_size=3, seed=2), "kfac")
    _moved(model)
    a = LaLoRARegularizer(model, P, 5.0, normalize="mean-diagonal", form=form, check_anchor=False)
    b = LaLoRARegularizer(model, P * SCALE, 5.0, normalize="mean-diagonal", form=form, check_anchor=False)
    assert float(b().detach()) == pytest.approx(float(a().detach()), rel=1e-5) and float(a().detach()) > 0
    with pytest.raises(ValueError, match="normalize='trace'"):
        LaLoRARegularizer(model, P, 5.0, normalize="trace", check_anchor=False)


def test_heldout_loss_against_singletons():
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    examples = labelled_sequences()
    batched = [pad_batch(examples[:3], side="right"), pad_batch(examples[3:], side="left")]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in singleton_batches(examples):  # reference: unpadded, one example at a time, log-softmax by hand
            logp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0, :-1].double(), -1)
            tgt = b["labels"][0, 1:]
            keep = tgt != -100
            total -= float(logp[keep].gather(1, tgt[keep, None]).sum())
            count += int(keep.sum())
    model.train()
    value = heldout_loss(model, batched)
    assert model.training  # mode restored
    # padded batches vs singletons, float32 forward: 1e-5 is round-off
    assert value == pytest.approx(total / count, rel=1e-5)


def _trainer(tmp_path, precision, steps, **kw):
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    (b,) = token_batches(n_batches=1, batch_size=8, seq_len=7, seed=5)
    train = [{k: v[i] for k, v in b.items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, train_sampling_strategy="sequential", seed=0)
    return lalora.LaLoRATrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                                precision=precision, strength=50.0, **kw), model


@pytest.fixture(scope="module")
def diag_precision():
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    return fit_quiet(model, token_batches(n_batches=2, batch_size=4, seq_len=7, seed=11), "diag")


def test_trainer_logs_the_heldout_source_loss(tmp_path, diag_precision):
    source = token_batches(n_batches=2, batch_size=3, seq_len=7, seed=21)
    trainer, model = _trainer(tmp_path, diag_precision, 5, source_eval_dataset=source, source_eval_steps=2,
                              normalize="mean-diagonal")
    before = heldout_loss(model, source)
    trainer.train()
    logged = [(h["step"], h["source_loss"]) for h in trainer.state.log_history if "source_loss" in h]
    assert [s for s, _ in logged] == [0, 2, 4, 5]  # the start, every 2 steps, the last step
    assert logged[0][1] == pytest.approx(before, rel=1e-6)  # the same function on the same weights
    assert logged[-1][1] == pytest.approx(heldout_loss(model, source), rel=1e-6)
    assert logged[-1][1] != logged[0][1]  # lr 0.5: training moved the weights
    assert trainer.source_eval_history == [{"step": s, "source_loss": v} for s, v in logged]
    reg = trainer.regularizer
    assert reg.normalize == "mean-diagonal"
    assert reg.raw_strength == pytest.approx(50.0 / diag_precision.mean_diagonal(), rel=1e-6)


def test_trainer_source_eval_of_a_dataset_and_bad_arguments(tmp_path, diag_precision):
    from torch.utils.data import Dataset

    (b,) = token_batches(n_batches=1, batch_size=4, seq_len=7, seed=21)

    class Examples(Dataset):  # examples go through the trainer's collator
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {k: v[i] for k, v in b.items()}

    trainer, model = _trainer(tmp_path, diag_precision, 1, source_eval_dataset=Examples())
    trainer.train()  # logging_steps=1: step 0 and step 1
    logged = [h["source_loss"] for h in trainer.state.log_history if "source_loss" in h]
    assert len(logged) == 2 and logged[1] == pytest.approx(heldout_loss(model, [b]), rel=1e-6)
    with pytest.raises(ValueError, match="source_eval_steps=.*needs source_eval_dataset"):
        _trainer(tmp_path, diag_precision, 1, source_eval_steps=3)
    with pytest.raises(ValueError, match=r"source_eval_steps=.*int >= 1"):
        _trainer(tmp_path, diag_precision, 1, source_eval_dataset=[b], source_eval_steps=0)
    with pytest.raises(ValueError, match="LaLoRATrainer\\(normalize='mean'\\)"):
        _trainer(tmp_path, diag_precision, 1, normalize="mean")


def test_checkpoint_keeps_normalize(tmp_path, diag_precision):
    from lalora.integrations.trainer import STATE_FILE

    trainer, _ = _trainer(tmp_path, diag_precision, 2, normalize="mean-diagonal")
    trainer.train()
    trainer.save_model(str(tmp_path / "ckpt"))
    state = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    assert state["normalize"] == "mean-diagonal"
    assert state["scale"] == pytest.approx(diag_precision.mean_diagonal(), rel=1e-6)


def _sweep_batches():
    """(target train, target held-out, source held-out): the target is one learnable pattern (the same 7 tokens in
    every example), the source random tokens."""
    ids = torch.tensor([[5, 9, 3, 7, 5, 9, 3]] * 4)
    pattern = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return [pattern, pattern], [pattern], token_batches(n_batches=1, batch_size=4, seq_len=7, seed=33)


def test_sweep_strengths_front_and_choice(diag_precision):
    model = tiny_lora_llama(seed=0)
    randomize_lora_B(model)
    train, target, source = _sweep_batches()
    theta0 = {n: t.clone() for n, t in lora_state(find_lora_adapters(model)).items()}
    report = lalora.sweep_strengths(model, diag_precision, train, source_eval=source, target_eval=target,
                                    strengths=(1e4, 0, 10), steps=4, lr=0.05, max_source_increase=0.0)
    pts = report["points"]
    assert [p["strength"] for p in pts] == [0, 10, 1e4]  # ascending, each once
    assert report["base"]["source_loss"] == pytest.approx(heldout_loss(model, source), rel=1e-6)  # left at theta0
    assert all(torch.equal(t, theta0[n]) for n, t in lora_state(find_lora_adapters(model)).items())
    # each row is what one run from theta0 at that strength gives: rerun one by hand
    reg = LaLoRARegularizer(model, diag_precision, 10, normalize="mean-diagonal")
    torch.manual_seed(0)
    lalora.training.train_lora(model, train, 4, 0.05, reg=reg, progress=False)
    assert pts[1]["source_loss"] == pytest.approx(heldout_loss(model, source), rel=1e-6)
    assert pts[1]["raw_strength"] == pytest.approx(10 / diag_precision.mean_diagonal(), rel=1e-6)
    reg.reset_to_anchor()
    # the choice follows the definitions: the largest gain among the points within the tolerance
    ok = [p for p in pts if p["source_increase"] <= 0.0]
    assert report["best"] == (max(ok, key=lambda p: (p["target_gain"], -p["source_increase"])) if ok else None)
    for p in pts:  # on the front exactly when no other point is at least as good on both axes and better on one
        beaten = any(q["target_gain"] >= p["target_gain"] and q["source_increase"] <= p["source_increase"] and q != p
                     and (q["target_gain"], q["source_increase"]) != (p["target_gain"], p["source_increase"])
                     for q in pts)
        assert (p["strength"] in report["front"]) == (not beaten)
    # plain LoRA learns the pattern; a huge strength keeps the model near theta0 on both axes
    assert pts[0]["target_gain"] > 0 and pts[0]["target_gain"] > pts[2]["target_gain"]
    assert abs(pts[2]["source_increase"]) < abs(pts[0]["source_increase"])
    with pytest.raises(ValueError, match="target_eval .* or target_metric"):
        lalora.sweep_strengths(model, diag_precision, train, source_eval=source)


def test_sweep_cli(capsys, tmp_path, model_dir, data_files, precision_file):
    src, task = data_files
    out = tmp_path / "sweep.json"
    code, stdout, err = run(capsys, "sweep", "--model", model_dir, "--precision", precision_file, "--data", task,
                            "--target-eval", task, "--source-eval", src, "--strengths", "0,1,1000", "--steps", 2,
                            "--lr", 0.01, "--max-source-increase", 0.5, "--out", out, "--batch-size", 2, "-q")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert [p["strength"] for p in report["points"]] == [0, 1, 1000] and report["normalize"] == "mean-diagonal"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| strength | raw lambda |" in stdout and f"wrote {out}" in stdout
    best = report["best"]
    assert best is not None and f"--strength {best['strength']:g} --normalize mean-diagonal" in stdout
    P = lalora.Precision.load(precision_file)
    assert report["scale"] == pytest.approx(P.mean_diagonal(), rel=1e-6)
    code, _, err = run(capsys, "sweep", "--model", model_dir, "--precision", precision_file, "--data", task,
                       "--target-eval", task, "--source-eval", tmp_path / "missing.jsonl", "--out", out, "-q")
    assert code == 2 and "--source-eval" in err and "no such file" in err
    code, _, err = run(capsys, "sweep", "--model", model_dir, "--precision", precision_file, "--data", task,
                       "--target-eval", task, "--source-eval", src, "--strengths", "1,-2", "--out", out)
    assert code == 2 and "--strengths" in err
    assert math.isfinite(report["base"]["source_loss"])


def test_finetune_normalize(capsys, tmp_path, model_dir, data_files, precision_file):
    _, task = data_files
    code, stdout, err = run(capsys, "finetune", "--model", model_dir, "--data", task, "--precision", precision_file,
                            "--strength", 2, "--normalize", "mean-diagonal", "--steps", 1, "--out", tmp_path / "a",
                            "--batch-size", 2, "-q")
    assert code == 0, err
    m = lalora.Precision.load(precision_file).mean_diagonal()
    assert f"lambda = 2 / mean diagonal {m:.4g}" in stdout
    code, _, err = run(capsys, "finetune", "--model", model_dir, "--data", task, "--normalize", "mean-diagonal",
                       "--out", tmp_path / "b")
    assert code == 2 and "--normalize needs --precision" in err
