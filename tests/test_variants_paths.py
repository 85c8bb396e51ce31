"""peft variants through the other paths: the Trainer's fit at the start of training, ``skip_nonfinite`` on the
tapped stream, several adapters, the dry run's bytes. References and tolerances: ``test_variants``."""
import pytest
import torch
from peft import LoraConfig

from lalora import LaLoRARegularizer
from models import VOCAB, randomize_lora_B, tiny_llama, token_batches
from test_variants import TOL, _check_covers_everything, _fit, _peft, _trainable, brute_ef, rel


def test_trainer_fit_at_start_covers_modules_to_save(tmp_path):
    """LaLoRATrainer(source_data=...) gets the others through fit_precision: the head copy is in its precision, with
    the brute-force diagonal at the weights training starts from."""
    from transformers import TrainingArguments, default_data_collator

    from lalora.integrations.trainer import LaLoRATrainer

    model = _peft(tiny_llama(0), modules_to_save=["lm_head"])
    randomize_lora_B(model)
    source = token_batches(2)
    ref = brute_ef(model, source, ["lm_head.modules_to_save.weight"])  # at theta0, before any step
    (b,) = token_batches(1, batch_size=4, seed=5)
    train = [{k: v[i] for k, v in b.items()} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = LaLoRATrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                            source_data=source, backend="kfac", strength=1.0, fit_options={"uncovered": "error"})
    trainer.train()
    precision = trainer.regularizer.precision
    _check_covers_everything(model, precision)
    got = precision.diagonal()["lm_head.modules_to_save.weight"].reshape(-1)
    assert rel(got, torch.diagonal(ref)) <= TOL


def test_tap_leaves_out_a_batch_the_backend_skips():
    """skip_nonfinite with a non-Kronecker-covered tensor: a batch whose loss is not finite is left out of the others'
    diagonal as of the backend's blocks (the diagonal equals a fit on the finite batches only)."""
    model = _peft(tiny_llama(0), modules_to_save=["lm_head"])
    randomize_lora_B(model)
    good = token_batches(2)
    bad = {k: v.clone() for k, v in token_batches(1, seed=9)[0].items()}
    with torch.no_grad():
        head = _trainable(model)["lm_head.modules_to_save.weight"]
        saved = head.detach().clone()
    # a non-finite loss on one batch only: its tokens are one id no good batch uses, whose embedding is inf
    used = set(torch.cat([b["input_ids"].reshape(-1) for b in good]).tolist())
    tok = next(t for t in range(1, VOCAB) if t not in used)
    bad["input_ids"][:] = tok
    with torch.no_grad():
        row = model.base_model.model.model.embed_tokens.weight[tok].clone()
        model.base_model.model.model.embed_tokens.weight[tok] = float("inf")
    try:
        mixed = _fit(model, [good[0], bad, good[1]], "kfac", options={"curvature": "ef"}, skip_nonfinite=True)
    finally:
        with torch.no_grad():
            model.base_model.model.model.embed_tokens.weight[tok] = row
            head.copy_(saved)
    assert mixed.metadata["skipped_nonfinite"] == 1
    clean = _fit(model, good, "kfac", options={"curvature": "ef"})
    name = "lm_head.modules_to_save.weight"
    assert rel(mixed.diagonal()[name], clean.diagonal()[name]) <= TOL


def test_several_adapters_keep_the_adapter_name():
    model = _peft(tiny_llama(0), use_dora=True)
    torch.manual_seed(2)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="orthogonal",
                                           use_dora=True))
    model.base_model.set_adapter(["default", "second"])
    precision = _fit(model, token_batches(1), "block", adapter_name=["default", "second"])
    names = set(precision.param_names)
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.second.weight" in names
    assert "model.layers.0.self_attn.q_proj.lora_A.second" in names
    assert len(names) == len({n for n, p in model.named_parameters() if p.requires_grad})
    LaLoRARegularizer(model, precision, 1.0, adapter_name=["default", "second"], uncovered="error")


@pytest.mark.parametrize("backend", ["diag", "block", "kfac"])
def test_dry_run_bytes_include_the_others(backend):
    """``lalora fit --dry-run``'s exact bytes (``lalora.estimate.stored_bytes``) count the others' DiagBlocks and
    DoRA magnitudes: equal to the fitted precision's ``num_bytes``."""
    from lalora.estimate import stored_bytes

    dora = backend != "kfac"
    model = _peft(tiny_llama(0), use_dora=dora, modules_to_save=["lm_head"], trainable_token_indices=[2, 3])
    precision = _fit(model, token_batches(1), backend)
    assert stored_bytes(model, backend) == precision.num_bytes
    assert stored_bytes(model, backend, others="none") < precision.num_bytes


def test_kfac_passes_tap_the_first_pass_only():
    """kfac with max_memory reads the data once per group of layers (replayed streams): the others' diagonal is
    accumulated on the first pass only, so it still equals the brute-force diagonal."""
    from test_variants import _left_padded

    model = _peft(tiny_llama(0), modules_to_save=["lm_head"])
    randomize_lora_B(model)
    batches = _left_padded()
    precision = _fit(model, batches, "kfac", options={"curvature": "ef", "max_memory": "7KiB"})
    assert precision.metadata["kfac_passes"] > 1
    _check_covers_everything(model, precision)
    name = "lm_head.modules_to_save.weight"
    assert rel(precision.diagonal()[name].reshape(-1), torch.diagonal(brute_ef(model, batches, [name]))) <= TOL
