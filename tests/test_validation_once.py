"""A precision's blocks are validated once, where the data enters (a backend's output in ``fit_precision``, a
user's ``Precision(...)``, ``Precision.load``), and never again for precisions derived from a valid one: a
restriction to what a model has (``strict=False``) or the regularizer's own copies."""
from __future__ import annotations

import pytest
import torch

import lalora
from lalora.blocks import Block, DenseBlock, DiagBlock
from lalora.validation import match_to_model
from models import lora_mlp, randomize_lora_B


@pytest.fixture
def validations(monkeypatch):
    """The number of ``Block.validate`` calls (every kind's ``validate`` calls the base's first)."""
    calls = []
    base = Block.validate

    def counted(self, shapes):
        calls.append(self.kind)
        return base(self, shapes)

    monkeypatch.setattr(Block, "validate", counted)
    return calls


def _overlapping_precision(model) -> lalora.Precision:
    """A diag block on every LoRA matrix plus a dense block over fc1's B and fc2's A (overlapping both)."""
    adapters = {a.module_path.rsplit(".", 1)[-1]: a for a in lalora.find_lora_adapters(model)}
    anchor = {}
    for a in adapters.values():
        anchor[a.a_name], anchor[a.b_name] = a.A.detach().clone(), a.B.detach().clone()
    g = torch.Generator().manual_seed(0)
    blocks = [DiagBlock(n, torch.rand(t.shape, generator=g)) for n, t in anchor.items()]
    pair = (adapters["fc1"].b_name, adapters["fc2"].a_name)
    k = sum(anchor[p].numel() for p in pair)
    M = torch.randn(k, k, generator=g)
    blocks.append(DenseBlock(pair, M @ M.T / k, {p: anchor[p].shape for p in pair}))
    return lalora.Precision(blocks, anchor, metadata={"backend": "test", "num_examples": 3})


def test_each_block_is_validated_once_per_entry(tmp_path, validations):
    model = lora_mlp()
    randomize_lora_B(model)
    P = _overlapping_precision(model)
    assert len(validations) == len(P.blocks) == 5  # built by the user: once
    P.save(tmp_path / "p.lalora")
    validations.clear()
    Q = lalora.Precision.load(tmp_path / "p.lalora")
    assert len(validations) == len(Q.blocks)  # read from a file: once (not by the reader and again by Precision)
    validations.clear()
    reg = lalora.LaLoRARegularizer(model, Q, strength=1.0)
    assert validations == []  # the regularizer's copies (device, dtype, stacked groups) are derived
    with torch.no_grad():
        assert float(reg()) == 0.0  # at the anchor
    (Q * 2.0).with_anchor(Q.anchor).to(dtype=torch.float64)
    assert validations == []


def test_restriction_to_a_model_is_consistent_and_not_validated_again(validations):
    """The model has LoRA on fc2 only: fc1's matrices go, the dense block touching fc1's B goes, and with it fc2's A
    (its curvature would be incomplete), which drops fc2's A's diag block too; what is left is fc2's B alone."""
    P = _overlapping_precision(lora_mlp())
    other = lora_mlp(targets=("fc2",))
    (fc2,) = lalora.find_lora_adapters(other)
    validations.clear()
    with pytest.warns(UserWarning, match="applied partially"):
        R = match_to_model(P, other, strict=False)
    assert validations == []
    assert R.param_names == [fc2.b_name] and [b.params for b in R.blocks] == [(fc2.b_name,)]
    assert R.metadata["unconstrained_params"] == [fc2.a_name]
    assert sorted(R.metadata["skipped_params"]) == sorted(n for n in P.param_names if n != fc2.b_name)
    R.blocks[0].validate(R.shapes)  # what is left is a valid precision
    assert R.blocks[0] is P.blocks[P.param_names.index(fc2.b_name)]  # the block itself, unchanged
