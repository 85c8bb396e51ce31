"""How the ``kfac`` backend accumulates its factors (backends/kfac_factors.py ``FactorHooks``).

The Gram products go in place into float32 window sums, which are added into the float64
running sums every ``FLUSH_EVERY`` batches; adapters reading the same input tensor share one
window sum of ``X`` (one product). These tests check the sums against float64 references
computed directly from the inputs (tolerance ``TOL``: float32 accumulation vs float64) when the
sharing changes between batches, when windows are flushed, and when bad batches are skipped.
"""
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora
import lalora.backends.kfac as kfac_backend
import lalora.backends.kfac_factors as kfac_factors
from models import lora_mlp, randomize_lora_B
from test_robustness import _mlp_batches, _poison_grad_loss
from numerics import F32, rel_close

TOL = 1e-5


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class _Shared(nn.Module):
    """a, b, c read the same input tensor except in batches of 3 rows (a gets a copy: the group's
    leader leaves) and 5 rows (b gets a copy); e is called twice on one tensor."""

    def __init__(self, d=6):
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Linear(d, 3) for _ in range(4))

    def forward(self, x):
        n = x.shape[0]
        xa = x.clone() if n == 3 else x
        xb = x.clone() if n == 5 else x
        h = torch.tanh(x)
        return self.a(xa) + self.b(xb) + self.c(x) + self.e(h) + self.e(h)


def _shared_model():
    torch.manual_seed(0)
    model = get_peft_model(_Shared(), LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c", "e"],
                                                 init_lora_weights="orthogonal"))
    randomize_lora_B(model)
    return model


def _fit(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, "kfac", progress=False, **kw)


def _x_factors(precision):
    return {b.params[0].split(".lora_A")[0].split(".")[-1]: b.X.dense() for b in precision.blocks}


@pytest.mark.parametrize("flush_every", [2, 16])
def test_input_factors_when_the_sharing_changes_between_batches(monkeypatch, flush_every):
    """Sizes 4 4 3 4 5 5 4 4: a shared group forms, its leader leaves, a member leaves, singletons share
    again; with flushes every 2 batches and with one window. X of a, b, c is sum x^T x / N, of e
    sum tanh(x)^T tanh(x) / N (two calls: twice the products over twice the tokens)."""
    monkeypatch.setattr(kfac_backend, "FLUSH_EVERY", flush_every)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)) for n in (4, 4, 3, 4, 5, 5, 4, 4)]
    X = _x_factors(_fit(_shared_model(), data, loss="mse", options={"curvature": "ef"}))
    xs = torch.cat([x for x, _ in data]).double()
    ref = xs.T @ xs / len(xs)
    h = torch.tanh(xs)
    for name in "abc":
        assert rel(X[name], ref) <= TOL, name
    assert rel(X["e"], h.T @ h / len(h)) <= TOL


def test_shared_input_product_is_computed_once(monkeypatch):
    """With a, b, c sharing their input in every batch, each batch computes two input products (x for
    a, b, c; tanh(x) for e, called twice) and one gradient product per adapter and call."""
    calls = []
    real = kfac_factors.add_gram

    def counting(acc, z, alpha=1.0, **kw):
        calls.append(z.shape[1])
        return real(acc, z, alpha, **kw)

    monkeypatch.setattr(kfac_factors, "add_gram", counting)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)]
    _fit(_shared_model(), data, loss="mse", options={"curvature": "ef"})
    assert calls.count(6) == 2 * 3  # input products (d_in = 6)
    assert calls.count(3) == 5 * 3  # gradient products (d_out = 3): a, b, c, e twice


def test_skip_nonfinite_drops_exactly_the_bad_batches():
    """A NaN loss (batch 1) and a NaN gradient with a finite loss (batch 3) are skipped: the factors equal
    a skip-mode fit on the clean batches bitwise (one-batch windows in both) and the default fit on
    them to float32 rounding (1e-6; its window holds all batches)."""
    model = lora_mlp()
    randomize_lora_B(model)
    batches = _mlp_batches(5)
    batches[1][1][0, 2] = float("inf")
    batches[3][0][0, 0] = 123.0
    kw = dict(loss=_poison_grad_loss, options={"curvature": "ef"})
    P = _fit(model, batches, skip_nonfinite=True, **kw)
    clean = [b for i, b in enumerate(batches) if i not in (1, 3)]
    Q = _fit(model, clean, skip_nonfinite=True, **kw)
    R = _fit(model, clean, **kw)
    assert P.metadata["skipped_nonfinite_batches"] == [1, 3]
    for bp, bq, br in zip(P.blocks, Q.blocks, R.blocks):
        for k in ("X", "G"):
            assert rel_close(bp.tensors()[k], bq.tensors()[k], F32), k  # separate fits: round-off only
            assert rel(bp.tensors()[k], br.tensors()[k]) <= 1e-6, k
    with pytest.raises(lalora.DataError, match=r"source batch 1 gives a non-finite gradient \(in the factors of 'fc"):
        _fit(model, batches[2:], **kw)  # without skip_nonfinite: an error naming the batch (index 1 here)
