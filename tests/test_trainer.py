"""LaLoRATrainer and the plain-PyTorch helper on a tiny Llama: the penalty enters once per optimizer
step (accumulation k == no accumulation == a hand-written SGD reference), is logged separately,
survives checkpoint/resume with the same anchor, and is computed in float32 for bf16 models."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments, default_data_collator

import lalora
from lalora import AnchorMismatchError, LaLoRARegularizer, fit_precision
from lalora.adapters import find_lora_adapters, lora_parameters
from lalora.integrations.trainer import PRECISION_FILE, STATE_FILE, LaLoRATrainer
from models import randomize_lora_B, tiny_llama, tiny_lora_llama, token_batches

LR = 0.5
STRENGTH = 50.0
N_EX = 8


def make_model(dtype=torch.float32, lora_dtype_autocast=True):
    if dtype == torch.float32:
        model = tiny_lora_llama(seed=0)
    else:
        base = tiny_llama(0, dtype=dtype)
        torch.manual_seed(1)
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
        model = get_peft_model(base, cfg, autocast_adapter_dtype=lora_dtype_autocast)
    randomize_lora_B(model)
    return model


def examples():
    (b,) = token_batches(n_batches=1, batch_size=N_EX, seq_len=7, seed=5)
    return [{k: v[i] for k, v in b.items()} for i in range(N_EX)]


@pytest.fixture(scope="module")
def precision():
    model = make_model()
    src = token_batches(n_batches=2, batch_size=4, seq_len=7, seed=11)
    return fit_precision(model, src, "diag", progress=False)


def lora_weights(model):
    return {n: p.detach().float().clone() for n, p in lora_parameters(find_lora_adapters(model)).items()}


def args(tmp_path, bs, ga, steps, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=0.0, warmup_steps=0, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                train_sampling_strategy="sequential", disable_tqdm=True, remove_unused_columns=False, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def trainer_run(tmp_path, precision, bs, ga, steps, strength=STRENGTH, **kw):
    model = make_model()
    trainer = LaLoRATrainer(model=model, args=args(tmp_path, bs, ga, steps, **kw), train_dataset=examples(),
                            data_collator=default_data_collator, precision=precision, strength=strength)
    trainer.train()
    return model, trainer


def reference(precision, steps, per_step=4, strength=STRENGTH):
    """Hand-written SGD: loss = mean over the step's labelled tokens + reg()."""
    model = make_model()
    model.train()
    reg = LaLoRARegularizer(model, precision, strength)
    params = list(lora_parameters(find_lora_adapters(model)).values())
    exs = examples()
    penalties = []
    for s in range(steps):
        batch = default_data_collator(exs[s * per_step:(s + 1) * per_step])
        pen = reg()
        penalties.append(float(pen.detach()))
        loss = model(**batch).loss + pen
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= LR * g
    return lora_weights(model), penalties


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_accumulation_equivalence_and_logging(tmp_path, precision):
    ref, ref_pen = reference(precision, steps=2)
    ref0, _ = reference(precision, steps=2, strength=0.0)
    start = lora_weights(make_model())
    assert ref_pen[0] == 0.0 and ref_pen[1] > 0
    # The penalty must matter, else the test could not fail.
    assert max_diff(ref, ref0) > 1e-3
    assert max_diff(ref, start) > 1e-2
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        model, trainer = trainer_run(tmp_path / f"bs{bs}", precision, bs, ga, steps=2)
        got = lora_weights(model)
        assert max_diff(got, ref) < 2e-6, (bs, ga, max_diff(got, ref))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 2
        for h, p in zip(logs, ref_pen):
            assert h["lalora_penalty"] == pytest.approx(p, rel=1e-5, abs=1e-9)
            assert h["task_loss"] == h["loss"]


def test_resume_from_checkpoint_same_anchor(tmp_path, precision):
    out = tmp_path / "run"
    full, _ = trainer_run(out, precision, 4, 1, steps=2, save_strategy="steps", save_steps=1)
    ckpt = out / "checkpoint-1"
    assert (ckpt / PRECISION_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    saved = lalora.Precision.load(ckpt / PRECISION_FILE)
    assert all(torch.equal(saved.anchor[n], precision.anchor[n]) for n in precision.param_names)
    target = lora_weights(full)

    for given in (precision, None):  # with the precision, and from the checkpoint alone
        model = make_model()
        trainer = LaLoRATrainer(model=model, args=args(tmp_path / f"resume{given is None}", 4, 1, 2),
                                train_dataset=examples(), data_collator=default_data_collator,
                                precision=given, strength=None if given is None else STRENGTH)
        trainer.train(resume_from_checkpoint=str(ckpt))
        assert trainer.regularizer.strength == STRENGTH
        assert max_diff(lora_weights(model), target) < 1e-6

    # A different precision (another anchor) is refused on resume.
    other = precision.with_anchor({n: t + 0.01 for n, t in precision.anchor.items()})
    model = make_model()
    trainer = LaLoRATrainer(model=model, args=args(tmp_path / "bad", 4, 1, 2), train_dataset=examples(),
                            data_collator=default_data_collator, precision=other, strength=STRENGTH, anchor="ignore")
    with pytest.raises(AnchorMismatchError, match="anchor"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_anchor_mismatch_and_reset(tmp_path, precision):
    model = make_model()
    with torch.no_grad():
        next(iter(lora_parameters(find_lora_adapters(model)).values())).add_(0.1)
    kw = dict(args=args(tmp_path, 4, 1, 1), train_dataset=examples(), data_collator=default_data_collator,
              precision=precision, strength=STRENGTH)
    with pytest.raises(AnchorMismatchError, match=r"LaLoRATrainer\(\.\.\., anchor='reset'\)"):
        LaLoRATrainer(model=model, **kw)
    LaLoRATrainer(model=model, anchor="reset", **kw)
    assert max_diff(lora_weights(model), precision.anchor) == 0.0
    with pytest.raises(ValueError, match="strength"):
        LaLoRATrainer(model=model, args=kw["args"], precision=precision)
    with pytest.raises(ValueError, match="anchor="):
        LaLoRATrainer(model=model, anchor="sometimes", **kw)


@pytest.mark.parametrize("lora_fp32", [True, False])
def test_bf16_model(tmp_path, lora_fp32):
    model = make_model(torch.bfloat16, lora_dtype_autocast=lora_fp32)
    params = lora_parameters(find_lora_adapters(model))
    want = torch.float32 if lora_fp32 else torch.bfloat16
    assert all(p.dtype == want for p in params.values())
    src = token_batches(n_batches=2, batch_size=4, seq_len=7, seed=11)
    prec = fit_precision(model, src, "diag", progress=False)
    trainer = LaLoRATrainer(model=model, args=args(tmp_path, 2, 2, 3, bf16=True), train_dataset=examples(),
                            data_collator=default_data_collator, precision=prec, strength=STRENGTH)
    trainer.train()
    reg = trainer.regularizer
    pen = reg()
    assert pen.dtype == torch.float32
    # fp64 reference of the penalty from the (bf16 or fp32) weights.
    d = {n: p.detach().double() - prec.anchor[n].double() for n, p in params.items()}
    dense = prec.to_dense()
    flat = torch.cat([d[n].flatten() for n in prec.param_names])
    ref = 0.5 * STRENGTH * flat @ dense @ flat
    assert ref > 0
    assert float(pen.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert all(p.dtype == want for p in params.values())
    pens = [h["lalora_penalty"] for h in trainer.state.log_history if "lalora_penalty" in h]
    assert len(pens) == 3 and pens[0] == 0.0 and pens[-1] > 0


def test_regularized_helper_with_accumulation(precision):
    exs = examples()
    full = default_data_collator(exs[:4])

    def run(k):
        model = make_model()
        reg = LaLoRARegularizer(model, precision, STRENGTH)
        params = list(lora_parameters(find_lora_adapters(model)).values())
        with torch.no_grad():  # move away from theta0 so the penalty has a gradient
            for p in params:
                p.add_(0.05)
        n_tok = (full["labels"][:, 1:] != -100).sum()

        def loss_fn(batch):  # summed token loss / tokens of the whole step: micro-losses add up
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten(), reduction="sum") / n_tok

        f = lalora.regularized(loss_fn, reg, accumulation_steps=k)
        assert f.regularizer is reg
        for i in range(k):
            micro = {key: v[i * 4 // k:(i + 1) * 4 // k] for key, v in full.items()}
            f(micro).backward()
        return [p.grad.clone() for p in params], reg

    g1, reg = run(1)
    for k in (2, 4):
        gk, _ = run(k)
        assert max((a - b).abs().max().item() for a, b in zip(g1, gk)) < 1e-6
    with pytest.raises(ValueError, match="accumulation_steps"):
        lalora.regularized(lambda: 0, reg, accumulation_steps=0)


def test_lazy_export():
    import subprocess
    import sys

    code = "import sys, lalora; assert 'transformers.trainer' not in sys.modules, 'import lalora imported the Trainer'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert lalora.LaLoRATrainer is LaLoRATrainer and lalora.integrations.LaLoRATrainer is LaLoRATrainer


def test_fp16_lora_weights_penalty_in_fp32():
    """fp16 base model and fp16 LoRA weights: the penalty and its value are fp32 (float64 reference)."""
    model = make_model(torch.float16, lora_dtype_autocast=False)
    params = lora_parameters(find_lora_adapters(model))
    assert all(p.dtype == torch.float16 for p in params.values())
    prec = fit_precision(model, token_batches(n_batches=1, batch_size=4, seq_len=7, seed=11), "diag", progress=False)
    reg = LaLoRARegularizer(model, prec, STRENGTH)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    pen = reg()
    assert pen.dtype == torch.float32
    flat = torch.cat([(params[n].detach().double() - prec.anchor[n].double()).flatten() for n in prec.param_names])
    ref = 0.5 * STRENGTH * flat @ prec.to_dense() @ flat
    assert ref > 0 and float(pen.detach()) == pytest.approx(float(ref), rel=1e-5)
    pen.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float16 for p in params.values())
