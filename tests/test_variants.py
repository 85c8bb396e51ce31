"""peft variants: every trainable tensor is covered (``fit_precision(others="diag")``) or refused by name.

Reference: brute force here, per example, on unpadded singletons (``lalora.reference.unpadded_examples`` and
``example_loss``: the loss by its definition, one example at a time), with plain autograd w.r.t. the
model's parameters picked by their peft names by hand (``_by_hand``), never through lalora's name mapping
(``lalora.others``), its per-example gradients (``lalora.pergrad``) or its hooks (``lalora.capture``).
EF = (1/N) sum_n g_n g_n^T in float64.

Tolerance: the fit runs the float32 model on padded batches (another summation order than the singletons)
and accumulates squares of float32 per-example gradients; the reference does the same float32 forward per
example in float64 sums. Relative (Frobenius) errors of float32 round-off are ~1e-7; 1e-5 leaves room
for the sums over N examples and is still far below any modelling error (a missing term, a wrong
normalisation or a padded position counted is >= 1e-2 here).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM

import lalora
from lalora import BackendError, LaLoRARegularizer, UncoveredParameterWarning, fit_precision
from lalora.reference import example_loss, unpadded_examples
from models import VOCAB, labelled_sequences, pad_batch, randomize_lora_B, tiny_gpt2, tiny_llama, token_batches

TOL = 1e-5


def _by_hand(full: str) -> str:
    """The canonical name of a single-adapter model's parameter, by peft's naming rule written out here."""
    name = full.removeprefix("base_model.model.").replace(".default.", ".").removesuffix(".default")
    for m in ("lora_A", "lora_B"):
        name = name.replace(f".{m}.weight", f".{m}") if "down_proj.lora" not in name and "experts.lora" not in name else name
    return name


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {_by_hand(n): p for n, p in model.named_parameters() if p.requires_grad}


def brute_ef(model, batches, names) -> torch.Tensor:
    """(P, P) float64 EF over ``names`` (canonical, as ``_by_hand``) from per-example autograd on singletons."""
    params = _trainable(model)
    tensors = [params[n] for n in names]
    rows = []
    model.eval()
    for one in unpadded_examples(batches):
        grads = torch.autograd.grad(example_loss(model, one), tensors, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).double().reshape(-1)
                               for g, t in zip(grads, tensors)]))
    G = torch.stack(rows)
    return G.T @ G / G.shape[0]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _peft(base, *, init="orthogonal", fan_in_fan_out=False, **cfg):
    torch.manual_seed(1)
    cfg.setdefault("target_modules", ["q_proj", "v_proj"] if not fan_in_fan_out else ["c_attn"])
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=init, lora_dropout=0.0,
                                           fan_in_fan_out=fan_in_fan_out, **cfg))


def _fit(model, batches, backend="diag", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        warnings.simplefilter("error", UncoveredParameterWarning)  # nothing may be left uncovered
        return fit_precision(model, batches, backend, progress=False, **kw)


def _check_covers_everything(model, precision):
    trainable = set(_trainable(model))
    assert set(precision.param_names) == trainable, trainable ^ set(precision.param_names)


def _left_padded(position_ids: bool = False):
    """Left padding, masked prompts and labels (``labelled_sequences``); GPT-2's learned positions need position_ids."""
    return [pad_batch(labelled_sequences(), side="left", position_ids=position_ids)]


VARIANTS = {
    # name: (model builder, batches builder)
    "llama-modules_to_save": (lambda: _peft(tiny_llama(0), modules_to_save=["lm_head"]), lambda: token_batches(2)),
    "llama-trainable_tokens-left-padded": (lambda: _peft(tiny_llama(0), trainable_token_indices=[1, 2, 5, 9]),
                                           _left_padded),
    "llama-bias_all": (lambda: _peft(tiny_llama(0, mlp_bias=True), bias="all", target_modules=["gate_proj"]),
                       lambda: token_batches(2)),
    "gpt2-lora_bias": (lambda: _peft(tiny_gpt2(0), init=True, lora_bias=True, fan_in_fan_out=True), lambda: token_batches(2)),
    "gpt2-bias_lora_only": (lambda: _peft(tiny_gpt2(0), bias="lora_only", fan_in_fan_out=True), lambda: token_batches(2)),
    "gpt2-modules_to_save-left-padded": (lambda: _peft(tiny_gpt2(0), modules_to_save=["lm_head"], fan_in_fan_out=True),
                                         lambda: _left_padded(position_ids=True)),
    "llama-target_parameters": (lambda: _peft(tiny_llama(0), target_parameters=["mlp.down_proj.weight"]),
                                lambda: token_batches(2)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diag_covers_every_trainable_tensor_exactly(variant):
    build, data = VARIANTS[variant]
    model, batches = build(), data()
    randomize_lora_B(model)
    precision = _fit(model, batches)
    _check_covers_everything(model, precision)
    ref = brute_ef(model, batches, precision.param_names)
    assert rel(torch.diagonal(precision.to_dense()), torch.diagonal(ref)) <= TOL
    assert set(precision.metadata["others"]["params"]) == set(precision.param_names) - {
        n for n in precision.param_names if n.endswith((".lora_A", ".lora_B"))}


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_structured_backend_gets_the_generic_diagonal_beside_its_blocks(backend):
    """A Kronecker precision over the LoRA matrices plus the others' EF diagonal from the tapped stream: the
    LoRA blocks are those of a fit without others, the others' blocks the brute-force diagonal."""
    model, batches = _peft(tiny_llama(0), modules_to_save=["lm_head"], trainable_token_indices=[3, 4]), _left_padded()
    randomize_lora_B(model)
    mixed = _fit(model, batches, backend, options={"curvature": "ef"})
    _check_covers_everything(model, mixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_only = fit_precision(model, batches, backend, options={"curvature": "ef"}, progress=False, others="none")
    lora_names = lora_only.param_names
    assert mixed.param_names[:len(lora_names)] == lora_names
    n = sum(mixed.anchor[p].numel() for p in lora_names)
    assert rel(mixed.to_dense()[:n, :n], lora_only.to_dense()) <= TOL
    others = mixed.param_names[len(lora_names):]
    assert sorted(others) == ["lm_head.modules_to_save.weight", "model.embed_tokens.token_adapter.trainable_tokens_delta"]
    got = torch.cat([mixed.diagonal()[p].reshape(-1) for p in others])
    assert rel(got, torch.diagonal(brute_ef(model, batches, others))) <= TOL
    assert mixed.metadata["others"]["covered_by"] == "lalora.pergrad"


def _dora(family, b_nonzero):
    if family == "llama":
        model = _peft(tiny_llama(0), use_dora=True)
    else:
        model = _peft(tiny_gpt2(0), use_dora=True, fan_in_fan_out=True)
    if b_nonzero:
        randomize_lora_B(model)
    return model


@pytest.mark.parametrize("b_nonzero", [False, True], ids=["B=0", "B!=0"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_diag_and_block_match_brute_force(family, b_nonzero):
    model = _dora(family, b_nonzero)
    if not b_nonzero:  # orthogonal init: B != 0 already; make B = 0 (peft's default init) by hand
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
    batches = _left_padded() if family == "llama" else token_batches(2)
    diag = _fit(model, batches, "diag")
    _check_covers_everything(model, diag)
    ref = brute_ef(model, batches, diag.param_names)
    assert rel(torch.diagonal(diag.to_dense()), torch.diagonal(ref)) <= TOL
    block = _fit(model, batches, "block")
    _check_covers_everything(model, block)
    # one dense block per adapter: A, B and its magnitude vector, with their cross terms
    assert all(len(b.params) == 3 and b.params[2].endswith("lora_magnitude_vector.weight") for b in block.blocks)
    ref = brute_ef(model, batches, block.param_names)
    assert rel(block.to_dense(), _block_diagonal(ref, block)) <= TOL
    mags = [n for n in block.param_names if "magnitude" in n]
    assert all(bool(block.diagonal()[m].any()) for m in mags)  # the magnitudes have curvature


def _block_diagonal(dense, precision):
    """``dense`` restricted to the precision's blocks (zero between blocks)."""
    offsets, i = {}, 0
    for n in precision.param_names:
        offsets[n] = torch.arange(i, i + precision.anchor[n].numel())
        i += precision.anchor[n].numel()
    out = torch.zeros_like(dense)
    for b in precision.blocks:
        idx = torch.cat([offsets[p] for p in b.params])
        out[idx[:, None], idx[None, :]] = dense[idx[:, None], idx[None, :]]
    return out


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac", "backpack", "laplace"])
def test_dora_is_refused_by_backends_that_do_not_model_it(backend):
    if not lalora.get_backend(backend).available()[0]:
        pytest.skip(f"backend {backend!r}: {lalora.get_backend(backend).available()[1]}")
    model = _dora("llama", True)
    with pytest.raises(BackendError, match=r"does not support DoRA.*'model\.layers\.0\.self_attn\.q_proj'"):
        fit_precision(model, token_batches(1), backend, progress=False)
    with pytest.raises(BackendError, match="curvature='ggn' does not model DoRA"):
        fit_precision(model, token_batches(1), "block", options={"curvature": "ggn"}, progress=False)


def test_moe_target_parameters_on_fused_experts():
    """LoRA on a 3-D experts parameter (peft's ParamWrapper): its lora_A/lora_B are never called as modules, so they
    are covered by the generic diagonal, exactly."""
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64,
                        attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = _peft(MixtralForCausalLM(cfg).eval(), target_parameters=["mlp.experts.gate_up_proj"], init=True)
    randomize_lora_B(model)
    batches = token_batches(2)
    precision = _fit(model, batches)
    _check_covers_everything(model, precision)
    assert any("experts.lora_A" in n for n in precision.param_names)
    ref = brute_ef(model, batches, precision.param_names)
    assert rel(torch.diagonal(precision.to_dense()), torch.diagonal(ref)) <= TOL


def test_regularizer_and_file_handle_the_mix(tmp_path):
    """The penalty of a mixed precision (dense DoRA blocks + DiagBlocks) is (lambda/2) d^T F d over every covered
    tensor, its gradient reaches the modules_to_save copy, and the file round-trips bit for bit onto a fresh model."""
    def build():
        return _peft(tiny_llama(0), use_dora=True, modules_to_save=["lm_head"])
    model = build()
    precision = _fit(model, token_batches(2), "block")
    assert precision.structure == "dense+diag"
    path = tmp_path / "p.safetensors"
    precision.save(path)
    loaded = lalora.Precision.load(path, model=build())
    assert loaded.param_names == precision.param_names
    assert all(torch.equal(loaded.to_dense(), precision.to_dense()) for _ in [0])
    reg = LaLoRARegularizer(model, loaded, 3.0, uncovered="error")
    params = _trainable(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    d = torch.cat([(params[n].detach().double() - loaded.anchor[n].double()).reshape(-1) for n in loaded.param_names])
    expected = 0.5 * 3.0 * d @ precision.to_dense() @ d
    value = reg()
    # float32 penalty vs float64 dense form: round-off only
    assert abs(float(value.detach()) - float(expected)) <= 1e-5 * float(expected)
    value.backward()
    head = params["lm_head.modules_to_save.weight"]
    assert head.grad is not None and bool(head.grad.any())


def test_others_none_leaves_them_reported_and_bad_value_is_refused():
    model = _peft(tiny_llama(0), use_dora=True, modules_to_save=["lm_head"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = fit_precision(model, token_batches(1), "diag", progress=False, others="none")
    msg = " ".join(str(w.message) for w in caught if issubclass(w.category, UncoveredParameterWarning))
    assert "DoRA magnitude vectors" in msg and "modules_to_save" in msg and "others='diag'" in msg
    assert all(n.endswith((".lora_A", ".lora_B")) for n in p.param_names)
    with pytest.raises(ValueError, match="others='sometimes'"):
        fit_precision(model, token_batches(1), "diag", progress=False, others="sometimes")

