"""A moved anchor (``Precision.with_anchor``, ``consolidate``) moves every form with it, and
``AnchorMismatchError`` gives advice that fits the caller.

References are dense float64 matrices built here, around the *new* anchor theta1, without the
blocks' code paths: ``J^T kron(G, X) J`` with ``J`` the Jacobian of ``(A, B) -> vec(s B A)`` at
theta1 from ``torch.autograd.functional.jacobian`` (kfac: its diagonal A/B blocks), and
``vec(Delta)^T kron(G, X) vec(Delta)``, ``Delta = s (B A - B1 A1)``, for the effective-weight form.
Before the fix the effective-weight form was 0.14-0.28 at the moved anchor (not 0) and every
Kronecker form was off by 77-853 % from these references one step away.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from transformers import Trainer, TrainingArguments, default_data_collator

import lalora
from numerics import F64, rel_close
from lalora import AnchorMismatchError, LaLoRARegularizer
from lalora.adapters import find_lora_adapters, lora_parameters
from lalora.blocks import DenseBlock, DiagBlock
from lalora.blocks.kronecker import KFACBlock, TriKFACBlock
from lalora.continual import consolidate
from lalora.integrations.trainer import LaLoRATrainer, LaLoRATrainerMixin
from models import randomize_lora_B, tiny_lora_llama, token_batches

KINDS = ("kfac", "tri-kfac", "kfac-lowrank", "tri-kfac-lowrank", "diag", "dense")
KRONECKER = KINDS[:4]
STRENGTH = 3.0
# float32 penalty vs float64 reference over a few hundred terms: 1e-5 relative is round-off
# (measured 6e-9 .. 1e-7)
TOL = 1e-5


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _psd(n, g):
    M = torch.randn(n, n + 2, generator=g)
    return M @ M.T / n


def _precision(kind, anchor, scalings, seed=0):
    """Random PSD curvature of ``kind`` over the adapters in ``anchor`` (blocks fitted at ``anchor``)."""
    g = torch.Generator().manual_seed(seed)
    names = list(anchor)
    blocks = []
    for a, b in zip(names[::2], names[1::2]):
        A0, B0 = anchor[a], anchor[b]
        if kind == "diag":
            blocks += [DiagBlock(a, torch.rand(A0.shape, generator=g)), DiagBlock(b, torch.rand(B0.shape, generator=g))]
        elif kind == "dense":
            n = A0.numel() + B0.numel()
            M = torch.randn(n, n, generator=g)
            blocks.append(DenseBlock((a, b), M @ M.T / n, {a: tuple(A0.shape), b: tuple(B0.shape)}))
        else:
            cls = TriKFACBlock if kind.startswith("tri") else KFACBlock
            blk = cls((a, b), _psd(A0.shape[1], g), _psd(B0.shape[0], g), scalings[a])
            blocks.append(blk.compressed(3, seed=1) if kind.endswith("lowrank") else blk)
    return lalora.Precision(blocks, anchor, metadata={"backend": "test"})


def _dense_factor(block, role):
    t = block.tensors()
    if role in t:
        return t[role].double()
    U, s, d = (t[f"{role}_{k}"].double() for k in "Usd")
    return (U * s) @ U.T + torch.diag(d)


def reference_q(precision, theta1, theta2, form):
    """``q`` (penalty = strength/2 * q) at ``theta2`` for ``precision``'s factors centred at ``theta1``,
    float64, differentiable in ``theta2``."""
    total = torch.zeros((), dtype=torch.float64)
    for blk in precision.blocks:
        if blk.kind == "diag":
            (p,) = blk.params
            total = total + (blk.values.double() * (theta2[p] - theta1[p]).square()).sum()
            continue
        d = torch.cat([(theta2[p] - theta1[p]).reshape(-1) for p in blk.params])
        if blk.kind == "dense":
            total = total + d @ blk.matrix.double() @ d
            continue
        a, b = blk.params
        K = torch.kron(_dense_factor(blk, "G"), _dense_factor(blk, "X"))
        s = blk.scaling
        if form == "effective-weight":
            D = (s * (theta2[b] @ theta2[a] - theta1[b] @ theta1[a])).reshape(-1)
            total = total + D @ K @ D
            continue
        JA, JB = jacobian(lambda A, B: (s * B @ A).reshape(-1), (theta1[a], theta1[b]))
        J = torch.cat([JA.reshape(JA.shape[0], -1), JB.reshape(JB.shape[0], -1)], 1)
        M = J.T @ K @ J
        if not blk.kind.startswith("tri"):  # kfac: no A-B cross terms
            nA = theta1[a].numel()
            M[:nA, nA:] = 0
            M[nA:, :nA] = 0
        total = total + d @ M @ d
    return total


@pytest.fixture(scope="module")
def setting():
    model = tiny_lora_llama(seed=0)  # orthogonal init: A0, B0 both non-zero
    randomize_lora_B(model)
    adapters = find_lora_adapters(model)
    params = lora_parameters(adapters)
    scalings = {ad.a_name: ad.scaling for ad in adapters}
    theta0 = {n: p.detach().float().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(7)
    theta1 = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in theta0.items()}
    theta2 = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in theta1.items()}
    return model, params, scalings, theta0, theta1, theta2


def _set(params, theta):
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta[n])


def _check_around(model, params, P, theta1, theta2, form, ref_fn):
    """Penalty 0 at theta1 (the anchor), value and gradient = reference at theta2."""
    _set(params, theta1)
    reg = LaLoRARegularizer(model, P, STRENGTH, form=form)  # the anchor check passes at theta1
    assert float(reg().detach()) == 0.0
    _set(params, theta2)
    for p in params.values():
        p.grad = None
    penalty = reg()
    penalty.backward()
    t2 = {n: t.double().requires_grad_(True) for n, t in theta2.items()}
    want = 0.5 * STRENGTH * ref_fn({n: t.double() for n, t in theta1.items()}, t2)
    want.backward()
    assert rel(penalty, want) <= TOL
    got_g = torch.cat([params[n].grad.reshape(-1) for n in P.param_names])
    want_g = torch.cat([t2[n].grad.reshape(-1) for n in P.param_names])
    assert rel(got_g, want_g) <= TOL


def _forms(kind):
    return ("linearized", "effective-weight") if kind in KRONECKER else ("linearized",)


@pytest.mark.parametrize("kind", KINDS)
def test_with_anchor_moves_every_form(setting, kind, tmp_path):
    model, params, scalings, theta0, theta1, theta2 = setting
    P = _precision(kind, theta0, scalings)
    moved = P.with_anchor(theta1)
    for form in _forms(kind):
        _check_around(model, params, moved, theta1, theta2, form, lambda t1, t2: reference_q(P, t1, t2, form))
    # save -> load is a pure copy: same tensors bitwise, same penalty
    moved.save(tmp_path / "moved.safetensors")
    _set(params, theta1)
    back = lalora.Precision.load(tmp_path / "moved.safetensors", model)
    for x, y in zip(moved.blocks, back.blocks):
        assert all(torch.equal(x.tensors()[r], y.tensors()[r]) for r in x.tensors())
    for form in _forms(kind):
        _check_around(model, params, back, theta1, theta2, form, lambda t1, t2: reference_q(P, t1, t2, form))
    _set(params, theta0)


@pytest.mark.parametrize("kind", KINDS)
def test_consolidate_is_centred_at_the_new_anchor(setting, kind):
    model, params, scalings, theta0, theta1, theta2 = setting
    old = _precision(kind, theta0, scalings, seed=0)
    task = _precision(kind, theta1, scalings, seed=1)  # fitted at the end of the task
    decay = 0.4
    combined = consolidate(old, task, decay=decay)
    for form in _forms(kind):
        _check_around(model, params, combined, theta1, theta2, form,
                      lambda t1, t2: decay * reference_q(old, t1, t2, form) + reference_q(task, t1, t2, form))
    _set(params, theta0)


def test_blocks_are_centred_at_the_precision_anchor(setting):
    """A precision built from blocks fitted elsewhere re-centres them (what with_anchor relies on); the anchor
    keeps its dtype; blocks that do not depend on the fit point are reused as they are."""
    _, _, scalings, theta0, theta1, _ = setting
    P = _precision("tri-kfac", theta0, scalings).to(dtype=torch.float64)
    moved = P.with_anchor(theta1)
    assert all(t.dtype == torch.float64 for t in moved.anchor.values())
    for blk in moved.blocks:
        a, b = blk.params
        assert blk.A0.dtype == torch.float64
        assert torch.equal(blk.A0, theta1[a].double()) and torch.equal(blk.B0, theta1[b].double())
    direct = lalora.Precision(P.blocks, {n: t.double() for n, t in theta1.items()})
    assert rel_close(direct.to_dense(), moved.to_dense(), F64)  # the same products, computed twice
    D = _precision("diag", theta0, scalings)
    assert all(x is y for x, y in zip(D.with_anchor(theta1).blocks, D.blocks))
    with pytest.raises(KeyError, match="no entry for parameter"):
        P.with_anchor({})
    bad = dict(theta1)
    name = list(bad)[1]
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"with_anchor: parameter '{name}' of the new anchor has non-finite values"):
        P.with_anchor(bad)


# --- AnchorMismatchError: advice for the caller ---------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    model = tiny_lora_llama(seed=0, init=True)  # peft's default init: B0 = 0
    precision = lalora.fit_precision(model, token_batches(1), "diag", progress=False, uncovered="error")
    return precision


def _moved_model(amount, only_a=False):
    model = tiny_lora_llama(seed=0, init=True)
    params = lora_parameters(find_lora_adapters(model))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in params.items():
            if not only_a or ".lora_A" in n:
                p.add_(amount * torch.randn(p.shape, generator=g))
    return model


def _message(fn):
    with pytest.raises(AnchorMismatchError) as info:
        fn()
    return str(info.value)


def test_regularizer_advice_and_trained_weights(fitted):
    msg = _message(lambda: LaLoRARegularizer(_moved_model(0.05), fitted, 1.0))
    assert "reset_to_anchor()" in msg and "check_anchor=False" in msg and "anchor='reset'" not in msg
    # lora_B moved away from theta0's zeros: the weights look trained, a reset erases that
    assert "look trained" in msg and "ERASES" in msg and "fit_precision" in msg
    assert "fitted on adapter(s) ['default']" in msg
    # another initialisation of A only (B still 0): no claim that they look trained, but a reset may erase training
    msg = _message(lambda: LaLoRARegularizer(_moved_model(0.5, only_a=True), fitted, 1.0))
    assert "look trained" not in msg and "erases that training" in msg
    # round-off sized differences: only the reset advice
    msg = _message(lambda: LaLoRARegularizer(_moved_model(1e-7, only_a=True), fitted, 1.0))
    assert "erases" not in msg.lower() and "reset_to_anchor()" in msg


def _trainer_args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)


class MyTrainer(LaLoRATrainerMixin, Trainer):
    """A Trainer subclass as a TRL user would write it (``LaLoRATrainerMixin`` + ``SFTTrainer``)."""


@pytest.mark.parametrize("cls", [LaLoRATrainer, MyTrainer])
def test_trainer_advice_names_trainer_arguments(fitted, tmp_path, cls):
    kw = dict(args=_trainer_args(tmp_path), data_collator=default_data_collator, precision=fitted, strength=1.0)
    msg = _message(lambda: cls(model=_moved_model(0.05), **kw))
    name = cls.__name__
    assert f"{name}(..., anchor='reset')" in msg and f"{name}(..., anchor='ignore')" in msg
    assert "reset_to_anchor" not in msg and "check_anchor" not in msg
    assert "ERASES" in msg


def test_two_adapters_name_the_fitted_one(tmp_path):
    from peft import LoraConfig

    model = tiny_lora_llama(seed=0, adapter_name="first")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
    model.add_adapter("second", cfg)
    precision = lalora.fit_precision(model, token_batches(1), "diag", progress=False, adapter_name="first")
    model.set_adapter("second")  # "second" is active and trainable, "first" frozen
    msg = _message(lambda: LaLoRARegularizer(model, precision, 1.0, adapter_name="second"))
    assert "fitted on adapter(s) ['first']" in msg and "['second']" in msg
    assert "adapter_name='first'" in msg and "model.set_adapter('first')" in msg
    kw = dict(args=_trainer_args(tmp_path), data_collator=default_data_collator, precision=precision, strength=1.0,
              adapter_name="second")
    msg = _message(lambda: LaLoRATrainer(model=model, **kw))
    assert "LaLoRATrainer(..., adapter_name='first')" in msg and "LaLoRATrainer(..., anchor='reset')" in msg
